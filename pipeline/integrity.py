"""Damage detection in a feature store: chunk checksums and per-shard commit records.

Three layers make a damaged store loud wherever it is read:
  chunks         every chunk of `features` and `crops` is encoded as zstd followed by Zarr v3's `crc32c` codec,
                 so a changed byte fails decoding (pipeline.store_reader turns that into one line).
  commit record  each manifest part carries, in its Parquet key-value metadata under RECORD_KEY, the
                 chunk files its shard wrote and the crc32c of each file's payload (all but the codec's 4-byte
                 trailer): {"features": {"c/3/0/0": "1a2b3c4d"}, ...}, so a chunk that decodes but is not the
                 one its shard wrote (swapped, stale, copied over) is found too.
                 A chunk of only fill values is never written and not listed. Zarr reads a missing chunk
                 as fill values (zeros), so readers check the listed files exist (`missing_chunks`,
                 StoreReader.checked_read), and `verify` compares their checksums (pipeline.check).
  parts          manifest parts are written with Parquet page checksums and read with verification.
  compacted      a part merged by `zs-cache compact` holds several shards' rows; instead of RECORD_KEY it
                 carries SHARDS_KEY, each of its shards' commit record: {"12": {"features": {...}}, ...}.
"""

import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import google_crc32c
import zarr

from zeroseg.errors import UserError

RECORD_KEY = b"zeroseg.chunks"
RECORD_CRC_KEY = b"zeroseg.chunks.crc32c"  # of the record's bytes: a flip inside it that still parses is refused
SHARDS_KEY = b"zeroseg.shards"  # a compacted part: shard -> its commit record
SHARDS_CRC_KEY = b"zeroseg.shards.crc32c"


def chunk_crc32c(data: bytes) -> str:
    """What a commit record holds for a chunk file's bytes: the crc32c of its payload (a chunk file is its payload
    followed by the crc32c codec's 4-byte checksum of it, so the crc32c of a whole file tells nothing)."""
    return f"{google_crc32c.value(data[:-4]):08x}"


def chunk_key(array: zarr.Array, index: int) -> str:
    """The file name, relative to the array folder, of chunk `index` along the first axis."""
    return array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1))


def has_checksums(array: zarr.Array) -> bool:
    return any(type(codec).__name__ == "Crc32cCodec" for codec in array.metadata.codecs)


def shard_record(store_path: Path, arrays: dict[str, zarr.Array], chunks: Iterable[int]) -> dict[str, dict[str, str]]:
    """The commit record of a shard whose chunks `chunks` were just written: array -> chunk key -> payload crc32c."""
    record: dict[str, dict[str, str]] = {}
    indices = list(chunks)
    for name, array in arrays.items():
        files = {key: store_path / name / key for key in (chunk_key(array, i) for i in indices)}
        record[name] = {key: chunk_crc32c(path.read_bytes()) for key, path in files.items() if path.exists()}
    return record


def encode_record(record: dict) -> dict[bytes, bytes]:
    """The Parquet key-value metadata holding a commit record."""
    return _encode(RECORD_KEY, RECORD_CRC_KEY, record)


def encode_shard_records(records: dict[int, dict]) -> dict[bytes, bytes]:
    """The Parquet key-value metadata of a compacted part: each of its shards' commit record."""
    return _encode(SHARDS_KEY, SHARDS_CRC_KEY, {str(shard): record for shard, record in records.items()})


def decode_record(metadata: dict[bytes, bytes] | None, part: Path) -> dict[str, dict[str, str]]:
    """The commit record of a single part; UserError when it is missing or damaged."""
    if not metadata or RECORD_KEY not in metadata:
        raise UserError(f"manifest part '{part}' is damaged (it lacks the chunk record of a part)")
    record = _decode(metadata, RECORD_KEY, RECORD_CRC_KEY, part, "chunk record")
    if not _is_record(record):
        raise UserError(f"manifest part '{part}' is damaged (its chunk record is malformed)")
    _refuse_outside(record, part)
    return record


def decode_shard_records(metadata: dict[bytes, bytes] | None, part: Path) -> dict[int, dict[str, dict[str, str]]]:
    """Shard -> commit record of a compacted part, in shard order; UserError when they are missing or damaged."""
    if not metadata or SHARDS_KEY not in metadata:
        raise UserError(f"manifest part '{part}' is damaged (it lacks the shard records of a compacted part)")
    records = _decode(metadata, SHARDS_KEY, SHARDS_CRC_KEY, part, "shard records")
    if not (isinstance(records, dict) and records and all(k.isdigit() and _is_record(v) for k, v in records.items())):
        raise UserError(f"manifest part '{part}' is damaged (its shard records are malformed)")
    for record in records.values():
        _refuse_outside(record, part)
    return {int(shard): records[shard] for shard in sorted(records, key=int)}


def _encode(key: bytes, crc_key: bytes, value: dict) -> dict[bytes, bytes]:
    encoded = json.dumps(value, sort_keys=True).encode()
    return {key: encoded, crc_key: f"{google_crc32c.value(encoded):08x}".encode()}


def _decode(metadata: dict[bytes, bytes], key: bytes, crc_key: bytes, part: Path, what: str):
    if metadata.get(crc_key) != f"{google_crc32c.value(metadata[key]):08x}".encode():
        raise UserError(f"manifest part '{part}' is damaged (its {what} fails its crc32c)")
    try:
        return json.loads(metadata[key])
    except ValueError:
        raise UserError(f"manifest part '{part}' is damaged (its {what} is not JSON)") from None


def _refuse_outside(record: dict[str, dict[str, str]], part: Path) -> None:
    """Chunk files are named relative to the store: one an absolute path or '..' would reach is refused."""
    for name, files in record.items():
        for key in files:
            file = PurePosixPath(name, key)
            if file.is_absolute() or ".." in file.parts:
                raise UserError(f"manifest part '{part}' names chunk file '{file}', outside the store: refused")


def _is_record(record) -> bool:
    return isinstance(record, dict) and all(isinstance(files, dict) for files in record.values())


def missing_chunks(store_path: Path, record: dict[str, dict[str, str]]) -> list[str]:
    """'array/key' of every recorded chunk file that is not there."""
    return [
        f"{name}/{key}" for name, files in record.items() for key in files if not (store_path / name / key).is_file()
    ]
