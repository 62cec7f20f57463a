"""Each task on a tiny fixture in the benchmark's published layout, scored from a predictions
file written by hand, against metrics computed by hand (no model: every question already has
an answer, so the runner goes straight to scoring)."""

from __future__ import annotations

import csv
import json
import re

import eval_fixtures as fx
import pytest
from llm_server import FakeLLM

from llava_jax.eval import TASKS, EvalDataError
from llava_jax.eval.llm_client import ChatClient
from llava_jax.eval.mme import PERCEPTION
from llava_jax.eval.runner import evaluate


def run(task, data, out, answers, **kw):
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for qid, answer in answers.items():
            f.write(json.dumps({"question_id": qid, "answer": answer}) + "\n")
    report = evaluate(TASKS[task](), data, out, None, echo=lambda m: None, **kw)
    metrics = json.loads((out / "metrics.json").read_text())
    return report, metrics


def test_scienceqa(tmp_path):
    data = fx.make_scienceqa(tmp_path / "sqa")
    samples = TASKS["scienceqa"]().samples(data, "test")
    assert [s.question_id for s in samples] == ["p1", "p2", "p3", "p4"]
    assert samples[1].text == (
        "<image>\nContext: ctx\nWhich one?\nA. red\nB. blue\nC. tan\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert samples[1].images == (data / "images/test/p2/image.png",)
    assert samples[3].images == () and "<image>" not in samples[3].text
    answers = {"p1": "The answer is B.", "p2": "B", "p3": "A", "p4": "B. b1"}
    report, m = run("scienceqa", data, tmp_path / "out", answers, split="test")
    want = {"NAT": 50.0, "SOC": 100.0, "LAN": 100.0, "TXT": 50.0, "IMG": 50.0, "NO": 100.0,
            "G1-6": 100.0, "G7-12": 50.0, "Avg": 75.0}  # fmt: skip
    assert m["table"] == pytest.approx(want)
    assert m["accuracy"] == 75.0 and m["unparsed"] == 0
    assert "NAT" in report.format() and "75.00" in report.format()
    # The image split (the default): only p1 and p2.
    _, m = run("scienceqa", data, tmp_path / "out-img", answers)
    assert m["questions"] == 2 and m["accuracy"] == 50.0 and m["table"]["NO"] is None


def test_scienceqa_reads_answers_as_llava_eval_science_qa(tmp_path):
    data = fx.make_scienceqa(tmp_path / "sqa")
    # Right in substance, but not a form the official script reads: wrong there, and here.
    answers = {"p1": "The answer is B", "p2": "(B)", "p3": "A.", "p4": "b1"}
    _, m = run("scienceqa", data, tmp_path / "out", answers, split="test")
    assert m["accuracy"] == 0.0 and m["unparsed"] == 4


def test_vqav2_val_and_test_dev_submission(tmp_path):
    data = fx.make_vqav2(tmp_path / "vqa")
    answers = {"420": "Yes", "421": "two", "70": "The red."}
    _, m = run("vqav2", data, tmp_path / "val", answers, split="val2014")
    assert m["accuracy"] == pytest.approx((1.0 + 0.6 + 0.3) / 3 * 100)
    assert m["by_answer_type"] == pytest.approx({"number": 60.0, "other": 30.0, "yes/no": 100.0})
    sub = json.loads((tmp_path / "val/vqav2_val2014_submission.json").read_text())
    assert sub == [{"question_id": 420, "answer": "yes"}, {"question_id": 421, "answer": "2"},
                   {"question_id": 70, "answer": "red"}]  # fmt: skip
    # test-dev: no answers, a submission covering every test2015 question.
    _, m = run("vqav2", data, tmp_path / "dev", {"50": "Because, it's late."})
    assert "accuracy" not in m
    sub = json.loads((tmp_path / "dev/vqav2_test-dev2015_submission.json").read_text())
    assert sub == [{"question_id": 50, "answer": "because it 's late"},
                   {"question_id": 51, "answer": ""}]  # fmt: skip


def test_gqa(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")
    _, m = run("gqa", data, tmp_path / "out", {"201": "Yes.", "202": "right", "203": "table"})
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["structural"] == pytest.approx({"query": 50.0, "verify": 100.0})
    assert m["semantic"] == pytest.approx({"attr": 0.0, "obj": 100.0, "rel": 100.0})
    preds = json.loads((tmp_path / "out/gqa_testdev_balanced_predictions.json").read_text())
    assert preds[0] == {"questionId": "201", "prediction": "yes"}


def test_gqa_scores_only_balanced_questions_as_the_official_script(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")
    questions = json.loads((data / "testdev_balanced_questions.json").read_text())
    questions["203"]["isBalanced"] = False  # a testdev_all question outside the balanced set
    (data / "testdev_all_questions.json").write_text(json.dumps(questions))
    answers = {"201": "Yes.", "202": "right", "203": "table"}
    _, m = run("gqa", data, tmp_path / "out", answers, split="testdev_all")
    assert m["accuracy"] == 50.0 and m["scored_questions"] == 2  # 203 (right) is not scored
    preds = json.loads((tmp_path / "out/gqa_testdev_all_predictions.json").read_text())
    assert len(preds) == 3  # but it is answered
    del questions["203"]["isBalanced"]
    (data / "testdev_all_questions.json").write_text(json.dumps(questions))
    with pytest.raises(EvalDataError, match="question 203: no field 'isBalanced'"):
        run("gqa", data, tmp_path / "out2", answers, split="testdev_all")


def test_textvqa(tmp_path):
    data = fx.make_textvqa(tmp_path / "textvqa")
    _, m = run("textvqa", data, tmp_path / "out", {"1": "coca cola", "2": "STOP!"})
    assert m["accuracy"] == pytest.approx((0.9 + 1.0) / 2 * 100)


def test_textvqa_reference_ocr_tokens(tmp_path):
    data = fx.make_textvqa(tmp_path / "textvqa")
    task = TASKS["textvqa"]()
    assert task.samples(data, "val")[0].text == (
        "<image>\nWhat brand?\nAnswer the question using a single word or phrase."
    )
    ocr = {"data": [{"image_id": "a1", "ocr_tokens": ["Coca", "Cola", "500ml"]}]}
    (data / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps(ocr))
    first, second = task.samples(data, "val")
    assert first.text == (
        "<image>\nWhat brand?\nReference OCR token: Coca, Cola, 500ml\n"
        "Answer the question using a single word or phrase."
    )
    assert "Reference OCR token: \n" in second.text  # an image without tokens


def test_vizwiz(tmp_path):
    data = fx.make_vizwiz(tmp_path / "vizwiz")
    samples = TASKS["vizwiz"]().samples(data, "val")
    assert "respond with 'Unanswerable'" in samples[0].text
    answers = {"VizWiz_val_00000000": "Unanswerable", "VizWiz_val_00000001": "white",
               "VizWiz_val_00000002": "unanswerable"}  # fmt: skip
    _, m = run("vizwiz", data, tmp_path / "out", answers)
    assert m["accuracy"] == pytest.approx((1.0 + 0.9 + 0.0) / 3 * 100)
    assert m["by_answer_type"] == pytest.approx(
        {"other": 90.0, "unanswerable": 100.0, "yes/no": 0.0}
    )
    assert m["unanswerable"] == pytest.approx({"precision": 50.0, "recall": 100.0})
    sub = json.loads((tmp_path / "out/vizwiz_val_submission.json").read_text())
    assert sub[0] == {"image": "VizWiz_val_00000000.jpg", "answer": "unanswerable"}


def test_vizwiz_compares_with_the_raw_human_answers(tmp_path):
    data = fx.make_vizwiz(tmp_path / "vizwiz")
    rows = json.loads((data / "Annotations/val.json").read_text())
    rows[1]["answers"] = [{"answer": a} for a in ["coca-cola"] * 5 + ["coke"] * 5]
    (data / "Annotations/val.json").write_text(json.dumps(rows))
    answers = {"VizWiz_val_00000000": "unanswerable", "VizWiz_val_00000001": "Coca-Cola",
               "VizWiz_val_00000002": "yes"}  # fmt: skip
    _, m = run("vizwiz", data, tmp_path / "out", answers)
    # Submitted as "coca cola" (EvalAI's processor); VizWiz's evaluator: no match (0).
    assert m["by_answer_type"]["other"] == 0.0 and m["accuracy"] == pytest.approx(200 / 3)


def test_pope(tmp_path):
    data = fx.make_pope(tmp_path / "pope")
    answers = {
        "random/1": "Yes, there is.", "random/2": "No.",
        "popular/1": "no", "popular/2": "yes",
        "adversarial/1": "yes", "adversarial/2": "There is a cat",
    }  # fmt: skip
    _, m = run("pope", data, tmp_path / "out", answers)
    keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
    pick = lambda d: {k: d[k] for k in keys}  # noqa: E731
    assert pick(m["random"]) == pytest.approx(
        dict(zip(keys, (100, 100, 100, 100, 50), strict=True))
    )
    assert pick(m["popular"]) == pytest.approx(dict(zip(keys, (0, 0, 0, 0, 50), strict=True)))
    assert pick(m["adversarial"]) == pytest.approx(
        dict(zip(keys, (50, 50, 100, 200 / 3, 100), strict=True))
    )
    assert m["mean"]["f1"] == pytest.approx((100 + 0 + 200 / 3) / 3)


def test_mme(tmp_path):
    data = fx.make_mme(tmp_path / "MME_Benchmark_release_version")
    samples = TASKS["mme"]().samples(data, "all")
    assert len(samples) == 28
    answers = {s.question_id: s.meta["answer"].capitalize() for s in samples}
    answers["count/0001/1"] = "Yes"  # count: one of two wrong -> acc 50, acc+ 0
    answers["code_reasoning/0001/0"] = "I cannot tell"  # "other": wrong -> 50 + 0
    answers["code_reasoning/0001/1"] = "No, it is not"
    _, m = run("mme", data, tmp_path / "out", answers)
    assert m["perception"]["score"] == pytest.approx(9 * 200 + 50)
    assert m["perception"]["subtasks"]["count"] == pytest.approx(
        {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    )
    assert m["cognition"]["score"] == pytest.approx(3 * 200 + 50)


def test_mme_reads_the_release_layout_and_asks_as_llava_mme_jsonl(tmp_path):
    data = fx.make_mme(tmp_path / "MME_Benchmark_release_version")
    assert (data / "artwork/questions_answers_YN/0001.txt").is_file()  # the release's name
    samples = {s.question_id: s for s in TASKS["mme"]().samples(data, "perception")}
    # Every perception subtask, the five with images/ + questions_answers_YN/ included.
    assert {q.split("/")[0] for q in samples} == set(PERCEPTION)
    assert samples["artwork/0001/0"].text == (
        "<image>\nIs this a cat?\nAnswer the question using a single word or phrase."
    )


@pytest.mark.parametrize("subtask", ["artwork", "OCR"])
def test_mme_missing_subtask_questions_is_an_error(tmp_path, subtask):
    data = fx.make_mme(tmp_path / "MME_Benchmark_release_version")
    texts = data / subtask / ("questions_answers_YN" if subtask == "artwork" else "")
    for txt in texts.glob("*.txt"):
        txt.unlink()
    with pytest.raises(EvalDataError, match=f"{subtask}: no question files"):
        TASKS["mme"]().samples(data, "all")


def test_mme_old_folder_name_is_not_read_as_a_smaller_sum(tmp_path):
    data = fx.make_mme(tmp_path / "MME_Benchmark_release_version")
    (data / "scene/questions_answers_YN").rename(data / "scene/questions_answer_YES_NO")
    with pytest.raises(EvalDataError, match="scene: no question files"):
        TASKS["mme"]().samples(data, "perception")


def test_mmbench_circular(tmp_path):
    data = fx.make_mmbench(tmp_path / "mmbench")
    samples = {s.question_id: s for s in TASKS["mmbench"]().samples(data, "dev")}
    assert sorted(samples) == ["10/0", "10/1", "10/2", "11/0", "11/1"]
    assert samples["10/1"].meta["options"] == ["cat", "cow", "dog"]
    assert [samples[f"10/{k}"].meta["answer"] for k in range(3)] == ["B", "A", "C"]
    assert samples["11/1"].text == (
        "<image>\nA hint.\nIs it day?\nA. no\nB. yes\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert samples["11/0"].images == samples["10/0"].images  # "10": row 10's image
    answers = {"10/0": "B", "10/1": "A", "10/2": "A", "11/0": "A", "11/1": "B. yes"}
    _, m = run("mmbench", data, tmp_path / "out", answers)
    assert m["circular_accuracy"] == 50.0 and m["first_pass_accuracy"] == 100.0
    assert m["by_l2_category"] == {"perception": 0.0, "reasoning": 100.0}
    # VLMEvalKit's exact matching reads each of these forms (the old reader none of them).
    answers.update({"10/0": "**B**", "10/1": "cat is right", "10/2": "Option C"})
    _, m = run("mmbench", data, tmp_path / "out2", answers)
    assert m["circular_accuracy"] == 100.0 and m["unparsed"] == 0


def test_mmbench_released_rotations_are_asked_as_given_and_grouped(tmp_path):
    data = fx.make_mmbench_released(tmp_path / "mmbench")
    samples = {s.question_id: s for s in TASKS["mmbench"]().samples(data, "dev")}
    # One sample per row, none rotated again; a question's rows share its id before the "/".
    assert sorted(samples) == ["10/0", "10/1", "10/2", "11/0", "11/1", "12/0", "12/1", "12/2",
                               "12/3"]  # fmt: skip
    assert samples["10/1"].meta["options"] == ["cat", "cow", "dog"]
    assert samples["10/1"].meta["answer"] == "A"  # the row's own answer
    assert samples["12/3"].text == (
        "<image>\nWhich colour?\nA. tan\nB. red\nC. green\nD. blue\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert samples["10/2"].images == samples["10/0"].images  # "10": row 10's image
    answers = {
        "10/0": "B", "10/1": "A", "10/2": "C",  # right every time
        "11/0": "A", "11/1": "A",  # right, then wrong
        "12/0": "C", "12/1": "C", "12/2": "B", "12/3": "A",  # wrong first, then right
    }  # fmt: skip
    _, m = run("mmbench", data, tmp_path / "out", answers)
    assert m["questions"] == 9 and m["distinct_questions"] == 3
    assert m["circular_accuracy"] == pytest.approx(100 / 3)  # question 10 only
    assert m["first_pass_accuracy"] == pytest.approx(200 / 3)  # rows 10 and 11
    assert m["by_category"] == {"animals": 100.0, "colour": 0.0, "time": 0.0}
    assert m["by_l2_category"] == {"perception": 50.0, "reasoning": 0.0}


def test_mmbench_released_test_split_submits_every_row(tmp_path):
    data = fx.make_mmbench_released(tmp_path / "mmbench")
    with open(data / "mmbench_dev_20230712.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    for r in rows[1:]:
        r[7] = ""  # no answers
    fx.write_tsv(data / "mmbench_test_20230712.tsv", rows[0], rows[1:])
    answers = {"10/0": "B", "10/1": "A", "10/2": "C", "11/0": "A", "11/1": "A", "12/0": "C",
               "12/1": "C", "12/2": "B", "12/3": "A"}  # fmt: skip
    _, m = run("mmbench", data, tmp_path / "out", answers, split="test")
    with open(m["submission"]) as f:
        submitted = [(r["index"], r["prediction"]) for r in csv.DictReader(f, delimiter="\t")]
    assert sorted(submitted) == sorted([
        ("10", "B"), ("11", "A"), ("12", "C"), ("1000010", "A"), ("1000011", "A"),
        ("1000012", "C"), ("2000010", "C"), ("2000012", "B"), ("3000012", "A"),
    ])  # fmt: skip


def test_mmbench_cn_instruction(tmp_path):
    data = fx.make_mmbench(tmp_path / "mmbench")
    (data / "mmbench_dev_cn_20231003.tsv").write_text(
        (data / "mmbench_dev_20230712.tsv").read_text(encoding="utf-8"), encoding="utf-8"
    )
    samples = TASKS["mmbench"]().samples(data, "dev_cn")
    assert samples[0].text.endswith("\nC. cow\n请直接回答选项字母。")


def test_mmbench_test_split_writes_a_submission(tmp_path):
    data = fx.make_mmbench(tmp_path / "mmbench")
    tsv = (data / "mmbench_dev_20230712.tsv").read_text().replace("\tB\tanimals", "\t\tanimals")
    tsv = tsv.replace("\tA\ttime", "\t\ttime")
    (data / "mmbench_test_20230712.tsv").write_text(tsv)
    answers = {"10/0": "B", "10/1": "A", "10/2": "A", "11/0": "A", "11/1": "B"}
    answers["11/0"] = "I would say it is day."  # no letter: the server's matcher decides
    _, m = run("mmbench", data, tmp_path / "out", answers, split="test")
    with open(m["submission"]) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    # The raw answers under the TSV's own questions, as LLaVA's converter submits them.
    assert [(r["index"], r["question"], r["prediction"]) for r in rows] == [
        ("10", "Which animal?", "B"),
        ("11", "Is it day?", "I would say it is day."),
    ]


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


def test_missing_prediction_without_model_is_one_clear_error(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")
    with pytest.raises(EvalDataError, match="1 questions have no answer.*--model"):
        run("gqa", data, tmp_path / "out", {"201": "yes", "202": "left"})


def test_missing_benchmark_file_names_it(tmp_path):
    with pytest.raises(EvalDataError, match="testdev_balanced_questions.json: not found"):
        run("gqa", tmp_path, tmp_path / "out", {})


@pytest.mark.parametrize(
    "task, make, file, content, message",
    [
        ("vqav2", fx.make_vqav2, "v2_OpenEnded_mscoco_val2014_questions.json", [],
         "expected a JSON object with 'questions'; got a list"),
        ("vqav2", fx.make_vqav2, "v2_mscoco_val2014_annotations.json",
         {"annotations": [{"question_id": 420, "answers": "yes"}]},
         "annotations[0].answers: expected a list; got a string"),
        ("textvqa", fx.make_textvqa, "TextVQA_0.5.1_val.json", {"questions": []},
         "no field 'data' (expected a list)"),
        ("vizwiz", fx.make_vizwiz, "Annotations/val.json", {"data": []},
         "expected a list; got a JSON object"),
        ("gqa", fx.make_gqa, "testdev_balanced_questions.json", [],
         "expected a JSON object; got a list"),
        ("gqa", fx.make_gqa, "testdev_balanced_questions.json", {"201": "Is it on?"},
         "question 201: expected a JSON object; got a string"),
        ("mm-vet", fx.make_mmvet, "mm-vet.json", [{"imagename": "v1_0.png"}],
         "expected a JSON object; got a list"),
        ("scienceqa", fx.make_scienceqa, "pid_splits.json", {"train": []},
         "no field 'test' (expected a list)"),
    ],
)  # fmt: skip
def test_a_file_of_the_wrong_shape_is_one_line_naming_it(tmp_path, task, make, file, content,
                                                          message):  # fmt: skip
    data = make(tmp_path / "data")
    (data / file).write_text(json.dumps(content))
    split = {"vqav2": "val2014"}.get(task, TASKS[task]().default_split)
    with pytest.raises(ValueError) as error:
        TASKS[task]().samples(data, split)
    assert str(error.value) == f"{data / file}: {message}"


def test_a_llava_bench_context_without_caption_names_its_line(tmp_path):
    data = fx.make_llava_bench(tmp_path / "wild")
    (data / "context.jsonl").write_text('{"image": "001.jpg", "caption": "A red bus."}\n'
                                        '{"image": "002.jpg"}\n')  # fmt: skip
    with pytest.raises(ValueError, match="^" + re.escape(f"{data / 'context.jsonl'}:2: missing "
                                                         "field(s) caption") + "$"):  # fmt: skip
        TASKS["llava-bench"]().samples(data, "wild")


def test_missing_images_stop_before_the_model_loads(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")

    def load():
        raise AssertionError("the model must not be loaded")

    (data / "images/n2.jpg").unlink()
    with pytest.raises(EvalDataError) as error:
        evaluate(TASKS["gqa"](), data, tmp_path / "out", load, echo=lambda m: None)
    assert str(error.value) == (
        f"{data / 'images/n2.jpg'}: image not found (1 of 2 images missing; see "
        "docs/evaluation.md for the layout)"
    )
    (data / "images/n1.jpg").unlink()
    (data / "images").rmdir()
    with pytest.raises(
        EvalDataError, match=re.escape(f"{data / 'images'}: no such folder (2 of 2")
    ):
        evaluate(TASKS["gqa"](), data, tmp_path / "out", load, echo=lambda m: None)


def test_limit(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")
    _, m = run("gqa", data, tmp_path / "out", {"201": "yes"}, limit=1)
    assert m["questions"] == 1 and m["accuracy"] == 100.0


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
