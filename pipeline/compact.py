"""`zs-cache compact`: merge a store's manifest parts into fewer, larger ones (network filesystems open and
list each file at a cost; a store of ImageNet-1k has 1,252 parts of 1,024 rows).

Parts of fewer than `rows_per_part` rows are merged, in shard order, into compacted parts of whole shards and
at most `rows_per_part` rows (a part already that large stays as it is). A compacted part
`manifest/shards-AAAAAA-BBBBBB.parquet` (its lowest and highest shard) holds its shards' rows unchanged and,
in its key-value metadata, each shard's commit record (pipeline.integrity.SHARDS_KEY). Parts made before
commit records existed are left as they are, and no compacted part spans one: its shards are a run of parts.

Crash safety: each merged part is written to a dot-name, synced and renamed into place; only then (after a
sync of the folder) are the parts it merged removed. A kill in between leaves those parts beside the merged
one: every reader skips them (pipeline.store.committed_parts), and the next compact (or a repair) removes
them. The chunk files are never touched. Compact takes the builder lock. A damaged part is refused with
verify's line (repair it first).
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from zeroseg.io import sync_folder
from zeroseg.pipeline.integrity import encode_shard_records
from zeroseg.pipeline.options import CompactOptions
from zeroseg.pipeline.store import MANIFEST_DIR, MANIFEST_READERS, FeatureStore, builder_lock


@dataclass
class CompactSummary:
    """What one compact did, for its one line of output."""

    store: Path
    parts_before: int  # committed parts (leftovers not counted)
    parts_after: int
    rows: int  # manifest rows, the same before and after
    leftovers: int  # parts of an interrupted compaction removed

    def line(self) -> str:
        done = f"; removed {self.leftovers} parts left by an interrupted compact" if self.leftovers else ""
        if self.parts_before == self.parts_after:
            plural = "" if self.parts_after == 1 else "s"
            return f"nothing to compact: store {self.store} has {self.parts_after} manifest part{plural}{done}"
        return (f"compacted store {self.store}: {self.parts_before} manifest parts -> {self.parts_after} "
                f"({self.rows} rows){done}")  # fmt: skip


def compact(opts: CompactOptions, log: Callable[[str], None] = lambda line: None) -> CompactSummary:
    """Merge the store's small parts (see the module docstring); UserError when a builder holds the store or a part
    is damaged."""
    FeatureStore.open(opts.store)  # a store, before the lock file is made
    with builder_lock(opts.store):
        store = FeatureStore.open(opts.store, writable=True)
        folder = store.path / MANIFEST_DIR
        leftovers = remove_leftovers(store)
        parts = store.part_files()
        with ThreadPoolExecutor(MANIFEST_READERS) as pool:  # on a network filesystem the reads overlap
            footers = dict(zip(parts, pool.map(store.part_footer, parts)))  # (records, rows) of each part
            records = {part: footer[0] for part, footer in footers.items()}
            rows = {part: footer[1] for part, footer in footers.items()}
            for group in plan_groups(list(parts), rows, opts.rows_per_part):
                merged = {shard: record for part in group for shard, record in records[part].items()}
                target = store.compacted_path(merged)
                read = pool.map(store.read_part, group)  # each with its own record(s), which `merged` now holds
                table = pa.concat_tables([part_rows.replace_schema_metadata(None) for part_rows in read])
                store.write_part(target, table, encode_shard_records(merged))
                sync_folder(folder)  # the merged part is there before any part it replaces goes
                for part in group:
                    if part != target:
                        part.unlink()
                log(f"compact: shards {min(merged)}-{max(merged)} ({table.num_rows} rows) -> {target.name}")
        sync_folder(folder)
        return CompactSummary(store.path, len(parts), len(store.part_files()), sum(rows.values()), leftovers)


def plan_groups(parts: list[Path], rows: dict[Path, int], rows_per_part: int) -> list[list[Path]]:
    """Runs of consecutive parts (in shard order) of at most `rows_per_part` rows together, each of 2 parts or more
    (a part alone stays as it is)."""
    groups, group, total = [], [], 0
    for part in parts:
        if group and total + rows[part] > rows_per_part:
            groups.append(group)
            group, total = [], 0
        group.append(part)
        total += rows[part]
    groups.append(group)
    return [group for group in groups if len(group) > 1]


def remove_leftovers(store: FeatureStore) -> int:
    """Finish an interrupted compaction: remove the parts whose shards all lie in a larger part, and the
    temporary files of parts that were never renamed. Returns the number of parts removed."""
    leftovers = store.leftover_parts()
    for part in leftovers:
        part.unlink()
    store.remove_partial_parts()
    return len(leftovers)
