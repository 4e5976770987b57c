"""A damaged store is loud wherever it is read: chunk checksums, commit records, checked manifest parts, repair."""

import json
import shutil

import google_crc32c
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import TINY_TEACHER, flip_byte, invoke, read_every_batch, rebuild, train
from zeroseg.errors import UserError
from zeroseg.pipeline.check import find_damage
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.integrity import INTACT_FILE_CRC32C, chunk_crc32c, encode_record
from zeroseg.pipeline.manifest import ImageRecord, image_records, manifest_rows
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_meta import StoreMeta
from zeroseg.trainer.data import StoreBatches, StoreSamples
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
    assert "checksums  crc32c on every chunk of features and crops; 3 of 3 shards have a commit record" in shown.stdout


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
    record = FeatureStore.open(store).chunk_record(part)
    record["features"]["c/1/0/0"] = chunk_crc32c(chunk.read_bytes())  # damaged before it was recorded: decoding tells
    pq.write_table(pq.read_table(part).replace_schema_metadata(encode_record(record)), part, write_page_checksum=True)
    damage = find_damage(FeatureStore.open(store), progress=False)
    assert len(damage.problems) == 1 and damage.problems[0].startswith("shard 0: chunk 1 of features does not decode")
    assert list(damage.shards) == [0] and not damage.unrepairable  # the other chunks of its verify block read fine


def test_verify_finds_chunks_that_decode_but_are_not_the_ones_their_shards_wrote(store):
    """Two features chunks swapped (each intact, each decoding): only the commit records' payload crc32c tell."""
    first, second = store / "features" / "c" / "0" / "0" / "0", store / "features" / "c" / "2" / "0" / "0"
    whole = {f"{google_crc32c.value(path.read_bytes()):08x}" for path in (first, second)}
    assert whole == {INTACT_FILE_CRC32C}  # a whole file's crc32c tells nothing
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    first.write_bytes(second_bytes)
    second.write_bytes(first_bytes)
    damage = find_damage(FeatureStore.open(store), progress=False)
    assert sorted(damage.problems) == [
        "shard 0: chunk features/c/0/0/0 is damaged (crc32c differs from its commit record)",
        "shard 1: chunk features/c/2/0/0 is damaged (crc32c differs from its commit record)",
    ]
    assert sorted(damage.shards) == [0, 1]


def test_records_written_before_payload_checksums_still_verify_and_find_a_damaged_chunk(store):
    """Older stores recorded the whole file's crc32c, the same constant for every intact chunk: such a store is
    still clean, and a changed byte still fails that constant."""
    for part in sorted((store / "manifest").glob("*.parquet")):
        record = FeatureStore.open(store).chunk_record(part)
        old = {name: dict.fromkeys(files, INTACT_FILE_CRC32C) for name, files in record.items()}
        table = pq.read_table(part).replace_schema_metadata(encode_record(old))
        pq.write_table(table, part, write_page_checksum=True)
    assert find_damage(FeatureStore.open(store), progress=False).problems == []
    flip_byte(store / "features" / "c" / "1" / "0" / "0")
    flip_byte(store / "crops" / "c" / "3" / "0" / "0" / "0")
    assert sorted(find_damage(FeatureStore.open(store), progress=False).problems) == [
        "shard 0: chunk features/c/1/0/0 is damaged (crc32c differs from its commit record)",
        "shard 1: chunk crops/c/3/0/0/0 is damaged (crc32c differs from its commit record)",
    ]


def test_a_missing_chunk_is_an_error_naming_it_never_zeros_and_a_rerun_points_to_repair(store):
    (store / "crops" / "c" / "4" / "0" / "0" / "0").unlink()
    (store / "features" / "c" / "2" / "0" / "0").unlink()
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert "shard 1: chunk features/c/2/0/0 is missing" in verified.stderr
    assert "shard 2: chunk crops/c/4/0/0/0 is missing" in verified.stderr
    with pytest.raises(UserError, match=r"chunk features/c/2/0/0 \(rows 4-5\) is missing"):
        read_every_batch(store)
    samples = StoreSamples.open(store)
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
        StoreSamples.open(store)
    (store / "manifest" / "shard-000001 (copy).parquet").rename(store / "manifest" / "shard-000007.parquet")
    with pytest.raises(UserError, match=r"appears 2 times in the manifest \(4 duplicated images\)"):
        FeatureStore.open(store).manifest()
    with pytest.raises(UserError, match=r"features row 4 is claimed by several manifest rows"):
        StoreSamples.open(store)  # a store with crops: the trainer reads only the rows of its manifest
    repaired = invoke(zs_cache, "build", *build_args(store), "--repair")
    assert repaired.returncode == 2 and "cannot repair store" in repaired.stderr


def test_every_single_bit_flip_in_a_manifest_part_is_refused_or_harmless(store):
    part = store / "manifest" / "shard-000002.parquet"
    original = part.read_bytes()
    fs = FeatureStore.open(store)
    expected, record = fs.read_part(part), fs.chunk_record(part)
    silent = []
    for position in range(len(original)):
        data = bytearray(original)
        data[position] ^= 1 << (position % 8)
        part.write_bytes(bytes(data))
        try:
            same = fs.read_part(part).equals(expected) and fs.chunk_record(part) == record
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


def test_stores_made_before_checksums_still_open_and_say_they_are_unchecked(store):
    group_path = store / "zarr.json"
    group = json.loads(group_path.read_text())
    del group["attributes"]["zeroseg"]["commit_records"]
    group_path.write_text(json.dumps(group))
    for array in ("features", "crops"):
        meta_path = store / array / "zarr.json"
        metadata = json.loads(meta_path.read_text())
        metadata["codecs"] = [c for c in metadata["codecs"] if c["name"] != "crc32c"]
        meta_path.write_text(json.dumps(metadata))
        for chunk in (store / array / "c").rglob("0"):
            if chunk.is_file():
                chunk.write_bytes(chunk.read_bytes()[:-4])  # the crc32c codec appends 4 bytes
    for part in (store / "manifest").glob("*.parquet"):
        pq.write_table(pq.read_table(part).replace_schema_metadata(None), part)
    shown = invoke(zs_cache, "inspect", store)
    assert "chunks UNCHECKED (store made before chunk checksums" in shown.stdout
    assert "0 of 3 shards have a commit record" in shown.stdout
    verified = invoke(zs_cache, "verify", store, "--no-progress")
    assert verified.returncode == 0 and "3 shards without a commit record" in verified.stdout
    batches = read_every_batch(store)
    assert all(torch.any(batch.features != 0) for batch in batches)
    (store / "features" / "c" / "3" / "0" / "0").unlink()
    with pytest.raises(UserError, match=r"chunk features/c/3/0/0 \(rows 6-7\) is missing"):
        read_every_batch(store)


def attribute(store_path) -> dict:
    return json.loads((store_path / "zarr.json").read_text())["attributes"]["zeroseg"]


def test_the_store_attribute_keeps_its_json_layout_and_reads_back_unchanged(store):
    recorded = attribute(store)
    assert list(recorded) == ["teacher", "preprocessing", "grids", "views", "embed_dim", "shard_size", "chunk_size",
                              "normalized", "sources", "stored_crops", "commit_records", "format_version",
                              "package_version"]  # fmt: skip
    assert recorded["teacher"] == {"model": "zs-tiny-clip", "pretrained": None, "weights_sha256": None,
                                   "quick_gelu": False, "config": json.loads(TINY_TEACHER.read_text())}
    assert list(recorded["teacher"]) == ["model", "pretrained", "weights_sha256", "quick_gelu", "config"]
    preprocessing = {
        "crop": "centre square of side min(W, H), resized to crop_size (see pipeline.crops)",
        "crop_size": 32, "decode": "full", "interpolation": "bicubic", "antialias": True,
        "cell_boundaries": "floor(k * crop_size / grid)", "view_size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
    }  # fmt: skip
    assert json.dumps(recorded["preprocessing"]) == json.dumps(preprocessing)  # same keys, order and values
    assert recorded["sources"] == {"photos": {"kind": "folder", "path": recorded["sources"]["photos"]["path"],
                                              "column": None}}  # fmt: skip
    assert recorded["grids"] == [1, 2, 3, 4] and recorded["views"][:2] == [[1, 0, 0], [2, 0, 0]]
    meta = FeatureStore.open(store).meta
    assert json.dumps(meta.to_attribute()) == json.dumps(recorded)
    assert StoreMeta.from_attribute(meta.to_attribute(), store) == meta
    before = (store / "zarr.json").read_bytes()
    FeatureStore.open(store, writable=True).save_meta()
    assert (store / "zarr.json").read_bytes() == before


def test_stores_whose_attribute_predates_later_keys_still_open(store):
    group = json.loads((store / "zarr.json").read_text())
    recorded = group["attributes"]["zeroseg"]
    for key in ("stored_crops", "commit_records"):
        del recorded[key]
    del recorded["teacher"]["config"], recorded["sources"]["photos"]["column"], recorded["preprocessing"]["decode"]
    (store / "zarr.json").write_text(json.dumps(group))
    meta = FeatureStore.open(store).meta
    assert meta.teacher.config is None and meta.sources["photos"].column is None
    assert meta.preprocessing.decode == "full"
    assert meta.stored_crops is False and meta.commit_records is False


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda a: a.update(colour="blue"), "attribute zeroseg: unknown key 'colour' (damaged, or written by another"),
        (lambda a: a.pop("embed_dim"), "attribute zeroseg: no key 'embed_dim'"),
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
    group = json.loads((store / "zarr.json").read_text())
    damage(group["attributes"]["zeroseg"])
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
    record = FeatureStore.open(store).chunk_record(part)
    record["features"]["c/1/0/0"] = "00000000"  # the chunk decodes, but it is not the chunk the shard committed
    pq.write_table(pq.read_table(part).replace_schema_metadata(encode_record(record)), part, write_page_checksum=True)
    damage = find_damage(FeatureStore.open(store), progress=False)
    assert damage.problems == ["shard 0: chunk features/c/1/0/0 is damaged (crc32c differs from its commit record)"]
    assert list(damage.shards) == [0]
