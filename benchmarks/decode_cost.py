"""CPU cost of turning image bytes into a centre crop: `--decode full`, `reduced` and `device`, in one run.

Three sets of JPEGs: the generated sample photos at their own size (~500 x 375 to 640 x 480), and the same photos
upscaled (bicubic) and re-encoded at quality 90 to a long side of 1,600 px (~1600 x 1200) and 3,000 px
(~3000 x 2000), the sizes of CC12M and phone photos. For each set, pipeline.crops.crop_from_bytes at --crop-size:

  full       decode the whole image, then centre-crop and resize (what stores without `decode` do)
  reduced    libjpeg scales down by 2, 4 or 8 while decoding (short side kept >= the crop), then the same crop
  loader     `--decode device`, the CPU side of a trainer's loader worker: the file read (from the page cache),
             sha256 of the bytes, the header parsed (pipeline.device_decode.parse_image) and packed into an
             EncodedBatch; the decode and crop run on the training device. full / loader: the CPU cut per image.
  device/cpu `--decode device` decode and crop run on the CPU (decode_jpeg + torch resize), for honesty: what a
             CPU-only stage pays for it

Each side runs --rounds times for --seconds, interleaved, in this one thread (Pillow decodes on one core),
and the best round counts: images per CPU-second = per core. Also printed, per set: the mean and largest
absolute difference (0..255) of the reduced and device crops from the full ones; for comparison only (no store
can use it), decode alone: Pillow full, Pillow reduced and torchvision.io.decode_jpeg on the CPU; and the
device decode + crop on --device in batches of --batch-size (images/s of wall time: on CUDA, nvjpeg's).

    OMP_NUM_THREADS=1 python benchmarks/decode_cost.py               # crops of 224 px
    python benchmarks/decode_cost.py --device cuda --batch-size 256  # also nvjpeg's throughput
"""

import argparse
import hashlib
import io
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from zeroseg.evaluation.samples import sample_photos
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.device_decode import EncodedBatch, decode_crops, parse_image
from zeroseg.pipeline.images import decode_image, decode_reduced

LONG_SIDES = (None, 1600, 3000)  # None: the photos as they are


def photo_set(photos: list[Path], long_side: int | None) -> list[bytes]:
    if long_side is None:
        return [p.read_bytes() for p in photos]
    encoded = []
    for path in photos:
        image = Image.open(path).convert("RGB")
        factor = long_side / max(image.size)
        size = (round(image.width * factor), round(image.height * factor))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def per_core(work: Callable[[bytes], object], images: list[bytes], seconds: float) -> float:
    """Images per CPU-second of `work` over `images`, repeated for about `seconds` of CPU time."""
    done, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        for data in images:
            work(data)
        done += len(images)
    return done / (time.process_time() - started)


def best_rates(sides: dict[str, Callable[[bytes], object]], images: list[bytes], rounds: int, seconds: float) -> dict:
    """The best of `rounds` interleaved rounds of each side (a shared machine slows some rounds down)."""
    rates = {name: 0.0 for name in sides}
    for _ in range(rounds):
        for name, work in sides.items():
            rates[name] = max(rates[name], per_core(work, images, seconds))
    return rates


def loader_side(data: bytes) -> EncodedBatch:
    """What a loader worker does per image of a device-decode store once the bytes are read (`read_side`)."""
    hashlib.sha256(data).digest()
    return EncodedBatch.of([parse_image(data)])


def read_side(images: list[bytes], folder: Path) -> Callable[[bytes], EncodedBatch]:
    """loader_side of each image's bytes read back from a file in `folder` (the page cache, as a warm loader)."""
    paths = {}
    for index, data in enumerate(images):
        paths[id(data)] = folder / f"{index}.jpg"
        paths[id(data)].write_bytes(data)
    return lambda data: loader_side(paths[id(data)].read_bytes())


def device_crop(data: bytes, size: int, device: torch.device) -> np.ndarray:
    crops, errors = decode_crops(loader_side(data), size, device)
    assert errors == [None], errors
    return crops[0].cpu().numpy()


def device_rate(
    images: list[bytes], size: int, device: torch.device, batch: int, seconds: float
) -> tuple[float, float]:
    """Images/s (wall time) of decode_crops on `device` over batches of `batch` images (the set repeated), and the
    CPU time per image it costs this process (on CUDA: nvjpeg's host side, e.g. Huffman decoding, and launches)."""
    encoded = EncodedBatch.of([parse_image(images[i % len(images)]) for i in range(batch)])
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    decode_crops(encoded, size, device)  # warm-up: decoder handles, kernels
    synchronize()
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        decode_crops(encoded, size, device)
        synchronize()
        done += batch
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per side and round")
    parser.add_argument("--device", default="cpu", help="where the device decode's throughput is measured")
    parser.add_argument("--batch-size", type=int, default=64, help="images per device decode batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)

    photos = sample_photos(tempfile.mkdtemp(prefix="zeroseg-samples-"))
    size = args.crop_size
    crops = {
        "full": lambda data: crop_from_bytes(data, size),
        "reduced": lambda data: crop_from_bytes(data, size, decode="reduced"),
        "device/cpu": lambda data: device_crop(data, size, torch.device("cpu")),
    }
    decodes = {
        "Pillow full": decode_image,
        "Pillow reduced": lambda data: decode_reduced(data, size),
        "torchvision": lambda data: decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                ImageReadMode.RGB),
    }
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities", DeprecationWarning)
    print(f"{len(photos)} photos, {size}px crops, best of {args.rounds} rounds of {args.seconds:g} CPU-s, one thread")
    with tempfile.TemporaryDirectory(prefix="decode-cost-") as folder:
        for long_side in LONG_SIDES:
            images = photo_set(photos, long_side)
            shapes = [Image.open(io.BytesIO(data)).size for data in images]
            label = "as they are" if long_side is None else f"long side {long_side}"
            print(f"== {label}: {shapes[0][0]}x{shapes[0][1]} .. {shapes[-1][0]}x{shapes[-1][1]}")
            rates = best_rates({**crops, "loader": read_side(images, Path(folder))}, images, args.rounds, args.seconds)
            report_crops(images, size, rates)
            rate, cpu = device_rate(images, size, device, args.batch_size, args.seconds)
            print(f"   device decode+crop on {device.type}, batches of {args.batch_size}: {rate:.1f} images/s, "
                  f"{1000 * cpu:.2f} ms CPU per image in the calling process")
            decode_rates = best_rates(decodes, images, args.rounds, args.seconds / 2)
            print("   decode only: " + ", ".join(f"{name} {rate:.1f}" for name, rate in decode_rates.items())
                  + " images/s/core")  # fmt: skip


def report_crops(images: list[bytes], size: int, rates: dict[str, float]) -> None:
    """Print the per-core rates of one set, their ratios, and how far the other decodes' crops are from full's."""
    labels = {"full": "full decode + crop", "reduced": "reduced decode + crop", "loader": "device: loader side",
              "device/cpu": "device: decode + crop on cpu"}  # fmt: skip
    for name, label in labels.items():
        print(f"   {label:<29} {rates[name]:8.1f} images/s/core")
    print(f"   ratio reduced/full: {rates['reduced'] / rates['full']:.2f}x")
    print(f"   ratio full / loader side of --decode device: {rates['loader'] / rates['full']:.2f}x less CPU per image "
          f"(device decode + crop on the CPU: {rates['device/cpu'] / rates['full']:.2f}x)")
    full = [crop_from_bytes(data, size)[0].astype(np.int16) for data in images]
    for name, crop in (("reduced", lambda data: crop_from_bytes(data, size, decode="reduced")[0]),
                       ("device/cpu", lambda data: device_crop(data, size, torch.device("cpu")))):  # fmt: skip
        diffs = np.concatenate([np.abs(f - crop(data)).ravel() for f, data in zip(full, images)])
        print(f"   {name} - full pixels: mean abs {diffs.mean():.2f}, max abs {diffs.max()} (0..255)")

if __name__ == "__main__":
    main()
