"""Benchmarks of the LLaVA papers: loaders for their published layouts, prompts, metrics.

`TASKS` maps a task name to its class; `runner.evaluate` runs one. See docs/evaluation.md.
"""

from __future__ import annotations

from llava_jax.eval.gqa import GQA
from llava_jax.eval.llava_bench import LlavaBench
from llava_jax.eval.mmbench import MMBench
from llava_jax.eval.mme import MME
from llava_jax.eval.mmvet import MMVet
from llava_jax.eval.pope import POPE
from llava_jax.eval.scienceqa import ScienceQA
from llava_jax.eval.task import EvalDataError, Report, Sample, ScoreContext, Table, Task
from llava_jax.eval.vqa import TextVQA, VizWiz, VQAv2

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (ScienceQA, VQAv2, GQA, TextVQA, VizWiz, POPE, MME, MMBench, LlavaBench,
                        MMVet)
}  # fmt: skip

__all__ = ["TASKS", "EvalDataError", "Report", "Sample", "ScoreContext", "Table", "Task"]
