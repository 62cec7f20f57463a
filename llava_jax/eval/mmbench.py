"""MMBench (Liu et al., 2023): multiple choice with circular evaluation.

Layout: the released TSV in DIR, `mmbench_{split}_YYYYMMDD.tsv` (LLaVA-1.5 uses
`mmbench_dev_20230712.tsv`; `dev_cn`, `test` likewise), with the columns index, question,
hint, A, B, C, D (E, F when used), answer (dev only), category, l2-category and image
(base64; a short number instead refers to the image of the row with that index).

Circular evaluation: a question is right only when it is right under every rotation of its
options. The released TSVs already hold the rotations, as extra rows whose index is the
question's plus k × 1,000,000 (options and answer rotated); every row is then asked as given
and rows are grouped by index % 1,000,000, as the official evaluator does (and LLaVA-1.5's
`mmbench.sh`, which asks each row once). A TSV without such rows is rotated here: n options,
n passes, pass k showing the options from the k-th. Pass 0 (index < 1,000,000) alone gives
the first-pass accuracy. Answers are read with VLMEvalKit's exact matching
(`answers.mmbench_letter`), the mode of its circular evaluation without an LLM judge. Without
answers (test), `mmbench_{split}_submission.tsv` holds the raw answer of every row asked as
given (with the released rotations, every row) for the server to match.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from collections import defaultdict
from pathlib import Path

from llava_jax.eval.answers import LETTERS, MULTIPLE_CHOICE_PROMPT, NO_OPTION, mmbench_letter
from llava_jax.eval.metrics import circular_accuracy, percent
from llava_jax.eval.task import EvalDataError, Report, Sample, ScoreContext, Table, Task

_MISSING = ("", "nan", "NaN", "None")
# The released TSVs number the k-th rotation of question i as i + k * COPY_STRIDE.
COPY_STRIDE = 1_000_000


def read_tsv(data_dir: Path, split: str) -> tuple[Path, list[dict[str, str]]]:
    found = sorted(data_dir.glob(f"mmbench_{split}_2*.tsv"))
    if len(found) != 1:
        raise EvalDataError(f"{data_dir}: expected one mmbench_{split}_YYYYMMDD.tsv, found "
                            f"{len(found)}")  # fmt: skip
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    text = found[0].read_text(encoding="utf-8")  # local or gs://
    rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t"))
    for column in ("index", "question", "A", "B", "image"):
        if rows and column not in rows[0]:
            raise EvalDataError(f"{found[0]}: no column {column!r}")
    return found[0], rows


def rotate(options: list[str], k: int) -> list[str]:
    return options[k:] + options[:k]


# LLaVA's `model_vqa_mmbench.py --lang cn` instruction for MMBench-CN.
MULTIPLE_CHOICE_PROMPT_CN = "请直接回答选项字母。"


def prompt_text(row: dict[str, str], options: list[str], chinese: bool = False) -> str:
    """LLaVA's MMBench prompt: hint, question, lettered options, then the instruction."""
    lines = ["<image>"]
    if row.get("hint", "") not in _MISSING:
        lines.append(row["hint"])
    lines.append(row["question"])
    lines += [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    lines.append(MULTIPLE_CHOICE_PROMPT_CN if chinese else MULTIPLE_CHOICE_PROMPT)
    return "\n".join(lines)


class MMBench(Task):
    name = "mmbench"
    splits = ("dev", "test", "dev_cn", "test_cn", "dev_en", "test_en")
    default_split = "dev"

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        path, rows = read_tsv(data_dir, split)
        by_index = {r["index"]: r["image"] for r in rows}
        number = {r["index"]: _row_number(path, r) for r in rows}
        # The released files hold the rotations as rows of their own; others are rotated here.
        rotations_given = any(n >= COPY_STRIDE for n in number.values())
        samples = []
        for row in rows:
            options = [row[c] for c in LETTERS[:6] if row.get(c, "") not in _MISSING]
            image = row["image"]
            if len(image) < 64 and image in by_index:  # a reference to another row's image
                image = by_index[image]
            try:
                data = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise EvalDataError(f"{path}: row {row['index']}: image is not base64") from None
            answer = row.get("answer", "")
            answer = None if answer in _MISSING else answer.strip()
            if answer is not None and answer not in LETTERS[: len(options)]:
                raise EvalDataError(f"{path}: row {row['index']}: answer {answer!r} is not "
                                    f"one of the {len(options)} options")  # fmt: skip
            copy, question = divmod(number[row["index"]], COPY_STRIDE)
            for k in range(1 if rotations_given else len(options)):
                shown = rotate(options, k)
                meta = {"index": str(question), "pass": copy + k, "options": shown,
                        "question": row["question"],
                        "row": row["index"] if k == 0 else None,
                        "category": row.get("category", ""),
                        "l2_category": row.get("l2-category", ""),
                        "answer": None if answer is None
                        else LETTERS[(LETTERS.index(answer) - k) % len(options)]}  # fmt: skip
                text = prompt_text(row, shown, chinese=split.endswith("_cn"))
                samples.append(Sample(f"{question}/{copy + k}", text, (data,), meta))
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        letters = {s.question_id: mmbench_letter(predictions[s.question_id], s.meta["options"])
                   for s in samples}  # fmt: skip
        unparsed = sum(v in (None, NO_OPTION) for v in letters.values())
        if any(s.meta["answer"] is None for s in samples):
            # As LLaVA's `scripts/convert_mmbench_for_submission.py`: the raw answer of every
            # row asked as given, for the server to match.
            path = ctx.out_dir / f"mmbench_{ctx.split}_submission.tsv"
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f, delimiter="\t")
                w.writerow(["index", "question", *LETTERS[:4], "prediction"])
                for s in samples:
                    if s.meta["row"] is not None:
                        opts = (s.meta["options"] + [""] * 4)[:4]
                        w.writerow([s.meta["row"], s.meta["question"], *opts,
                                    predictions[s.question_id]])  # fmt: skip
            return Report({"submission": str(path), "unparsed": unparsed},
                          [Table(["split", "submission"], [[ctx.split, str(path)]])])  # fmt: skip
        passes: dict[str, list[bool]] = defaultdict(list)
        meta: dict[str, dict] = {}
        for s in samples:
            passes[s.meta["index"]].append(letters[s.question_id] == s.meta["answer"])
            meta.setdefault(s.meta["index"], s.meta)  # one question, counted once
        circular = circular_accuracy(passes)
        single = percent(letters[s.question_id] == s.meta["answer"] for s in samples
                         if s.meta["pass"] == 0)  # fmt: skip
        by: dict[str, dict[str, float | None]] = {}
        for key in ("category", "l2_category"):
            groups: dict[str, dict[str, list[bool]]] = defaultdict(dict)
            for i, oks in passes.items():
                groups[meta[i][key]][i] = oks
            by[key] = {g: circular_accuracy(v) for g, v in sorted(groups.items()) if g}
        metrics = {"circular_accuracy": circular, "first_pass_accuracy": single,
                   "distinct_questions": len(passes), "unparsed": unparsed,
                   "by_category": by["category"], "by_l2_category": by["l2_category"]}  # fmt: skip
        tables = [Table(["", "circular", "first pass"], [["accuracy", circular, single]])]
        if by["l2_category"]:
            tables.append(
                Table(["l2-category", "circular"], [[k, v] for k, v in by["l2_category"].items()])
            )
        return Report(metrics, tables)


def _row_number(path: Path, row: dict[str, str]) -> int:
    try:
        return int(row["index"])
    except ValueError:
        raise EvalDataError(f"{path}: index {row['index']!r} is not a number") from None
