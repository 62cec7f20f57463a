"""`llava-jax eval` end to end with a tiny random model: every task generates its answers
(garbage, but real batched greedy generation through the pipeline), writes them
incrementally, resumes, and scores them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import eval_fixtures as fx
import hf_tiny
import pytest
from llm_server import FakeLLM

from llava_jax.eval import TASKS
from llava_jax.eval.llm_client import ChatClient
from llava_jax.eval.runner import EvalDataError, PredictionsFile, evaluate

TEMPLATE = "chatml_direct"  # a short system prompt: the tiny model has 256 positions


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return hf_tiny.save_llava_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def pipeline(model_dir):
    from llava_jax.inference.pipeline import Pipeline

    return Pipeline.load(model_dir, template=TEMPLATE, echo=lambda m: None)


MAKERS = {
    "scienceqa": fx.make_scienceqa, "vqav2": fx.make_vqav2, "gqa": fx.make_gqa,
    "textvqa": fx.make_textvqa, "vizwiz": fx.make_vizwiz, "pope": fx.make_pope,
    "mme": fx.make_mme, "mmbench": fx.make_mmbench,
}  # fmt: skip
SPLITS = {"vqav2": "val2014", "scienceqa": "test"}
HEADLINE = {"scienceqa": "accuracy", "vqav2": "accuracy", "gqa": "accuracy",
            "textvqa": "accuracy", "vizwiz": "accuracy", "pope": "mean",
            "mme": "perception", "mmbench": "circular_accuracy"}  # fmt: skip


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("task", sorted(MAKERS))
def test_task_end_to_end(task, pipeline, tmp_path):
    data = MAKERS[task](tmp_path / "data")
    out = tmp_path / "out"
    t = TASKS[task]()
    split = SPLITS.get(task, t.default_split)
    evaluate(t, data, out, lambda: pipeline, split=split, batch_size=4, max_new_tokens=3,
             echo=lambda m: None)  # fmt: skip
    preds = lines(out / "predictions.jsonl")
    samples = t.samples(data, split)
    assert sorted((p["question_id"], p["prompt"]) for p in preds) == sorted(
        (s.question_id, s.text) for s in samples
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["questions"] == len(samples) and HEADLINE[task] in metrics


def test_batched_answers_equal_one_at_a_time(pipeline, tmp_path):
    data = fx.make_pope(tmp_path / "data")
    t = TASKS["pope"]()
    for batch, out in ((1, "one"), (4, "four")):
        evaluate(t, data, tmp_path / out, lambda: pipeline, batch_size=batch, max_new_tokens=3,
                 echo=lambda m: None)  # fmt: skip
    one, four = (lines(tmp_path / f"{n}/predictions.jsonl") for n in ("one", "four"))
    assert sorted(one, key=str) == sorted(four, key=str) and len(one) == 6


def test_resume_skips_answered_questions(pipeline, tmp_path):
    data = fx.make_pope(tmp_path / "data")
    out = tmp_path / "out"
    t = TASKS["pope"]()
    loads = []

    def load():
        loads.append(1)
        return pipeline

    evaluate(t, data, out, load, limit=2, batch_size=4, max_new_tokens=3, echo=lambda m: None)
    first = lines(out / "predictions.jsonl")
    assert len(first) == 2
    # An interrupted write leaves half a line: it is dropped and that question asked again.
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"question_id": "adversa')
    evaluate(t, data, out, load, batch_size=4, max_new_tokens=3, echo=lambda m: None)
    after = lines(out / "predictions.jsonl")
    assert after[:2] == first and len(after) == 6
    assert len({p["question_id"] for p in after}) == 6
    evaluate(t, data, out, load, batch_size=4, echo=lambda m: None)  # all answered
    assert len(loads) == 2 and len(lines(out / "predictions.jsonl")) == 6


def test_resume_refuses_another_model(pipeline, tmp_path):
    data = fx.make_gqa(tmp_path / "data")
    t = TASKS["gqa"]()
    evaluate(t, data, tmp_path / "out", lambda: pipeline, batch_size=4, max_new_tokens=3,
             model_name="/m/a",
             echo=lambda m: None)  # fmt: skip
    with pytest.raises(ValueError, match="holds predictions for model '/m/a'"):
        evaluate(t, data, tmp_path / "out", lambda: pipeline, model_name="/m/b",
                 echo=lambda m: None)  # fmt: skip


@pytest.mark.parametrize("task", ["llava-bench", "mm-vet"])
def test_judged_tasks_end_to_end(task, pipeline, tmp_path):
    make = {"llava-bench": fx.make_llava_bench, "mm-vet": fx.make_mmvet}[task]
    data = make(tmp_path / "data")
    reply = {"llava-bench": "7 5\nok", "mm-vet": "0.4"}[task]
    with FakeLLM(lambda body: reply) as llm:
        judge = ChatClient(llm.base_url, "judge-1")
        evaluate(TASKS[task](), data, tmp_path / "out", lambda: pipeline, batch_size=4,
                 max_new_tokens=3, judge=judge, judge_runs=2, echo=lambda m: None)  # fmt: skip
    m = json.loads((tmp_path / "out/metrics.json").read_text())
    answers = lines(tmp_path / "out/predictions.jsonl")
    # The model's answers reach the judge.
    assert all(any(a["answer"] in r["messages"][-1]["content"] for r in llm.requests)
               for a in answers)  # fmt: skip
    if task == "llava-bench":
        assert m["relative_score"]["all"]["mean"] == pytest.approx(500 / 7)
        assert m["relative_score"]["all"]["std"] == 0.0
    else:
        assert m["score"]["total"]["mean"] == pytest.approx(40.0)


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llava_jax.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip


@pytest.mark.slow  # a fresh process converts the model and compiles (~50 s on 2 busy cores)
def test_cli_prints_the_table_and_resumes(model_dir, tmp_path):
    data = fx.make_scienceqa(tmp_path / "sqa")
    out = tmp_path / "out"
    args = (
        "eval",
        "scienceqa",
        "--model",
        model_dir,
        "--data",
        data,
        "--out",
        out,
        "--split",
        "test",
        "--template",
        TEMPLATE,
        "--max-new-tokens",
        3,
        "--batch-size",
        2,
    )
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert "4/4 answered" in proc.stderr
    again = cli(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert "4 already answered" in again.stderr and "answered (" not in again.stderr
    assert json.loads(again.stdout)["table"].keys() >= {"NAT", "Avg"}


def test_cli_scores_a_predictions_file_without_a_model(tmp_path):
    data = fx.make_gqa(tmp_path / "gqa")
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"question_id": q, "answer": a} for q, a in (("201", "yes"), ("202", "Left."),
                                                          ("203", "chair"))]  # fmt: skip
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("eval", "gqa", "--data", data, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2].split() == ["overall", "66.67"]
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == pytest.approx(200 / 3)


def test_cli_a_non_string_answer_is_one_line_naming_the_line(tmp_path):
    """`"answer": 123` was scored as the text "123" (issue 18.2)."""
    data = fx.make_gqa(tmp_path / "gqa")
    out = tmp_path / "out"
    out.mkdir()
    rows = ['{"question_id": "201", "answer": "yes"}', '{"question_id": "202", "answer": 123}']
    (out / "predictions.jsonl").write_text("\n".join(rows) + "\n")
    proc = cli("eval", "gqa", "--data", data, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"llava-jax: error: {out / 'predictions.jsonl'}:2: the answer is 123, not a string"
    ]
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("answer", ["null", "true", '["yes"]', '{"text": "yes"}', "1.5"])
def test_only_string_answers_load(tmp_path, answer):
    path = tmp_path / "predictions.jsonl"
    path.write_text(f'{{"question_id": 7, "answer": {answer}}}\n')
    with pytest.raises(EvalDataError, match=r"predictions.jsonl:1: the answer is .*, not a str"):
        PredictionsFile(path).load()
    path.write_text('{"question_id": 7, "answer": "yes"}\n')
    assert PredictionsFile(path).load() == {"7": "yes"}


def test_cli_judge_flags(tmp_path, monkeypatch):
    data = fx.make_llava_bench(tmp_path / "wild")
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"question_id": str(i), "answer": "an answer"} for i in range(3)]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("eval", "llava-bench", "--data", data, "--out", out, "--judge-model", "judge-1",
            "--judge-runs", 2, "--judge-api-key-env", "TEST_JUDGE_KEY")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TEST_JUDGE_KEY"}
    with FakeLLM(lambda body: "8 6\nfine", key="sk-judge") as llm:
        proc = cli(*args, "--judge-base-url", llm.base_url, env=env)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines()[-1] == (
            f"llava-jax: error: {llm.base_url}/chat/completions: HTTP 401 Incorrect API key "
            "provided; set TEST_JUDGE_KEY"
        )
        proc = cli(*args, "--judge-base-url", llm.base_url,
                   env={**env, "TEST_JUDGE_KEY": "sk-judge"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2].split()[:4] == ["conv", "75.0", "±", "0.0"]
    assert len(list((out / "llm_cache").rglob("*.json"))) == 6
    assert len((out / "judge.jsonl").read_text().splitlines()) == 6


def test_cli_errors_are_one_line(tmp_path):
    proc = cli("eval", "gqa", "--data", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("llava-jax: error: ")
    assert "testdev_balanced_questions.json: not found" in proc.stderr
    proc = cli("eval", "gqa", "--data", tmp_path, "--split", "nope")
    assert proc.returncode == 2 and "unknown split 'nope'" in proc.stderr
    proc = cli("eval", "gqa", "--data", tmp_path, "--prefix-cache-mb", "-1")
    assert proc.returncode == 2 and "--prefix-cache-mb must be >= 0, got -1.0" in proc.stderr
    (tmp_path / "testdev_balanced_questions.json").write_text("[]")  # the wrong shape
    proc = cli("eval", "gqa", "--data", tmp_path, "--out", tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"llava-jax: error: {tmp_path}/testdev_balanced_questions.json: expected a JSON object; "
        "got a list"
    ]


def test_suite_runs_every_benchmark_found(pipeline, tmp_path):
    from llava_jax.eval.suite import run_suite

    root = tmp_path / "data"
    fx.make_pope(root / "pope")
    fx.make_gqa(root / "gqa")
    fx.make_mme(root / "MME_Benchmark_release_version")
    fx.make_llava_bench(root / "llava-bench")
    loads = []

    def load():
        loads.append(1)
        return pipeline

    report = run_suite(TASKS, root, tmp_path / "out", load, echo=lambda m: None, batch_size=4,
                       max_new_tokens=3)  # fmt: skip
    scores = report.metrics["scores"]
    assert list(scores) == ["VQAv2", "GQA", "VizWiz", "SQA-IMG", "TextVQA", "POPE", "MME", "MMB",
                            "LLaVA-W", "MM-Vet"]  # fmt: skip
    assert len(loads) == 1  # one model load for all tasks
    pope = json.loads((tmp_path / "out/pope-all/metrics.json").read_text())
    mme = json.loads((tmp_path / "out/mme-all/metrics.json").read_text())
    assert scores["POPE"] == pope["mean"]["f1"] and scores["MME"] == mme["perception"]["score"]
    assert scores["GQA"] is not None and scores["VQAv2"] is None
    assert report.metrics["notes"]["LLaVA-W"] == "needs --judge-model"
    assert report.metrics["notes"]["VQAv2"].startswith("no ")


def test_cli_suite_scores_without_a_model(tmp_path):
    root = tmp_path / "data"
    fx.make_gqa(root / "gqa")
    out = tmp_path / "out"
    (out / "gqa-testdev_balanced").mkdir(parents=True)
    rows = [{"question_id": q, "answer": a} for q, a in (("201", "yes"), ("202", "left"),
                                                          ("203", "sofa"))]  # fmt: skip
    (out / "gqa-testdev_balanced/predictions.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    fx.make_vizwiz(root / "vizwiz")
    (out / "vizwiz-val").mkdir()
    rows = [{"question_id": f"VizWiz_val_0000000{i}", "answer": a}
            for i, a in enumerate(("Unanswerable", "white", "unanswerable"))]  # fmt: skip
    (out / "vizwiz-val/predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("eval", "llava-1.5", "--data", root, "--out", out)
    assert proc.returncode == 0, proc.stderr
    header, _, values, _, note = proc.stdout.splitlines()[:5]
    assert header.split()[:3] == ["VQAv2", "GQA", "VizWiz"]
    assert values.split()[:3] == ["-", "66.67", "63.33"]  # VizWiz: (1 + 0.9 + 0) / 3
    assert note.startswith("VizWiz: the val split; LLaVA-1.5 reports test-dev")
    suite = json.loads((out / "suite.json").read_text())
    assert suite["scores"]["GQA"] == pytest.approx(200 / 3)
    assert suite["notes"]["VizWiz"].startswith("the val split")


def test_eval_with_an_adapter_answers_as_the_merged_model(model_dir, pipeline, tmp_path, capsys):
    """`eval --adapter` applies LoRA adapters (unmerged) to --model: its answers are the
    merged model's; run.json names the adapter, so a resume without it is refused."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llava_jax import model_io
    from llava_jax.cli.main import main
    from llava_jax.inference.generator import Generator
    from llava_jax.models import build, lora
    from llava_jax.param_paths import flat_to_nested, nested_to_flat

    cfg, spec = pipeline.cfg, lora.LoraSpec(rank=4, alpha=8.0)
    base = build.model_params(pipeline.model)
    adapted = lora.add_adapters(build.model_from_params(cfg, base), spec, jax.random.key(1))
    state = nnx.state(adapted, nnx.Param)
    flat = nested_to_flat(nnx.to_pure_dict(state))
    rng = np.random.RandomState(3)  # a trained B (zeros at init: the adapters would do nothing)
    trained = {k: v + jnp.asarray(0.5 * rng.randn(*v.shape), v.dtype)
               for k, v in flat.items() if k.endswith("_lora_b")}  # fmt: skip
    nnx.replace_by_pure_dict(state, flat_to_nested({**flat, **trained}))
    nnx.update(adapted, state)
    adapters = {k: v for k, v in {**flat, **trained}.items() if lora.is_adapter(k)}
    model_io.save_adapter_dir(tmp_path / "adapter", spec, adapters)
    merged = build.model_from_params(cfg, lora.merged_params(adapted, spec))
    reference = dataclasses.replace(pipeline, model=merged, generator=Generator(merged))

    data = fx.make_pope(tmp_path / "pope")
    evaluate(TASKS["pope"](), data, tmp_path / "merged", lambda: reference, split="adversarial",
             max_new_tokens=4, echo=lambda m: None)  # fmt: skip
    evaluate(TASKS["pope"](), data, tmp_path / "base", lambda: pipeline, split="adversarial",
             max_new_tokens=4, echo=lambda m: None)  # fmt: skip
    args = ["eval", "pope", "--model", str(model_dir), "--data", str(data), "--split",
            "adversarial", "--template", TEMPLATE, "--max-new-tokens", "4"]  # fmt: skip
    out = tmp_path / "adapted"
    assert main([*args, "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 0
    got = lines(out / "predictions.jsonl")
    want = {r["question_id"]: r["answer"] for r in lines(tmp_path / "merged/predictions.jsonl")}
    plain = {r["question_id"]: r["answer"] for r in lines(tmp_path / "base/predictions.jsonl")}
    assert {r["question_id"]: r["answer"] for r in got} == want
    assert want != plain, "the adapters change no answer: the test shows nothing"
    assert "adapter" in json.loads((out / "run.json").read_text())["model"]
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2  # the same folder, without the adapters
    assert "model" in capsys.readouterr().err


def test_eval_adapter_needs_a_model_and_an_adapter_dir(tmp_path, capsys):
    from llava_jax.cli.main import main

    data = fx.make_pope(tmp_path / "pope")
    assert main(["eval", "pope", "--data", str(data), "--adapter", str(tmp_path)]) == 2
    assert "--adapter adapts --model, which is not given" in capsys.readouterr().err
    assert main(["eval", "pope", "--data", str(data), "--model", str(tmp_path),
                 "--adapter", str(tmp_path)]) == 2  # fmt: skip
    assert "not an adapter dir" in capsys.readouterr().err
