"""The eval task tests' runner: scores hand-written answers as a predictions file, with no model
(every question already has an answer, so the runner goes straight to scoring)."""

from __future__ import annotations

import json

from llava_jax.eval import TASKS
from llava_jax.eval.runner import evaluate


def run(task, data, out, answers, **kw):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for qid, answer in answers.items():
            f.write(json.dumps({"question_id": qid, "answer": answer}) + "\n")
    report = evaluate(TASKS[task](), data, out, None, echo=lambda m: None, **kw)
    metrics = json.loads((out / "metrics.json").read_text())
    return report, metrics
