"""ScienceQA (Lu et al., 2022): the LLaVA paper's table by subject, context and grade.

Layout (the ScienceQA release, as LLaVA's docs/Evaluation.md uses it):

    DIR/problems.json        {pid: {question, choices, answer (index), hint, image, subject,
                                    grade, split, ...}}
    DIR/pid_splits.json      {"test": [pid, ...], ...}
    DIR/images/test/PID/image.png   (or DIR/test/PID/image.png)

Answers are read as LLaVA's `llava/eval/eval_science_qa.py` reads them
(`answers.scienceqa_letter`). Columns follow ScienceQA's `evaluations.py`: NAT / SOC / LAN
by subject; TXT = has a text context (hint), IMG = has an image, NO = neither; G1-6 / G7-12
by grade; Avg over all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from llava_jax.eval.answers import LETTERS, MULTIPLE_CHOICE_PROMPT, scienceqa_letter
from llava_jax.eval.metrics import percent
from llava_jax.eval.task import (
    EvalDataError,
    Report,
    Sample,
    ScoreContext,
    Table,
    Task,
    check_layout,
    read_json,
    require,
)

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
_LOW_GRADES = {f"grade{i}" for i in range(1, 7)}
_HIGH_GRADES = {f"grade{i}" for i in range(7, 13)}


def question_text(problem: dict) -> str:
    """LLaVA-1.5's multiple-choice prompt: context, question, lettered options, instruction."""
    lines = [f"Context: {problem['hint']}"] if problem.get("hint") else []
    lines.append(problem["question"])
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(problem["choices"])]
    lines.append(MULTIPLE_CHOICE_PROMPT)
    return "\n".join(lines)


def columns_of(meta: dict) -> list[str]:
    """The table columns a question counts in (Avg excluded)."""
    cols = [c for s, c in _SUBJECTS.items() if meta["subject"] == s]
    if meta["hint"]:
        cols.append("TXT")
    if meta["image"]:
        cols.append("IMG")
    if not meta["hint"] and not meta["image"]:
        cols.append("NO")
    if meta["grade"] in _LOW_GRADES:
        cols.append("G1-6")
    if meta["grade"] in _HIGH_GRADES:
        cols.append("G7-12")
    return cols


def scienceqa_table(correct: Sequence[tuple[dict, bool]]) -> dict[str, float | None]:
    """Accuracy (%) per column for (meta, correct) pairs; None for an empty column."""
    hits: dict[str, list[bool]] = {c: [] for c in COLUMNS}
    for meta, ok in correct:
        for col in [*columns_of(meta), "Avg"]:
            hits[col].append(ok)
    return {c: percent(h) for c, h in hits.items()}


class ScienceQA(Task):
    name = "scienceqa"
    splits = ("img", "test", "val", "minival", "train")
    default_split = "img"  # the test questions with an image (LLaVA-1.5's "SQA-IMG")
    max_new_tokens = 128

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        problems_path, splits_path = data_dir / "problems.json", data_dir / "pid_splits.json"
        problems = read_json(problems_path, dict)
        part = "test" if split == "img" else split
        splits = read_json(splits_path, {part: list})
        images = data_dir / "images" / part
        if not images.is_dir() and (data_dir / part).is_dir():
            images = data_dir / part
        samples = []
        for pid in splits[part]:
            if pid not in problems:
                raise EvalDataError(f"{problems_path}: no problem {pid}")
            where = f"{problems_path}: problem {pid}"
            p = require(problems[pid], ("question", "choices", "answer", "subject", "grade"), where)
            check_layout(p["choices"], list, f"{where}: choices")
            image = p.get("image") or None
            if split == "img" and not image:
                continue
            text = question_text(p)
            refs = ()
            if image:
                text = "<image>\n" + text
                refs = (images / pid / image,)
            meta = {"answer": int(p["answer"]), "choices": list(p["choices"]),
                    "subject": p["subject"], "grade": p["grade"], "hint": p.get("hint") or "",
                    "image": image}  # fmt: skip
            samples.append(Sample(str(pid), text, refs, meta))
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        rows, unparsed = [], 0
        for s in samples:
            letter = scienceqa_letter(predictions[s.question_id], len(s.meta["choices"]))
            unparsed += letter is None
            rows.append((s.meta, letter == LETTERS[s.meta["answer"]]))
        table = scienceqa_table(rows)
        metrics = {"accuracy": table["Avg"], "table": table, "unparsed": unparsed}
        return Report(metrics, [Table(["", *COLUMNS], [["accuracy", *table.values()]])])
