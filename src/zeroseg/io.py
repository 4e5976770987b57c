"""Files as every stage writes them: whole or not at all (write a temporary sibling, flush it to disk, rename it
over the target, so a reader or a process resumed after a kill sees the old file or the new one, never a partial
one), with the mode the umask gives, and the temporary files of killed writers removed by the next writer; names
a recorded folder holds resolved inside it; file digests; and byte counts as people read them."""

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zeroseg.errors import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields the temporary path to write (a dot-name beside `path`, ignored by Parquet readers, source
    listings and globs); when the block ends it gets the mode the umask gives a new file, is synced and renamed
    over `path`, or removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.chmod(partial, 0o666 & ~_umask())  # as open() would make it (safetensors' save_file makes 0600)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


PARTIAL_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)\.partial")  # atomic_path's temporary name


def remove_dead_partials(folder: str | Path, targets: re.Pattern[str] | None = None) -> list[Path]:
    """Delete the temporary files atomic_path left in `folder` (not below it), for targets whose name matches
    `targets` (any when None), whose writer process is no longer alive on this machine: a writer killed before
    its rename (kill -9, out of memory). A live writer's file is kept. Returns the files removed."""
    folder = Path(folder)
    removed = []
    for entry in folder.iterdir() if folder.is_dir() else ():
        match = PARTIAL_NAME.fullmatch(entry.name)
        if match is None or (targets is not None and not targets.fullmatch(match["target"])):
            continue
        if not _alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    """The process's umask, read from /proc (Linux): os.umask reads it only by setting it, which would narrow the
    files other threads make meanwhile (Zarr chunks); elsewhere that narrowing is the price."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        mask = os.umask(0o077)
        os.umask(mask)
        return mask
    return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


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


def inside(folder: str | Path, name: str, where: str | Path) -> Path:
    """folder/name, links resolved, when it lies inside `folder`; UserError naming `where` (the file that names
    it) otherwise: a name recorded in an export or a store cannot reach other files ("../../etc/passwd")."""
    root = Path(folder).resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{where} names '{name}', which lies outside '{folder}': refused")
    return path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(values: dict) -> str:
    """`values` as JSON with sorted keys and no spaces: the same text for the same content, whatever the order."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def canonical_sha256(values: dict) -> str:
    """The SHA-256 of canonical_json(values): what a store's metadata and an export's config.json carry to tell a
    hand edit from the content they were written with."""
    return hashlib.sha256(canonical_json(values).encode()).hexdigest()


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
