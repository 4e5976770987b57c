"""What one `zs-cache build` or `zs-cache compact` is asked to do: the options and their defaults (the CLI takes its
defaults from here), checked when they are made (`__post_init__`), before anything is read."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from zeroseg.errors import require
from zeroseg.pipeline.images import DECODES

DEFAULT_SHARD_SIZE = 1024
DEFAULT_CHUNK_SIZE = 64
DEFAULT_DECODE_THREADS = min(8, os.cpu_count() or 1)
DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; refused from the header, before decoding (decompression bombs)
DEFAULT_MAX_FILE_MB = 256
DEFAULT_ROWS_PER_PART = 131_072  # ImageNet-1k: 10 parts; CC12M: 92


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
    outside_paths: bool = False  # a list file may name absolute paths and paths through '..'
    compile: bool = True  # torch.compile the teacher on CUDA (Teacher ignores it on CPU)
    progress: bool = True
    store_crops: bool = False  # keep the crops in the store (implied for tar sources and stores that have them)
    scheduler: str | None = None  # address of a running Dask scheduler to build on
    scheduler_file: str | None = None  # or the JSON file such a scheduler writes (dask scheduler --scheduler-file)
    workers: int = 0  # > 0: build on a local Dask cluster of this many worker processes
    repair: bool = False  # first redo the shards that zs-cache verify finds damaged
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are error rows, told from their header
    max_file_mb: float = DEFAULT_MAX_FILE_MB  # larger files are error rows, never read whole
    decode: str | None = None  # pipeline.images.DECODES; None: the store's, or "full" for a new store

    def __post_init__(self) -> None:
        grids = self.grids
        require(grids and min(grids) >= 1 and len(set(grids)) == len(grids),
                f"--grids must be distinct positive integers, got {grids}")
        for name in ("batch_size", "chunk_size", "image_size", "decode_threads", "max_pixels"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be positive")
        require(max(grids) <= self.image_size,
                f"--grids {max(grids)} splits a {self.image_size}px crop into cells smaller than a pixel: "
                "use grids of at most --image-size")
        require(self.decode is None or self.decode in DECODES,
                f"--decode must be one of {', '.join(DECODES)}, got '{self.decode}'")
        require(self.max_file_mb > 0, "--max-file-mb must be positive")
        require(self.shard_size is None or (self.shard_size >= 1 and self.shard_size % self.chunk_size == 0),
                f"--shard-size must be a positive multiple of the chunk size {self.chunk_size}")
        require(0 <= self.max_error_fraction <= 1, "--max-error-fraction must be between 0 and 1")
        require(self.workers >= 0,
                "--workers must be 0 (build in this process) or a positive number of Dask workers")
        require(not (self.scheduler and self.workers),
                "--scheduler and --workers exclude each other: build on a running cluster or start a local one")
        require(not (self.scheduler_file and (self.scheduler or self.workers)),
                "--scheduler-file names the cluster to build on: give it without --scheduler or --workers")
        require(not self.workers or self.device in ("auto", "cpu"),
                f"--device {self.device} picks one device; with --workers each worker takes its own GPU: "
                "use --device auto (or cpu)")


@dataclass(frozen=True)
class CompactOptions:
    store: str | Path
    rows_per_part: int = DEFAULT_ROWS_PER_PART  # parts of fewer rows are merged into parts of at most this many

    def __post_init__(self) -> None:
        require(self.rows_per_part >= 1, f"--rows-per-part must be a positive number of rows, got {self.rows_per_part}")
