r"""Where images come from: a folder tree, webdataset tar shards, an HDF5 file of encoded images, a list of
paths, or one image file (key: its name).

Every source lists its images as string keys in a deterministic order and reads a key's encoded
bytes; decoding happens later (pipeline.images), so a broken file is a per-image error, never a
failed listing. A source is described by its `SourceSpec`, which the store records, so the trainer can
reopen it by name. Every source also reports, after `keys()`, the `duplicates` it skipped: listed paths
that reach an image it already lists (only folders have them: links), skipped path -> the listed key.

HDF5 layout (what `zs-cache pack-h5` writes): two one-dimensional datasets of equal length,
  /keys    variable-length UTF-8 strings, unique (the image keys, e.g. relative paths)
  /images  variable-length uint8, the encoded file bytes (JPEG, PNG, ...) of each key.

Tar shards (what img2dataset writes with --output_format webdataset, e.g. CC3M, CC12M): a folder
holding `00000.tar`, `00001.tar`, ... (and .parquet / _stats.json files, ignored); in each tar the
members of one sample share a key: `000000042.jpg`, `000000042.json`, `000000042.txt`. Image key =
`<tar file name>/<member key>` (`00000.tar/000000042`). A folder that directly holds `*.tar` files is
a tar-shard source. The trainer cannot read tars at random, so a store caches such images only
together with their crops (`--store-crops`).

Keys are text (Parquet strings must be UTF-8) but POSIX names are bytes: a name that is not valid UTF-8
gets each undecodable byte written as `\xNN` (Python's backslashreplace: `bad\xff.jpg`), and `read`
maps such a key back to the bytes (a name that literally holds `\xNN` text is tried first). Folder
sources follow symbolic links once per real directory and real file (device and inode): a loop or a
second link to a listed folder or file adds nothing (see `FolderSource.duplicates`). Files are read
only when they are regular files (not FIFOs or devices), and at most `max_bytes` of them.
"""

import errno
import json
import os
import re
import stat
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq

from zeroseg.errors import DAMAGED, UserError, recorded_fields
from zeroseg.io import atomic_path, write_atomically
from zeroseg.runtime import bar_disabled

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
H5_EXTENSIONS = frozenset({".h5", ".hdf5", ".hdf"})


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "folder", "tar", "hdf5", "list" or "file"
    path: str  # absolute path of the folder, folder of tar shards, HDF5 file, list file or image file
    column: str | None = None  # Parquet list files: the column holding the paths

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "column": self.column}

    @classmethod
    def from_dict(cls, spec: dict, where: str) -> "SourceSpec":
        """As a store records it (`where` names it in a UserError)."""
        spec = SourceSpec(**recorded_fields(cls, spec, where))
        if spec.kind not in _SOURCE_TYPES:
            raise UserError(f"{where}: unknown source kind '{spec.kind}' ({DAMAGED})")
        return spec


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def escape_name(name: str) -> str:
    r"""A file name as a key: undecodable bytes (surrogates from os.fsdecode) as `\xNN`."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def unescape_path(base: Path, key: str) -> Path:
    """The path of a key made by escape_name (a path that literally holds the key's text wins)."""
    literal = base / key
    if "\\x" not in key or literal.exists():
        return literal
    raw = _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), key)  # surrogateescape of the byte
    return base / raw


def read_regular_file(path: Path, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, refusing FIFOs, devices and sockets (never blocking on them) and files of
    more than max_bytes, with an OSError whose strerror says why (a listed path holding a NUL byte included)."""
    if "\0" in str(path):
        raise OSError(errno.EINVAL, "the path holds a NUL byte")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "FIFO" if stat.S_ISFIFO(info.st_mode) else "device" if stat.S_ISCHR(info.st_mode) else "special file"
            raise OSError(errno.EINVAL, f"not a regular file ({kind})")
        if max_bytes is None:
            return handle.read()
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(errno.EFBIG, f"file larger than the size cap of {max_bytes} bytes (--max-file-mb)")
    return data


class FolderSource:
    """Every file with an image extension under a root, recursively; key = POSIX path relative to root (names
    escaped as the module docstring says)."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.root = Path(spec.path)
        self.duplicates: dict[str, str] = {}  # after keys(): skipped path -> the key of the same real file/folder

    def keys(self) -> list[str]:
        """Walk the tree in sorted order, following each real directory and listing each real file once."""
        root = self.root.stat()
        found, seen_dirs, seen_files = [], {(root.st_dev, root.st_ino): "."}, {}
        for directory, subdirs, files in os.walk(self.root, followlinks=True):
            relative = Path(directory).relative_to(self.root)
            kept = []
            for name in sorted(d for d in subdirs if not d.startswith(".")):
                path = Path(directory) / name
                try:
                    info = path.stat()
                except OSError:  # a dangling link or a loop the kernel refuses: nothing to list
                    continue
                here = escape_name((relative / name).as_posix())
                if (info.st_dev, info.st_ino) in seen_dirs:
                    self.duplicates[here + "/"] = seen_dirs[(info.st_dev, info.st_ino)] + "/"
                    continue
                seen_dirs[(info.st_dev, info.st_ino)] = here
                kept.append(name)
            subdirs[:] = kept
            for name in sorted(files):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                key = escape_name((relative / name).as_posix())
                try:
                    info = (Path(directory) / name).stat()
                except OSError:
                    found.append(key)  # dangling: an error row when read
                    continue
                if (info.st_dev, info.st_ino) in seen_files:
                    self.duplicates[key] = seen_files[(info.st_dev, info.st_ino)]
                    continue
                seen_files[(info.st_dev, info.st_ino)] = key
                found.append(key)
        return sorted(found)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        return read_regular_file(unescape_path(self.root, key), max_bytes)


TAR_INDEX_DIR = ".zs-tar-index"  # in a tar-shard folder: one member index per tar (see tar_members)


@lru_cache(maxsize=32)
def tar_members(path: str) -> dict[str, tuple[int, int]]:
    """Image members of one tar: member key -> (offset of its data, size).

    The header scan runs once per tar: its result is kept in `<folder>/.zs-tar-index/<tar name>.json`
    together with the tar's size and modification time, and reused while both are unchanged (a rewritten
    or re-downloaded tar is scanned again). A folder we cannot write to is scanned every time (once per
    process). A truncated tar (an interrupted download) keeps the members listed before the break.
    """
    tar = Path(path)
    info = tar.stat()
    stamp = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    index = tar.parent / TAR_INDEX_DIR / f"{tar.name}.json"
    try:
        saved = json.loads(index.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return {key: (offset, size) for key, offset, size in saved["members"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no index yet, or an unusable one: scan the tar and write it anew
    members = scan_tar(path)
    try:
        index.parent.mkdir(exist_ok=True)
        write_atomically(index, json.dumps({**stamp, "members": [[k, *v] for k, v in members.items()]}))
    except OSError:
        pass  # a read-only source: the index only saves the next listing a scan
    return members


def scan_tar(path: str) -> dict[str, tuple[int, int]]:
    """Image members of one tar from its member headers (one pass over the file)."""
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as archive:
            for info in archive:
                folder, _, name = escape_name(info.name).rpartition("/")
                stem, _, extension = name.partition(".")  # webdataset: the key ends at the first dot
                if info.isfile() and f".{extension.lower()}" in IMAGE_EXTENSIONS:
                    key = f"{folder}/{stem}" if folder else stem
                    members.setdefault(key, (info.offset_data, info.size))
    except tarfile.ReadError as exc:
        if not members:
            raise UserError(f"{path}: not a readable tar file ({exc}); remove it or fix the download") from None
    return members


class TarShardSource:
    """A folder of webdataset tar shards (layout in the module docstring); key = '<tar name>/<member key>'."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.root = Path(spec.path)
        self.duplicates: dict[str, str] = {}  # none: tar members are listed once

    def tars(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("*.tar") if p.is_file())

    def keys(self) -> list[str]:
        names = self.tars()
        with ThreadPoolExecutor(8) as pool:  # header scans are I/O bound: overlap them on network filesystems
            listed = list(pool.map(lambda name: tar_members(str(self.root / name)), names))
        return [f"{name}/{member}" for name, members in zip(names, listed) for member in members]

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        name, member = key.split("/", 1)
        offset, size = tar_members(str(self.root / name))[member]
        if max_bytes is not None and size > max_bytes:
            raise OSError(errno.EFBIG, f"member larger than the size cap of {max_bytes} bytes (--max-file-mb)")
        with open(self.root / name, "rb") as handle:
            handle.seek(offset)
            return handle.read(size)


def tar_of(key: str) -> str:
    """The tar shard holding a TarShardSource key: images of one tar go to the same build tasks."""
    return key.split("/", 1)[0]


class H5Source:
    """Encoded images in an HDF5 file (layout in the module docstring), opened lazily per process."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.duplicates: dict[str, str] = {}  # none: /keys is unique
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._index: dict[str, int] | None = None

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.spec.path, "r"), os.getpid()
        return self._file

    def keys(self) -> list[str]:
        handle = self._open()
        if "keys" not in handle or "images" not in handle:
            raise UserError(f"{self.spec.path}: HDF5 source needs datasets /keys and /images (see zs-cache pack-h5)")
        keys = [k.decode() if isinstance(k, bytes) else str(k) for k in handle["keys"][:]]
        if len(keys) != len(handle["images"]):
            raise UserError(f"{self.spec.path}: /keys and /images have different lengths")
        if len(set(keys)) != len(keys):
            raise UserError(f"{self.spec.path}: /keys holds duplicate keys")
        self._index = {key: i for i, key in enumerate(keys)}
        return keys

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        if self._index is None:
            self.keys()
        return self._open()["images"][self._index[key]].tobytes()


class ListSource:
    """Paths listed one per line in a text file (blank lines and #-comments skipped), or in a column of
    a Parquet file; relative paths are relative to the list file's folder; key = the path as listed. A build
    refuses absolute paths and paths through '..' unless told (`refuse_outside_paths`)."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.base = Path(spec.path).parent
        self.duplicates: dict[str, str] = {}  # none: a path listed twice is the same key, listed once

    def keys(self) -> list[str]:
        path = Path(self.spec.path)
        if path.suffix.lower() == ".parquet":
            column = self.spec.column or "path"
            schema = pq.read_schema(path)
            if column not in schema.names:
                raise UserError(f"{path}: no column '{column}' (columns: {', '.join(schema.names)}); use --column")
            keys = [str(k) for k in pq.read_table(path, columns=[column]).column(column).to_pylist() if k]
        else:
            lines = path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
            keys = [escape_name(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        return list(dict.fromkeys(keys))

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        return read_regular_file(unescape_path(self.base, key), max_bytes)

    def refuse_outside_paths(self, keys: list[str]) -> None:
        """UserError naming the first key that is an absolute path or goes through '..' (zs-cache build reads such
        keys only with --outside-paths)."""
        outside = next((key for key in keys if Path(key).is_absolute() or ".." in Path(key).parts), None)
        if outside is not None:
            raise UserError(
                f"list file '{self.spec.path}' names '{outside}', outside its folder: pass --outside-paths to read "
                f"absolute paths and paths through '..'"
            )


class FileSource:
    """One image file given as the source: one key, the file's name."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.duplicates: dict[str, str] = {}

    def keys(self) -> list[str]:
        return [escape_name(Path(self.spec.path).name)]

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        return read_regular_file(Path(self.spec.path), max_bytes)


Source = FolderSource | TarShardSource | H5Source | ListSource | FileSource
_SOURCE_TYPES = {"folder": FolderSource, "tar": TarShardSource, "hdf5": H5Source, "list": ListSource,
                 "file": FileSource}  # fmt: skip


def open_source(path: str | Path, column: str | None = None) -> Source:
    """A source from a path given on the command line: folder, folder of tar shards, HDF5 file, image file (by its
    extension) or list file."""
    resolved = Path(path).expanduser().resolve()
    if resolved.is_dir():
        kind = "tar" if any(p.is_file() for p in resolved.glob("*.tar")) else "folder"
        return _SOURCE_TYPES[kind](SourceSpec(kind, str(resolved)))
    if not resolved.is_file():
        raise UserError(f"source '{path}' does not exist (expected a folder, an HDF5 file, an image or a list file)")
    if resolved.suffix.lower() in H5_EXTENSIONS:
        if not h5py.is_hdf5(resolved):
            raise UserError(f"source '{path}' is not an HDF5 file")
        return H5Source(SourceSpec("hdf5", str(resolved)))
    if resolved.suffix.lower() in IMAGE_EXTENSIONS:
        return FileSource(SourceSpec("file", str(resolved)))
    return ListSource(SourceSpec("list", str(resolved), column))


def source_from_spec(spec: SourceSpec) -> Source:
    """Reopen a source recorded in a store."""
    if not Path(spec.path).exists():
        raise UserError(f"image source '{spec.path}' recorded in the store is not reachable from here")
    return _SOURCE_TYPES[spec.kind](spec)


def pack_h5(folder: str | Path, out: str | Path, progress: bool = True) -> int:
    """Write every image under `folder` into an HDF5 file in the layout above; returns the count.

    The file is written under a temporary name and renamed when complete.
    """
    from tqdm import tqdm

    source = open_source(folder)
    if not isinstance(source, FolderSource):
        raise UserError(f"pack-h5 needs a folder of images, got '{folder}'")
    keys = source.keys()
    out = Path(out)
    with atomic_path(out) as partial, h5py.File(partial, "w") as handle:
        handle.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))
        images = handle.create_dataset("images", shape=(len(keys),), dtype=h5py.vlen_dtype(np.uint8))
        for i, key in enumerate(tqdm(keys, desc="packing", unit="img", disable=bar_disabled(progress))):
            images[i] = np.frombuffer(source.read(key), dtype=np.uint8)
    return len(keys)
