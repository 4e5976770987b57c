"""The store decode "device": decode_jpeg and a torch crop on the compute device, the same pixels in both stages."""

import dataclasses
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import decode_jpeg

from tests.conftest import PHOTOS, TINY_TEACHER, invoke, make_store, train
from zeroseg.errors import UserError
from zeroseg.pipeline import device_decode
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.crops import centre_box
from zeroseg.pipeline.device_decode import DECODE_GROUP, EncodedBatch, centre_resize, decode_crops, parse_image
from zeroseg.pipeline.images import ImageDecodeError, decode_image
from zeroseg.pipeline.manifest import image_records
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_reader import StoreReader
from zeroseg.trainer.data import Batch, DeviceBatches, StoreBatches, make_loader
from zeroseg.trainer.sampling import BatchPlan

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def oriented_jpeg(orientation: int) -> bytes:
    """A 60 x 40 photo crop stored with EXIF orientation `orientation`."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    photo = Image.open(PHOTOS[0]).convert("RGB").crop((100, 50, 160, 90))
    return encode(photo, "JPEG", exif=exif.tobytes(), quality=95)


def odd_images() -> dict[str, bytes]:
    """Images decode_jpeg cannot take, JPEGs it takes (greyscale, rotated, progressive), and a truncated JPEG."""
    photo = Image.open(PHOTOS[1]).convert("RGB").resize((48, 40))
    sixteen = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return {
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=95),
        "grey.jpg": encode(photo.convert("L"), "JPEG", quality=95),
        "photo.png": encode(photo, "PNG"),
        "sixteen.png": encode(Image.fromarray(sixteen), "PNG"),
        "palette.png": encode(photo.convert("P"), "PNG"),
        "rotated.jpg": oriented_jpeg(6),
        "progressive.jpg": encode(photo, "JPEG", quality=90, progressive=True),
        "truncated.jpg": PHOTOS[2].read_bytes()[:3000],
    }


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_on_the_device_as_pillow_applies_it(orientation):
    data = oriented_jpeg(orientation)
    parsed = parse_image(data)
    assert parsed.pixels is None and parsed.orientation == orientation
    assert parsed.size == ((40, 60) if orientation >= 5 else (60, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stored = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
    image = Image.fromarray(stored)  # decode_jpeg's pixels, with Pillow's orientation rule
    image.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    assert expected.shape[:2] == parsed.size[::-1]
    left, top, right, bottom = centre_box(*parsed.size)
    crops, errors = decode_crops(EncodedBatch.of([parsed]), 40, CPU)  # 40: the centre square, not resized
    assert errors == [None]
    np.testing.assert_array_equal(crops[0].numpy(), expected[top:bottom, left:right])


def test_images_decode_jpeg_cannot_take_are_decoded_by_pillow_and_cropped_alike():
    images = odd_images()
    for name in ("cmyk.jpg", "photo.png", "sixteen.png", "palette.png"):
        parsed = parse_image(images[name])
        pillow = np.array(decode_image(images[name]))
        assert parsed.data == b"" and np.array_equal(parsed.pixels, pillow), name
        crops, errors = decode_crops(EncodedBatch.of([parsed]), 16, CPU)
        expected = centre_resize(torch.from_numpy(pillow).permute(2, 0, 1), 16).permute(1, 2, 0)
        assert errors == [None] and torch.equal(crops[0], expected), name
    grey = parse_image(images["grey.jpg"])  # decode_jpeg takes 8-bit greyscale, as RGB
    crops, _ = decode_crops(EncodedBatch.of([grey]), 16, CPU)
    assert grey.pixels is None and torch.equal(crops[0, ..., 0], crops[0, ..., 2])
    with pytest.raises(ImageDecodeError, match="more than --max-pixels 1919"):
        parse_image(images["photo.png"], max_pixels=1919)
    with pytest.raises(ImageDecodeError, match="not an image"):
        parse_image(b"plain text, no image" * 4)


def test_a_jpeg_the_decoder_rejects_is_that_images_error_and_the_others_decode_as_alone():
    good = [parse_image(path.read_bytes()) for path in PHOTOS[:2]]
    truncated = parse_image(odd_images()["truncated.jpg"])  # the header reads; the decoder finds the truncation
    crops, errors = decode_crops(EncodedBatch.of([good[0], truncated, good[1]]), 24, CPU)
    assert errors[0] is None and errors[2] is None
    assert errors[1].startswith("truncated image: image file is truncated")  # Pillow rejects it too
    assert not crops[1].any()
    alone, _ = decode_crops(EncodedBatch.of(good), 24, CPU)
    assert torch.equal(crops[[0, 2]], alone)
    many = [parse_image(path.read_bytes()) for path in PHOTOS] * 7  # 70: more than one group of DECODE_GROUP
    many[66] = truncated
    crops, errors = decode_crops(EncodedBatch.of(many), 24, CPU)
    assert len(many) > DECODE_GROUP and [i for i, error in enumerate(errors) if error] == [66]
    photos, _ = decode_crops(EncodedBatch.of(many[:10]), 24, CPU)
    assert torch.equal(crops[60:66], photos[:6]) and torch.equal(crops[67:], photos[7:])
    batch = Batch(None, torch.zeros(2, 1, 4), torch.tensor([7, 9]), EncodedBatch.of([good[0], truncated]))
    with pytest.raises(UserError, match=r"^store 'st': row 9 no longer decodes on cpu \(truncated image: image file"):
        batch.device_crops(CPU, 24, "st")  # in training: stage one decoded this row, so the store is refused


def test_a_jpeg_the_devices_decoder_rejects_is_decoded_by_pillow_and_cropped_alike(monkeypatch):
    parsed = [parse_image(path.read_bytes()) for path in PHOTOS[:3]]
    accepted, _ = decode_crops(EncodedBatch.of(parsed), 24, CPU)
    rejects = device_decode._decode_jpegs  # nvjpeg takes fewer JPEGs than libjpeg: the second one, here
    second = torch.tensor(list(parsed[1].data), dtype=torch.uint8)

    def rejecting(encoded, device):
        return [None if torch.equal(data, second) else image for data, image in zip(encoded, rejects(encoded, device))]

    monkeypatch.setattr(device_decode, "_decode_jpegs", rejecting)
    crops, errors = decode_crops(EncodedBatch.of(parsed), 24, CPU)
    assert errors == [None, None, None]
    assert torch.equal(crops[[0, 2]], accepted[[0, 2]])
    pillow = torch.from_numpy(np.array(decode_image(PHOTOS[1].read_bytes()))).permute(2, 0, 1)  # (3, H, W)
    assert torch.equal(crops[1], centre_resize(pillow, 24).permute(1, 2, 0))


def build_options(photos, store, **overrides) -> BuildOptions:
    return BuildOptions(
        source=str(photos), store=str(store), teacher=str(TINY_TEACHER), pretrained="none", device="cpu",
        shard_size=4, chunk_size=2, batch_size=3, image_size=32, progress=False, **{"decode": "device", **overrides},
    )  # fmt: skip


@pytest.fixture(scope="module")
def device_stores(tmp_path_factory):
    """The fixture photos and the odd images, cached with --decode device with and without --store-crops."""
    root = tmp_path_factory.mktemp("device")
    photos = root / "photos"
    photos.mkdir()
    for path in PHOTOS[:6]:
        shutil.copy(path, photos / path.name)
    for name, data in odd_images().items():
        (photos / name).write_bytes(data)
    for name, crops in (("stored", True), ("decoded", False)):
        run_build(build_options(photos, root / name, store_crops=crops), log=lambda line: None)
    return photos, root / "stored", root / "decoded"


def test_the_trainers_device_decode_gives_the_stored_crops_byte_for_byte(device_stores):
    photos, stored_path, decoded_path = device_stores
    stored, decoded = FeatureStore.open(stored_path), FeatureStore.open(decoded_path)
    assert decoded.meta.preprocessing.decode == "device" and decoded.meta.preprocessing.decode_device == "cpu"
    attribute = json.loads((decoded_path / "zarr.json").read_text())["attributes"]["zeroseg"]["preprocessing"]
    assert (attribute["decode"], attribute["decode_device"]) == ("device", "cpu")
    shown = invoke(zs_cache, "inspect", decoded_path)
    assert shown.returncode == 0 and "from 32px centre crops (device decode on cpu)" in shown.stdout
    records = {r.key: r for r in image_records(decoded.manifest())}
    assert records["truncated.jpg"].error.startswith("truncated image: image file is truncated")
    assert records["truncated.jpg"].row is None and records["truncated.jpg"].sha256 is not None
    assert (records["rotated.jpg"].width, records["rotated.jpg"].height) == (40, 60)
    assert sum(r.ok for r in records.values()) == 13
    assert {r.key: r.row for r in image_records(stored.manifest())} == {k: r.row for k, r in records.items()}
    np.testing.assert_array_equal(stored.features[:], decoded.features[:])  # the teacher saw the same pixels

    samples = StoreReader.open(decoded_path)
    batches = StoreBatches(samples, BatchPlan(batch=4, accum=1, world=1, rank=0), window=2, seed=0)
    for j in range(3):
        batch = batches[j]
        assert batch.crops is None and len(batch.encoded) == 4  # the loader only read and parsed them
        crops = batch.device_crops(CPU, 32, decoded_path)
        np.testing.assert_array_equal(crops.numpy(), stored.crops[:][batch.rows.numpy()])
    ok = [r for r in records.values() if r.ok]
    reader = StoreReader.open(stored.path)  # a store with crops reads them, on any device
    rows = np.array([r.row for r in ok])
    kept = StoreBatches(reader, BatchPlan(batch=4, accum=1, world=1, rank=0), window=2, seed=0)[0]
    assert reader.reads_stored_crops and kept.encoded is None and kept.crops.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(reader.stored_crops(rows), stored.crops[:][rows])


def test_squares_of_one_size_resized_together_give_the_pixels_of_one_resize_per_image():
    """decode_crops resizes the centre squares of one side length in one call; the pixels are those of the former
    resize of each image on its own (F.interpolate of one image, rounded, clamped)."""
    images = [Image.open(path).convert("RGB") for path in PHOTOS[:4]]
    images += [images[0].resize((90, 60)), images[1].resize((60, 90)), images[2].resize((90, 60)), images[0]]
    parsed = [parse_image(encode(image, "JPEG", quality=90)) for image in images]
    parsed.append(parse_image(encode(images[3].resize((90, 60)), "PNG")))  # Pillow's pixels, a square of 60 too
    crops, errors = decode_crops(EncodedBatch.of(parsed), 24, CPU)
    assert errors == [None] * len(parsed)
    for crop, image in zip(crops, parsed):
        pixels = decode_jpeg(torch.frombuffer(bytearray(image.data), dtype=torch.uint8)) if image.data else (
            torch.from_numpy(image.pixels).permute(2, 0, 1))
        left, top, right, bottom = centre_box(pixels.shape[2], pixels.shape[1])
        square = pixels[None, :, top:bottom, left:right].float()
        alone = torch.nn.functional.interpolate(square, size=(24, 24), mode="bicubic", antialias=True)
        assert torch.equal(crop, alone[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0))


def test_device_batches_are_the_loaders_batches_decoded_on_the_device_a_batch_ahead(device_stores):
    _, _, decoded_path = device_stores
    samples = StoreReader.open(decoded_path)
    dataset = StoreBatches(samples, BatchPlan(batch=4, accum=1, world=1, rank=0), window=2, seed=0)
    ahead = DeviceBatches(iter(make_loader(dataset, 0, 3, workers=1, prefetch=2, pin=False)), CPU, 32, decoded_path)
    try:
        batches = list(ahead)
    finally:
        ahead.close()
    assert len(batches) == 3
    for j, batch in enumerate(batches):
        expected = dataset[j]
        assert batch.encoded is None and torch.equal(batch.rows, expected.rows)
        assert torch.equal(batch.features, expected.features)
        assert torch.equal(batch.crops, expected.device_crops(CPU, 32, decoded_path))


def test_a_rerun_with_another_decode_or_device_type_is_refused(device_stores, tmp_path):
    """A device-decode store takes images and trains only on its device type, unless it keeps its crops."""
    photos, stored_path, decoded_path = device_stores
    assert run_build(build_options(photos, decoded_path, decode=None), log=lambda line: None).processed == 0
    other = invoke(zs_cache, "build", photos, "--store", decoded_path, "--teacher", TINY_TEACHER, "--pretrained",
                   "none", "--device", "cpu", "--image-size", "32", "--decode", "full")
    assert other.returncode == 2 and other.stderr.strip().splitlines() == [
        f"error: store '{decoded_path}' was built with --decode device; this build asks for --decode full: "
        "leave it out or use a new --store"
    ]
    gpu, gpu_crops = tmp_path / "gpu", tmp_path / "gpu-crops"  # as stores cached on a GPU record it
    for source, copy in ((decoded_path, gpu), (stored_path, gpu_crops)):
        shutil.copytree(source, copy)
        store = FeatureStore.open(copy, writable=True)
        store.meta.preprocessing = dataclasses.replace(store.meta.preprocessing, decode_device="cuda")
        store.save_meta()
    (photos / "new.jpg").write_bytes(PHOTOS[7].read_bytes())
    try:
        rerun = invoke(zs_cache, "build", photos, "--store", gpu, "--teacher", TINY_TEACHER, "--pretrained", "none",
                       "--device", "cpu", "--image-size", "32", "--no-progress")
    finally:
        (photos / "new.jpg").unlink()
    assert rerun.returncode == 2 and rerun.stderr.strip().splitlines() == [
        f"error: store '{gpu}''s crops were decoded by nvjpeg on cuda; this build runs on cpu, whose decoder gives "
        "other pixels: run it on cuda, or use a new store"
    ]
    trained = train(gpu, tmp_path / "run", "--steps", "2")
    assert trained.returncode == 2 and trained.stderr.strip().splitlines() == [
        f"error: store '{gpu}''s crops were decoded by nvjpeg on cuda; this run trains on cpu, whose decoder gives "
        "other pixels: run it on cuda, or use a new store"
    ]
    kept = train(gpu_crops, tmp_path / "run-crops", "--steps", "2")  # its stored crops are the teacher's pixels
    assert kept.returncode == 0, kept.stderr


def test_training_on_a_device_decode_store_runs_and_resumes_exactly(tmp_path):
    store = make_store(tmp_path, count=6, decode="device")
    straight = train(store, tmp_path / "straight", "--steps", "4")
    assert straight.returncode == 0, straight.stderr
    first = train(store, tmp_path / "resumed", "--steps", "4", "--stop-at", "2")
    assert first.returncode == 0, first.stderr
    from zeroseg.trainer.cli import main as zs_train

    second = invoke(zs_train, "run", "--run-dir", tmp_path / "resumed", "--resume", "--workers", "1", "--no-progress")
    assert second.returncode == 0, second.stderr
    a, b = (torch.load(tmp_path / run / "checkpoints/step-00000004.pt", weights_only=True)["model"]
            for run in ("straight", "resumed"))  # fmt: skip
    assert all(torch.equal(a[name], b[name]) for name in a)
