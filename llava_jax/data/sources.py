"""Training data sources: each is a `grain.MapDataset` (random access) of `RawRecord`s.

`open_source(spec)` opens any of:

  * a LLaVA JSON file (a list of records) or JSONL file (one record per line);
  * a OneVision-style YAML mixture of such files (`data/mixture.py`);
  * a directory written by `llava-jax data build` (ArrayRecord shards, `data/shards.py`);
  * `tfds:NAME[/CONFIG][:SPLIT]`, a prepared TFDS dataset read with `tfds.data_source`.

Files, folders and image roots may be local or `gs://` (etils.epath; ArrayRecord reads its
shards from GCS itself).

Sources never fail on a bad record: a record that is not an object, or has no
`conversations`, still comes out as a `RawRecord` (with `conversations` a `NotAnObject`,
None, or whatever ill-typed value it held), and the sample transform skips it as
`malformed_record` under its id, so the skip is counted with every other. Media references
are not checked here either: the transform calls `resolve_media`, which raises `SkipSample`
for a path that leaves the image root or does not exist.

Memory: mix665k is about 1 GB of JSON. A source keeps each record as compact JSON bytes in
one NumPy buffer (plus an int64 offset per record) and decodes a record on `__getitem__`, so
Grain worker processes share a flat buffer instead of each holding a Python object graph.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any

import grain
import numpy as np
from etils import epath

from llava_jax.data.schema import NotAnObject, RawRecord, SkipSample

TFDS_PREFIX = "tfds:"


def open_source(
    spec: str,
    image_root: str | None = None,
    *,
    tfds_fields: Mapping[str, str] | None = None,
    seed: int = 0,
) -> grain.MapDataset:
    """Opens a training data source as a `grain.MapDataset[RawRecord]`, in source order.

    Args:
      spec: a `.json` / `.jsonl` file, a `.yaml` / `.yml` mixture, a `data build` output
        directory, or `tfds:NAME[/CONFIG][:SPLIT]` (split default `train`; TFDS slicing such
        as `train[:10%]` works).
      image_root: the folder that relative image / video paths resolve against (JSON, YAML
        entries without their own `image_folder`); for `tfds:` the TFDS `data_dir` (None:
        TFDS's default). Ignored for a `data build` directory, whose media are embedded.
      tfds_fields: for `tfds:` only, our field name -> the dataset's feature name, for the
        fields `id`, `image`, `video`, and `conversations` or `question` + `answer`
        (default: the features of those names that exist).
      seed: the seed of `random:N` mixture sampling.

    Raises:
      FileNotFoundError: `spec` does not exist.
      ValueError: a file that cannot be read as a whole (invalid JSON list, bad YAML, a
        manifest of another format, an unknown TFDS feature), named in the message.
    """
    if spec.startswith(TFDS_PREFIX):
        return grain.MapDataset.source(TfdsRecords(spec, image_root, tfds_fields))
    if tfds_fields:
        raise ValueError(f"{spec}: tfds_fields given, but the source is not a tfds: dataset")
    path = epath.Path(spec)  # local or gs://
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), spec)
    if path.is_dir():
        from llava_jax.data import shards

        return grain.MapDataset.source(shards.ShardRecords(path))
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        from llava_jax.data import mixture

        tables, table_ids, rows = [], [], []
        for i, entry in enumerate(mixture.read_mixture(path, image_root)):
            table = load_json_table(entry.json_path, entry.image_root)
            picked = mixture.sample_rows(len(table), entry.sampling_strategy, seed, i)
            tables.append(table)
            table_ids.append(np.full(len(picked), i, np.int32))
            rows.append(picked)
        return grain.MapDataset.source(
            JsonRecords(tables, np.concatenate(table_ids), np.concatenate(rows))
        )
    if suffix in (".json", ".jsonl"):
        table = load_json_table(path, image_root)
        return grain.MapDataset.source(
            JsonRecords([table], np.zeros(len(table), np.int32), np.arange(len(table)))
        )
    raise ValueError(
        f"{spec}: unknown data source; expected .json, .jsonl, .yaml, a `llava-jax data "
        f"build` directory or {TFDS_PREFIX}NAME"
    )


# -- media paths -------------------------------------------------------------------------------


def is_remote(path: epath.PathLike) -> bool:
    """A `gs://` (or other URI) path, opened through etils.epath rather than the local disk."""
    return "://" in os.fspath(path)


def resolve_media(ref: bytes | str, root: str | None, record_id: str) -> bytes | Path:
    """Returns a record's image / video: its bytes as given, or its checked path.

    A path must be relative and stay inside `root` once `..` and symbolic links are resolved
    (`Path.resolve`), and name an existing file. Under a remote root (`gs://`, which has no
    symbolic links) `..` is resolved by name, and the file's bytes are returned: it had to
    be asked for once to be checked, so it is fetched once.

    Args:
      ref: one entry of `RawRecord.images` / `.videos`.
      root: `RawRecord.root`.
      record_id: for the skip's log line.

    Returns:
      `ref` itself when it is bytes, else the resolved `Path` of a local file, or the bytes
      of a remote one.

    Raises:
      SkipSample: `path_outside_root` (absolute, or leaving `root`), `missing_file` (no such
        regular file), `malformed_record` (not a string or bytes, or an empty path).
      ValueError: a path when the source has no image root (a configuration error, not a bad
        record: every image record would be skipped).
    """
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise SkipSample("malformed_record", f"media entry {ref!r} is not a path", record_id)
    if root is None:
        raise ValueError(f"record {record_id} names the file {ref!r}, but no image root is set")
    if PurePath(ref).is_absolute():
        raise SkipSample("path_outside_root", f"{ref!r} is an absolute path", record_id)
    if is_remote(root):
        return _read_remote_media(ref, root, record_id)
    try:
        base = Path(root).resolve()
        path = (base / ref).resolve()
        if not path.is_relative_to(base):
            raise SkipSample("path_outside_root", f"{ref!r} leaves the image root", record_id)
        if not path.is_file():
            raise SkipSample("missing_file", f"{ref!r}: no such file under {root}", record_id)
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, a link loop
        raise SkipSample("malformed_record", f"media path {ref!r}: {e}", record_id) from None
    return path


def _read_remote_media(ref: str, root: str, record_id: str) -> bytes:
    relative = posixpath.normpath(ref)
    if relative == ".." or relative.startswith("../"):
        raise SkipSample("path_outside_root", f"{ref!r} leaves the image root", record_id)
    try:
        return (epath.Path(root) / relative).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise SkipSample("missing_file", f"{ref!r}: no such file under {root}", record_id) from None


# -- LLaVA JSON / JSONL ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JsonTable:
    """The records of one JSON / JSONL file as compact JSON, decoded one at a time.

    Attributes:
      name: the file name, the prefix of default record ids (`<name>:<index>`).
      data: uint8[bytes], every record's compact JSON, back to back.
      offsets: int64[N + 1], record i is `data[offsets[i]:offsets[i + 1]]`.
      root: the image root of this file's relative paths.
    """

    name: str
    data: np.ndarray
    offsets: np.ndarray
    root: str | None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, index: int) -> RawRecord:
        """Record `index` of the file (its position in the file, 0-based)."""
        blob = self.data[self.offsets[index] : self.offsets[index + 1]].tobytes()
        return record_from_json(json.loads(blob), f"{self.name}:{index}", self.root)


def load_json_table(path: epath.PathLike, root: str | None) -> JsonTable:
    """Reads a LLaVA `.json` (one list) or `.jsonl` (one record per line) file.

    An invalid JSONL line becomes a record that is not an object (the transform skips it as
    `malformed_record`); a `.json` file that is not a valid list raises ValueError, since
    none of it can be read. Blank JSONL lines are not records.
    """
    path = epath.Path(path)
    chunks: list[bytes] = []
    if path.suffix.lower() == ".jsonl":
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    chunks.append(_jsonl_record(line, path, number))
    elif path.suffix.lower() == ".json":
        chunks.extend(_compact(obj) for obj in _iter_json_list(path))
    else:
        raise ValueError(f"{path}: expected a .json or .jsonl file")
    offsets = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    data = np.frombuffer(b"".join(chunks), np.uint8)
    return JsonTable(path.name, data, offsets, None if root is None else str(root))


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}  # fmt: skip


def record_from_json(obj: Any, default_id: str, root: str | None) -> RawRecord:
    """One LLaVA record (a parsed JSON value) as a `RawRecord`, without validating it.

    `image` / `video` may be a string or a list; anything else is passed on as one entry for
    `resolve_media` to reject. A value that is not an object gives `NotAnObject`.
    """
    if not isinstance(obj, dict):
        what = f"a JSON {_JSON_TYPES.get(type(obj), type(obj).__name__)}"
        if isinstance(obj, str):
            what += f" {obj[:200]!r}"
        return RawRecord(id=default_id, conversations=NotAnObject(what), root=root)
    record_id = obj.get("id")
    return RawRecord(
        id=default_id if record_id is None else str(record_id),
        conversations=obj.get("conversations"),
        images=_media_refs(obj.get("image")),
        videos=_media_refs(obj.get("video")),
        root=root,
    )


class JsonRecords:
    """A random-access data source over rows of one or more `JsonTable`s.

    Args:
      tables: the files.
      table_ids: int32[M], the table of each record.
      rows: int64[M], the record's index in its table.
    """

    def __init__(self, tables: Sequence[JsonTable], table_ids: np.ndarray, rows: np.ndarray):
        self._tables = tuple(tables)
        self._table_ids = np.asarray(table_ids, np.int32)
        self._rows = np.asarray(rows, np.int64)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> RawRecord:
        return self._tables[self._table_ids[index]].record(int(self._rows[index]))

    def __repr__(self) -> str:
        names = ", ".join(t.name for t in self._tables)
        return f"JsonRecords({names}; {len(self)} records)"


def _media_refs(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(value)
    return (value,)


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _jsonl_record(line: bytes, path: epath.Path, number: int) -> bytes:
    try:
        return _compact(json.loads(line))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # A JSON string, so the record is "not an object" downstream, with the cause kept.
        return _compact(f"{path.name} line {number}: invalid JSON: {e}")


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _read_utf8(path: epath.Path) -> str:
    """The file's text; JSON is UTF-8 (RFC 8259 §8.1), and a stray byte names the file."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = raw[e.start : e.start + 1]
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start:,} is {byte!r})") from None


def _iter_json_list(path: epath.Path):
    """Yields the elements of a JSON list one by one: the whole list never exists as objects."""
    text = _read_utf8(path)
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        raise ValueError(f"{path}: expected a JSON list of records (use .jsonl for lines)")
    pos = _WHITESPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from None
            yield obj
            pos = _WHITESPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                line = text.count("\n", 0, pos) + 1
                raise ValueError(f"{path}: invalid JSON: expected ',' or ']' at line {line}")
    if _WHITESPACE.match(text, pos).end() != len(text):
        raise ValueError(f"{path}: invalid JSON: extra data after the list")


# -- TFDS --------------------------------------------------------------------------------------

TFDS_FIELDS = ("id", "image", "video", "conversations", "question", "answer")


class TfdsRecords:
    """A prepared TFDS dataset (`tfds.data_source`, no download) as `RawRecord`s.

    Images: an `Image` feature is read as its encoded bytes (TFDS does not decode it; our
    transform does, with its format allow-list); a uint8 array (a `Tensor`, or the images of
    a `Sequence(Image)`, which TFDS decodes) is encoded as lossless PNG bytes. Videos must be
    stored as the file's bytes. Text comes back from TFDS as bytes and is decoded as UTF-8.
    `conversations` is a JSON string, a list of `{"from", "value"}`, or a `Sequence` of
    `{"from", "value"}` features; `question` + `answer` make one human/gpt exchange, with
    one `<image>\\n` per image put before a question that has no placeholder.

    The TFDS source is opened lazily in each process (it is not pickled into Grain workers).
    """

    def __init__(self, spec: str, data_dir: str | None, fields: Mapping[str, str] | None):
        import tensorflow_datasets as tfds

        name, _, split = spec[len(TFDS_PREFIX) :].partition(":")
        self._name, self._split = name, split or "train"
        self._data_dir = None if data_dir is None else str(data_dir)
        try:
            builder = tfds.builder(self._name, data_dir=self._data_dir)
        except Exception as e:  # TFDS raises its own error types for unknown names
            raise ValueError(f"{spec}: cannot open the TFDS dataset: {_one_line(e)}") from None
        features = builder.info.features
        self._fields = _tfds_fields(spec, fields, list(features.keys()))
        # Encoded images stay bytes: TFDS would decode them with every format Pillow knows.
        self._skip_decoding = tuple(
            self._fields[key]
            for key in ("image", "video")
            if key in self._fields and isinstance(features[self._fields[key]], tfds.features.Image)
        )
        self._source = None
        try:
            self._len = len(self._open())
        except Exception as e:  # an unknown split, a dataset not prepared in data_dir
            raise ValueError(f"{spec}: cannot read the TFDS dataset: {_one_line(e)}") from None

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds

            decoders = {f: tfds.decode.SkipDecoding() for f in self._skip_decoding}
            self._source = tfds.data_source(
                self._name,
                split=self._split,
                data_dir=self._data_dir,
                download=False,
                decoders=decoders or None,
            )
        return self._source

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> RawRecord:
        example = self._open()[index]
        fields = self._fields
        record_id = (
            str(_to_python(example[fields["id"]]))
            if "id" in fields
            else f"{self._name}:{self._split}:{index}"
        )
        images = _tfds_media(example[fields["image"]]) if "image" in fields else ()
        videos = _tfds_media(example[fields["video"]]) if "video" in fields else ()
        if "conversations" in fields:
            conversations = _tfds_conversations(example[fields["conversations"]])
        else:
            question = _to_python(example[fields["question"]])
            if images and isinstance(question, str) and "<image>" not in question:
                question = "<image>\n" * len(images) + question
            answer = _to_python(example[fields["answer"]])
            conversations = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        return RawRecord(record_id, conversations, images, videos, root=None)

    def __repr__(self) -> str:
        return f"TfdsRecords({self._name}:{self._split}; {self._len} records)"


def _tfds_fields(spec: str, fields: Mapping[str, str] | None, features: list[str]) -> dict:
    if not fields:  # None or empty (the config's default): the features of our names
        fields = {k: k for k in TFDS_FIELDS if k in features}
        if "conversations" in fields:
            fields.pop("question", None), fields.pop("answer", None)
    fields = {str(k): str(v) for k, v in dict(fields).items()}
    unknown = sorted(set(fields) - set(TFDS_FIELDS))
    if unknown:
        raise ValueError(f"{spec}: tfds_fields {unknown} unknown; accepted: {list(TFDS_FIELDS)}")
    missing = sorted(f"{k}={v}" for k, v in fields.items() if v not in features)
    if missing:
        raise ValueError(f"{spec}: no such features {missing}; the dataset has {sorted(features)}")
    if "conversations" not in fields and not {"question", "answer"} <= set(fields):
        raise ValueError(
            f"{spec}: tfds_fields must map `conversations`, or `question` and `answer`; "
            f"the dataset has {sorted(features)}"
        )
    return fields


def _tfds_media(value: Any) -> tuple[bytes, ...]:
    if isinstance(value, bytes):
        return (value,)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return (_png(value),) if value.ndim in (2, 3) else tuple(_png(v) for v in value)
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(m for v in value for m in _tfds_media(v))
    return (value,)  # resolve_media rejects it as malformed


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _tfds_conversations(value: Any) -> Any:
    value = _to_python(value)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None  # malformed_record downstream
    if isinstance(value, dict) and set(value) >= {"from", "value"}:  # a Sequence of dicts
        return [
            {"from": f, "value": v} for f, v in zip(value["from"], value["value"], strict=False)
        ]
    return value


def _to_python(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return _to_python(value.tolist()) if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return _to_python(value.item())
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
