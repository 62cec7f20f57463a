"""GQA (Hudson & Manning, 2019): exact match after LLaVA's normalisation.

Layout: `{split}_questions.json` ({question_id: {imageId, question, answer, types}}), as
released (`testdev_balanced_questions.json` is what LLaVA-1.5 reports), and images
`images/{imageId}.jpg`. Accuracy overall and by the structural and semantic question types
of the GQA evaluation script; `gqa_{split}_predictions.json` is written in the format that
script reads ([{"questionId", "prediction"}]).

As the GQA evaluation script (`eval.py` of cs.stanford.edu/people/dorarad/gqa/evaluate.html)
does, only the questions marked `isBalanced` are scored: all of a `*_balanced` file, a part of
a `*_all` file; the others are answered and written to the predictions file only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from llava_jax.eval.answers import SHORT_ANSWER_PROMPT
from llava_jax.eval.metrics import percent
from llava_jax.eval.normalize import normalize_gqa
from llava_jax.eval.task import (
    EvalDataError,
    Report,
    Sample,
    ScoreContext,
    Table,
    Task,
    read_json,
    require,
)


class GQA(Task):
    name = "gqa"
    splits = ("testdev_balanced", "testdev_all", "val_balanced", "val_all", "challenge_balanced")
    default_split = "testdev_balanced"

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        path = data_dir / f"{split}_questions.json"
        samples = []
        for qid, q in read_json(path, dict).items():
            require(q, ("imageId", "question"), f"{path}: question {qid}")
            if q.get("answer") is not None and not isinstance(q.get("isBalanced"), bool):
                raise EvalDataError(f"{path}: question {qid}: no field 'isBalanced' (true or "
                                    "false), which decides whether it is scored")  # fmt: skip
            meta = {"answer": q.get("answer"), "balanced": q.get("isBalanced"),
                    "types": q.get("types") or {}}  # fmt: skip
            text = f"<image>\n{q['question']}\n{SHORT_ANSWER_PROMPT}"
            samples.append(Sample(str(qid), text, (data_dir / "images" / f"{q['imageId']}.jpg",),
                                  meta))  # fmt: skip
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        pred = {s.question_id: normalize_gqa(predictions[s.question_id]) for s in samples}
        path = ctx.out_dir / f"gqa_{ctx.split}_predictions.json"
        path.write_text(json.dumps([{"questionId": q, "prediction": p} for q, p in pred.items()]))
        scored = [s for s in samples if s.meta["answer"] is not None and s.meta["balanced"]]
        if not scored:
            return Report({"predictions": str(path)}, [Table(["predictions"], [[str(path)]])])
        hits = {s.question_id: pred[s.question_id] == s.meta["answer"] for s in scored}
        groups: dict[str, dict[str, list[bool]]] = {"structural": defaultdict(list),
                                                    "semantic": defaultdict(list)}  # fmt: skip
        for s in scored:
            for kind, by in groups.items():
                if s.meta["types"].get(kind):
                    by[s.meta["types"][kind]].append(hits[s.question_id])
        accuracy = percent(hits.values())
        metrics = {
            "accuracy": accuracy,
            "predictions": str(path),
            "scored_questions": len(scored),  # the isBalanced ones
            **{k: {t: percent(v) for t, v in sorted(by.items())} for k, by in groups.items()},
        }
        tables = [Table(["", "accuracy"], [["overall", accuracy]])]
        for kind in groups:
            if metrics[kind]:
                tables.append(
                    Table([kind, *metrics[kind]], [["accuracy", *metrics[kind].values()]])
                )
        return Report(metrics, tables)
