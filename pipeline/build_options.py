"""What one `zs-cache build` is asked to do: the options and their defaults (the CLI takes its defaults from
here), checked before anything is read."""

import os
from dataclasses import dataclass, field

from zeroseg.pipeline.errors import UserError

DEFAULT_SHARD_SIZE = 1024
DEFAULT_CHUNK_SIZE = 64
DEFAULT_DECODE_THREADS = min(8, os.cpu_count() or 1)


@dataclass
class BuildOptions:
    source: str
    store: str
    grids: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    teacher: str = "ViT-L-14"
    pretrained: str | None = None  # None: the 'openai' tag, or the weights an hf-hub:/local-dir: teacher brings
    quick_gelu: bool | None = None
    batch_size: int = 64
    device: str = "auto"
    shard_size: int | None = None  # None: the store's, or DEFAULT_SHARD_SIZE for a new store
    chunk_size: int = DEFAULT_CHUNK_SIZE
    image_size: int = 224
    max_error_fraction: float = 0.01
    decode_threads: int = DEFAULT_DECODE_THREADS
    source_name: str | None = None
    column: str | None = None
    compile: bool = True  # torch.compile the teacher on CUDA (Teacher ignores it on CPU)
    progress: bool = True
    store_crops: bool = False  # keep the crops in the store (implied for tar sources and stores that have them)
    scheduler: str | None = None  # address of a running Dask scheduler to build on
    scheduler_file: str | None = None  # or the JSON file such a scheduler writes (dask scheduler --scheduler-file)
    workers: int = 0  # > 0: build on a local Dask cluster of this many worker processes


def validate(opts: BuildOptions) -> None:
    if not opts.grids or any(g < 1 for g in opts.grids) or len(set(opts.grids)) != len(opts.grids):
        raise UserError(f"--grids must be distinct positive integers, got {opts.grids}")
    for name in ("batch_size", "chunk_size", "image_size", "decode_threads"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if opts.shard_size is not None and (opts.shard_size < 1 or opts.shard_size % opts.chunk_size):
        raise UserError(f"--shard-size must be a positive multiple of the chunk size {opts.chunk_size}")
    if not 0 <= opts.max_error_fraction <= 1:
        raise UserError("--max-error-fraction must be between 0 and 1")
    if opts.workers < 0:
        raise UserError("--workers must be 0 (build in this process) or a positive number of Dask workers")
    if opts.scheduler and opts.workers:
        raise UserError("--scheduler and --workers exclude each other: build on a running cluster or start a local one")
    if opts.scheduler_file and (opts.scheduler or opts.workers):
        raise UserError("--scheduler-file names the cluster to build on: give it without --scheduler or --workers")
