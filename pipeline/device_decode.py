"""The store decode "device": JPEGs decoded by torchvision's decode_jpeg on the stage's compute device (nvjpeg on
CUDA, libjpeg-turbo on the CPU) and centre-cropped there with torch, so that the CPU of a loader only reads bytes.

Both stages run the same two steps, so the trainer sees exactly the teacher's pixels on the same device type:
- `parse_image` (CPU: build decode threads, trainer loader workers): the header, read without decoding (size,
  mode, EXIF orientation, --max-pixels); images decode_jpeg cannot take (not JPEG, CMYK/YCCK JPEG, 16-bit,
  palette, ...) are decoded here by Pillow exactly as the full decode does (pipeline.images.decode_image).
- `decode_crops` (the device: the teacher's in stage one, the training device in stage two): one batched
  decode_jpeg of the JPEGs (one by one when the batch fails; a JPEG the decoder rejects is decoded by Pillow, and
  is that image's error when Pillow rejects it too), the EXIF orientation applied with flips and transposes
  (exact on any device), the centre square (pipeline.crops.centre_box) resized to S x S by torch's antialiased
  bicubic in float32, rounded and clamped to uint8. The pixels differ from Pillow's (another resize; nvjpeg
  another IDCT), so a store records the device type that decoded it (`decode_device`) and only that device type
  may train on it or add to it.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from zeroseg.errors import UserError
from zeroseg.pipeline.crops import centre_box
from zeroseg.pipeline.images import REVERSED_AXES, ImageDecodeError, decode_image, read_header

DECODERS = {"cuda": "nvjpeg", "cpu": "libjpeg-turbo"}  # what decode_jpeg runs on each device type
DECODE_GROUP = 64  # JPEGs per batched decode_jpeg call
_DEVICE_JPEG_MODES = ("RGB", "L")  # Pillow's modes of the 8-bit YCbCr/RGB and greyscale JPEGs decode_jpeg takes
# torchvision 0.29 deprecates its decoders in favour of TorchCodec (not installable here): the one warning hushed
_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"


@dataclass(frozen=True)
class ParsedImage:
    """The CPU side of one image: its JPEG bytes for decode_jpeg, or Pillow's pixels of an image it cannot take."""

    size: tuple[int, int]  # (width, height), EXIF orientation applied
    data: bytes = b""  # the JPEG, when `pixels` is None
    orientation: int = 1  # EXIF orientation to apply after decode_jpeg (1 with pixels: Pillow applied it)
    pixels: np.ndarray | None = None  # (H, W, 3) uint8 RGB of pipeline.images.decode_image


def parse_image(data: bytes, max_pixels: int | None = None) -> ParsedImage:
    """The CPU part of a device decode of image bytes; ImageDecodeError as decode_image gives it for bytes that are
    no image or images of more than max_pixels pixels (told from the header)."""
    header = read_header(data, max_pixels)
    if header.format == "JPEG" and header.mode in _DEVICE_JPEG_MODES:
        return ParsedImage(header.oriented_size, data, header.orientation)
    image = decode_image(data, max_pixels)
    return ParsedImage(image.size, pixels=np.array(image, dtype=np.uint8))


@dataclass
class EncodedBatch:
    """B parsed images as a loader worker hands them over: all JPEG bytes in one tensor (cheap to send between
    processes and to pin), plus Pillow's pixels of the other images."""

    data: torch.Tensor  # (total bytes,) uint8: image i's JPEG is data[offsets[i]:offsets[i + 1]] (empty: pixels)
    offsets: torch.Tensor  # (B + 1,) int64
    orientation: torch.Tensor  # (B,) int64 EXIF orientation to apply after decode_jpeg
    pixels: list[torch.Tensor | None]  # per image (H, W, 3) uint8 of Pillow's decode, or None (a JPEG)

    @classmethod
    def of(cls, images: Sequence[ParsedImage]) -> "EncodedBatch":
        lengths = [len(image.data) for image in images]
        joined = bytearray(b"".join(image.data for image in images))
        return cls(
            torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8),
            torch.tensor(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), dtype=torch.int64),
            torch.tensor([image.orientation for image in images], dtype=torch.int64),
            [None if image.pixels is None else torch.from_numpy(image.pixels) for image in images],
        )

    def __len__(self) -> int:
        return len(self.pixels)

    def pin_memory(self) -> "EncodedBatch":
        """Pinned copies (DataLoader's pin_memory calls this), so that the pixels go to the GPU asynchronously."""
        pixels = [None if p is None else p.pin_memory() for p in self.pixels]
        return EncodedBatch(self.data.pin_memory(), self.offsets, self.orientation, pixels)


def decode_crops(batch: EncodedBatch, size: int, device: torch.device) -> tuple[torch.Tensor, list[str | None]]:
    """(B, size, size, 3) uint8 centre crops on `device`, and per image None or the reason it does not decode (its
    crop is left zero: a build makes it an error row). The JPEGs are decoded DECODE_GROUP at a time, so that at
    most that many whole images are on the device at once (3000 x 2000 photos: 18 MB each); one the device's
    decoder rejects is decoded by Pillow (the same rule in both stages, so the same pixels). The centre squares
    of one side length are resized together (`resize_squares`)."""
    crops = torch.zeros(len(batch), size, size, 3, dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(batch)
    pillow = [(i, _pillow_square(pixels, device)) for i, pixels in enumerate(batch.pixels) if pixels is not None]
    resize_squares(crops, pillow, size)
    offsets, orientation = batch.offsets.tolist(), batch.orientation.tolist()
    jpegs = [i for i in range(len(batch)) if offsets[i + 1] > offsets[i]]
    for start in range(0, len(jpegs), DECODE_GROUP):
        group = jpegs[start : start + DECODE_GROUP]
        encoded = [batch.data[offsets[i] : offsets[i + 1]] for i in group]
        squares = []
        for i, data, image in zip(group, encoded, _decode_jpegs(encoded, device)):
            if image is not None:
                squares.append((i, centre_square(orient(image, orientation[i]))))
                continue
            try:  # a JPEG the device's decoder rejects (nvjpeg takes fewer than libjpeg): Pillow, as parse_image does
                pixels = np.array(decode_image(data.numpy().tobytes()), dtype=np.uint8)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
            else:
                squares.append((i, _pillow_square(torch.from_numpy(pixels), device)))
        resize_squares(crops, squares, size)
    return crops, errors


def _pillow_square(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 RGB of Pillow's decode -> its (3, h, h) centre square, on `device`."""
    return centre_square(pixels.to(device, non_blocking=True).permute(2, 0, 1))


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """decode_jpeg's (3, H, W) uint8 of each JPEG, in one batched call; when that fails, one by one: the images it
    rejects are None."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            pass
        images: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                images.append(None)
        return images


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) stored pixels -> the displayed image of EXIF orientation 1..8, as Pillow's exif_transpose gives it:
    transposed for 5..8, then each axis that runs against the stored one reversed."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(1, 2)
    reversed_x, reversed_y = REVERSED_AXES.get(orientation, (False, False))
    dims = [axis for axis, flip in ((1, reversed_y), (2, reversed_x)) if flip]
    return image.flip(dims) if dims else image


def centre_square(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> the (3, h, h) centre square of pipeline.crops.centre_box (a view)."""
    left, top, right, bottom = centre_box(image.shape[2], image.shape[1])
    return image[:, top:bottom, left:right]


def centre_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8: the centre square resized as `resize_squares` does."""
    crops = torch.empty(1, size, size, 3, dtype=torch.uint8, device=image.device)
    resize_squares(crops, [(0, centre_square(image))], size)
    return crops[0].permute(2, 0, 1)


def resize_squares(crops: torch.Tensor, squares: list[tuple[int, torch.Tensor]], size: int) -> None:
    """crops[i] (size, size, 3) = square i (3, h, h) uint8 resized with antialiased bicubic in float32, rounded and
    clamped to 0..255 (or as it is when h == size); one interpolate call per side length h (each image is resized
    on its own inside it: the same pixels as one call per image)."""
    by_side: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for index, square in squares:
        by_side.setdefault(square.shape[1], []).append((index, square))
    for side, members in by_side.items():
        stacked = torch.stack([square for _, square in members])  # (n, 3, h, h)
        if side != size:
            stacked = F.interpolate(stacked.float(), size=(size, size), mode="bicubic", antialias=True)
            stacked = stacked.round().clamp(0, 255).to(torch.uint8)
        crops[[index for index, _ in members]] = stacked.permute(0, 2, 3, 1)


def check_decode_device(recorded: str | None, device_type: str, store: str, doing: str) -> None:
    """A device-decode store (`recorded`: the device type that decoded its crops) is refused by a stage on another
    device type, whose decoder gives other pixels than the teacher saw. doing: e.g. 'this run trains on'."""
    if recorded is not None and device_type != recorded:
        raise UserError(
            f"store '{store}''s crops were decoded by {DECODERS.get(recorded, recorded)} on {recorded}; {doing} "
            f"{device_type}, whose decoder gives other pixels: run it on {recorded}, or use a new store"
        )
