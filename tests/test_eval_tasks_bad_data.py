"""Benchmark data an eval task refuses before it scores or loads a model: missing answers,
files and images, a file of the wrong shape; each error is one line naming the file."""

from __future__ import annotations

import json
import re

import eval_fixtures as fx
import pytest
from eval_task_helpers import run

from llava_jax.eval import TASKS, EvalDataError
from llava_jax.eval.runner import evaluate


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
