"""Stage two's data: the chunk-window sample order and the batches read from a real tiny store."""

import dataclasses
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import STORE_CHUNK, make_store
from zeroseg.errors import UserError
from zeroseg.pipeline import store as store_module
from zeroseg.pipeline.compact import compact
from zeroseg.pipeline.manifest import ImageRecord, image_records
from zeroseg.pipeline.options import CompactOptions
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_reader import SourceImages, StoreReader
from zeroseg.trainer.data import ModelInput, StoreBatches, check_store, make_loader
from zeroseg.trainer.losses import LossConfig
from zeroseg.trainer.model_config import model_preset
from zeroseg.trainer.sampling import BatchPlan, SampleOrder


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("data"))


def test_epoch_order_shuffles_chunks_then_samples_within_windows():
    chunk_of = np.repeat([0, 1, 2, 5, 6, 7, 9], [4, 4, 4, 3, 4, 4, 2])  # 25 samples, uneven chunks
    order = SampleOrder(chunk_of, window=2, seed=7)
    first = order.epoch(0)
    assert sorted(first) == list(range(25))
    assert np.array_equal(first, SampleOrder(chunk_of, window=2, seed=7).epoch(0))  # a function of (seed, epoch)
    assert not np.array_equal(first, order.epoch(1))
    assert not np.array_equal(first, SampleOrder(chunk_of, window=2, seed=8).epoch(0))
    # the order walks through windows of 2 whole chunks, each window's samples contiguous
    for epoch in range(4):
        windows = _windows(order.epoch(epoch), chunk_of, 2)
        assert [len(w) for w in windows] == [2, 2, 2, 1]
        assert set().union(*windows) == {0, 1, 2, 5, 6, 7, 9}
    # the stream concatenates epochs: positions straddle the boundary without dropping a sample
    assert np.array_equal(order.positions(20, 10), np.concatenate([first[20:], order.epoch(1)[:5]]))


def _windows(order: np.ndarray, chunk_of: np.ndarray, window: int) -> list[set]:
    """The chunk sets of the order's windows: the shortest contiguous blocks holding all samples of their
    chunks, grouped greedily into `window` chunks (a window's chunks may happen to come out one by one)."""
    blocks, start = [], 0
    while start < len(order):
        chunks = {chunk_of[order[start]]}
        while True:
            end = start + int(np.isin(chunk_of, list(chunks)).sum())
            found = set(chunk_of[order[start:end]])
            if found <= chunks:
                break
            chunks |= found
        assert found == chunks
        blocks.append(chunks)
        start = end
    windows = [set()]
    for block in blocks:
        if len(windows[-1]) == window:
            windows.append(set())
        windows[-1] |= block
        assert len(windows[-1]) <= window
    return windows


@pytest.mark.parametrize("streams, run", [(1, 1), (2, 3), (3, 1)])
def test_device_batches_do_not_depend_on_the_number_of_processes(streams, run):
    one = BatchPlan(batch=3, accum=4, world=1, rank=0, streams=streams, run=run)
    two = [BatchPlan(batch=3, accum=2, world=2, rank=r, streams=streams, run=run) for r in range(2)]
    four = [BatchPlan(batch=3, accum=1, world=4, rank=r, streams=streams, run=run) for r in range(4)]
    assert one.effective_batch == two[0].effective_batch == four[0].effective_batch == 12
    block = streams * run  # steps per block; a block's steps cover its 12 x block positions, each batch once
    starts = []
    for step in range(2 * block):
        expected = [one.start(step * 4 + a) for a in range(4)]  # device batch m of the step, m = 0..3
        starts += expected
        for plans in (two, four):
            found = {}
            for plan in plans:
                for a in range(plan.accum):
                    j = step * plan.accum + a
                    found[plan.step_and_index(j)] = plan.start(j)
            assert found == {(step, m): start for m, start in enumerate(expected)}
    assert sorted(starts) == list(range(0, 24 * block, 3))
    if streams == run == 1:  # the plain order: device batch m of step s at s * E + m * batch
        assert starts == list(range(0, 24, 3))
    # block 0, device batch slot 1 (one's accumulation pass 1) owns positions 3 x block ... 6 x block - 1: run c of
    # it, R batches, serves the steps u with u % streams == c in turn
    slot = [one.start(u * 4 + 1) for u in range(block)]
    assert sorted(slot) == list(range(3 * block, 6 * block, 3))
    assert slot[:: streams] == list(range(3 * block, 3 * block + 3 * run, 3))


def test_plans_that_read_whole_runs_fit_an_epoch_into_a_block():
    plan = BatchPlan.reading(256, 1, 8, 3, workers=8, samples=1_281_167, window_samples=16 * 64)
    assert (plan.streams, plan.run) == (8, 64)  # 16 windows of 1,024 in batches of 256
    small = BatchPlan.reading(2, 1, 2, 0, workers=3, samples=48, window_samples=4)
    assert (small.streams, small.run) == (3, 4)  # 3 x 4 steps of 4 samples: one epoch of 48
    alone = BatchPlan.reading(4, 1, 1, 0, workers=0, samples=10, window_samples=4)
    assert [alone.start(j) for j in range(9)] == list(range(0, 36, 4))  # one reader, one slot: the plain order


def test_batches_hold_the_store_rows_and_the_crops_the_teacher_saw(store):
    samples = StoreReader.open(store)
    features = FeatureStore.open(store).features[:]
    reader = SourceImages(samples.meta)
    plan = BatchPlan(batch=4, accum=1, world=1, rank=0)
    dataset = StoreBatches(samples, plan, window=2, seed=0)
    seen = []
    for batch in make_loader(dataset, 0, 5, workers=1, prefetch=2, pin=False):  # 20 samples = 2 epochs
        rows = batch.rows.numpy()
        assert batch.crops.dtype == torch.uint8 and batch.crops.shape == (4, 32, 32, 3)
        assert batch.features.dtype == torch.float16 and batch.features.shape == (4, 30, 32)
        np.testing.assert_array_equal(batch.features.numpy(), features[rows])
        records = [ImageRecord("photos", key, int(row)) for key, row in zip(_keys(store, rows), rows)]
        np.testing.assert_array_equal(batch.crops.numpy(), reader.crops(records))
        seen += rows.tolist()
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))  # every row once per epoch
    assert seen[:10] != seen[10:]


def test_batches_from_a_store_that_keeps_its_crops(store, tmp_path):
    kept = make_store(tmp_path, store_crops=True)
    plan = BatchPlan(batch=5, accum=1, world=1, rank=0)
    decoded = StoreBatches(StoreReader.open(store), plan, window=2, seed=0)
    stored = StoreBatches(StoreReader.open(kept), plan, window=2, seed=0)
    assert stored.samples.reads_stored_crops and not decoded.samples.reads_stored_crops
    for j in range(2):
        a, b = decoded[j], stored[j]
        assert torch.equal(a.rows, b.rows) and torch.equal(a.features, b.features) and torch.equal(a.crops, b.crops)


def test_a_chunks_image_records_are_read_from_its_shards_manifest_part(store):
    samples = StoreReader.open(store)
    assert samples.rows.tolist() == list(range(10)) and len(samples.parts) == 3  # only the rows are held
    fs = FeatureStore.open(store)
    manifest = {record.row: record for record in image_records(fs.manifest())}
    for index in range(5):  # chunks of 2 rows, shards of 4: parts 0, 0, 1, 1, 2
        records = samples.chunk_records(index)
        for offset in range(2):
            expected = manifest[2 * index + offset]
            found = (records["source"][offset], records["key"][offset], records["sha256"][offset])
            assert found == (expected.source, expected.key, expected.sha256)


def test_chunk_records_from_compacted_parts_read_only_the_row_groups_that_hold_them(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    before = {index: _records(store, index) for index in range(5)}
    monkeypatch.setattr(store_module, "PART_ROW_GROUP", 3)  # row groups of 3 rows: a chunk spans one or two
    compact(CompactOptions(store, 8))
    fs = FeatureStore.open(store)
    assert [pq.ParquetFile(part).num_row_groups for part in fs.part_files()] == [3, 1]
    samples = StoreReader.open(store)
    assert {index: _records(store, index, samples) for index in range(5)} == before
    read = []
    original = pq.ParquetFile.read_row_groups
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", lambda self, groups, **kw: read.append(groups) or
                        original(self, groups, **kw))  # fmt: skip
    samples.chunk_records(1)  # rows 2-3: groups 0 (rows 0-2) and 1 (rows 3-5) of the first part
    assert read == [[0, 1]]


def test_a_compact_while_training_is_followed_and_a_changed_part_refused(tmp_path):
    store = make_store(tmp_path)
    samples, fs = StoreReader.open(store), FeatureStore.open(store)
    before = _records(store, 3, samples)
    compact(CompactOptions(store, 8))  # the trainer's listing of parts is out of date
    assert _records(store, 3, samples) == before and len(set(samples.parts.values())) == 2
    part = fs.part_path(2)
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 1), part)  # shard 2 loses its last image (row 9)
    with pytest.raises(UserError, match=r"shard-000002.parquet' no longer lists the images of features rows 8-9 "
                                        r"this run started with \(the store changed during training\)"):  # fmt: skip
        samples.chunk_records(4)
    hashes = pa.array(["Z" * 64] * table.num_rows)
    pq.write_table(table.set_column(table.schema.get_field_index("sha256"), "sha256", hashes), part)
    with pytest.raises(UserError, match=r"shard-000002.parquet': a sha256 there is not 64 hex digits"):
        samples.chunk_records(4)


def test_start_up_refuses_an_image_listed_twice_from_the_digests_of_its_names(tmp_path):
    store = make_store(tmp_path)
    part = pq.read_table(store / "manifest" / "shard-000001.parquet")
    moved = pc.add(part["row"], 100)  # the same images under other features rows
    pq.write_table(part.set_column(0, "row", moved), store / "manifest" / "shard-000007.parquet")
    first = part["key"][0].as_py()
    with pytest.raises(UserError, match=rf"image photos/{first} appears 2 times in the manifest \(4 duplicated"):
        StoreReader.open(store)


def _records(store, index: int, samples: StoreReader | None = None) -> list[tuple]:
    """(source, key, sha256) of chunk `index`'s samples, read by StoreReader.chunk_records."""
    records = (samples or StoreReader.open(store)).chunk_records(index)
    return list(zip(records["source"].tolist(), records["key"].tolist(), records["sha256"].tolist()))


def _keys(store, rows: np.ndarray) -> list[str]:
    by_row = {record.row: record.key for record in image_records(FeatureStore.open(store).manifest())}
    return [by_row[int(row)] for row in rows]


def test_a_worker_reads_each_chunk_once_per_epoch(store, monkeypatch):
    reads = Counter()
    original = StoreReader.read_chunk

    def counting(self, index):
        reads[index] += 1
        return original(self, index)

    monkeypatch.setattr(StoreReader, "read_chunk", counting)
    samples = StoreReader.open(store)
    dataset = StoreBatches(samples, BatchPlan(batch=5, accum=1, world=1, rank=0), window=2, seed=3)
    dataset[0], dataset[1]  # one epoch: 10 samples in 5 chunks, windows of 2 chunks
    assert reads == dict.fromkeys(range(5), 1)


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_each_chunk_is_read_about_once_per_epoch_by_one_worker_of_two_ranks(tmp_path, monkeypatch, workers):
    store = make_store(tmp_path, count=48, store_crops=True)  # 24 chunks of 2, windows of 2 chunks
    log = tmp_path / "reads"
    original = StoreReader.read_chunk

    def logged(self, index):  # runs in the loader workers: one line per Zarr read of a chunk
        with log.open("a") as out:
            out.write(f"{os.getpid()} {index}\n")
        return original(self, index)

    monkeypatch.setattr(StoreReader, "read_chunk", logged)
    samples = StoreReader.open(store)

    def epoch(plans: list[BatchPlan]) -> tuple[list[int], Counter, set]:
        """One epoch (12 steps of 2 ranks x 2) through real loaders: rows seen, reads per chunk, readers."""
        log.write_text("")
        rows = []
        for plan in plans:
            loader = make_loader(StoreBatches(samples, plan, window=2, seed=5), 0, 12, workers, prefetch=2, pin=False)
            rows += [row for batch in loader for row in batch.rows.tolist()]
        reads = [line.split() for line in log.read_text().splitlines()]
        return rows, Counter(int(index) for _, index in reads), {pid for pid, _ in reads}

    plain = epoch([BatchPlan(batch=2, accum=1, world=2, rank=r) for r in range(2)])
    laid_out = epoch([BatchPlan.reading(2, 1, 2, r, workers, len(samples), 2 * STORE_CHUNK) for r in range(2)])
    for rows, per_chunk, readers in (plain, laid_out):
        assert sorted(rows) == list(range(48))  # one block is this epoch
        assert set(per_chunk) == set(range(24)) and len(readers) == 2 * workers
    _, per_chunk, _ = laid_out
    if workers != 4:  # runs of 6 (2 workers) or 4 batches (3) cover whole windows: one read of every chunk
        assert per_chunk == dict.fromkeys(range(24), 1)
    else:  # runs of 3 batches of 2: 8 of the 12 windows of 4 samples straddle two runs, each reads its chunks
        assert max(per_chunk.values()) == 2 and sum(per_chunk.values()) <= 24 + 8 * 2
    assert sum(plain[1].values()) > sum(per_chunk.values())


def test_model_input_normalises_and_resizes_on_the_device(store):
    meta = StoreReader.open(store).meta
    crops = torch.full((2, 32, 32, 3), 255, dtype=torch.uint8)
    images = ModelInput(meta, 32, torch.device("cpu"))(crops)
    expected = (1.0 - torch.tensor(meta.preprocessing.mean)) / torch.tensor(meta.preprocessing.std)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images[0, :, 5, 7], expected)
    assert ModelInput(meta, 16, torch.device("cpu"))(crops).shape == (2, 3, 16, 16)


def test_stores_that_do_not_fit_the_model_are_refused(store):
    samples = StoreReader.open(store)
    tiny = model_preset("tiny")
    check_store(samples, tiny, LossConfig(), resize=False)
    with pytest.raises(UserError, match=r"holds 32-dim features .* teacher_dim is 768"):
        check_store(samples, model_preset("base"), LossConfig(), resize=False)
    wide = dataclasses.replace(tiny, image_size=64)
    with pytest.raises(UserError, match=r"holds 32px crops but the model's image_size is 64"):
        check_store(samples, wide, LossConfig(), resize=False)
    check_store(samples, wide, LossConfig(), resize=True)
    with pytest.raises(UserError, match=r"the loss asks for grids \[5\]"):
        check_store(samples, tiny, LossConfig(grids=(1, 5)), resize=False)
