"""Streaming reader and writer for Hugging Face checkpoint directories.

Peak host memory stays near one tensor when reading and one shard when writing, so a 72B
checkpoint is never held twice. Files are not memory-mapped (mapped pages count in RSS):
each tensor is read with seek + readinto straight into a fresh numpy buffer.

Safetensors layout: an 8-byte little-endian header length, a JSON header mapping each tensor
to {dtype, shape, data_offsets}, then the data; offsets count from the byte after the header.
Pickled `.bin`/`.pt` files are read only with `allow_pickle=True`: torch.load can run code, and
`weights_only=True` is only safe from torch 2.6 (CVE-2025-32434).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from llava_jax.errors import CheckpointError

_FORMATS = [  # (safetensors name, numpy dtype, torch dtype); the format is little-endian
    ("F64", "<f8", "float64"),
    ("F32", "<f4", "float32"),
    ("F16", "<f2", "float16"),
    ("BF16", ml_dtypes.bfloat16, "bfloat16"),
    ("I64", "<i8", "int64"),
    ("I32", "<i4", "int32"),
    ("I16", "<i2", "int16"),
    ("I8", "i1", "int8"),
    ("U8", "u1", "uint8"),
    ("BOOL", "bool", "bool"),
]
DTYPES: dict[str, np.dtype] = {name: np.dtype(dtype) for name, dtype, _ in _FORMATS}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_FLOATING = {DTYPES[name] for name in ("F64", "F32", "F16", "BF16")}
_TORCH_DTYPES = {f"torch.{torch_name}": DTYPES[name] for name, _, torch_name in _FORMATS}
_MAX_HEADER_BYTES = 100 * 2**20  # the limit safetensors itself enforces
_PICKLE_SUFFIXES = (".bin", ".pt")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def read_config_json(path: Path, what: str = "a Hugging Face model directory") -> dict:
    """A checkpoint directory's config file, or a one-line `CheckpointError` saying that the
    directory is not `what` (no file) or that the file is not JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}; not {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def parse_size(size: int | str) -> int:
    """Parses a size such as "5GB" as transformers does (GB = 10**9 bytes, GiB = 2**30).

    Args:
        size: bytes as an int, or digits followed by KB/MB/GB/KiB/MiB/GiB (any case).

    Returns:
        The size in bytes.
    """
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]I?B)\s*", size.upper())
    if not match:
        raise ValueError(f"size {size!r} is not an integer followed by a unit, e.g. '5GB'")
    return int(match[1]) * units[match[2]]


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte range in a safetensors file
    end: int = 0
    tensor: Any = None  # the torch.Tensor, for pickled checkpoints


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a C-contiguous array's memory (also for 0-d and bool arrays)."""
    return array.reshape(-1).view(np.uint8)


def _read_header(path: Path) -> dict[str, _Entry]:
    """Parses and validates one safetensors header; returns its tensors by name."""
    name, file_size = path.name, path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        (header_len,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (file_size,)
        if header_len > min(file_size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{name}: header length {header_len} does not fit a file of {file_size} bytes "
                "(not safetensors, or truncated?)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object")
    data_start, entries = 8 + header_len, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in (*shape, begin, end)) and begin <= end
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{name}: tensor {key!r} has a malformed entry {info}")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{name}: tensor {key!r} has {end - begin} bytes but shape {list(shape)} "
                f"of {info['dtype']} needs {math.prod(shape) * dtype.itemsize}"
            )
        if data_start + end > file_size:
            raise CheckpointError(
                f"{name}: tensor {key!r} needs bytes {data_start + begin}..{data_start + end} "
                f"but the file has {file_size} bytes (truncated download?)"
            )
        entries[key] = _Entry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


def _load_pickle(path: Path) -> dict[str, _Entry]:
    """Loads a torch state dict with weights_only=True, requiring torch >= 2.6."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path.name}: reading it needs torch; install llava-jax[torch]"
        ) from None
    if tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):
        raise CheckpointError(
            f"{path.name}: torch {torch.__version__} cannot load pickles safely "
            "(CVE-2025-32434); install torch>=2.6"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # any unpickling failure means a bad or unsafe file
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path.name}: torch.load failed: {reason}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: holds a {type(state).__name__}, not a state dict")
    entries = {}
    for key, t in state.items():
        dtype = _TORCH_DTYPES.get(str(t.dtype)) if isinstance(t, torch.Tensor) else None
        if dtype is None:
            raise CheckpointError(f"{path.name}: entry {key!r} is not a supported tensor")
        entries[key] = _Entry(path, dtype, tuple(t.shape), tensor=t)
    return entries


def _read_index(index: Path) -> dict[str, Path]:
    """Reads an HF index's weight_map; checks that each shard is inside the directory and exists."""
    try:
        weight_map = dict(json.loads(index.read_text())["weight_map"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index.name}: not a JSON object with a 'weight_map'") from None
    root, files = index.parent.resolve(), {}
    for key, name in weight_map.items():
        path = index.parent / str(name)
        if not path.resolve().is_relative_to(root):  # untrusted index must not escape the dir
            raise CheckpointError(f"{index.name}: tensor {key!r} points outside the directory")
        if not path.is_file():
            raise CheckpointError(f"{index.name}: shard file {name} (for {key!r}) is missing")
        files[key] = path
    return files


def _find(d: Path, index: str, single: str, suffixes: tuple[str, ...]) -> tuple[dict, list]:
    """Returns (weight_map or {}, files) for one format: its index, else `single`, else a glob."""
    if (d / index).is_file():
        weight_map = _read_index(d / index)
        return weight_map, sorted(set(weight_map.values()))
    if (d / single).is_file():
        return {}, [d / single]
    return {}, sorted(p for p in d.iterdir() if p.suffix in suffixes)


def _discover(d: Path, allow_pickle: bool) -> tuple[dict[str, Path], list[Path]]:
    """Returns the checkpoint's index weight_map (or {}) and the files to read."""
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    weight_map, files = _find(
        d, "model.safetensors.index.json", "model.safetensors", (".safetensors",)
    )
    if not weight_map and any(_SHARD.fullmatch(f.name) for f in files):
        raise CheckpointError(
            f"{d}: has model-*-of-* shards but no model.safetensors.index.json "
            "(interrupted write or download?)"
        )
    if files:
        return weight_map, files
    pt_index = "pytorch_model.bin.index.json"
    if not any(p.suffix in _PICKLE_SUFFIXES or p.name == pt_index for p in d.iterdir()):
        raise CheckpointError(f"{d}: no *.safetensors (or .bin/.pt) checkpoint files")
    if not allow_pickle:
        raise CheckpointError(
            f"{d}: only has pickle (.bin/.pt) weights, which can run code when loaded; "
            "pass --allow-pickle (allow_pickle=True) if you trust them"
        )
    return _find(d, pt_index, "pytorch_model.bin", _PICKLE_SUFFIXES)


class CheckpointReader:
    """Reads tensors one at a time from an HF checkpoint directory.

    Reads `model.safetensors.index.json` and its shards, else `model.safetensors`, else every
    `*.safetensors`; else, only with `allow_pickle`, `pytorch_model.bin.index.json`,
    `pytorch_model.bin`, or every `*.bin`/`*.pt` (e.g. LLaVA's `mm_projector.bin`).

    Example:
        with CheckpointReader(hf_dir) as ckpt:
            for key in ckpt.keys():
                w = ckpt.read(key)
    """

    def __init__(self, hf_dir: str | os.PathLike, allow_pickle: bool = False):
        """Finds the checkpoint files and validates their headers; reads no tensor data.

        Args:
            hf_dir: checkpoint directory.
            allow_pickle: also read `.bin`/`.pt` files with torch.load(weights_only=True).
        """
        self.path = Path(hf_dir)
        self._entries: dict[str, _Entry] = {}
        self._open_files: dict[Path, Any] = {}
        weight_map, files = _discover(self.path, allow_pickle)
        for file in files:
            is_pickle = file.suffix in _PICKLE_SUFFIXES
            for key, entry in (_load_pickle(file) if is_pickle else _read_header(file)).items():
                if key in self._entries:
                    other = self._entries[key].path.name
                    raise CheckpointError(f"{file.name}: tensor {key!r} is also in {other}")
                self._entries[key] = entry
        for key, file in weight_map.items():
            if key not in self._entries or self._entries[key].path != file:
                raise CheckpointError(f"{file.name}: has no tensor {key!r}, unlike its index")

    def keys(self) -> list[str]:
        """Returns all tensor names, sorted."""
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def _entry(self, key: str) -> _Entry:
        if key not in self._entries:
            raise CheckpointError(f"{self.path}: has no tensor {key!r}")
        return self._entries[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Returns the shape of tensor `key` without reading it."""
        return self._entry(key).shape

    def dtype(self, key: str) -> np.dtype:
        """Returns the numpy dtype of tensor `key` (bfloat16 as ml_dtypes.bfloat16)."""
        return self._entry(key).dtype

    def read(self, key: str) -> np.ndarray:
        """Reads one tensor into a fresh array that owns its memory.

        Args:
            key: tensor name.

        Returns:
            The tensor with the checkpoint's shape and dtype.
        """
        e = self._entry(key)
        out = np.empty(e.shape, e.dtype)
        self._read_into(e, key, memoryview(_bytes_of(out)))
        if e.dtype in _FLOATING and not np.isfinite(out).all():
            # Damaged bytes keep the file's size: nothing else notices (issue 18).
            raise CheckpointError(
                f"{e.path.name}: tensor {key!r} holds {int((~np.isfinite(out)).sum()):,} NaN or "
                "infinite values; the weights are damaged"
            )
        return out

    def _read_into(self, e: _Entry, key: str, dst: memoryview) -> None:
        if e.tensor is not None:  # a byte copy: numpy cannot view torch bfloat16 tensors
            import torch

            dst[:] = memoryview(e.tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
            return
        if e.path not in self._open_files:  # unbuffered: readinto fills `out` directly
            self._open_files[e.path] = open(e.path, "rb", buffering=0)
        f, done = self._open_files[e.path], 0
        f.seek(e.begin)
        while done < len(dst):
            n = f.readinto(dst[done:])
            if not n:
                raise CheckpointError(
                    f"{e.path.name}: tensor {key!r} needs bytes {e.begin}..{e.end} but the "
                    f"file ends at {e.begin + done} (changed since it was opened?)"
                )
            done += n

    def close(self) -> None:
        """Closes the files opened by `read`."""
        for f in self._open_files.values():
            f.close()
        self._open_files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class CheckpointWriter:
    """Streams tensors into safetensors shards, holding at most one shard in memory.

    `close` writes `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards and
    `model.safetensors.index.json` as transformers writes them. Shards are written under hidden
    temporary names and renamed at the end, the index last, so an interrupted write (or an
    exception inside `with`) never leaves a checkpoint that looks complete; a checkpoint already
    in `out_dir` is replaced at close. As in transformers, a tensor larger than
    `max_shard_size` gets a shard of its own.

    Example:
        with CheckpointWriter(out_dir, max_shard_size="5GB") as out:
            out.add("lm_head.weight", w)
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ):
        """Prepares `out_dir`, creating it if needed.

        Args:
            out_dir: output directory; other files there (config.json, ...) are left alone.
            max_shard_size: bytes per shard: an int, or a string such as "5GB" or "2GiB".
            metadata: safetensors `__metadata__` (str to str); defaults to {"format": "pt"},
                which transformers requires.
        """
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        if not all(isinstance(s, str) for item in self.metadata.items() for s in item):
            raise CheckpointError(f"safetensors metadata must map str to str: {self.metadata}")
        self._tag = uuid.uuid4().hex[:8]
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = self._total_size = 0
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names)
        self._keys: set[str] = set()
        self._done = False

    def add(self, key: str, array: Any) -> None:
        """Queues one tensor, first writing out the current shard if the tensor would overflow it.

        The array is held by reference until its shard is written: do not modify it meanwhile.

        Args:
            key: tensor name, unique in the checkpoint.
            array: a numpy array, or anything np.asarray accepts (e.g. a jax.Array).
        """
        if self._done:
            raise CheckpointError(f"{self.out_dir}: add({key!r}) after the writer was closed")
        if key in self._keys:
            raise CheckpointError(f"{self.out_dir}: tensor {key!r} was added twice")
        array = np.asarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {key!r}: dtype {array.dtype} is not supported")
        array = np.require(array, requirements="C")  # not ascontiguousarray: 0-d -> 1-d
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_size:
            self._write_shard()
        self._pending[key] = array
        self._pending_bytes += array.nbytes
        self._total_size += array.nbytes
        self._keys.add(key)

    def _write_shard(self) -> None:
        header: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for key, a in self._pending.items():
            dtype, end = _DTYPE_NAMES[a.dtype], offset + a.nbytes
            header[key] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
        tmp = self.out_dir / f".tmp-{self._tag}-{len(self._shards):05d}.safetensors.partial"
        self._shards.append((tmp, list(self._pending)))
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for a in self._pending.values():
                f.write(memoryview(_bytes_of(a)))
            f.flush()
            os.fsync(f.fileno())
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        """Writes the last shard, then gives every file its final name (the index last)."""
        if self._done:
            return
        if self._pending or not self._shards:
            self._write_shard()
        n = len(self._shards)
        names = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        names = ["model.safetensors"] if n == 1 else names
        # Like save_pretrained, replace a previous checkpoint; its index goes first so that it
        # never names a mix of old and new shards.
        (self.out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
        for old in self.out_dir.iterdir():
            if old.name == "model.safetensors" or _SHARD.fullmatch(old.name):
                old.unlink()
        for (tmp, _), name in zip(self._shards, names, strict=True):
            os.replace(tmp, self.out_dir / name)
        if n > 1:
            shards = zip(self._shards, names, strict=True)
            weight_map = {key: name for (_, keys), name in shards for key in keys}
            index = {"metadata": {"total_size": self._total_size}, "weight_map": weight_map}
            tmp = self.out_dir / f".tmp-{self._tag}-index.json.partial"
            tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.out_dir / "model.safetensors.index.json")
        self._done = True

    def abort(self) -> None:
        """Deletes the temporary shards written so far, leaving `out_dir` as it was."""
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)
        self._pending, self._shards, self._done = {}, [], True

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
