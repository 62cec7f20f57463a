"""MM-Vet (Yu et al., 2023): open answers graded 0-1 by an LLM against the ground truth.

Layout (the MM-Vet release): `DIR/mm-vet.json` ({"v1_0": {"imagename", "capability": [...],
"question", "answer"}, ...}) and `DIR/images/IMAGENAME`. The question is asked as is. The
score is the mean grade × 100, overall and per capability (rec, ocr, know, gen, spat, math),
with mean and std over the judge runs. Grades are read, asked again and averaged as MM-Vet's
`mm-vet_evaluator.py` (yuweihao/MM-Vet) does.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from llava_jax.eval.judge import judge_all, parse_unit_score, runs_of, unreadable
from llava_jax.eval.metrics import mean_std
from llava_jax.eval.task import Report, Sample, ScoreContext, Table, Task, read_json, require

# Follows the MM-Vet grader's rules (<AND> / <OR> in the ground truth, 0.0-1.0 in steps of
# 0.1); the examples are ours.
GRADER = """Compare the ground truth with an AI model's prediction and give the prediction a \
correctness score. In the ground truth, <AND> means the prediction is fully right only if it \
contains every element, and <OR> means any one element suffices. The score is one of 0.0 \
(totally wrong), 0.1, 0.2, ..., 0.9, 1.0 (totally right). Reply with the score only.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
What color is the bus? | red <OR> dark red | The bus is blue. | 0.0
How many cats are there? | 3 | There are three cats on the sofa. | 1.0
"""
# As MM-Vet's `mm-vet_evaluator.py`: greedy, 3 tokens; an unreadable grade is asked again
# with RETRY_SUFFIX, at temperatures 0, 0.5, 1 and 1.5 (its fifth retry's reply is never
# read), and then counts 0.
JUDGE_PARAMS = {"temperature": 0.0, "max_tokens": 3}
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
RETRY_TEMPERATURES = (0.0, 0.5, 1.0, 1.5)


def grader_messages(question: str, truth: str, prediction: str, retry: bool = False) -> list[dict]:
    row = " | ".join(x.replace("\n", "<br>") for x in (question, truth, prediction))
    return [{"role": "user", "content": f"{GRADER}{row} | " + (RETRY_SUFFIX if retry else "")}]


class MMVet(Task):
    name = "mm-vet"
    splits = ("all",)
    default_split = "all"
    max_new_tokens = 1024
    needs_judge = True

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        samples = []
        path = data_dir / "mm-vet.json"
        for qid, q in read_json(path, dict).items():
            require(q, ("imagename", "question", "answer"), f"{path}: question {qid}")
            meta = {"question": q["question"], "answer": q["answer"],
                    "capability": list(q.get("capability", []))}  # fmt: skip
            samples.append(Sample(qid, f"<image>\n{q['question']}",
                                  (data_dir / "images" / q["imagename"],), meta))  # fmt: skip
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        requests = {s.question_id: grader_messages(s.meta["question"], s.meta["answer"],
                                                   predictions[s.question_id])
                    for s in samples}  # fmt: skip
        scores = judge_all(ctx, requests, parse_unit_score, JUDGE_PARAMS)
        retries = {s.question_id: grader_messages(s.meta["question"], s.meta["answer"],
                                                  predictions[s.question_id], retry=True)
                   for s in samples}  # fmt: skip
        asked_again = 0
        for temperature in RETRY_TEMPERATURES:
            pending = {judged for judged, v in scores.items() if v is None}
            if not pending:
                break
            asked_again += len(pending)
            params = {**JUDGE_PARAMS, "temperature": temperature}
            scores.update(judge_all(ctx, retries, parse_unit_score, params, only=pending))
        caps = {s.question_id: s.meta["capability"] for s in samples}
        per_run: dict[str, list[float]] = defaultdict(list)
        for run in runs_of(scores, ctx.judge_runs):
            groups: dict[str, list[float]] = defaultdict(list)
            for q, v in run.items():
                v = 0.0 if v is None else v  # unreadable after every retry: 0, as there
                groups["total"].append(v)
                for c in caps[q]:
                    groups[c].append(v)
            for name, vs in groups.items():
                per_run[name].append(100.0 * sum(vs) / len(vs))
        metrics = {"judge": ctx.judge.model, "judge_runs": ctx.judge_runs,
                   "unreadable_judge_replies": unreadable(scores),
                   "judge_requests_asked_again": asked_again, "score": {}}  # fmt: skip
        rows = []
        for name in ["total", *sorted(set(per_run) - {"total"})]:
            mean, std = mean_std(per_run[name])
            metrics["score"][name] = {"mean": mean, "std": std, "runs": per_run[name]}
            rows.append([name, f"{mean:.1f} ± {std:.1f}"])
        return Report(metrics, [Table(["capability", "score"], rows)])
