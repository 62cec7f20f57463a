"""What a benchmark task is: its samples, how they are prompted, how they are scored."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava_jax.eval.layout import Layout, check_layout, records, require


class EvalDataError(ValueError):
    """A benchmark directory that does not hold the published layout (printed as one line)."""


# An image is a file path, or the encoded file's bytes (MMBench ships base64 in its TSV).
ImageRef = Path | bytes


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question put to the model.

    Attributes:
      question_id: unique within the task; the key of the predictions file.
      text: the user turn, `<image>` placeholders included, prompt suffix included.
      images: one per `<image>` placeholder, in order.
      meta: what scoring needs (ground truth, category, ...); JSON-serialisable.
    """

    question_id: str
    text: str
    images: tuple[ImageRef, ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Table:
    """A printed result table: header names and rows of cells (floats print as 0.00)."""

    headers: list[str]
    rows: list[list[Any]]

    def format(self) -> str:
        cells = [self.headers] + [[_cell(c) for c in row] for row in self.rows]
        widths = [max(len(str(r[i])) for r in cells) for i in range(len(self.headers))]
        lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


@dataclasses.dataclass
class Report:
    """The outcome of scoring: metrics (written to metrics.json), the tables to print and
    notes printed under them."""

    metrics: dict[str, Any]
    tables: list[Table]
    notes: list[str] = dataclasses.field(default_factory=list)

    def format(self) -> str:
        text = "\n\n".join(t.format() for t in self.tables)
        if self.notes:
            text += "\n\n" + "\n".join(self.notes)
        return text


@dataclasses.dataclass
class ScoreContext:
    """What scoring may use besides the predictions.

    Attributes:
      out_dir: where the task may write extra files (a submission file, judge replies).
      data_dir: the benchmark directory.
      split: the split evaluated.
      judge: an `llm_client.ChatClient` for the LLM-judged tasks, or None.
      judge_runs: how many times the judge scores every answer (mean and std over runs).
      echo: progress messages.
    """

    out_dir: Path
    data_dir: Path
    split: str
    judge: Any = None
    judge_runs: int = 1
    echo: Any = print


class Task:
    """A benchmark. Subclasses set the class attributes and implement `samples` and `score`."""

    name: str = ""
    splits: tuple[str, ...] = ()
    default_split: str = ""
    max_new_tokens: int = 128
    needs_judge: bool = False

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        raise NotImplementedError

    def score(
        self, samples: Sequence[Sample], predictions: dict[str, str], ctx: ScoreContext
    ) -> Report:
        raise NotImplementedError


# -- reading a benchmark's files ----------------------------------------------------------------
#
# Each loader says what layout it expects where it reads a file (`read_json(path, {"data":
# list})`, `read_jsonl(path, fields)`, `records(...)`, `require(...)`, from `layout`), so that a
# file of the wrong shape is one line naming the file, the place and what was found.


def read_json(path: Path, expect: Layout | None = None) -> Any:
    """JSON from a benchmark file, with one-line errors that name the file.

    Args:
      path: the file.
      expect: its layout (see `check_layout`); None: anything.
    """
    if not path.is_file():
        raise EvalDataError(f"{path}: not found (see docs/evaluation.md for the layout)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None
    if expect is not None:
        check_layout(data, expect, str(path))
    return data


def read_jsonl(path: Path, keys: Sequence[str] = ()) -> list[dict]:
    """JSON Lines of objects holding `keys` (blank lines skipped). Also accepts a file holding
    one JSON list."""
    if not path.is_file():
        raise EvalDataError(f"{path}: not found (see docs/evaluation.md for the layout)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return records(read_json(path), keys, str(path))
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError as e:
                raise EvalDataError(f"{path}:{number}: not valid JSON ({e})") from None
            rows.append(require(row, keys, f"{path}:{number}"))
    return rows


def drop_partial_line(path: Path) -> bytes:
    """A JSONL file's bytes, after cutting off a last line left unfinished by an interrupted
    write (only ever an incomplete record, which is then produced again)."""
    if not path.is_file():
        return b""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    return data


def check_images(samples: Sequence[Sample]) -> None:
    """Stops with one line when an image file of `samples` is missing (before any model is
    loaded): the topmost missing folder, else the first missing file, and how many are."""
    paths = {ref for s in samples for ref in s.images if not isinstance(ref, bytes)}
    missing = sorted(p for p in paths if not p.is_file())
    if not missing:
        return
    top = missing[0]
    while not top.parent.is_dir():
        top = top.parent
    what = "image not found" if top == missing[0] else "no such folder"
    raise EvalDataError(f"{top}: {what} ({len(missing)} of {len(paths)} images missing; see "
                        "docs/evaluation.md for the layout)")  # fmt: skip
