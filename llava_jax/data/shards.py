"""The on-disk format of `llava-jax data build`: ArrayRecord shards of records with media.

A build directory holds

    manifest.json                          what `read_manifest` checks (below)
    records-00000-of-00004.array_record    ArrayRecord, group_size 1 (one record per chunk,
    ...                                    so any record is read alone), uncompressed
    skipped.jsonl                          one {"id", "reason", "detail"} per skipped record

and reading the shards in order gives the source's records in order, skipped ones left out.

One record is
    b"LJR1" | uint32 little-endian n | n bytes of JSON header | media bytes, back to back
where the header is {"id", "conversations", "images": [byte length, ...], "videos": [...]}:
the media's bytes are stored as they are (JPEG stays JPEG), with no base64 and no
dependency beyond the standard library.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

from etils import epath

from llava_jax.data.schema import RawRecord

FORMAT = "llava-jax-records"
VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
WRITER_OPTIONS = "group_size:1,uncompressed"  # media are compressed already
_MAGIC = b"LJR1"
_LENGTH = struct.Struct("<I")


def shard_name(index: int, num_shards: int) -> str:
    return f"records-{index:05d}-of-{num_shards:05d}.array_record"


def encode_record(record: RawRecord) -> bytes:
    """A record whose media are all bytes, serialised (see the module docstring)."""
    media = (*record.images, *record.videos)
    if not all(isinstance(m, bytes) for m in media):
        raise TypeError(f"record {record.id}: only media given as bytes can be stored")
    header = json.dumps(
        {
            "id": record.id,
            "conversations": record.conversations,
            "images": [len(m) for m in record.images],
            "videos": [len(m) for m in record.videos],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    return b"".join((_MAGIC, _LENGTH.pack(len(header)), header, *media))


def decode_record(data: bytes) -> RawRecord:
    """The inverse of `encode_record`; ValueError if `data` is not such a record."""
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _LENGTH.size:
        raise ValueError("not a llava-jax record (bad magic)")
    start = len(_MAGIC) + _LENGTH.size
    (header_len,) = _LENGTH.unpack_from(data, len(_MAGIC))
    header = json.loads(data[start : start + header_len])
    pos, view = start + header_len, memoryview(data)
    media = {}
    for kind in ("images", "videos"):
        media[kind] = []
        for length in header[kind]:
            media[kind].append(bytes(view[pos : pos + length]))
            pos += length
    if pos != len(data):
        raise ValueError(f"record {header['id']}: {len(data)} bytes, the header says {pos}")
    return RawRecord(
        id=header["id"],
        conversations=header["conversations"],
        images=tuple(media["images"]),
        videos=tuple(media["videos"]),
        root=None,
    )


def read_manifest(directory: epath.PathLike) -> dict[str, Any]:
    """The manifest of a build directory (local or `gs://`), checked: format, version, shards.

    Raises:
      ValueError: no manifest, another format or version, or a shard file missing.
    """
    directory = epath.Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{directory}: not a `llava-jax data build` output (no {MANIFEST})"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / MANIFEST}: invalid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{directory / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"{directory / MANIFEST}: format version {manifest.get('version')}; this "
            f"llava-jax reads version {VERSION}"
        )
    missing = [s["file"] for s in manifest["shards"] if not (directory / s["file"]).is_file()]
    if missing:
        raise ValueError(f"{directory}: shard files missing: {', '.join(missing)}")
    return manifest


class ShardRecords:
    """A random-access data source over a build directory's shards, in build order."""

    def __init__(self, directory: epath.PathLike):
        import grain

        self._directory = epath.Path(directory)
        manifest = read_manifest(self._directory)
        # ArrayRecord's reader opens gs:// itself (riegeli's GcsReader, array_record >= 0.8).
        paths = [os.fspath(self._directory / s["file"]) for s in manifest["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(paths)
        if len(self._source) != manifest["num_records"]:
            raise ValueError(
                f"{self._directory}: the shards hold {len(self._source)} records, the "
                f"manifest says {manifest['num_records']}"
            )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawRecord:
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"ShardRecords({self._directory}; {len(self)} records)"
