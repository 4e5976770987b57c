"""Readers take no lock: a zs-cache compact (a real one, in another process) that replaces the manifest parts
while a reader reads them, or that is killed half-way, changes nothing the reader returns; a damaged part that
no compact replaced is still one line naming it, read once."""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import invoke, make_store
from zeroseg.errors import UserError
from zeroseg.pipeline import store as store_module
from zeroseg.pipeline.build import pending_keys
from zeroseg.pipeline.cli import main as zs_cache
from zeroseg.pipeline.store import FeatureStore
from zeroseg.pipeline.store_reader import StoreReader

CRASH = Path(__file__).parent / "compact_crash.py"
MERGED = "shards-000000-000002.parquet"


def source_keys(store: Path) -> list[str]:
    return sorted(path.name for path in Path(FeatureStore.open(store).meta.sources["photos"].path).iterdir())


def start_up(store: Path) -> tuple[list[int], dict]:
    samples = StoreReader.open(store)
    return samples.rows.tolist(), samples.required


READERS = {  # reader -> (the FeatureStore method it calls per part, what it returns)
    "manifest": ("read_part", lambda store: FeatureStore.open(store).manifest()),
    "records": ("part_records", lambda store: FeatureStore.open(store).records()),
    "verify": ("read_part", lambda store: invoke(zs_cache, "verify", store, "--no-progress")),
    "trainer start-up": ("read_part", start_up),
    "rerun planning": (
        "read_part", lambda store: pending_keys(FeatureStore.open(store), [*source_keys(store), "new.jpg"], "photos")
    ),
}
RACES = {  # race -> (compact_crash.py's kill point, its rows per part of each compact, the parts it leaves)
    "a compact": (0, [100], [MERGED]),
    "two compacts": (0, [8, 100], [MERGED]),
    "a compact killed before its removals": (2, [100], ["shard-000000.parquet", "shard-000001.parquet",
                                                        "shard-000002.parquet", MERGED]),
    "a compact killed after a removal": (3, [100], ["shard-000001.parquet", "shard-000002.parquet", MERGED]),
}  # fmt: skip


def compact_elsewhere(store: Path, kill_at: int, rows_per_part: int) -> None:
    """A real compact of `store` in another process (compact_crash.py), SIGKILLed before its change `kill_at`
    (0: not killed)."""
    finished = subprocess.run([sys.executable, CRASH, store, str(kill_at), str(rows_per_part)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert finished.returncode == (-9 if kill_at else 0), finished.stderr


def race(monkeypatch, method: str, store: Path, kill_at: int = 0, compacts: tuple[int, ...] = ()) -> Counter:
    """Wrap FeatureStore.<method>, which a reader calls per part: before it reads, its first call runs the first of
    `compacts` (compact_elsewhere, killed at `kill_at`), and its first call for a part that compact made the next,
    and so on: one compact per listing of the parts. Every call waits while a compact runs, so the parts listed
    before it are gone (or left over) when read. Returns the calls per part name."""
    original, pending, made = getattr(FeatureStore, method), list(compacts), None
    calls, gate = Counter(), threading.Lock()

    def wrapped(self, path, *args, **kwargs):
        nonlocal made
        with gate:
            calls[path.name] += 1
            if pending and (made is None or path.name in made):
                before = set(FeatureStore.open(store).part_names())
                compact_elsewhere(store, kill_at, pending.pop(0))
                made = set(FeatureStore.open(store).part_names()) - before
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, method, wrapped)
    return calls


@pytest.mark.parametrize("name", RACES)
@pytest.mark.parametrize("reader", READERS)
def test_a_reader_returns_the_same_while_a_compact_replaces_the_parts_it_listed(crops_store, monkeypatch, reader,
                                                                                name):  # fmt: skip
    method, read = READERS[reader]
    kill_at, compacts, left = RACES[name]
    unraced = read(crops_store)
    calls = race(monkeypatch, method, crops_store, kill_at, compacts)
    raced = read(crops_store)
    assert FeatureStore.open(crops_store).part_names() == left
    listed_again = kill_at != 2  # a kill before the first removal leaves every part the reader listed
    assert (MERGED in calls) == listed_again, calls
    assert calls["shard-000000.parquet"] == 1  # each part is read at most once: it is gone or it read
    if reader == "manifest":
        assert raced.equals(unraced)
    elif reader == "verify":
        assert (raced.returncode, raced.stdout) == (unraced.returncode, unraced.stdout) and unraced.returncode == 0
        noted = f"note: {len(left) - 1} manifest parts are left by an interrupted zs-cache compact"
        assert raced.stderr.startswith(noted) == (kill_at and listed_again), raced.stderr  # those it listed again
    else:
        assert raced == unraced


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory) -> Path:
    """A store without crops: the trainer reads each features chunk's image records from the manifest."""
    return make_store(tmp_path_factory.mktemp("plain"))


def every_chunks_images(samples: StoreReader, fs: FeatureStore) -> list[dict[str, list]]:
    """(source, key, sha256) of the samples of each features chunk, as a loader worker reads them."""
    chunks = [samples.chunk_records(index) for index in range(len(samples) // samples.meta.chunk_size)]
    return [{column: values.tolist() for column, values in chunk.items()} for chunk in chunks]


@pytest.mark.parametrize("name", RACES)
def test_the_trainer_reads_a_chunks_images_while_a_compact_replaces_the_parts_it_listed_at_start_up(
    pristine_store, tmp_path, monkeypatch, name
):
    shutil.copytree(pristine_store.parent, tmp_path / "copy")
    store = tmp_path / "copy" / "store"
    kill_at, compacts, left = RACES[name]
    samples, fs = StoreReader.open(store), FeatureStore.open(store)  # its parts: the three single ones
    unraced = every_chunks_images(samples, fs)
    calls = race(monkeypatch, "read_part", store, kill_at, compacts)
    raced = every_chunks_images(samples, fs)  # the first read of the first chunk's part runs the compact(s)
    assert raced == unraced and FeatureStore.open(store).part_names() == left
    assert (MERGED in calls) == (kill_at != 2), calls


def test_the_listing_of_the_parts_is_made_again_when_a_compacted_part_goes_while_its_footer_is_read(crops_store,
                                                                                                  monkeypatch):
    """FeatureStore.parts (the trainer's listing at start-up and after a compact): a compacted part's shards are
    read from its footer, and the part can go before they are."""
    compact_elsewhere(crops_store, 0, 8)
    race(monkeypatch, "part_records", crops_store, compacts=(100,))
    assert FeatureStore.open(crops_store).parts() == dict.fromkeys(range(3), crops_store / "manifest" / MERGED)


@pytest.mark.parametrize("reader", READERS)
def test_a_damaged_part_that_no_compact_replaced_is_one_line_naming_it_read_once(crops_store, monkeypatch, reader):
    method, read = READERS[reader]
    part = crops_store / "manifest" / "shard-000001.parquet"
    part.write_bytes(part.read_bytes()[:-12])  # its footer is gone
    calls = race(monkeypatch, method, crops_store)
    told = f"manifest part '{part}' is damaged"
    if reader == "verify":
        verified = read(crops_store)
        problems = verified.stderr.splitlines()
        assert verified.returncode == 1 and problems[0].startswith(f"problem: {told}"), verified.stderr
        assert problems[0].endswith("run zs-cache build --repair")
    else:
        with pytest.raises(UserError, match=re.escape(told)):
            read(crops_store)
    assert calls[part.name] == 1 and max(calls.values()) == 1, calls  # no second listing


@pytest.mark.parametrize("reader", ["manifest", "verify"])
def test_a_reader_whose_parts_change_at_every_listing_gives_up_after_read_attempts(crops_store, monkeypatch, reader):
    """The loop that retries (FeatureStore.while_stable, verify's too) stops after READ_ATTEMPTS listings and says
    which part did not read: here READ_ATTEMPTS is 2 and two compacts replace the parts."""
    monkeypatch.setattr(store_module, "READ_ATTEMPTS", 2)
    method, read = READERS[reader]
    race(monkeypatch, method, crops_store, compacts=(8, 100))
    told = "manifest part '.*shards-000000-000001.parquet' is damaged"
    if reader == "verify":
        found = invoke(zs_cache, "verify", crops_store, "--no-progress")
        assert found.returncode == 1 and re.match(f"problem: {told}", found.stderr), found.stderr
    else:
        with pytest.raises(UserError, match=told):
            read(crops_store)


def drop_disk_line(shown: str) -> list[str]:
    return [line for line in shown.splitlines() if not line.startswith("disk")]


def test_inspect_counts_the_disk_of_a_store_while_a_compact_removes_the_parts_it_listed(crops_store, monkeypatch):
    before = invoke(zs_cache, "inspect", crops_store).stdout
    listing = os.scandir

    def scandir(path):
        """The real listing of `path`; the manifest folder's is followed by a real compact."""
        entries = list(listing(path))
        if Path(path).name == "manifest":
            compact_elsewhere(crops_store, 0, 100)
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(os, "scandir", scandir)
    shown = invoke(zs_cache, "inspect", crops_store)
    assert shown.returncode == 0, shown.stderr
    assert FeatureStore.open(crops_store).part_names() == [MERGED]
    assert drop_disk_line(shown.stdout) == drop_disk_line(before)  # the disk line counts what is there
