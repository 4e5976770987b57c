"""Files as every stage writes them: whole or not at all (write a temporary sibling, flush it to disk, rename it
over the target, so a reader or a process resumed after a kill sees the old file or the new one, never a partial
one), and byte counts as people read them."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write (a dot-name beside `path`, ignored by Parquet readers, source
    listings and globs); when the block ends it is synced and renamed over `path`, or removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, content: str | bytes) -> None:
    with atomic_path(path) as partial:
        if isinstance(content, str):
            partial.write_text(content, encoding="utf-8")
        else:
            partial.write_bytes(content)


def sync_folder(path: str | Path) -> None:
    """Flush a folder's entries (renames, removals) to disk, so that later changes cannot overtake them."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def human_size(count: int) -> str:
    """In the unit that fits: 512 B, 3.4 KiB, 120.5 MiB, 55.0 GiB (1 KiB = 1024 B)."""
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
