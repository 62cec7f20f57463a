"""`llava-jax eval` generates on the continuous-batching engine: the same greedy answers as
`Generator.generate` one question at a time, with or without the prefix cache; questions
grouped by image; slots sized from image headers; a killed run resumes."""

from __future__ import annotations

import json

import eval_fixtures as fx
import hf_tiny
import numpy as np
import pytest
from PIL import Image

import llava_jax.inference.engine
import llava_jax.inference.prefix_cache
from llava_jax.eval import TASKS, slots
from llava_jax.eval.runner import EvalDataError, evaluate
from llava_jax.inference.generator import bucket
from llava_jax.media.image_processing import image_hw, load_image

NEW = 4  # answer tokens


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from llava_jax.inference.pipeline import Pipeline

    path = hf_tiny.save_llava_dir(tmp_path_factory.mktemp("hf"))
    return Pipeline.load(path, template="chatml_direct", echo=lambda m: None)


@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    """12 questions: 2 images, 2 questions each, in 3 categories."""
    return fx.make_pope_grid(tmp_path_factory.mktemp("pope"), images=2, per_image=2)


def answers(out):
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    return {r["question_id"]: r["answer"] for r in rows}


def run(pipeline, data, out, **kw):
    kw = {"batch_size": 3, "max_new_tokens": NEW, "echo": lambda m: None, **kw}
    evaluate(TASKS["pope"](), data, out, lambda: pipeline, **kw)
    return answers(out)


@pytest.fixture(scope="module")
def one_at_a_time(pipeline, pope):
    """Each question through `Generator.generate` alone: the reference."""
    sampling = pipeline.stop_config(max_new_tokens=NEW, temperature=0.0)
    expected = {}
    for s in TASKS["pope"]().samples(pope, "all"):
        prompt = pipeline.prompt([{"role": "user", "content": s.text}],
                                 [load_image(i) for i in s.images])  # fmt: skip
        (gen,) = pipeline.generator.generate([prompt], sampling)
        text = pipeline.decode(gen.token_ids)
        cut = min((text.find(x) for x in sampling.stop_strings if x in text), default=len(text))
        expected[s.question_id] = text[:cut].strip()
    return expected


class _Spy:
    """Records the engines and prefix caches `generate_answers` builds."""

    def __init__(self, monkeypatch):
        self.engines, self.caches = [], []
        engine_cls = llava_jax.inference.engine.Engine
        cache_cls = llava_jax.inference.prefix_cache.PrefixCache

        def engine(*a, **kw):
            self.engines.append(engine_cls(*a, **kw))
            return self.engines[-1]

        for_model = cache_cls.for_model

        def cache(*a, **kw):
            made = for_model(*a, **kw)
            if made is not None:
                self.caches.append(made)
            return made

        monkeypatch.setattr(llava_jax.inference.engine, "Engine", engine)
        monkeypatch.setattr(cache_cls, "for_model", cache)


def test_engine_answers_equal_one_at_a_time(pipeline, pope, one_at_a_time, tmp_path):
    got = run(pipeline, pope, tmp_path / "out", prefix_cache_mb=0)
    assert len(got) == 12 and any(got.values())
    assert got == one_at_a_time


def test_prefix_cache_hits_and_changes_no_answer(pipeline, pope, one_at_a_time, tmp_path,
                                                 monkeypatch):  # fmt: skip
    spy = _Spy(monkeypatch)
    got = run(pipeline, pope, tmp_path / "out", prefix_cache_mb=64)
    (cache,), (engine,) = spy.caches, spy.engines
    # Each image has 6 questions (2 per category), grouped: all but its first reuse at least
    # its image tokens.
    assert cache.stats["prefix_hits"] == 10, cache.stats
    samples = TASKS["pope"]().samples(pope, "all")
    total = sum(slots.prompt_length(pipeline, s) for s in samples)
    assert engine.stats["prefilled_tokens"] < total / 2, (engine.stats, total)
    assert got == one_at_a_time


def test_questions_come_grouped_by_image(pipeline, pope, tmp_path):
    # One slot: the predictions file's order is the order questions were admitted.
    run(pipeline, pope, tmp_path / "out", batch_size=1)
    image_of = {s.question_id: s.images for s in TASKS["pope"]().samples(pope, "all")}
    rows = [json.loads(x) for x in (tmp_path / "out/predictions.jsonl").read_text().splitlines()]
    order = [image_of[r["question_id"]] for r in rows]
    runs = [k for i, k in enumerate(order) if i == 0 or order[i - 1] != k]
    assert len(runs) == 2, order  # two images: two runs (the files interleave them)


def test_slots_are_sized_to_the_longest_prompt(pipeline, pope, tmp_path, monkeypatch):
    spy = _Spy(monkeypatch)
    run(pipeline, pope, tmp_path / "out")
    samples = TASKS["pope"]().samples(pope, "all")
    lengths = []
    for s in samples:
        prompt = pipeline.prompt([{"role": "user", "content": s.text}],
                                 [load_image(i) for i in s.images])  # fmt: skip
        assert slots.prompt_length(pipeline, s) == len(prompt.input_ids), s.question_id
        lengths.append(len(prompt.input_ids))
    (engine,) = spy.engines
    assert engine.num_slots == 3
    assert engine.max_length == bucket(max(lengths) + NEW) < engine.context


def test_image_hw_reads_the_header_upright(tmp_path):
    """What sizes the slots (`image_hw`, a path or bytes, as eval's questions hold either)."""
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270: the decoded image is 10 high, 20 wide turned to 20 x 10
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(path, exif=exif)
    upright = load_image(path)
    assert image_hw(path) == (upright.height, upright.width) == (20, 10)
    assert image_hw(path.read_bytes()) == (20, 10)


def test_a_question_over_the_context_is_named(pipeline, pope, tmp_path):
    context = pipeline.cfg.text.max_position_embeddings
    message = (r"^question adversarial/1: prompt of \d+ tokens "
               rf"\+ {context} new tokens exceeds the model's context of {context}$")  # fmt: skip
    with pytest.raises(EvalDataError, match=message):
        run(pipeline, pope, tmp_path / "out", max_new_tokens=context)
    assert not (tmp_path / "out/predictions.jsonl").exists()  # refused before any answer


def test_an_interrupted_run_resumes_from_what_was_written(pipeline, pope, one_at_a_time,
                                                          tmp_path):  # fmt: skip
    out = tmp_path / "out"

    def interrupt(message):
        if "questions/s" in message:  # the first progress line: 2 answers written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(pipeline, pope, out, batch_size=2, echo=interrupt)
    first = answers(out)
    assert 2 <= len(first) < 12
    resumed = []
    assert run(pipeline, pope, out, echo=resumed.append) == one_at_a_time
    assert f"12 questions, {len(first)} already answered" in resumed[0]
    left = 12 - len(first)
    assert resumed[-1].startswith(f"{left}/{left} answered (")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 12
