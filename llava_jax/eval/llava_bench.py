"""LLaVA-Bench (COCO) and LLaVA-Bench (In-the-Wild): answers rated by an LLM judge against
a reference (GPT-4) answer, given a text description of the image.

Layouts:

  llava-bench (in the wild), the `liuhaotian/llava-bench-in-the-wild` release:
    DIR/questions.jsonl      {"question_id", "image", "text", "category"}
    DIR/context.jsonl        {"image", "caption"}
    DIR/answers_gpt4.jsonl   {"question_id", "text"}
    DIR/images/IMAGE

  llava-bench-coco (split `coco`), LLaVA's `playground/data/coco2014_val_qa_eval`:
    DIR/qa90_questions.jsonl, DIR/qa90_gpt4_answer.jsonl (same fields as above)
    DIR/caps_boxes_coco2014_val_80.jsonl  {"image", "captions": [...],
                                           "instances": [{"category", "bbox"}]}
    DIR/val2014/IMAGE  (COCO val2014; `COCO_val2014_`-prefixed names are found too)

The judge sees the context, the question, the reference answer as assistant 1 and the model's
as assistant 2, and puts both 1-10 scores on its first line. With LLaVA's own rules file
(`llava/eval/table/rule.json` of haotian-liu/LLaVA) copied to `DIR/rule.json`, the judge gets
its rule per category and LLaVA's system message, as `eval_gpt_review_bench.py` (wild) and
`eval_gpt_review_visual.py` (COCO) send them; without it, our paraphrase, which the report
labels (the numbers are then not comparable with the papers'). Per category (conv, detail,
complex) and overall: relative score = mean(model) / mean(reference) × 100, as LLaVA's
`summarize_gpt_review.py` computes it (unreadable replies as (-1, -1), means rounded to 3
decimals first), with mean and std over the judge runs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from llava_jax.eval.judge import judge_all, parse_score_pair, runs_of, unreadable
from llava_jax.eval.metrics import mean_std, relative_score
from llava_jax.eval.task import (
    EvalDataError,
    Report,
    Sample,
    ScoreContext,
    Table,
    Task,
    read_json,
    read_jsonl,
    records,
)

JUDGE_SYSTEM = "You are a careful, impartial assistant who rates the quality of answers."
# LLaVA's system message (haotian-liu/LLaVA `llava/eval/eval_gpt_review_bench.py`), sent with
# the rules of its `rule.json`.
OFFICIAL_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
RULES_FILE = "rule.json"
# Paraphrases the rule of LLaVA's judge (llava/eval/table/rule.json): the four criteria,
# a 1-10 overall score each, both scores alone on the first line, then the explanation.
JUDGE_RULE = (
    "We want your feedback on two AI assistants' answers to the user question above. The user "
    "asks it while looking at an image, which is described to you by the context above.\n"
    "Rate each answer's helpfulness, relevance, accuracy and level of detail, and give each "
    "assistant one overall score from 1 to 10, where higher is better.\n"
    "On the first line write only the two scores, for assistant 1 and assistant 2, separated "
    "by a space. From the second line on, explain your rating, without letting the order in "
    "which the answers appear sway you."
)
CATEGORIES = ("conv", "detail", "complex")
QUESTION_FIELDS = ("question_id", "image", "text", "category")
JUDGE_PARAMS = {"temperature": 0.2, "max_tokens": 1024}
# LLaVA's `eval_gpt_review_bench.py` keeps an unreadable reply as [-1, -1], and
# `summarize_gpt_review.py` averages it in.
UNREADABLE_PAIR = (-1.0, -1.0)


@dataclasses.dataclass(frozen=True)
class JudgeRule:
    """What the judge is told: a system message, the answers' role name and the rule."""

    system: str = JUDGE_SYSTEM
    role: str = "Assistant"
    prompt: str = JUDGE_RULE


PARAPHRASE = JudgeRule()


def judge_messages(
    context: str, question: str, reference: str, answer: str, rule: JudgeRule = PARAPHRASE
) -> list[dict]:
    r = rule.role
    content = (
        f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
        f"[{r} 1]\n{reference}\n\n[End of {r} 1]\n\n"
        f"[{r} 2]\n{answer}\n\n[End of {r} 2]\n\n[System]\n{rule.prompt}\n\n"
    )
    return [{"role": "system", "content": rule.system}, {"role": "user", "content": content}]


def official_rules(data_dir: Path, split: str, categories: set[str]) -> dict[str, JudgeRule]:
    """Each category's rule from LLaVA's `rule.json` in `data_dir`, or {} when it is absent.

    In-the-wild questions use the `llava_bench_<category>` entries
    (`eval_gpt_review_bench.py`), COCO questions the bare `<category>` ones
    (`eval_gpt_review_visual.py`).
    """
    path = data_dir / RULES_FILE
    if not path.exists():
        return {}
    table = read_json(path, dict)
    rules = {}
    for category in sorted(categories):
        key = category if split == "coco" else f"llava_bench_{category}"
        entry = table.get(key)
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(f), str) for f in ("role", "prompt")
        ):
            raise EvalDataError(f"{path}: no rule {key!r} with string 'role' and 'prompt' "
                                "(copy haotian-liu/LLaVA llava/eval/table/rule.json)")  # fmt: skip
        rules[category] = JudgeRule(OFFICIAL_SYSTEM, entry["role"], entry["prompt"])
    return rules


def _coco_image(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / "val2014" / name, data_dir / "val2014" / f"COCO_val2014_{name}"):
        if candidate.is_file():
            return candidate
    return data_dir / "val2014" / name


class LlavaBench(Task):
    name = "llava-bench"
    splits = ("wild", "coco")
    default_split = "wild"
    max_new_tokens = 1024
    needs_judge = True

    def samples(self, data_dir: Path, split: str) -> list[Sample]:
        if split == "coco":
            questions = read_jsonl(data_dir / "qa90_questions.jsonl", QUESTION_FIELDS)
            answers = read_jsonl(data_dir / "qa90_gpt4_answer.jsonl", ("question_id", "text"))
            path = data_dir / "caps_boxes_coco2014_val_80.jsonl"
            contexts = {}
            for c in read_jsonl(path, ("image", "captions")):
                instances = records(c.get("instances", []), ("category", "bbox"),
                                    f"{path}: image {c['image']}: instances")  # fmt: skip
                # As `eval_gpt_review_visual.py` writes it: the captions, a blank line, then
                # "category: [x1, y1, x2, y2]" per object, the box as Python prints the list.
                boxes = "\n".join(f"{i['category']}: {i['bbox']}" for i in instances)
                contexts[c["image"]] = "\n".join(c["captions"]) + "\n\n" + boxes
        else:
            questions = read_jsonl(data_dir / "questions.jsonl", QUESTION_FIELDS)
            answers = read_jsonl(data_dir / "answers_gpt4.jsonl", ("question_id", "text"))
            rows = read_jsonl(data_dir / "context.jsonl", ("image", "caption"))
            # `eval_gpt_review_bench.py` joins a list of captions with newlines.
            contexts = {c["image"]: c["caption"] if isinstance(c["caption"], str)
                        else "\n".join(map(str, c["caption"])) for c in rows}  # fmt: skip
        reference = {str(a["question_id"]): a["text"] for a in answers}
        samples = []
        for q in questions:
            qid = str(q["question_id"])
            if qid not in reference or q["image"] not in contexts:
                raise EvalDataError(f"{data_dir}: question {qid} has no reference answer or "
                                    "no image context")  # fmt: skip
            image = (_coco_image(data_dir, q["image"]) if split == "coco"
                     else data_dir / "images" / q["image"])  # fmt: skip
            meta = {"question": q["text"], "category": q["category"],
                    "reference": reference[qid], "context": contexts[q["image"]]}  # fmt: skip
            samples.append(Sample(qid, f"<image>\n{q['text']}", (image,), meta))
        return samples

    def score(self, samples, predictions, ctx: ScoreContext) -> Report:
        rules = official_rules(ctx.data_dir, ctx.split, {s.meta["category"] for s in samples})
        requests = {
            s.question_id: judge_messages(
                s.meta["context"], s.meta["question"], s.meta["reference"],
                predictions[s.question_id], rules.get(s.meta["category"], PARAPHRASE),
            )
            for s in samples
        }  # fmt: skip
        scores = judge_all(ctx, requests, parse_score_pair, JUDGE_PARAMS)
        category = {s.question_id: s.meta["category"] for s in samples}
        per_run: dict[str, list[float]] = defaultdict(list)
        absolute: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for run in runs_of(scores, ctx.judge_runs):
            pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for q, pair in run.items():
                pair = UNREADABLE_PAIR if pair is None else pair
                pairs[category[q]].append(pair)
                pairs["all"].append(pair)
            for name, ps in pairs.items():
                per_run[name].append(relative_score(ps))
                absolute[name] += ps
        names = [c for c in (*CATEGORIES, "all") if c in per_run]
        names += sorted(set(per_run) - set(names))
        metrics = {
            "judge": ctx.judge.model,
            "judge_runs": ctx.judge_runs,
            "judge_rules": f"LLaVA {RULES_FILE}" if rules else "llava-jax paraphrase",
            "unreadable_judge_replies": unreadable(scores),
            "relative_score": {},
        }
        rows = []
        for name in names:
            mean, std = mean_std(per_run[name])
            ref = sum(p[0] for p in absolute[name]) / len(absolute[name])
            model = sum(p[1] for p in absolute[name]) / len(absolute[name])
            metrics["relative_score"][name] = {
                "mean": mean,
                "std": std,
                "runs": per_run[name],
                "reference_mean": ref,
                "model_mean": model,
            }
            rows.append([name, f"{mean:.1f} ± {std:.1f}", ref, model])
        table = Table(["category", "relative score", "reference (1-10)", "model (1-10)"], rows)
        notes = []
        if not rules:
            notes.append(f"judged with llava-jax's paraphrase of LLaVA's rules: not comparable "
                         f"with published numbers; put LLaVA's llava/eval/table/rule.json at "
                         f"{ctx.data_dir / RULES_FILE} to judge as LLaVA does")  # fmt: skip
        if metrics["unreadable_judge_replies"]:
            notes.append(f"{metrics['unreadable_judge_replies']} unreadable judge replies count "
                         "as scores (-1, -1), as LLaVA's summarize_gpt_review.py counts them; "
                         "a rerun asks them again")  # fmt: skip
        return Report(metrics, [table], notes)
