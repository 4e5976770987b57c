"""Read-speed cost of the crc32c codec on every store chunk: decode all chunks of two arrays holding the same
features (ViT-L-14 shape: 30 views x 768, float16, chunks of 64 images, zstd level 3), one with and one
without crc32c, and print the ratio. Also the crops shape (224 x 224 x 3 uint8).

    python benchmarks/chunk_checksum.py [--chunks 24] [--repeats 7]
"""

import argparse
import tempfile
import time

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec


def read_once(array: zarr.Array, chunks: int) -> float:
    size = array.chunks[0]
    started = time.perf_counter()
    for index in range(chunks):
        array[index * size : (index + 1) * size]
    return time.perf_counter() - started


def compare(root: str, name: str, values: np.ndarray, chunk_shape: tuple, chunks: int, repeats: int) -> None:
    """Best of `repeats` full reads of each array, the two arrays read in turn (so load on a shared machine
    falls on both alike)."""
    arrays = {}
    for label, compressors in (("zstd", [ZstdCodec(level=3)]), ("zstd+crc32c", [ZstdCodec(level=3), Crc32cCodec()])):
        arrays[label] = zarr.create_array(f"{root}/{name}-{label}", shape=values.shape, chunks=chunk_shape,
                                          dtype=values.dtype, compressors=compressors, fill_value=0)
        arrays[label][:] = values
    seconds = {label: float("inf") for label in arrays}
    for _ in range(repeats):
        for label, array in arrays.items():
            seconds[label] = min(seconds[label], read_once(array, chunks))
    mib = values.nbytes / 2**20
    plain, checked = seconds["zstd"], seconds["zstd+crc32c"]
    print(f"{name:9s} {mib:7.1f} MiB decoded: zstd {mib / plain:7.1f} MiB/s, zstd+crc32c {mib / checked:7.1f} MiB/s, "
          f"read time ratio checked/plain {checked / plain:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = 64 * args.chunks
    features = (rng.standard_normal((rows, 30, 768)) * 0.05).astype(np.float16)  # like projected CLIP features
    smooth = rng.integers(0, 255, (rows, 28, 28, 3), dtype=np.uint8).repeat(8, axis=1).repeat(8, axis=2)
    with tempfile.TemporaryDirectory() as root:
        compare(root, "features", features, (64, 30, 768), args.chunks, args.repeats)
        compare(root, "crops", smooth, (64, 224, 224, 3), args.chunks, args.repeats)


if __name__ == "__main__":
    main()
