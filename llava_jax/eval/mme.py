"""MME (Fu et al., 2023): yes/no questions, two per image, over 14 subtasks.

Layout (`MME_Benchmark_release_version/`, pass it as DIR): one folder per subtask, either
with `images/` and `questions_answers_YN/` subfolders (artwork, celebrity, landmark,
posters, scene) or with each image next to its `.txt` (the others), as the release has it
and LLaVA's `convert_answer_to_mme.py` reads it. A `.txt` holds one `question<TAB>Yes|No`
line per question, for the image of the same name (.jpg or .png). Every subtask of the split
must be there with at least one question file: a missing one is an error, not a smaller sum.

Prompt, as LLaVA-1.5's `llava_mme.jsonl`: the question without its "Please answer yes or
no." (LLaVA's converter puts it back to find the ground truth), then the short-answer line.

Scoring follows MME's `calculation.py`: per subtask acc (per question) + acc+ (per image,
both questions right), × 100 each; perception and cognition are the sums of their subtasks'
scores (at most 2000 and 800).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from llava_jax.eval.answers import SHORT_ANSWER_PROMPT, mme_yes_no
from llava_jax.eval.metrics import mme_subtask_score
from llava_jax.eval.task import EvalDataError, Report, Sample, ScoreContext, Table, Task

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")  # fmt: skip
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")  # fmt: skip
YES_NO_INSTRUCTION = "Please answer yes or no."


def _pairs(folder: Path) -> list[tuple[Path, Path]]:
    """(question file, image) pairs of one subtask folder, in file-name order."""
    if (folder / "questions_answers_YN").is_dir():
        texts, images = folder / "questions_answers_YN", folder / "images"
    else:
        texts = images = folder
    pairs = []
    for txt in sorted(texts.glob("*.txt")):
        found = [images / (txt.stem + ext) for ext in (".jpg", ".png", ".jpeg", ".JPG", ".PNG")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise EvalDataError(f"{txt}: no image {txt.stem}.jpg or .png in {images}")
        pairs.append((txt, found[0]))
    if not pairs:
        raise EvalDataError(f"{folder}: no question files (questions_answers_YN/*.txt next to "
                            "images/, or *.txt next to their images)")  # fmt: skip
    return pairs


def prompt_text(question: str) -> str:
    """LLaVA-1.5's MME prompt (`llava_mme.jsonl`): "Please answer yes or no." dropped."""
    question = question.replace(YES_NO_INSTRUCTION, "").strip()
    return f"<image>\n{question}\n{SHORT_ANSWER_PROMPT}"


class MME(Task):
    name = "mme"
    splits = ("all", "perception", "cognition")
    default_split = "all"

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        subtasks = {"all": PERCEPTION + COGNITION, "perception": PERCEPTION,
                    "cognition": COGNITION}[split]  # fmt: skip
        missing = [s for s in subtasks if not (data_dir / s).is_dir()]
        if missing:
            raise EvalDataError(f"{data_dir}: no MME subtask folder(s) {', '.join(missing)} "
                                "(pass MME_Benchmark_release_version as --data)")  # fmt: skip
        samples = []
        for subtask in subtasks:
            for txt, image in _pairs(data_dir / subtask):
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for i, line in enumerate(lines):
                    question, sep, answer = line.rpartition("\t")
                    if not sep or answer.strip().lower() not in ("yes", "no"):
                        raise EvalDataError(f"{txt}:{i + 1}: not `question<TAB>Yes|No`")
                    text = prompt_text(question)
                    meta = {"subtask": subtask, "image": image.name,
                            "answer": answer.strip().lower()}  # fmt: skip
                    samples.append(Sample(f"{subtask}/{txt.stem}/{i}", text, (image,), meta))
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for s in samples:
            ok = mme_yes_no(predictions[s.question_id]) == s.meta["answer"]
            per_image[s.meta["subtask"]][s.meta["image"]].append(ok)
        metrics, tables = {}, []
        for group, names in (("perception", PERCEPTION), ("cognition", COGNITION)):
            scores = {n: mme_subtask_score(per_image[n]) for n in names if n in per_image}
            if not scores:
                continue
            total = sum(v["score"] for v in scores.values())
            metrics[group] = {"score": total, "subtasks": scores}
            rows = [[n, v["acc"], v["acc_plus"], v["score"]] for n, v in scores.items()]
            rows.append([f"{group} total", None, None, total])
            tables.append(Table([group, "acc", "acc+", "score"], rows))
        return Report(metrics, tables)
