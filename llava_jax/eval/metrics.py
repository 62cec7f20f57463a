"""Benchmark metrics as pure functions of predictions and ground truth.

Every function here is checked against hand-computed values in tests/test_eval_metrics.py.
Percentages are returned as floats in [0, 100]; nothing is rounded until a table prints it,
except where an official scorer rounds on the way (LLaVA-Bench's means).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from llava_jax.eval.normalize import evalai_answer, normalize_vqa, strip_whitespace


def percent(hits: Iterable[float]) -> float | None:
    """Mean × 100, or None for no items (a table prints "-")."""
    hits = list(hits)
    return 100.0 * sum(hits) / len(hits) if hits else None


# -- VQA accuracy ------------------------------------------------------------------------------


def leave_one_out_accuracy(answer: str, humans: Sequence[str]) -> float:
    """min(#other humans who gave `answer` / 3, 1), averaged over the leave-one-out subsets.

    With 10 humans of whom m match: m = 1 -> 0.3, m = 2 -> 0.6, m = 3 -> 0.9, m >= 4 -> 1.
    """
    if not humans:
        raise ValueError("a VQA question needs at least one human answer")
    matches = sum(h == answer for h in humans)
    # Leaving out a matching human leaves m - 1 matches; leaving out another leaves m.
    total = matches * min(1.0, (matches - 1) / 3) + (len(humans) - matches) * min(1.0, matches / 3)
    return total / len(humans)


def vqa_accuracy(answer: str, humans: Sequence[str]) -> float:
    """The official VQA accuracy of one submitted answer, as GT-Vision-Lab/VQA
    `PythonEvaluationTools/vqaEvaluation/vqaEval.py` computes it since commit a013f00 (2021,
    "Fixed processing answers bug").

    Both sides lose newlines, tabs and outer spaces. When the human answers disagree, the
    answer and every human answer are normalised in full (punctuation, lower case, number
    words, articles, contractions); when they agree, nothing is normalised and the answer must
    equal theirs exactly. (The 2016 script normalised the answer always and the humans with
    the punctuation step only.) Submit answers through `evalai_answer`, as LLaVA does.
    """
    answer = strip_whitespace(answer)
    humans = [strip_whitespace(h) for h in humans]
    if len(set(humans)) > 1:
        answer = normalize_vqa(answer)
        humans = [normalize_vqa(h) for h in humans]
    return leave_one_out_accuracy(answer, humans)


def vizwiz_accuracy(answer: str, humans: Sequence[str]) -> float:
    """VizWiz's own evaluator (the `vqaEval.py` of vizwiz.org/tasks-and-datasets/vqa, class
    `VQAEval` by Qing Li): the answer is normalised in full, the human answers are compared
    as they are in the annotations (so "coca cola" does not match "coca-cola")."""
    return leave_one_out_accuracy(normalize_vqa(answer), list(humans))


def textvqa_accuracy(answer: str, humans: Sequence[str]) -> float:
    """TextVQA's evaluator (`m4c_evaluator.py`): both sides through `evalai_answer`, always."""
    return leave_one_out_accuracy(evalai_answer(answer), [evalai_answer(h) for h in humans])


# -- yes / no: POPE ----------------------------------------------------------------------------


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's table for "yes"/"no" predictions and labels ("yes" is the positive class).

    Returns accuracy, precision, recall, f1 and yes_ratio (the share of "yes" predictions),
    each × 100, and the counts tp, fp, tn, fn.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / n if n else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }  # fmt: skip


# -- MME -----------------------------------------------------------------------------------------


def mme_subtask_score(results: Mapping[str, Sequence[bool]]) -> dict[str, float]:
    """One MME subtask: image -> correctness of its (two) questions.

    acc = correct questions / questions × 100; acc+ = images with every question correct /
    images × 100; score = acc + acc+ (at most 200).
    """
    per_question = [ok for oks in results.values() for ok in oks]
    acc = percent(per_question) or 0.0
    acc_plus = percent(all(oks) for oks in results.values()) or 0.0
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


# -- multiple choice ---------------------------------------------------------------------------


def circular_accuracy(passes: Mapping[str, Sequence[bool]]) -> float | None:
    """MMBench's circular evaluation: a question counts only if every rotation is right."""
    return percent(all(oks) for oks in passes.values())


# -- LLM-judged benchmarks -----------------------------------------------------------------------


def relative_score(pairs: Sequence[tuple[float, float]]) -> float:
    """LLaVA-Bench, as LLaVA's `llava/eval/summarize_gpt_review.py` computes it from
    (reference score, model score) pairs: each mean rounded to 3 decimals, then
    mean(model) / mean(reference) × 100. An unreadable judge reply enters as (-1, -1), as
    `eval_gpt_review_bench.py::parse_score` writes it.
    """
    if not pairs:
        raise ValueError("relative_score of no judged answers")
    reference, model = (round(float(m), 3) for m in np.asarray(pairs, np.float64).mean(0))
    if reference == 0:
        raise ValueError("the reference answers scored 0 on average")
    return 100.0 * model / reference


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default, as the LLaVA summary uses)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
