"""The LLaVA-1.5 benchmark suite in one run: every task whose data is present, one model
load, one summary row in the order of the LLaVA-1.5 paper's table.

Layout: one folder per benchmark under the suite's data root, each in its task's published
layout (docs/evaluation.md): `vqav2/`, `gqa/`, `vizwiz/`, `scienceqa/`, `textvqa/`, `pope/`,
`MME_Benchmark_release_version/` (or `mme/`), `mmbench/`, `llava-bench-in-the-wild/` (or
`llava-bench/`), `mm-vet/`. Missing folders are skipped; the judged tasks need a judge.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

from etils import epath

from llava_jax.eval.runner import evaluate, local_out_dir
from llava_jax.eval.task import Report, Table, Task


@dataclasses.dataclass(frozen=True)
class Entry:
    column: str  # the LLaVA-1.5 table's name
    task: str
    folders: tuple[str, ...]
    headline: Callable[[dict], Any]  # metrics -> the number the paper reports
    caveat: str = ""  # how our number differs from the paper's protocol, printed under the row


def _get(*keys: str) -> Callable[[dict], Any]:
    def pick(metrics: dict) -> Any:
        for k in keys:
            if not isinstance(metrics, dict) or k not in metrics:
                return None
            metrics = metrics[k]
        return metrics

    return pick


VIZWIZ_CAVEAT = (
    "the val split; LLaVA-1.5 reports test-dev (`llava-jax eval vizwiz --split test` writes "
    "the file for the EvalAI server)"
)

SUITE = (
    Entry("VQAv2", "vqav2", ("vqav2",), _get("accuracy")),
    Entry("GQA", "gqa", ("gqa",), _get("accuracy")),
    Entry("VizWiz", "vizwiz", ("vizwiz",), _get("accuracy"), VIZWIZ_CAVEAT),
    Entry("SQA-IMG", "scienceqa", ("scienceqa",), _get("accuracy")),
    Entry("TextVQA", "textvqa", ("textvqa",), _get("accuracy")),
    Entry("POPE", "pope", ("pope",), _get("mean", "f1")),
    Entry("MME", "mme", ("MME_Benchmark_release_version", "mme"), _get("perception", "score")),
    Entry("MMB", "mmbench", ("mmbench",), _get("circular_accuracy")),
    Entry(
        "LLaVA-W",
        "llava-bench",
        ("llava-bench-in-the-wild", "llava-bench"),
        _get("relative_score", "all", "mean"),
    ),  # fmt: skip
    Entry("MM-Vet", "mm-vet", ("mm-vet",), _get("score", "total", "mean")),
)


def run_suite(
    tasks: dict[str, type[Task]],
    data_root: str | os.PathLike,
    out_root: str | os.PathLike,
    load_pipeline: Callable[[], Any] | None,
    judge: Any = None,
    echo: Callable[[str], None] = print,
    **kwargs: Any,
) -> Report:
    """Runs every suite task whose folder exists under `data_root` (each with its default
    split) into `out_root/TASK-SPLIT/`; kwargs go to `runner.evaluate`. The model is loaded
    once, on first need. Writes `out_root/suite.json`."""
    data_root, out_root = epath.Path(data_root), local_out_dir(out_root)
    if not data_root.is_dir():
        raise FileNotFoundError(2, "no such data directory", str(data_root))
    out_root.mkdir(parents=True, exist_ok=True)
    cached: list[Any] = []

    def load_once():
        if not cached:
            cached.append(load_pipeline())
        return cached[0]

    row: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for entry in SUITE:
        folder = next((data_root / f for f in entry.folders if (data_root / f).is_dir()), None)
        task = tasks[entry.task]()
        if folder is None:
            notes[entry.column] = f"no {data_root / entry.folders[0]}"
        elif task.needs_judge and judge is None:
            notes[entry.column] = "needs --judge-model"
        else:
            out = out_root / f"{entry.task}-{task.default_split}"
            evaluate(task, folder, out, load_once if load_pipeline else None, judge=judge,
                     echo=echo, **kwargs)  # fmt: skip
            metrics = json.loads((out / "metrics.json").read_text())
            row[entry.column] = entry.headline(metrics)
            if row[entry.column] is None:
                notes[entry.column] = "submission file only (no public answers)"
            elif entry.caveat:
                notes[entry.column] = entry.caveat
            continue
        row[entry.column] = None
        echo(f"{entry.column}: skipped ({notes[entry.column]})")
    (out_root / "suite.json").write_text(json.dumps({"scores": row, "notes": notes}, indent=2))
    table = Table(list(row), [list(row.values())])
    caveats = [f"{e.column}: {e.caveat}" for e in SUITE if e.caveat and row[e.column] is not None]
    return Report({"scores": row, "notes": notes}, [table], caveats)
