"""Checking that parsed JSON has the layout a loader expects, with one-line errors.

A loader states the layout where it reads a file, e.g. `check_layout(data, {"questions":
list}, str(path))` or `records(rows, ("question_id", "image"), f"{path}: questions")`, so
that a file of the wrong shape stops with one line naming the file, the place in it and what
was found there ("x.json: expected a JSON object with 'questions'; got a list") instead of a
KeyError or TypeError deep inside the loader. Used by the benchmark loaders and the COCO
annotation reader of `llava-jax instruct`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Layout = type | dict[str, type]  # a JSON type (dict, list, str), or an object's typed fields
_NAMES = {dict: "a JSON object", list: "a list", str: "a string"}


class LayoutError(ValueError):
    """JSON that does not have the layout its reader expects (printed as one line)."""


def kind(value: Any) -> str:
    """What a JSON value is, in words ("a list", "a JSON object", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return _NAMES.get(type(value), type(value).__name__)


def check_layout(value: Any, expect: Layout, where: str) -> None:
    """Raises a one-line `LayoutError` at `where` unless `value` has the layout `expect`: a
    type, or {key: type} for a JSON object that holds those keys with values of those types."""
    fields = expect if isinstance(expect, dict) else {}
    wanted = dict if fields else expect
    if not isinstance(value, wanted):
        detail = f" with {', '.join(repr(k) for k in fields)}" if fields else ""
        raise LayoutError(f"{where}: expected {_NAMES[wanted]}{detail}; got {kind(value)}")
    for key, typ in fields.items():
        if key not in value:
            raise LayoutError(f"{where}: no field {key!r} (expected {_NAMES[typ]})")
        if not isinstance(value[key], typ):
            raise LayoutError(f"{where}: field {key!r} should be {_NAMES[typ]}; got "
                              f"{kind(value[key])}")  # fmt: skip


def require(record: Any, keys: Sequence[str], where: str) -> dict:
    """`record` if it is a JSON object holding `keys`, else a one-line error at `where`."""
    check_layout(record, dict, where)
    missing = [k for k in keys if k not in record]
    if missing:
        raise LayoutError(f"{where}: missing field(s) {', '.join(missing)}")
    return record


def records(rows: Any, keys: Sequence[str], where: str) -> list[dict]:
    """`rows` if it is a list of JSON objects that each hold `keys` (errors name `where[i]`)."""
    check_layout(rows, list, where)
    for i, row in enumerate(rows):
        require(row, keys, f"{where}[{i}]")
    return rows
