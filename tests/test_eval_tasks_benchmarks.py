"""The exact-match tasks (ScienceQA, VQAv2, GQA, TextVQA, VizWiz, POPE, MME, MMBench) on tiny
fixtures in each benchmark's published layout (tests/eval_fixtures.py): the prompts they ask,
and scores from a predictions file written by hand against metrics computed by hand."""

from __future__ import annotations

import csv
import json

import eval_fixtures as fx
import pytest
from eval_task_helpers import run

from llava_jax.eval import TASKS, EvalDataError
from llava_jax.eval.mme import PERCEPTION


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


def test_limit(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")
    _, m = run("gqa", data, tmp_path / "out", {"201": "yes"}, limit=1)
    assert m["questions"] == 1 and m["accuracy"] == 100.0
