"""The judged tasks (LLaVA-Bench, MM-Vet) against a fake judge server (tests/llm_server.py):
what the judge is sent (LLaVA's rule.json, contexts), relative scores computed by hand, and
replies reused, asked again or counted unreadable as the reference scripts do."""

from __future__ import annotations

import json

import eval_fixtures as fx
import pytest
from eval_task_helpers import run
from llm_server import FakeLLM

from llava_jax.eval import EvalDataError
from llava_jax.eval.llm_client import ChatClient


def judge_reply(body):
    """Reference answers score 8; the model's 8 when it says "good", else 4; + run index."""
    text = body["messages"][-1]["content"]
    if "unreadable" in text:
        return "I cannot rate this."
    model = 8 if "[Assistant 2]\ngood" in text else 4
    return f"8 {model + body['seed']}\nBoth answers are fine."


def test_llava_bench_relative_score(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    answers = {"0": "good", "1": "bad", "2": "good"}
    with FakeLLM(judge_reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1", cache_dir=tmp_path / "cache")
        report, m = run("llava-bench", data, tmp_path / "out", answers, judge=judge,
                        judge_runs=2)  # fmt: skip
        assert len(llm.requests) == 6
        sent = sorted(r["messages"][1]["content"] for r in llm.requests)  # any arrival order
        assert sent[0].startswith(
            "[Context]\nA cat.\n\n[Question]\nWhy?\n\n[Assistant 1]\n"
            "reference 2\n\n[End of Assistant 1]\n\n[Assistant 2]\ngood\n"
        )
        # Resume: the replies on disk are reused, nothing is sent again.
        run("llava-bench", data, tmp_path / "out", answers, judge=judge, judge_runs=2)
        assert len(llm.requests) == 6
    r = m["relative_score"]
    assert (r["conv"]["mean"], r["conv"]["std"]) == pytest.approx((106.25, 6.25))
    assert (r["detail"]["mean"], r["detail"]["std"]) == pytest.approx((56.25, 6.25))
    # Model means 20 / 3 and 23 / 3, rounded to 3 decimals first (summarize_gpt_review.py).
    assert r["all"]["runs"] == pytest.approx([6.667 / 8 * 100, 7.667 / 8 * 100])
    assert (r["all"]["mean"], r["all"]["std"]) == pytest.approx((7.167 / 8 * 100, 6.25))
    replies = [json.loads(x) for x in (tmp_path / "out/judge.jsonl").read_text().splitlines()]
    assert len(replies) == 6 and all(x["reply"].endswith("Both answers are fine.") for x in replies)
    assert "106.2 ± 6.2" in report.format() or "106.3 ± 6.2" in report.format()


def test_a_changed_answer_is_judged_again(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    with FakeLLM(judge_reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1", cache_dir=tmp_path / "cache")
        _, m = run("llava-bench", data, tmp_path / "out", {"0": "good", "1": "bad", "2": "good"},
                   judge=judge)  # fmt: skip
        assert m["relative_score"]["detail"]["mean"] == 50.0  # 4 / 8
        _, m = run("llava-bench", data, tmp_path / "out", {"0": "good", "1": "good", "2": "good"},
                   judge=judge)  # fmt: skip
        assert len(llm.requests) == 4  # only question 1, whose answer changed
        assert "[Assistant 2]\ngood" in llm.requests[-1]["messages"][1]["content"]
    assert m["relative_score"]["detail"]["mean"] == 100.0  # 8 / 8
    assert m["relative_score"]["all"]["mean"] == 100.0
    assert len((tmp_path / "out/judge.jsonl").read_text().splitlines()) == 4


def test_an_unreadable_judge_reply_is_asked_again_on_rerun(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    asked: dict[str, int] = {}

    def unreadable_first(body):
        content = body["messages"][-1]["content"]
        asked[content] = asked.get(content, 0) + 1
        return "I cannot rate this." if "flaky" in content and asked[content] == 1 else "8 6"

    answers = {"0": "flaky", "1": "a", "2": "b"}
    with FakeLLM(unreadable_first) as llm:
        judge = ChatClient(llm.base_url, "judge-1", cache_dir=tmp_path / "cache")
        _, m = run("llava-bench", data, tmp_path / "out", answers, judge=judge)
        # Counted as (-1, -1), as LLaVA's summary does: conv -1 / -1; all 3.667 / 5.0.
        assert m["unreadable_judge_replies"] == 1
        assert m["relative_score"]["conv"]["mean"] == 100.0
        assert m["relative_score"]["all"]["mean"] == pytest.approx(100 * 3.667 / 5)
        _, m = run("llava-bench", data, tmp_path / "out", answers, judge=judge)
        assert len(llm.requests) == 4  # the unreadable one again, past the reply cache
        assert m["unreadable_judge_replies"] == 0
        assert m["relative_score"]["conv"]["mean"] == 75.0  # 6 / 8
        run("llava-bench", data, tmp_path / "out", answers, judge=judge)
        assert len(llm.requests) == 4  # now final
    rows = [json.loads(x) for x in (tmp_path / "out/judge.jsonl").read_text().splitlines()]
    flaky = [(r["reply"], r["score"]) for r in rows if r["question_id"] == "0"]
    assert flaky == [("I cannot rate this.", None), ("8 6", [8.0, 6.0])]  # both kept


def test_llava_bench_coco_context_has_boxes_and_unreadable_replies_are_counted(tmp_path):
    data = fx.make_llava_bench_coco(tmp_path / "coco")
    with FakeLLM(judge_reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        _, m = run("llava-bench", data, tmp_path / "out", {"0": "unreadable"}, split="coco",
                   judge=judge)  # fmt: skip
        content = llm.requests[0]["messages"][1]["content"]
    # As `eval_gpt_review_visual.py` writes it: the box as Python prints the list.
    assert "[Context]\nA dog on grass.\nA brown dog.\n\ndog: [0.1, 0.2, 0.5, 0.75]\n\n" in content
    assert m["unreadable_judge_replies"] == 1
    assert m["relative_score"]["all"]["reference_mean"] == -1.0  # kept in, as LLaVA does


def test_llava_bench_needs_a_judge(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    with pytest.raises(EvalDataError, match="answers are in .*predictions.jsonl.*--judge-model"):
        run("llava-bench", data, tmp_path / "out", {"0": "a", "1": "b", "2": "c"})


def test_mmvet(tmp_path):
    data = fx.make_mmvet(tmp_path / "mmvet")

    def grade(body):
        row = body["messages"][-1]["content"].splitlines()[-1].split(" | ")
        return "1.0" if row[1] in row[2] else "0.0"

    with FakeLLM(grade) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        _, m = run("mm-vet", data, tmp_path / "out", {"v1_0": "It says stop.", "v1_1": "A dog"},
                   judge=judge, judge_runs=1)  # fmt: skip
    assert m["score"]["total"]["mean"] == 50.0
    assert m["score"]["ocr"]["mean"] == 100.0 and m["score"]["rec"]["mean"] == 50.0


def test_mmvet_unreadable_grades_are_asked_again_as_the_official_evaluator(tmp_path):
    data = fx.make_mmvet(tmp_path / "mmvet")

    def grade(body):
        if "It says stop." in body["messages"][-1]["content"]:
            return "0.8" if body["temperature"] == 0.5 else "Correctness: 0.8"
        return " 1.0"  # never readable (the first field is empty)

    with FakeLLM(grade) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        _, m = run("mm-vet", data, tmp_path / "out", {"v1_0": "It says stop.", "v1_1": "A dog"},
                   judge=judge, judge_runs=1)  # fmt: skip
        asks = [(r["temperature"], r["max_tokens"], r["messages"][-1]["content"].endswith(
            "\nPredict the correctness of the answer (digit): ")) for r in llm.requests
            if "A dog" in r["messages"][-1]["content"]]  # fmt: skip
    # mm-vet_evaluator.py: greedy, 3 tokens, then asked again with the digit prompt at rising
    # temperatures, and 0 when still unreadable.
    assert asks == [(0.0, 3, False), (0.0, 3, True), (0.5, 3, True), (1.0, 3, True),
                    (1.5, 3, True)]  # fmt: skip
    assert m["score"]["total"]["mean"] == pytest.approx(40.0)  # (0.8 + 0) / 2
    assert m["unreadable_judge_replies"] == 1 and m["judge_requests_asked_again"] == 2 + 4


RULES = {  # the layout of haotian-liu/LLaVA `llava/eval/table/rule.json`, rules shortened
    "llava_bench_conv": {"role": "Assistant", "prompt": "Rate the conversation."},
    "llava_bench_detail": {"role": "Assistant", "prompt": "Rate the description."},
    "llava_bench_complex": {"role": "Assistant", "prompt": "Rate the reasoning."},
    "conv": {"role": "Helper", "prompt": "Rate the COCO conversation."},
}


def test_llava_bench_judges_with_llava_rule_json(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    (data / "rule.json").write_text(json.dumps(RULES))
    with FakeLLM(judge_reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        report, m = run("llava-bench", data, tmp_path / "out", {"0": "good", "1": "bad",
                        "2": "good"}, judge=judge)  # fmt: skip
        sent = {r["messages"][1]["content"]: r["messages"][0]["content"] for r in llm.requests}
    # LLaVA's system message and each category's rule, as `eval_gpt_review_bench.py` sends.
    assert set(sent.values()) == {
        "You are a helpful and precise assistant for checking the quality of the answer."
    }
    rule_of = {c.split("[Question]\n")[1].split("\n")[0]: c.split("[System]\n")[1] for c in sent}
    assert rule_of == {
        "What is it?": "Rate the conversation.\n\n",
        "Describe it.": "Rate the description.\n\n",
        "Why?": "Rate the reasoning.\n\n",
    }
    assert m["judge_rules"] == "LLaVA rule.json"
    assert "paraphrase" not in report.format()


def test_llava_bench_without_rule_json_says_the_numbers_are_not_comparable(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    with FakeLLM(judge_reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        report, m = run("llava-bench", data, tmp_path / "out", {"0": "good", "1": "bad",
                        "2": "good"}, judge=judge)  # fmt: skip
    assert m["judge_rules"] == "llava-jax paraphrase"
    assert "not comparable with published numbers" in report.format()


def test_llava_bench_coco_uses_the_bare_category_rules(tmp_path):
    data = fx.make_llava_bench_coco(tmp_path / "coco")
    (data / "rule.json").write_text(json.dumps(RULES))
    with FakeLLM(judge_reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        run("llava-bench", data, tmp_path / "out", {"0": "good"}, split="coco", judge=judge)
        content = llm.requests[0]["messages"][1]["content"]
    assert "[Helper 1]\n" in content and content.endswith(
        "[System]\nRate the COCO conversation.\n\n"
    )


def test_llava_bench_rule_json_without_a_category_is_one_line(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    del_detail = {k: v for k, v in RULES.items() if k != "llava_bench_detail"}
    (data / "rule.json").write_text(json.dumps(del_detail))
    with FakeLLM(judge_reply) as llm, pytest.raises(EvalDataError, match="llava_bench_detail"):
        run("llava-bench", data, tmp_path / "out", {"0": "a", "1": "b", "2": "c"},
            judge=ChatClient(llm.base_url, "judge-1"))  # fmt: skip
