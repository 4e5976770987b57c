"""A damaged store is loud wherever it is read: chunk checksums, commit records, checked manifest parts, repair."""

import json
import re
import shutil

import google_crc32c
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY_TEACHER, flip_byte, invoke, read_every_batch, rebuild, train
from zeroseg.errors import UserError
from zeroseg.io import canonical_sha256
from zeroseg.pipeline.check import find_damage
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.integrity import chunk_crc32c, encode_record
from zeroseg.pipeline.manifest import ImageRecord, image_records, manifest_rows
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_meta import StoreMeta
from zeroseg.pipeline.store_reader import StoreReader
from zeroseg.trainer.data import StoreBatches
from zeroseg.trainer.sampling import BatchPlan


@pytest.fixture
def store(crops_store):
    return crops_store


def build_args(store_path) -> list[str]:
    """zs-cache build arguments that bring the store up to date with its own source and teacher."""
    meta = FeatureStore.open(store_path).meta
    return [meta.sources["photos"].path, "--store", str(store_path), "--teacher", str(TINY_TEACHER),
            "--pretrained", "none", "--device", "cpu", "--image-size", "32", "--no-progress"]


def test_new_stores_checksum_every_chunk_and_record_each_shards_chunks(store):
    for array in ("features", "crops"):
        codecs = json.loads((store / array / "zarr.json").read_text())["codecs"]
        assert [c["name"] for c in codecs] == ["bytes", "zstd", "crc32c"]
    part = pq.ParquetFile(store / "manifest" / "shard-000001.parquet")
    record = json.loads(part.metadata.metadata[b"zeroseg.chunks"])
    assert sorted(record) == ["crops", "features"] and sorted(record["features"]) == ["c/2/0/0", "c/3/0/0"]
    assert all(len(crc) == 8 for crc in record["crops"].values())
    assert part.metadata.row_group(0).column(0).statistics is not None
    shown = invoke(zs_cache, "inspect", store)
    assert "checksums  crc32c on every chunk of features and crops; a commit record for each of the 3 shards" in (
        shown.stdout
    )


def test_a_flipped_byte_in_a_features_chunk_fails_verify_training_and_is_repaired(store, tmp_path):
    before = FeatureStore.open(store).features[:]
    flip_byte(store / "features" / "c" / "1" / "0" / "0")
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert verified.returncode == 1
    assert "shard 0: chunk features/c/1/0/0 is damaged (crc32c differs from its commit record)" in verified.stderr
    with pytest.raises(UserError, match=r"a chunk of features holding rows 2-3 is damaged \(crc32c mismatch\)"):
        read_every_batch(store)
    # 5 steps of 2 are one epoch of the 10 images: every chunk is read, whatever the sample order
    trained = train(store, tmp_path / "run", "--steps", "5")
    assert trained.returncode == 2 and "is damaged (crc32c mismatch)" in trained.stderr
    assert "Traceback" not in trained.stderr
    parts = {p.name: p.read_bytes() for p in (store / "manifest").iterdir()}
    summary, lines = rebuild(store, repair=True)
    assert lines[0].startswith("repair: shard 0 is damaged (shard 0: chunk features/c/1/0/0 is damaged")
    assert (summary.processed, summary.shards) == (4, 1)
    after = {p.name: p.read_bytes() for p in (store / "manifest").iterdir()}
    assert after["shard-000001.parquet"] == parts["shard-000001.parquet"]  # nothing else redone
    assert after["shard-000002.parquet"] == parts["shard-000002.parquet"]
    assert invoke(zs_cache, "verify", store, "--no-progress").returncode == 0
    np.testing.assert_array_equal(FeatureStore.open(store).features[:], before)


def test_verify_names_a_chunk_that_fails_decoding_though_its_commit_record_agrees(store):
    chunk = store / "features" / "c" / "1" / "0" / "0"
    flip_byte(chunk)
    part = store / "manifest" / "shard-000000.parquet"
    record = FeatureStore.open(store).part_records(part)[0]
    record["features"]["c/1/0/0"] = chunk_crc32c(chunk.read_bytes())  # damaged before it was recorded: decoding tells
    pq.write_table(pq.read_table(part).replace_schema_metadata(encode_record(record)), part, write_page_checksum=True)
    damage = find_damage(FeatureStore.open(store), progress=False)
    assert len(damage.problems) == 1 and damage.problems[0].startswith("shard 0: chunk 1 of features does not decode")
    assert list(damage.shards) == [0] and not damage.unrepairable  # the other chunks of its verify block read fine


def test_verify_finds_chunks_that_decode_but_are_not_the_ones_their_shards_wrote(store):
    """Two features chunks swapped (each intact, each decoding): only the commit records' payload crc32c tell."""
    first, second = store / "features" / "c" / "0" / "0" / "0", store / "features" / "c" / "2" / "0" / "0"
    whole = {f"{google_crc32c.value(path.read_bytes()):08x}" for path in (first, second)}
    assert len(whole) == 1  # a whole file's crc32c is one constant for every intact file: it tells nothing
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    first.write_bytes(second_bytes)
    second.write_bytes(first_bytes)
    damage = find_damage(FeatureStore.open(store), progress=False)
    assert sorted(damage.problems) == [
        "shard 0: chunk features/c/0/0/0 is damaged (crc32c differs from its commit record)",
        "shard 1: chunk features/c/2/0/0 is damaged (crc32c differs from its commit record)",
    ]
    assert sorted(damage.shards) == [0, 1]


def test_a_missing_chunk_is_an_error_naming_it_never_zeros_and_a_rerun_points_to_repair(store):
    (store / "crops" / "c" / "4" / "0" / "0" / "0").unlink()
    (store / "features" / "c" / "2" / "0" / "0").unlink()
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert "shard 1: chunk features/c/2/0/0 is missing" in verified.stderr
    assert "shard 2: chunk crops/c/4/0/0/0 is missing" in verified.stderr
    with pytest.raises(UserError, match=r"chunk features/c/2/0/0 \(rows 4-5\) is missing"):
        read_every_batch(store)
    samples = StoreReader.open(store)
    with pytest.raises(UserError, match=r"chunk crops/c/4/0/0/0 \(rows 8-9\) is missing"):
        StoreBatches(samples, BatchPlan(2, 1, 1, 0), 2, 0).chunk(4)  # features and crops of rows 8-9
    rerun = invoke(zs_cache, "build", *build_args(store))
    assert rerun.returncode == 2
    assert "shard 1 lost chunk features/c/2/0/0: run zs-cache build --repair to redo it" in rerun.stderr
    summary, lines = rebuild(store, repair=True)
    assert [line.split(" is damaged")[0] for line in lines[:2]] == ["repair: shard 1", "repair: shard 2"]
    assert (summary.processed, summary.shards) == (6, 2)
    assert invoke(zs_cache, "verify", store, "--no-progress").returncode == 0
    assert len(read_every_batch(store)) == 5


def test_stray_manifest_files_and_duplicate_rows_are_refused(store, tmp_path):
    shutil.copy(store / "manifest" / "shard-000001.parquet", store / "manifest" / "shard-000001 (copy).parquet")
    for result in (invoke(zs_cache, "inspect", store), invoke(zs_cache, "verify", store, "--no-progress")):
        assert result.returncode in (1, 2)
        assert "shard-000001 (copy).parquet' is not a manifest part (parts are named shard-NNNNNN.parquet)" in (
            result.stderr
        )
    with pytest.raises(UserError, match="is not a manifest part"):
        StoreReader.open(store)
    (store / "manifest" / "shard-000001 (copy).parquet").rename(store / "manifest" / "shard-000007.parquet")
    with pytest.raises(UserError, match=r"appears 2 times in the manifest \(4 duplicated images\)"):
        FeatureStore.open(store).manifest()
    with pytest.raises(UserError, match=r"features row 4 is claimed by several manifest rows"):
        StoreReader.open(store)  # a store with crops: the trainer reads only the rows of its manifest
    repaired = invoke(zs_cache, "build", *build_args(store), "--repair")
    assert repaired.returncode == 2 and "cannot repair store" in repaired.stderr


def test_every_single_bit_flip_in_a_manifest_part_is_refused_or_harmless(store):
    part = store / "manifest" / "shard-000002.parquet"
    original = part.read_bytes()
    fs = FeatureStore.open(store)
    expected, record = fs.read_part(part), fs.part_records(part)
    silent = []
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 1 << (position % 8)
        part.write_bytes(bytes(data))
        try:
            same = fs.read_part(part).equals(expected) and fs.part_records(part) == record
        except UserError:
            continue
        if not same:
            silent.append(position)
    part.write_bytes(original)
    assert silent == []


@pytest.mark.parametrize("column", ["sha256", "width", "height"])
def test_verify_finds_a_damaged_page_of_a_column_it_does_not_check_and_repair_redoes_its_shard(store, column):
    """Every reader of the part refuses it (the trainer reads the hashes, inspect the errors): verify, which checks
    other columns, must too, or --repair would find nothing to redo."""
    part = store / "manifest" / "shard-000001.parquet"
    chunk = next(chunk for chunk in (pq.ParquetFile(part).metadata.row_group(0).column(i) for i in range(10))
                 if chunk.path_in_schema == column)  # fmt: skip
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    flip_byte(part, position=start + chunk.total_compressed_size // 2)  # inside the column's pages
    with pytest.raises(UserError, match=f"manifest part '{part}' is damaged"):
        FeatureStore.open(store).manifest()
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert verified.returncode == 1 and f"problem: manifest part '{part}' is damaged" in verified.stderr
    summary, lines = rebuild(store, repair=True)
    assert lines[0].startswith("repair: shard 1 is damaged") and (summary.processed, summary.shards) == (4, 1)
    assert invoke(zs_cache, "verify", store, "--no-progress").returncode == 0


def test_a_store_of_another_format_version_is_refused_in_one_line(store, tmp_path):
    """One store format: a store of format 1 (made before chunk checksums, commit records and the metadata
    checksum) is refused by every reader, saying which version it is and which this zeroseg reads."""
    group = json.loads((store / "zarr.json").read_text())
    group["attributes"]["zeroseg"]["format_version"] = 1
    (store / "zarr.json").write_text(json.dumps(group))
    line = f"store '{store}' has format 1; this zeroseg reads format 2: rebuild it with zs-cache build"
    with pytest.raises(UserError, match=re.escape(line)):
        StoreReader.open(store)
    for result in (invoke(zs_cache, "inspect", store), invoke(zs_cache, "verify", store, "--no-progress"),
                   train(store, tmp_path / "run", "--steps", "1")):  # fmt: skip
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {line}"]


def test_an_edited_store_attribute_fails_its_checksum_in_every_reader(store, tmp_path):
    """The attribute's sha256 covers its canonical JSON: a hand edit of `normalized` or of the mean, which would
    silently change what the features mean, is one line from open, inspect, verify and zs-train."""
    text = (store / "zarr.json").read_text()
    for edit in (lambda a: a.update(normalized=True), lambda a: a["preprocessing"]["mean"].__setitem__(0, 0.5)):
        group = json.loads(text)
        edit(group["attributes"]["zeroseg"])
        (store / "zarr.json").write_text(json.dumps(group, indent=2))
        line = f"store '{store}': its metadata fails its checksum"
        with pytest.raises(UserError, match=re.escape(line)):
            FeatureStore.open(store)
        for result in (invoke(zs_cache, "inspect", store), invoke(zs_cache, "verify", store, "--no-progress"),
                       train(store, tmp_path / "run", "--steps", "1")):  # fmt: skip
            assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
            assert result.stderr.startswith(f"error: {line}")
    group = json.loads(text)
    group["attributes"]["zeroseg"]["preprocessing"]["mean"] = [0.48145466, 0.4578275, 0.40821073]  # the same values
    (store / "zarr.json").write_text(json.dumps(group, indent=4))  # another layout of the same JSON
    assert FeatureStore.open(store).meta.preprocessing.mean[0] == 0.48145466


def attribute(store_path) -> dict:
    return json.loads((store_path / "zarr.json").read_text())["attributes"]["zeroseg"]


def test_the_store_attribute_keeps_its_json_layout_and_reads_back_unchanged(store):
    recorded = attribute(store)
    assert list(recorded) == ["teacher", "preprocessing", "grids", "embed_dim", "shard_size", "chunk_size",
                              "normalized", "sources", "stored_crops", "format_version", "package_version",
                              "sha256"]  # fmt: skip
    assert recorded["sha256"] == canonical_sha256({key: value for key, value in recorded.items() if key != "sha256"})
    assert recorded["teacher"] == {"model": "zs-tiny-clip", "pretrained": None, "weights_sha256": None,
                                   "quick_gelu": False, "config": json.loads(TINY_TEACHER.read_text())}
    assert list(recorded["teacher"]) == ["model", "pretrained", "weights_sha256", "quick_gelu", "config"]
    preprocessing = {
        "crop": "centre square of side min(W, H), resized to crop_size (see pipeline.crops)",
        "crop_size": 32, "decode": "full", "decode_device": None, "interpolation": "bicubic", "antialias": True,
        "cell_boundaries": "floor(k * crop_size / grid)", "view_size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    }  # fmt: skip
    assert json.dumps(recorded["preprocessing"]) == json.dumps(preprocessing)  # same keys, order and values
    assert recorded["sources"] == {"photos": {"kind": "folder", "path": recorded["sources"]["photos"]["path"],
                                              "column": None}}  # fmt: skip
    meta = FeatureStore.open(store).meta
    assert recorded["grids"] == [1, 2, 3, 4] and meta.views[:2] == [(1, 0, 0), (2, 0, 0)] and meta.num_views == 30
    assert json.dumps(meta.to_attribute()) == json.dumps(recorded)
    assert StoreMeta.from_attribute(meta.to_attribute(), store) == meta
    before = (store / "zarr.json").read_bytes()
    FeatureStore.open(store, writable=True).save_meta()
    assert (store / "zarr.json").read_bytes() == before


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda a: a.update(colour="blue"), "attribute zeroseg: unknown key 'colour' (damaged, or written by another"),
        (lambda a: a.pop("embed_dim"), "attribute zeroseg: no key 'embed_dim'"),
        (lambda a: a.pop("stored_crops"), "attribute zeroseg: no key 'stored_crops'"),
        (lambda a: a["preprocessing"].pop("decode"), "attribute zeroseg.preprocessing: no key 'decode'"),
        (lambda a: a["preprocessing"].pop("decode_device"), "attribute zeroseg.preprocessing: no key 'decode_device'"),
        (lambda a: a["teacher"].pop("model"), "attribute zeroseg.teacher: no key 'model'"),
        (lambda a: a["preprocessing"].update(gamma=2.2), "attribute zeroseg.preprocessing: unknown key 'gamma'"),
        (lambda a: a["preprocessing"].update(decode="fast"),
         "attribute zeroseg.preprocessing: decode 'fast' is not one of full, reduced, device"),
        (lambda a: a["preprocessing"].update(decode="device"),
         "attribute zeroseg.preprocessing: decode_device must name the device type of decode 'device' only"),
        (lambda a: a["sources"]["photos"].pop("path"), "attribute zeroseg.sources.photos: no key 'path'"),
        (lambda a: a["sources"]["photos"].update(kind="ftp"), "zeroseg.sources.photos: unknown source kind 'ftp'"),
        (lambda a: a.update(teacher="zs-tiny-clip"), "attribute zeroseg.teacher: a str, not a JSON object"),
    ],
)
def test_a_damaged_store_attribute_is_one_line_naming_the_store(store, damage, named):
    """As another zeroseg might write it: its checksum agrees, its keys do not."""
    group = json.loads((store / "zarr.json").read_text())
    recorded = group["attributes"]["zeroseg"]
    damage(recorded)
    recorded["sha256"] = canonical_sha256({key: value for key, value in recorded.items() if key != "sha256"})
    (store / "zarr.json").write_text(json.dumps(group))
    with pytest.raises(UserError) as refused:
        FeatureStore.open(store)
    assert str(refused.value).startswith(f"store '{store}': attribute zeroseg") and named in str(refused.value)
    shown = invoke(zs_cache, "inspect", store)
    assert shown.returncode == 2 and len(shown.stderr.strip().splitlines()) == 1 and named in shown.stderr


def test_image_records_are_the_manifest_rows(store):
    part = FeatureStore.open(store).read_part(store / "manifest" / "shard-000001.parquet")
    records = image_records(part)
    assert [(r.source, r.key, r.row) for r in records] == list(zip(*(part[c].to_pylist() for c in ("source", "key",
                                                                                                     "row"))))
    assert all(r.ok and len(r.sha256) == 64 and r.width > 0 for r in records)
    assert manifest_rows(1, records).drop_columns(["time"]).equals(part.drop_columns(["time"]))
    failed = ImageRecord("photos", "gone.jpg", error="unreadable: No such file or directory")
    row = manifest_rows(1, [failed]).drop_columns(["time"]).to_pylist()[0]
    assert row == {"row": None, "key": "gone.jpg", "source": "photos", "sha256": None, "width": None, "height": None,
                   "status": "error", "error": "unreadable: No such file or directory", "shard": 1}
    assert image_records(manifest_rows(1, [failed])) == [failed]


def test_verify_compares_each_decoded_chunk_with_its_commit_record_from_the_one_read(store):
    part = store / "manifest" / "shard-000000.parquet"
    record = FeatureStore.open(store).part_records(part)[0]
    record["features"]["c/1/0/0"] = "00000000"  # the chunk decodes, but it is not the chunk the shard committed
    pq.write_table(pq.read_table(part).replace_schema_metadata(encode_record(record)), part, write_page_checksum=True)
    damage = find_damage(FeatureStore.open(store), progress=False)
    assert damage.problems == ["shard 0: chunk features/c/1/0/0 is damaged (crc32c differs from its commit record)"]
    assert list(damage.shards) == [0]
