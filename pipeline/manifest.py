"""The manifest's rows: their Arrow schema, the `ImageRecord` each row is, and the check that no image or
features row is claimed twice."""

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from zeroseg.errors import UserError
from zeroseg.pipeline.duplicates import name_digests, repeated_names, repeated_rows

MANIFEST_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),  # index into features; null for failed images
        ("key", pa.string()),  # stable image id within its source
        ("source", pa.string()),  # source name (a key of StoreMeta.sources)
        ("sha256", pa.string()),  # hash of the encoded image bytes; null when unreadable
        ("width", pa.int32()),  # original size after EXIF rotation; null for failed images
        ("height", pa.int32()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, for status == "error"
        ("shard", pa.int32()),
        ("time", pa.timestamp("ms", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class ImageRecord:
    """One image of the manifest, what the build found and what readers look up: a manifest row without its
    status (ok when error is None), shard and time. Rows of the Arrow manifest: `manifest_rows`, `image_records`."""

    source: str  # the source's name in StoreMeta.sources
    key: str  # stable image id within its source
    row: int | None = None  # index into features; None for a failed image
    sha256: str | None = None  # hash of the encoded image bytes; None when unreadable (or not checked)
    width: int | None = None  # original size after EXIF rotation; None for failed images
    height: int | None = None
    error: str | None = None  # why the image failed

    @property
    def ok(self) -> bool:
        return self.error is None


RECORD_FIELDS = [f.name for f in fields(ImageRecord)]


NAME_DIGEST = "name_digest"  # a column a reader may hold instead of source and key: their pipeline.duplicates digest


def refuse_duplicates(
    path: Path, table: pa.Table, names_of_rows: Callable[[np.ndarray], list[str]] | None = None
) -> None:
    """UserError when two manifest rows hold the same image (source, key) or the same features row (found from
    digests: pipeline.duplicates). A table that holds the names' digests (NAME_DIGEST) with the rows instead of
    the names is checked too: names_of_rows(rows) gives the names 'source/key' of the images of features rows
    `rows`, for the few rows whose digest repeats."""
    names = set(table.column_names)
    if {"source", "key"} <= names:
        refuse_repeated_names(path, name_digests(table["source"], table["key"]), partial(name_list, table))
    if "row" in names:
        repeated = repeated_rows(table["row"].drop_null().to_numpy())
        if repeated:
            raise UserError(
                f"store '{path}': features row {next(iter(repeated))} is claimed by several manifest rows: "
                f"run zs-cache verify"
            )
    if NAME_DIGEST in names:  # after the rows' check: the names are looked up by row
        rows = table["row"].to_numpy()
        refuse_repeated_names(path, table[NAME_DIGEST].to_numpy(), lambda indices: names_of_rows(rows[indices]))


def refuse_repeated_names(path: Path, digests: np.ndarray, names_of: Callable[[np.ndarray], list[str]]) -> None:
    """UserError naming an image that several of the rows whose names have (N,) `digests` hold."""
    repeated = repeated_names(digests, names_of)
    if repeated:
        name, count = next(iter(repeated.items()))
        raise UserError(
            f"store '{path}': image {name} appears {count} times in the manifest ({len(repeated)} duplicated "
            f"images): run zs-cache verify"
        )


def name_list(table: pa.Table, indices: np.ndarray) -> list[str]:
    """'source/key' of rows `indices` of a manifest table."""
    rows = table.select(["source", "key"]).take(pa.array(indices))
    return pc.binary_join_element_wise(rows["source"], rows["key"], "/").to_pylist()


def manifest_rows(shard: int, records: list[ImageRecord]) -> pa.Table:
    """Shard `shard`'s manifest part from the records of its images."""
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    columns = {name: [getattr(record, name) for record in records] for name in RECORD_FIELDS}
    columns["status"] = ["ok" if record.ok else "error" for record in records]
    columns["shard"] = [shard] * len(records)
    columns["time"] = [now] * len(records)
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def image_records(table: pa.Table) -> list[ImageRecord]:
    """The records of manifest rows (any selection of columns holding source and key; the others are None)."""
    names = [name for name in RECORD_FIELDS if name in table.column_names]
    return [ImageRecord(**row) for row in table.select(names).to_pylist()]
