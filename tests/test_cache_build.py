"""zs-cache build end to end on the real fixture photos with the tiny random-weight teacher."""

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tqdm import tqdm

from tests.conftest import PHOTOS, TINY_TEACHER, Terminal, dead_pid, final_bar_line, invoke, run_cli
from zeroseg.errors import UserError
from zeroseg.io import human_size
from zeroseg.pipeline.build import run_build
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.manifest import MANIFEST_SCHEMA, image_records
from zeroseg.pipeline.options import BuildOptions
from zeroseg.pipeline.shards import EncodeSettings, Shard, decode_item, encode_shard, plan_shards
from zeroseg.pipeline.sources import open_source, pack_h5
from zeroseg.pipeline.store import FeatureStore, builder_lock
from zeroseg.pipeline.store_reader import SourceImages, StoreReader
from zeroseg.pipeline.teacher import Teacher, resolve_identity

TINY = dict(teacher=str(TINY_TEACHER), pretrained="none", device="cpu", shard_size=4, chunk_size=2,
            batch_size=3, image_size=64, progress=False)


def build(source, store, **overrides):
    return run_build(BuildOptions(source=str(source), store=str(store), **{**TINY, **overrides}), log=lambda s: None)


def by_key(store_path) -> dict[str, np.ndarray]:
    store = FeatureStore.open(store_path)
    table = store.manifest().to_pydict()
    features = store.features[:]
    return {k: features[r] for k, r, s in zip(table["key"], table["row"], table["status"]) if s == "ok"}


def test_store_layout_and_metadata(photos, tmp_path):
    summary = build(photos, tmp_path / "store")
    assert (summary.processed, summary.ok, summary.errors, summary.shards) == (10, 10, 0, 3)
    store = FeatureStore.open(tmp_path / "store")
    meta = store.meta
    assert store.features.dtype == np.float16 and store.features.shape[1:] == (30, 32)
    assert store.features.chunks == (2, 30, 32)
    assert meta.grids == [1, 2, 3, 4] and meta.views[1] == (2, 0, 0) and meta.normalized is False
    assert meta.teacher.to_dict() == {"model": "zs-tiny-clip", "pretrained": None, "weights_sha256": None,
                                      "quick_gelu": False, "config": json.loads(TINY_TEACHER.read_text())}
    assert meta.preprocessing.crop_size == 64 and meta.preprocessing.view_size == 32
    assert len(meta.preprocessing.mean) == 3 and meta.sources["photos"].kind == "folder"
    table = store.manifest()
    assert sorted(table.column("key").to_pylist()) == sorted(f"{p.parent.name}/{p.name}" for p in PHOTOS)
    rows = table.column("row").to_pylist()
    assert len(set(rows)) == 10 and all(r // 4 == s for r, s in zip(rows, table.column("shard").to_pylist()))
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert all(len(h) == 64 for h in table.column("sha256").to_pylist())
    first = Image.open(PHOTOS[0])
    row0 = table.to_pylist()[table.column("key").to_pylist().index(f"{PHOTOS[0].parent.name}/{PHOTOS[0].name}")]
    assert (row0["width"], row0["height"]) == first.size


def test_store_opens_with_plain_zarr_and_pyarrow(photos, tmp_path):
    build(photos, tmp_path / "store")
    code = (
        "import sys, zarr, pyarrow.parquet as pq\n"
        "g = zarr.open_group(sys.argv[1], mode='r')\n"
        "m = pq.read_table(sys.argv[1] + '/manifest')\n"
        "f = g['features']\n"
        "rows = [r for r in m.column('row').to_pylist() if r is not None]\n"
        "print(f.shape, f.dtype, m.num_rows, float(abs(f[rows[0]]).sum()) > 0, g.attrs['zeroseg']['grids'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(10, 30, 32) float16 10 True [1, 2, 3, 4]"


def test_crop_invariant_every_view(photos, tmp_path):
    """The crop the trainer-side reader returns, sent through the teacher, gives features[row] back."""
    build(photos, tmp_path / "store")
    store = FeatureStore.open(tmp_path / "store")
    reader = SourceImages(store.meta)
    teacher = Teacher(store.meta.teacher, torch.device("cpu"))
    for record in store.manifest().to_pylist()[:4]:
        crop = reader.crop(record["source"], record["key"])
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        again = teacher.encode_crops(torch.from_numpy(crop[None]), store.meta.grids)[0].float()
        stored = torch.from_numpy(store.features[record["row"]]).float()
        torch.testing.assert_close(again, stored, atol=2e-3, rtol=2e-3)


def test_rerun_does_nothing_and_new_images_are_appended(photos, tmp_path):
    store_path = tmp_path / "store"
    (tmp_path / "held").mkdir()
    moved = [shutil.move(str(p), tmp_path / "held" / p.name) for p in sorted(photos.glob("val2017/*.jpg"))[:2]]
    first = build(photos, store_path)
    assert first.processed == 8
    assert build(photos, store_path).processed == 0
    before = by_key(store_path)
    for path in moved:
        shutil.move(path, photos / "val2017" / path.name)
    (photos / "new").mkdir()
    shutil.copy(PHOTOS[0], photos / "new" / "copy.jpg")
    appended = build(photos, store_path)
    assert appended.processed == 3 and appended.ok == 3
    store = FeatureStore.open(store_path)
    assert store.committed_shards() == {0, 1, 2}
    after = by_key(store_path)
    assert len(after) == 11 and all(np.array_equal(before[k], after[k]) for k in before if k in after)
    np.testing.assert_array_equal(after["new/copy.jpg"], after[f"{PHOTOS[0].parent.name}/{PHOTOS[0].name}"])


def test_the_bar_moves_one_image_at_a_time_and_reaches_the_total(photos, tmp_path, monkeypatch):
    source = open_source(photos)
    keys = source.keys()
    teacher = Teacher(resolve_identity(str(TINY_TEACHER), "none"), torch.device("cpu"))
    drawn = io.StringIO()
    bar = tqdm(total=len(keys), file=drawn, mininterval=0, miniters=1, disable=False)  # draws every update
    encode_shard(Shard(0, keys), 0, (decode_item(source, key, 64) for key in keys), teacher,
                 EncodeSettings((1, 2), 3, 64, "photos", False), bar.update)
    bar.close()
    shown = [int(n) for n in re.findall(r"(\d+)/10 ", drawn.getvalue())]
    assert list(dict.fromkeys(shown)) == list(range(11))  # 0, 1, 2, ..., 10: not 0, 3, 6, 9, 10 (batches of 3)
    monkeypatch.setattr(sys, "stderr", Terminal())
    build(photos, tmp_path / "store", progress=True)
    assert final_bar_line(sys.stderr.getvalue()).startswith("zs-cache: 100%") and " 10/10 " in sys.stderr.getvalue()


def test_plan_reuses_free_shard_ids_in_order():
    keys = [f"k{i}" for i in range(10)]
    assert [(s.id, s.keys) for s in plan_shards(keys[4:8] + keys[9:], {1, 3}, 4)] == [
        (0, keys[4:8]), (2, keys[9:])
    ]
    assert [s.id for s in plan_shards(keys, set(), 4)] == [0, 1, 2]


def test_sigkill_mid_build_then_resume_equals_uninterrupted(photos, tmp_path):
    for i in range(4):  # 50 images: the build takes a few seconds, long enough to be killed mid-way
        shutil.copytree(photos / "JPEGImages", photos / f"copy{i}", dirs_exist_ok=True)
        shutil.copytree(photos / "val2017", photos / f"copy{i}", dirs_exist_ok=True)
    args = ["build", photos, "--store", tmp_path / "killed", "--teacher", TINY_TEACHER, "--pretrained", "none",
            "--device", "cpu", "--shard-size", "4", "--chunk-size", "2", "--batch-size", "2",
            "--image-size", "64", "--no-progress", "--decode-threads", "1"]
    process = subprocess.Popen([sys.executable, "-m", "zeroseg.pipeline.cli", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "killed" / "manifest"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(manifest.glob("shard-*.parquet"))) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list(manifest.glob("shard-*.parquet")))
    assert 2 <= committed < 13, "the kill should land mid-build"
    resumed = run_cli("zeroseg.pipeline.cli", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"cached {50 - 0} images" not in resumed.stdout  # only the missing shards were redone
    build(photos, tmp_path / "clean", batch_size=2)
    killed, clean = FeatureStore.open(tmp_path / "killed"), FeatureStore.open(tmp_path / "clean")
    columns = ["key", "row", "status", "shard", "sha256"]
    assert killed.manifest(columns).sort_by("key").equals(clean.manifest(columns).sort_by("key"))
    np.testing.assert_allclose(killed.features[:].astype(np.float32), clean.features[:].astype(np.float32),
                               atol=1e-3)
    assert run_cli("zeroseg.pipeline.cli", "verify", tmp_path / "killed").returncode == 0
    assert not list(manifest.glob(".*.partial"))  # a part the kill left half-written is gone


def test_a_rerun_removes_the_temporary_parts_of_a_killed_writer_and_nothing_else(photos, tmp_path):
    build(photos, tmp_path / "store", shard_size=4)
    manifest = tmp_path / "store" / "manifest"
    before = FeatureStore.open(tmp_path / "store").manifest()
    pid = dead_pid()
    dead = [f".shard-000002.parquet.{pid}.partial", f".shards-000000-000003.parquet.{pid}.partial"]
    for name in dead:
        (manifest / name).write_bytes(b"PAR1 half a part")  # what a build or compact killed mid-write leaves
    (manifest / ".notes").write_text("not a part")
    assert build(photos, tmp_path / "store", shard_size=4).processed == 0
    assert sorted(p.name for p in manifest.iterdir() if p.name.startswith(".")) == [".notes"]
    assert FeatureStore.open(tmp_path / "store").manifest().equals(before)


def test_second_builder_is_refused(photos, tmp_path):
    with builder_lock(tmp_path / "store"):
        refused = run_cli("zeroseg.pipeline.cli", "build", photos, "--store", tmp_path / "store", "--teacher",
                          TINY_TEACHER, "--pretrained", "none", "--device", "cpu")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: store '{tmp_path / 'store'}' is being written by another zs-cache build or compact; wait for it to "
        f"finish"
    )
    assert not (tmp_path / "store" / "zarr.json").exists()


def test_hdf5_and_list_sources_match_the_folder(photos, tmp_path):
    build(photos, tmp_path / "folder")
    pack_h5(photos, tmp_path / "photos.h5", progress=False)
    build(tmp_path / "photos.h5", tmp_path / "h5")
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    keys = sorted(str(p.relative_to(photos)) for p in photos.rglob("*.jpg"))
    listing.write_text("# photos\n" + "\n".join(f"../photos/{k}" for k in keys) + "\n\n")
    build(listing, tmp_path / "list", outside_paths=True)
    pq.write_table(pa.table({"file": [str(photos / k) for k in keys]}), tmp_path / "paths.parquet")
    build(tmp_path / "paths.parquet", tmp_path / "parquet", column="file", outside_paths=True)
    folder = by_key(tmp_path / "folder")
    h5 = by_key(tmp_path / "h5")
    listed = {k.removeprefix("../photos/"): v for k, v in by_key(tmp_path / "list").items()}
    parquet = {k.removeprefix(f"{photos}/"): v for k, v in by_key(tmp_path / "parquet").items()}
    assert set(folder) == set(h5) == set(listed) == set(parquet) and len(folder) == 10
    for key, features in folder.items():
        for other in (h5, listed, parquet):
            np.testing.assert_array_equal(features, other[key])


def write_bad_inputs(root):
    """One file per kind of awkward input; returns {relative key: expected status}."""
    root.mkdir(parents=True, exist_ok=True)
    photo = PHOTOS[0].read_bytes()

    def save(name, image, fmt, **params):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        (root / name).write_bytes(buffer.getvalue())

    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (root / "notes.jpg").write_text("not an image at all\n" * 20)
    save("cmyk.jpg", Image.new("CMYK", (50, 40), (10, 200, 30, 5)), "JPEG")
    save("grey.png", Image.new("L", (60, 30), 90), "PNG")
    save("rgba.png", Image.new("RGBA", (30, 60), (10, 20, 30, 100)), "PNG")
    save("palette.gif", Image.new("P", (33, 33), 3), "GIF")
    save("deep.png", Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 8
    save("rotated.jpg", Image.open(PHOTOS[1]), "JPEG", exif=exif.tobytes())
    save("tiny.png", Image.new("RGB", (3, 2), (1, 2, 3)), "PNG")
    save("wide.png", Image.new("RGB", (3000, 4), (200, 0, 0)), "PNG")
    save("tall.jpg", Image.new("RGB", (5, 2500), (0, 0, 200)), "JPEG")
    broken = {"empty.jpg", "truncated.jpg", "notes.jpg"}
    return {p.name: "error" if p.name in broken else "ok" for p in root.iterdir()}


def test_bad_inputs_become_error_rows_and_odd_images_are_converted(tmp_path):
    expected = write_bad_inputs(tmp_path / "bad")
    summary = build(tmp_path / "bad", tmp_path / "store", max_error_fraction=0.5)
    assert (summary.ok, summary.errors) == (9, 3)
    table = {r["key"]: r for r in FeatureStore.open(tmp_path / "store").manifest().to_pylist()}
    assert {k: r["status"] for k, r in table.items()} == expected
    assert table["empty.jpg"]["error"].startswith("empty file") and table["empty.jpg"]["row"] is None
    assert table["truncated.jpg"]["error"].startswith("truncated image")
    assert table["notes.jpg"]["error"].startswith("not an image")
    rotated = Image.open(PHOTOS[1]).size
    assert (table["rotated.jpg"]["width"], table["rotated.jpg"]["height"]) == rotated[::-1]
    assert (table["wide.png"]["width"], table["wide.png"]["height"]) == (3000, 4)
    reader = SourceImages(FeatureStore.open(tmp_path / "store").meta)
    assert np.abs(reader.crop("bad", "deep.png").astype(int) - 156).max() <= 1  # 40000 / 257
    assert reader.crop("bad", "rgba.png")[0, 0].tolist() == [159, 163, 167]  # c * 100/255 + 255 * 155/255
    assert invoke(zs_cache, "verify", tmp_path / "store").returncode == 0


def test_error_fraction_and_exit_codes(tmp_path):
    write_bad_inputs(tmp_path / "bad")
    common = ["--teacher", TINY_TEACHER, "--pretrained", "none", "--device", "cpu", "--image-size", "64",
              "--no-progress"]
    failed = invoke(zs_cache, "build", tmp_path / "bad", "--store", tmp_path / "s1", *common)
    assert failed.returncode == 1
    assert "cached 9 images, 3 errors (25.0%)" in failed.stdout
    assert "more than --max-error-fraction 0.01" in failed.stderr and "Traceback" not in failed.stderr
    allowed = invoke(zs_cache, "build", tmp_path / "bad", "--store", tmp_path / "s2", *common,
                      "--max-error-fraction", "0.3")
    assert allowed.returncode == 0, allowed.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"")
    (junk / "b.png").write_text("nope")
    nothing = invoke(zs_cache, "build", junk, "--store", tmp_path / "s3", *common)
    assert nothing.returncode == 1 and "no image could be read" in nothing.stderr


def test_wrong_arguments_are_one_line_and_exit_2(photos, tmp_path):
    common = ["--pretrained", "none", "--device", "cpu", "--image-size", "64", "--no-progress"]
    garbage, wrong = tmp_path / "garbage.pt", tmp_path / "other-architecture.pt"
    garbage.write_bytes(bytes(range(256)) * 20)
    torch.save({"visual.proj": torch.zeros(3)}, wrong)
    cases = [
        (["build", tmp_path / "missing", "--store", tmp_path / "s", "--teacher", TINY_TEACHER, *common],
         "does not exist"),
        (["build", photos, "--store", tmp_path / "s", "--teacher", "no-such-model", *common], "unknown teacher"),
        (["build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER, "--grids", "1,x", *common],
         "--grids"),
        (["build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER, "--pretrained", "openai",
          "--device", "cpu"], "neither a weights file nor an open_clip tag"),
        (["inspect", tmp_path], "is not a feature store"),
        (["build", photos, "--store", tmp_path / "s", "--teacher", "ViT-B-32", "--pretrained", "openai", *common[2:]],
         "could not load teacher weights 'openai' into ViT-B-32 (offline? pass a local weights file)"),
        (["build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER, "--pretrained", garbage,
          *common[2:]], f"could not load teacher weights '{garbage}' into zs-tiny-clip"),
        (["build", photos, "--store", tmp_path / "s", "--teacher", TINY_TEACHER, "--pretrained", wrong,
          *common[2:]], "Error(s) in loading state_dict"),
    ]
    for args, message in cases:
        result = invoke(zs_cache, *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_build_options_check_themselves_when_made():
    """The options refuse a bad value or combination with the flag's name, before a build reads anything."""
    refusals = [
        ({"shard_size": 100}, "--shard-size must be a positive multiple of the chunk size 64"),
        ({"grids": [1, 1]}, r"--grids must be distinct positive integers, got \[1, 1\]"),
        ({"workers": 2, "device": "cuda:1"}, "--device cuda:1 picks one device; with --workers each worker"),
        ({"scheduler_file": "s.json", "workers": 2}, "--scheduler-file names the cluster to build on"),
    ]
    for values, message in refusals:
        with pytest.raises(UserError, match=f"^{message}"):
            BuildOptions(source="photos", store="store", **values)


def test_store_made_with_other_teacher_or_grids_is_refused(photos, tmp_path):
    build(photos, tmp_path / "store")
    checkpoint = tmp_path / "tiny.pt"
    identity = resolve_identity(str(TINY_TEACHER), "none")
    torch.manual_seed(1)
    from zeroseg.pipeline.teacher import create_clip

    torch.save(create_clip(identity, torch.device("cpu")).state_dict(), checkpoint)
    common = ["--store", tmp_path / "store", "--teacher", TINY_TEACHER, "--device", "cpu", "--image-size", "64"]
    other_teacher = invoke(zs_cache, "build", photos, *common, "--pretrained", checkpoint)
    assert other_teacher.returncode == 2 and "was built with teacher zs-tiny-clip" in other_teacher.stderr
    other_grids = invoke(zs_cache, "build", photos, *common, "--pretrained", "none", "--grids", "1,3")
    assert other_grids.returncode == 2 and "holds grids [1, 2, 3, 4]" in other_grids.stderr


def test_reduced_decode_is_recorded_and_the_trainer_decodes_the_stored_pixels(photos, tmp_path):
    """Crops of 32 px from photos of short side >= 281 decode at 1/8: the trainer's decode of a store without
    stored crops must repeat exactly that, and a rerun cannot switch the store to another decode."""
    build(photos, tmp_path / "store", store_crops=True, decode="reduced", image_size=32)
    store = FeatureStore.open(tmp_path / "store")
    assert store.meta.preprocessing.decode == "reduced"
    records = image_records(store.manifest())
    decoded = SourceImages(store.meta).crops(records)
    stored = StoreReader.open(store.path).stored_crops(np.array([r.row for r in records]))
    np.testing.assert_array_equal(decoded, stored)
    full = np.stack([crop_from_bytes((photos / r.key).read_bytes(), 32)[0] for r in records])
    assert 0 < np.abs(decoded.astype(int) - full).mean() < 5  # close to, but not, the full decode's pixels
    assert build(photos, tmp_path / "store", image_size=32).processed == 0  # no --decode: the store's
    refused = invoke(zs_cache, "build", photos, "--store", tmp_path / "store", "--teacher", TINY_TEACHER,
                     "--pretrained", "none", "--device", "cpu", "--image-size", "32", "--decode", "full")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"error: store '{tmp_path / 'store'}' was built with --decode reduced; this build asks for --decode full: "
        f"leave it out or use a new --store"
    ]
    unknown = invoke(zs_cache, "build", photos, "--store", tmp_path / "other", "--decode", "fast")
    assert unknown.returncode == 2 and "--decode must be one of full, reduced, device, got 'fast'" in unknown.stderr


def test_local_weights_file_is_loaded_and_recorded(photos, tmp_path):
    """The offline path for real weights: a checkpoint file saved here, loaded by path, hashed."""
    from zeroseg.io import sha256_file
    from zeroseg.pipeline.teacher import create_clip

    identity = resolve_identity(str(TINY_TEACHER), "none")
    torch.manual_seed(7)
    model = create_clip(identity, torch.device("cpu"))
    torch.save(model.state_dict(), tmp_path / "tiny-weights.pt")
    build(photos, tmp_path / "store", pretrained=str(tmp_path / "tiny-weights.pt"))
    store = FeatureStore.open(tmp_path / "store")
    assert store.meta.teacher.weights_sha256 == sha256_file(tmp_path / "tiny-weights.pt")
    assert store.meta.teacher.pretrained == str(tmp_path / "tiny-weights.pt")
    record = store.manifest().to_pylist()[0]
    crop = SourceImages(store.meta).crop(record["source"], record["key"])
    with torch.inference_mode():
        from zeroseg.pipeline.crops import grid_views

        views = grid_views(torch.from_numpy(crop[None]), [1], 32, model.visual.preprocess_cfg["mean"],
                           model.visual.preprocess_cfg["std"])
        expected = model.encode_image(views[:, 0])[0]
    torch.testing.assert_close(torch.from_numpy(store.features[record["row"], 0]).float(), expected,
                               atol=2e-3, rtol=2e-3)


def test_quick_gelu_follows_openai_weights():
    assert resolve_identity("ViT-B-32", "openai").quick_gelu is True
    assert resolve_identity("ViT-B-32", "laion2b_s34b_b79k").quick_gelu is False
    assert resolve_identity("ViT-B-32-quickgelu", "none").quick_gelu is True
    assert resolve_identity("ViT-B-32", "openai", quick_gelu=False).quick_gelu is False


def test_inspect_and_verify_output(tmp_path):
    write_bad_inputs(tmp_path / "bad")
    build(tmp_path / "bad", tmp_path / "store", max_error_fraction=1.0)
    shown = invoke(zs_cache, "inspect", tmp_path / "store")
    assert shown.returncode == 0
    assert "images     9 ok, 3 errors, 3 shards (shard size 4)" in shown.stdout
    assert "teacher    zs-tiny-clip pretrained=none (random weights) quick_gelu=False" in shown.stdout
    assert "grids 1,2,3,4 -> 30 views of 32px from 64px centre crops (full decode)" in shown.stdout
    assert "errors     1 x empty file (0 bytes)" in shown.stdout
    assert re.search(r"^disk       \d+\.\d (KiB|MiB)$", shown.stdout, re.M) and "0.0 MiB" not in shown.stdout
    verified = invoke(zs_cache, "verify", tmp_path / "store", "--no-progress")
    assert verified.returncode == 0
    assert verified.stdout.strip() == f"store {tmp_path / 'store'} verified: 9 ok rows, 3 errors, 3 shards"
    store = FeatureStore.open(tmp_path / "store", writable=True)
    ok_row = next(r["row"] for r in store.manifest().to_pylist() if r["status"] == "ok")
    corrupted = store.features[ok_row]
    corrupted[3, 5] = np.nan
    store.features[ok_row] = corrupted
    broken = invoke(zs_cache, "verify", tmp_path / "store", "--no-progress")
    assert broken.returncode == 1 and f"row {ok_row}: NaN or Inf in features" in broken.stderr


def test_verify_names_every_manifest_row_that_disagrees_with_the_array(photos, tmp_path):
    from zeroseg.pipeline.check import verify

    build(photos, tmp_path / "store")
    store = FeatureStore.open(tmp_path / "store")
    first, second = (pq.read_table(store.part_path(shard)).to_pylist() for shard in (0, 1))
    keys = [r["key"] for r in first]
    first[0]["status"] = "maybe"
    first[1]["row"] = None
    first[2]["row"] = 5  # shard 0 holds rows 0..3; row 5 is shard 1's
    first[3]["source"] = "elsewhere"
    second[1]["key"] = second[0]["key"]
    for shard, rows in ((0, first), (1, second)):
        part = store.part_path(shard)
        record = pq.read_metadata(part).metadata  # the commit record stays: only the rows disagree
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA.with_metadata(record)), part)
    problems, counts = verify(store, progress=False)
    assert problems == [
        f"photos/{keys[0]}: unknown status 'maybe'",
        f"photos/{keys[1]}: status ok without a row",
        f"photos/{keys[2]}: row 5 outside shard 0",
        f"elsewhere/{keys[3]}: source 'elsewhere' is not registered in the store metadata",
        "row 5 is claimed by 2 manifest rows",
        f"photos/{second[0]['key']} appears 2 times",
    ]
    assert counts == {"ok": 9, "error": 0, "shards": 3}


def test_a_creation_killed_before_its_metadata_is_rebuilt_but_a_foreign_zarr_group_is_refused(photos, tmp_path):
    import zarr

    unfinished = zarr.open_group(str(tmp_path / "unfinished"), mode="w")
    unfinished.create_array("features", shape=(0, 30, 32), chunks=(2, 30, 32), dtype="float16")
    (tmp_path / "unfinished" / "manifest").mkdir()
    assert build(photos, tmp_path / "unfinished").ok == 10
    assert invoke(zs_cache, "verify", tmp_path / "unfinished").returncode == 0

    foreign = zarr.open_group(str(tmp_path / "foreign"), mode="w")
    foreign.create_array("temperature", shape=(4,), dtype="float32")
    refused = invoke(zs_cache, "build", photos, "--store", tmp_path / "foreign", "--teacher", TINY_TEACHER,
                     "--pretrained", "none", "--device", "cpu")
    assert refused.returncode == 2 and "is a Zarr group but not a zeroseg feature store" in refused.stderr
    assert (tmp_path / "foreign" / "temperature").is_dir()


def test_a_new_store_never_overwrites_a_folder_and_keeps_its_lock_while_it_is_created(photos, tmp_path):
    before = sorted(p.relative_to(photos) for p in photos.rglob("*"))
    refused = invoke(zs_cache, "build", photos, "--store", photos, "--teacher", TINY_TEACHER, "--pretrained", "none",
                     "--device", "cpu")
    assert refused.returncode == 2 and "is not a feature store and is not empty" in refused.stderr
    assert sorted(p.relative_to(photos) for p in photos.rglob("*")) == before

    import threading

    from zeroseg.errors import UserError

    for i in range(3):  # 37 images: the build is still running when its store appears
        shutil.copytree(photos / "JPEGImages", photos / f"more{i}")
        shutil.copytree(photos / "val2017", photos / f"more{i}", dirs_exist_ok=True)
    builder = threading.Thread(target=build, args=(photos, tmp_path / "new"), kwargs={"batch_size": 1})
    builder.start()
    while not (tmp_path / "new" / "zarr.json").exists():
        time.sleep(0.001)
    with pytest.raises(UserError, match="being written by another zs-cache build"):
        with builder_lock(tmp_path / "new"):
            pass
    builder.join()
    assert FeatureStore.open(tmp_path / "new").manifest().num_rows == len(list(photos.rglob("*.jpg")))


def test_dry_run_counts_images_and_sizes_the_store_without_writing(photos, tmp_path):
    args = ["build", photos, "--store", tmp_path / "store", "--teacher", "zs-tiny-clip", "--pretrained", "none",
            "--image-size", "64", "--shard-size", "4", "--chunk-size", "2", "--dry-run"]
    planned = invoke(zs_cache, *args, "--store-crops")
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert lines[0].endswith("10 images in " + str(photos) + ", 0 already in the store, 10 to cache in 3 shards of 4")
    assert lines[1] == "features 10 x 30 views x 32 float16 = 18.8 KiB"  # 10 * 30 * 32 * 2 bytes
    assert lines[2].startswith("crops    10 x 64x64x3 uint8 = 120.0 KiB before zstd")
    assert not (tmp_path / "store").exists()
    build(photos, tmp_path / "store")
    again = invoke(zs_cache, *args)
    assert "10 already in the store, 0 to cache" in again.stdout and "= 0 B" in again.stdout


@pytest.mark.parametrize(("count", "shown"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                              (59_036_175_360, "55.0 GiB"), (3 * 2**40, "3.0 TiB")])
def test_sizes_are_printed_in_the_unit_that_fits(count, shown):
    assert human_size(count) == shown
