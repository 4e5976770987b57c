"""Sources a careful user should not have to clean first: odd names, link loops, bombs, FIFOs, devices."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq

from tests.conftest import PHOTOS, TINY_TEACHER, invoke, png_bomb_header, run_cli, train
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.crops import crop_from_bytes
from zeroseg.pipeline.integrity import RECORD_KEY, encode_record
from zeroseg.pipeline.sources import (
    FileSource,
    FolderSource,
    H5Source,
    ListSource,
    SourceSpec,
    TarShardSource,
    open_source,
    pack_h5,
)
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_reader import SourceImages

TINY_BUILD = ("--teacher", TINY_TEACHER, "--pretrained", "none", "--device", "cpu", "--image-size", "32",
              "--shard-size", "4", "--chunk-size", "2", "--no-progress", "--max-error-fraction", "1")


def hostile_folder(root):
    root.mkdir()
    (root / "sub").mkdir()
    (root / "a.jpg").write_bytes(PHOTOS[0].read_bytes())
    (root / "sub" / "b.jpg").write_bytes(PHOTOS[1].read_bytes())
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as handle:  # not UTF-8
        handle.write(PHOTOS[2].read_bytes())
    os.symlink(".", root / "self")  # a loop
    os.symlink("..", root / "sub" / "up")  # a second loop
    os.symlink("a.jpg", root / "link.jpg")  # a second name of a listed file
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    (root / "bomb.png").write_bytes(png_bomb_header(18000, 18000))
    (root / "big.jpg").write_bytes(PHOTOS[3].read_bytes() + bytes(2 * 2**20))
    return root


def test_a_hostile_folder_builds_to_ordinary_and_error_rows(tmp_path):
    source = hostile_folder(tmp_path / "src")
    built = run_cli("zeroseg.pipeline.cli", "build", source, "--store", tmp_path / "store", *TINY_BUILD,
                    "--max-file-mb", "1", "--max-pixels", "100000000", timeout=240)
    assert built.returncode == 0, built.stderr
    assert "Traceback" not in built.stderr
    assert "source: 3 paths reach files or folders already listed (links), cached once" in built.stderr
    store = FeatureStore.open(tmp_path / "store")
    rows = {r["key"]: r for r in store.manifest().to_pylist()}
    assert sorted(rows) == ["a.jpg", "bad\\xff.jpg", "big.jpg", "bomb.png", "pipe.jpg", "sub/b.jpg", "zero.jpg"]
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {"a.jpg", "bad\\xff.jpg", "sub/b.jpg"}
    assert rows["pipe.jpg"]["error"] == "unreadable: not a regular file (FIFO)"
    assert rows["zero.jpg"]["error"] == "unreadable: not a regular file (device)"
    assert rows["big.jpg"]["error"].startswith("unreadable: file larger than the size cap of 1048576 bytes")
    assert rows["bomb.png"]["error"] == (
        "image too large: 18000x18000 = 324000000 pixels, more than --max-pixels 100000000"
    )
    odd = rows["bad\\xff.jpg"]
    crop = SourceImages(store.meta).crop(odd["source"], odd["key"], odd["sha256"])  # the key finds its file again
    np.testing.assert_array_equal(crop, crop_from_bytes(PHOTOS[2].read_bytes(), 32)[0])
    assert run_cli("zeroseg.pipeline.cli", "verify", tmp_path / "store", "--no-progress").returncode == 0


def test_links_are_followed_once_per_real_folder(tmp_path):
    root = tmp_path / "src"
    (root / "real").mkdir(parents=True)
    (root / "real" / "x.jpg").write_bytes(b"x")
    os.symlink("real", root / "alias")
    os.symlink("..", root / "real" / "loop")
    source = FolderSource(SourceSpec("folder", str(root)))
    assert source.keys() == ["alias/x.jpg"]  # sorted walk: "alias" is reached first
    assert source.duplicates == {"alias/loop/": "./", "real/": "alias/"}


def test_every_kind_of_source_reports_the_duplicates_it_skipped(photos, tmp_path):
    """zs-cache build logs any source's `duplicates`: folders' are the links they skip, the other kinds have none."""
    pack_h5(photos, tmp_path / "photos.h5", progress=False)
    (tmp_path / "list.txt").write_text(f"{PHOTOS[0]}\n{PHOTOS[0]}\n")
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "00000.tar", "w") as archive:
        archive.add(PHOTOS[1], "000000000.jpg")
    kinds = {photos: FolderSource, tmp_path / "photos.h5": H5Source, tmp_path / "list.txt": ListSource,
             tmp_path / "tars": TarShardSource, PHOTOS[2]: FileSource}  # fmt: skip
    for path, kind in kinds.items():
        source = open_source(path)
        assert type(source) is kind
        assert len(source.keys()) == (1 if kind in (ListSource, TarShardSource, FileSource) else len(PHOTOS))
        assert source.duplicates == {}


def test_impossible_grids_or_sizes_are_refused_before_anything_is_created(photos, tmp_path):
    refusals = {
        ("--grids", "1,100", "--image-size", "64"): "error: --grids 100 splits a 64px crop into cells smaller",
        ("--image-size", "1"): "error: --grids 4 splits a 1px crop into cells smaller than a pixel",
        ("--max-pixels", "0"): "error: --max-pixels must be positive",
    }
    for args, message in refusals.items():
        built = invoke(zs_cache, "build", photos, "--store", tmp_path / "store", "--teacher", TINY_TEACHER,
                       "--pretrained", "none", "--device", "cpu", *args)
        assert built.returncode == 2 and built.stderr.startswith(message), built.stderr
        assert len(built.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "store").exists()


def test_a_list_file_reads_outside_its_folder_only_when_told(photos, tmp_path):
    (photos / "inside").mkdir()
    shutil.copy(PHOTOS[0], photos / "inside" / "a.jpg")
    for line in ("/etc/passwd", "../../../../etc/passwd", "inside/../../outside.jpg"):
        listing = photos / "list.txt"
        listing.write_text(f"inside/a.jpg\n{line}\n")
        refused = invoke(zs_cache, "build", listing, "--store", tmp_path / "store", *TINY_BUILD)
        assert refused.returncode == 2 and not (tmp_path / "store").exists()
        assert refused.stderr.strip() == (
            f"error: list file '{listing}' names '{line}', outside its folder: pass --outside-paths to read absolute "
            f"paths and paths through '..'"
        )
    listing.write_text(f"inside/a.jpg\n{PHOTOS[1]}\n")
    built = invoke(zs_cache, "build", listing, "--store", tmp_path / "store", *TINY_BUILD, "--outside-paths")
    assert built.returncode == 0, built.stderr
    assert sorted(FeatureStore.open(tmp_path / "store").manifest(["key"])["key"].to_pylist()) == sorted(
        ["inside/a.jpg", str(PHOTOS[1])]
    )
    assert "--outside-paths" in invoke(zs_cache, "build", "--help").stdout


def test_a_commit_record_naming_a_file_outside_the_store_is_refused(crops_store, tmp_path):
    """A part whose record (crc32c recomputed, as anyone can) names ../../../../etc/passwd as a chunk file."""
    part = sorted((crops_store / "manifest").glob("shard-*.parquet"))[0]
    table = pq.read_table(part)
    record = json.loads(table.schema.metadata[RECORD_KEY])
    record["features"]["../../../../etc/passwd"] = "00000000"
    metadata = {**table.schema.metadata, **encode_record(record)}
    pq.write_table(table.replace_schema_metadata(metadata), part, write_page_checksum=True)
    refusal = f"manifest part '{part}' names chunk file 'features/../../../../etc/passwd', outside the store: refused"
    verified = run_cli("zeroseg.pipeline.cli", "verify", crops_store)
    assert verified.returncode == 1 and f"problem: {refusal}" in verified.stderr.splitlines()
    trained = train(crops_store, tmp_path / "run", "--steps", "1")
    assert trained.returncode == 2 and trained.stderr.strip() == f"error: {refusal}"


def test_one_image_file_is_a_source_of_one_image_and_a_nul_in_a_list_is_an_error_row(tmp_path):
    (tmp_path / "one.jpg").write_bytes(PHOTOS[0].read_bytes())
    single = invoke(zs_cache, "build", tmp_path / "one.jpg", "--store", tmp_path / "single", *TINY_BUILD)
    assert single.returncode == 0, single.stderr
    (row,) = FeatureStore.open(tmp_path / "single").manifest().to_pylist()
    assert row["key"] == "one.jpg" and row["error"] is None
    (tmp_path / "list.txt").write_bytes(b"one.jpg\nbad\0name.jpg\n")
    listed = invoke(zs_cache, "build", tmp_path / "list.txt", "--store", tmp_path / "listed", *TINY_BUILD)
    assert listed.returncode == 0, listed.stderr
    rows = {row["key"]: row["error"] for row in FeatureStore.open(tmp_path / "listed").manifest().to_pylist()}
    assert rows["one.jpg"] is None and "the path holds a NUL byte" in rows["bad\0name.jpg"]


def test_progress_bars_stay_out_of_output_that_is_not_a_terminal(tmp_path):
    (tmp_path / "one.jpg").write_bytes(PHOTOS[0].read_bytes())
    args = [a for a in TINY_BUILD if a != "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    done = subprocess.run([sys.executable, "-m", "zeroseg.pipeline.cli", "build", str(tmp_path / "one.jpg"), "--store",
                           str(tmp_path / "store"), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "zs-cache:" not in done.stderr and "img/s" not in done.stderr  # stderr is a pipe: no bar
