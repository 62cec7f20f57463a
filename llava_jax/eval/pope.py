"""POPE (Li et al., 2023): object hallucination as yes/no questions on COCO val2014.

Layout (the POPE release's `output/coco/` files, JSON Lines despite the `.json` name):

    DIR/coco_pope_{adversarial,popular,random}.json   {"question_id", "image", "text", "label"}
      (or DIR/coco/coco_pope_*.json, as LLaVA's playground has them)
    DIR/val2014/COCO_val2014_*.jpg

Answers are read with LLaVA's `eval_pope.py` rule; per split: accuracy, precision, recall,
F1 and yes-ratio, and their mean over the splits (LLaVA-1.5 reports the mean F1).
"""

from __future__ import annotations

from pathlib import Path

from llava_jax.eval.answers import SHORT_ANSWER_PROMPT, pope_yes_no
from llava_jax.eval.metrics import binary_metrics
from llava_jax.eval.task import (
    EvalDataError,
    Report,
    Sample,
    ScoreContext,
    Table,
    Task,
    read_jsonl,
)

CATEGORIES = ("adversarial", "popular", "random")
COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class POPE(Task):
    name = "pope"
    splits = ("all", *CATEGORIES)
    default_split = "all"

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        samples = []
        for category in CATEGORIES if split == "all" else (split,):
            path = data_dir / f"coco_pope_{category}.json"
            if not path.is_file() and (data_dir / "coco" / path.name).is_file():
                path = data_dir / "coco" / path.name
            for q in read_jsonl(path, ("question_id", "image", "text", "label")):
                if q["label"] not in ("yes", "no"):
                    raise EvalDataError(f"{path}: label {q['label']!r} is not yes or no")
                text = f"<image>\n{q['text']}\n{SHORT_ANSWER_PROMPT}"
                image = data_dir / "val2014" / q["image"]
                meta = {"category": category, "label": q["label"]}
                samples.append(Sample(f"{category}/{q['question_id']}", text, (image,), meta))
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        metrics, rows = {}, []
        for category in CATEGORIES:
            chosen = [s for s in samples if s.meta["category"] == category]
            if not chosen:
                continue
            preds = [pope_yes_no(predictions[s.question_id]) for s in chosen]
            m = binary_metrics(preds, [s.meta["label"] for s in chosen])
            metrics[category] = m
            rows.append([category, *(m[c] for c in COLUMNS)])
        if len(metrics) > 1:
            mean = {c: sum(m[c] for m in metrics.values()) / len(metrics) for c in COLUMNS}
            metrics["mean"] = mean
            rows.append(["mean", *mean.values()])
        return Report(metrics, [Table(["split", *COLUMNS], rows)])
