"""TensorBoard event files for scalars, written without TensorFlow.

An event file is a TFRecord stream of `Event` protocol buffers. We only ever write two
kinds, so they are encoded here by hand (protobuf wire format, a few lines):

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

Each record is framed as: uint64 length, uint32 masked CRC-32C of the length, the bytes,
uint32 masked CRC-32C of the bytes (all little-endian).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Mapping

from etils import epath


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses."""
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf does
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(
    wall_time: float, step: int, scalars: Mapping[str, float] | None = None, version=None
) -> bytes:
    """One serialised `Event` with a scalar summary (or the file-version header)."""
    event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if version is not None:
        event += _length_delimited(3, version.encode())
    values = b"".join(
        _length_delimited(
            1,
            _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(value))),
        )
        for tag, value in (scalars or {}).items()
    )
    if values:
        event += _length_delimited(5, values)
    return event


class SummaryWriter:
    """Writes scalar summaries to a new event file in `logdir`; flushes every write.

    Flushing each write costs little at one write per logging step, and a killed run keeps
    every scalar it logged. `logdir` may be local or a `gs://` path (etils.epath).
    """

    def __init__(self, logdir: str | os.PathLike):
        path = epath.Path(logdir)
        path.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self._file = (path / name).open("wb")
        self._write(encode_event(time.time(), 0, version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", _masked_crc(header)))
        self._file.write(data + struct.pack("<I", _masked_crc(data)))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes `values` ({tag: number}) at `step`."""
        self._write(encode_event(time.time(), int(step), values))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
