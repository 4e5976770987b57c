"""`zs-cache build --dry-run`: what a build would do and the disk it needs, before any teacher runs.

Sizes are computed, not measured: features are N x V x D float16 (zstd gains little on them: the stored
size is about this); crops N x S x S x 3 uint8 before compression (zstd keeps about 80% of photo crops, measured on the
fixture photos).
"""

import math

import open_clip

from zeroseg.io import human_size
from zeroseg.pipeline.build import check_compatible, open_build_source, wants_crops
from zeroseg.pipeline.options import DEFAULT_SHARD_SIZE, BuildOptions
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.teacher import resolve_identity


def dry_run(opts: BuildOptions) -> list[str]:
    """Lines saying how many images a build would cache and the size of what it would store."""
    source, name, keys = open_build_source(opts)
    identity = resolve_identity(opts.teacher, opts.pretrained, opts.quick_gelu)
    store = FeatureStore.open(opts.store) if FeatureStore.exists(opts.store) else None
    cached = 0
    if store is not None:
        check_compatible(store.meta, identity, opts)
        done = store.manifest(columns=["source"]).column("source").to_pylist()
        cached = done.count(name)
    pending = max(len(keys) - cached, 0)
    shard_size = store.meta.shard_size if store is not None else opts.shard_size or DEFAULT_SHARD_SIZE
    embed_dim = int(open_clip.get_model_config(identity.model)["embed_dim"])
    views = sum(grid * grid for grid in opts.grids)
    features = pending * views * embed_dim * 2
    lines = [
        f"dry run: {len(keys):,} images in {source.spec.path}, {cached:,} already in the store, {pending:,} to cache "
        f"in {math.ceil(pending / shard_size):,} shards of {shard_size}",
        f"features {pending:,} x {views} views x {embed_dim} float16 = {human_size(features)}",
    ]
    if wants_crops(store, source, opts):
        crops = pending * opts.image_size**2 * 3
        lines.append(f"crops    {pending:,} x {opts.image_size}x{opts.image_size}x3 uint8 = {human_size(crops)} "
                     f"before zstd (about {human_size(int(crops * 0.8))} stored)")
    lines.append("nothing was computed or written; run again without --dry-run to build")
    return lines
