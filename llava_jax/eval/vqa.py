"""VQA-accuracy benchmarks: VQAv2, TextVQA and VizWiz.

All three score an answer against ten human answers with the VQA accuracy (min(#matching
humans / 3, 1) over the leave-one-out subsets), each with its own official normalisation
(`metrics.vqa_accuracy`, `textvqa_accuracy`, `vizwiz_accuracy`). As LLaVA does, every
answer goes through EvalAI's answer processor before it is scored or written to a
submission file. Splits
without public answers (VQAv2 test-dev, TextVQA and VizWiz test) only write the submission.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from llava_jax.eval.answers import SHORT_ANSWER_PROMPT
from llava_jax.eval.metrics import percent, textvqa_accuracy, vizwiz_accuracy, vqa_accuracy
from llava_jax.eval.normalize import evalai_answer
from llava_jax.eval.task import (
    EvalDataError,
    Report,
    Sample,
    ScoreContext,
    Table,
    Task,
    read_json,
    records,
)

VIZWIZ_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'."


def _prompt(question: str, *suffix: str) -> str:
    return "\n".join(["<image>", question.strip(), *suffix])


def _by_type(samples, scores) -> tuple[float | None, dict[str, float | None]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for s, v in zip(samples, scores, strict=True):
        groups[s.meta.get("answer_type") or "all"].append(v)
    return percent(scores), {k: percent(v) for k, v in sorted(groups.items())}


def _report(name, samples, scores, submission: Path, metrics_extra=None) -> Report:
    if not scores:
        return Report({"submission": str(submission)},
                      [Table(["split", "submission"], [[name, str(submission)]])])  # fmt: skip
    overall, types = _by_type(samples, scores)
    metrics = {"accuracy": overall, "by_answer_type": types, "submission": str(submission),
               **(metrics_extra or {})}  # fmt: skip
    headers = ["", "overall", *types]
    return Report(metrics, [Table(headers, [["accuracy", overall, *types.values()]])])


def _write(path: Path, rows) -> None:
    path.write_text(json.dumps(rows) + "\n")


class VQAv2(Task):
    """Layout: `v2_OpenEnded_mscoco_{split}_questions.json`, `v2_mscoco_{split}_annotations.json`
    (train/val only), images `{val2014,test2015}/COCO_{dir}_{image_id:012d}.jpg`."""

    name = "vqav2"
    splits = ("test-dev2015", "test2015", "val2014", "train2014")
    default_split = "test-dev2015"

    @staticmethod
    def image_dir(split: str) -> str:
        return "test2015" if split.startswith("test") else split

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        questions_path = data_dir / f"v2_OpenEnded_mscoco_{split}_questions.json"
        questions = read_json(questions_path, {"questions": list})["questions"]
        annotations_path = data_dir / f"v2_mscoco_{split}_annotations.json"
        truth = {}
        if annotations_path.is_file():
            annotations = read_json(annotations_path, {"annotations": list})["annotations"]
            where = f"{annotations_path}: annotations"
            for i, a in enumerate(records(annotations, ("question_id", "answers"), where)):
                answers = records(a["answers"], ("answer",), f"{where}[{i}].answers")
                truth[a["question_id"]] = ([x["answer"] for x in answers], a.get("answer_type"))
        folder = self.image_dir(split)
        samples = []
        keys = ("question_id", "image_id", "question")
        for q in records(questions, keys, f"{questions_path}: questions"):
            meta = {"question_id": q["question_id"]}
            if q["question_id"] in truth:
                meta["answers"], meta["answer_type"] = truth[q["question_id"]]
            image = data_dir / folder / f"COCO_{folder}_{int(q['image_id']):012d}.jpg"
            text = _prompt(q["question"], SHORT_ANSWER_PROMPT)
            samples.append(Sample(str(q["question_id"]), text, (image,), meta))
        if truth and len(truth) < len(samples):
            raise EvalDataError(f"{annotations_path}: answers for {len(truth)} of "
                                f"{len(samples)} questions")  # fmt: skip
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        submitted = {s.meta["question_id"]: evalai_answer(predictions[s.question_id])
                     for s in samples}  # fmt: skip
        rows = [{"question_id": q, "answer": a} for q, a in submitted.items()]
        all_test = ctx.data_dir / "v2_OpenEnded_mscoco_test2015_questions.json"
        if ctx.split == "test-dev2015" and all_test.is_file():
            # The EvalAI test-dev phase takes answers for every test2015 question.
            rows += [{"question_id": q["question_id"], "answer": ""}
                     for q in records(read_json(all_test, {"questions": list})["questions"],
                                      ("question_id",), f"{all_test}: questions")
                     if q["question_id"] not in submitted]  # fmt: skip
        path = ctx.out_dir / f"vqav2_{ctx.split}_submission.json"
        _write(path, rows)
        scored = [s for s in samples if "answers" in s.meta]
        scores = [vqa_accuracy(submitted[s.meta["question_id"]], s.meta["answers"])
                  for s in scored]  # fmt: skip
        return _report(ctx.split, scored, scores, path)


class TextVQA(Task):
    """Layout: `TextVQA_0.5.1_{split}.json` ({"data": [...]}), images
    `train_images/{image_id}.jpg` (val too) or `test_images/{image_id}.jpg`, and optionally
    `TextVQA_Rosetta_OCR_v0.2_{split}.json` ({"data": [{"image_id", "ocr_tokens"}]}): when
    present, each prompt gets the line `Reference OCR token: a, b, ...` after the question,
    as LLaVA-1.5's `llava_textvqa_val_v051_ocr.jsonl` has."""

    name = "textvqa"
    splits = ("val", "test", "train")
    default_split = "val"

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        path = data_dir / f"TextVQA_0.5.1_{split}.json"
        data = read_json(path, {"data": list})["data"]
        folder = "test_images" if split == "test" else "train_images"
        ocr_path = data_dir / f"TextVQA_Rosetta_OCR_v0.2_{split}.json"
        ocr = None
        if ocr_path.is_file():
            rows = records(read_json(ocr_path, {"data": list})["data"], ("image_id",),
                           f"{ocr_path}: data")  # fmt: skip
            ocr = {r["image_id"]: r.get("ocr_tokens", []) for r in rows}
        samples = []
        for q in records(data, ("question_id", "image_id", "question"), f"{path}: data"):
            meta = {"question_id": q["question_id"]}
            if q.get("answers"):
                meta["answers"] = list(q["answers"])
            image = data_dir / folder / f"{q['image_id']}.jpg"
            lines = [SHORT_ANSWER_PROMPT]
            if ocr is not None:
                lines.insert(0, "Reference OCR token: " + ", ".join(ocr.get(q["image_id"], [])))
            text = _prompt(q["question"], *lines)
            samples.append(Sample(str(q["question_id"]), text, (image,), meta))
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        rows = [{"question_id": s.meta["question_id"],
                 "answer": evalai_answer(predictions[s.question_id])} for s in samples]  # fmt: skip
        path = ctx.out_dir / f"textvqa_{ctx.split}_submission.json"
        _write(path, rows)
        scored = [s for s in samples if "answers" in s.meta]
        scores = [textvqa_accuracy(predictions[s.question_id], s.meta["answers"]) for s in scored]
        return _report(ctx.split, scored, scores, path)


class VizWiz(Task):
    """Layout: `Annotations/{split}.json` (a list of {image, question, answers,
    answer_type, answerable}), images `{split}/{image}`."""

    name = "vizwiz"
    splits = ("val", "test", "train")
    default_split = "val"

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        path = data_dir / "Annotations" / f"{split}.json"
        samples = []
        for i, q in enumerate(records(read_json(path, list), ("image", "question"), str(path))):
            meta = {"image": q["image"]}
            if q.get("answers"):
                answers = records(q["answers"], ("answer",), f"{path}[{i}].answers")
                meta["answers"] = [a["answer"] for a in answers]
                meta["answer_type"] = q.get("answer_type")
            text = _prompt(q["question"], VIZWIZ_PROMPT, SHORT_ANSWER_PROMPT)
            samples.append(Sample(Path(q["image"]).stem, text, (data_dir / split / q["image"],),
                                  meta))  # fmt: skip
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        submitted = {s.question_id: evalai_answer(predictions[s.question_id]) for s in samples}
        path = ctx.out_dir / f"vizwiz_{ctx.split}_submission.json"
        _write(path, [{"image": s.meta["image"], "answer": submitted[s.question_id]}
                      for s in samples])  # fmt: skip
        scored = [s for s in samples if "answers" in s.meta]
        scores = [vizwiz_accuracy(submitted[s.question_id], s.meta["answers"]) for s in scored]
        # Whether the model said "unanswerable" exactly for the unanswerable questions.
        said = [submitted[s.question_id] == "unanswerable" for s in scored]
        truth = [s.meta.get("answer_type") == "unanswerable" for s in scored]
        extra = {}
        if scored:
            tp = sum(a and b for a, b in zip(said, truth, strict=True))
            extra["unanswerable"] = {
                "precision": 100.0 * tp / sum(said) if sum(said) else 0.0,
                "recall": 100.0 * tp / sum(truth) if sum(truth) else 0.0,
            }
        return _report(ctx.split, scored, scores, path, extra)
