"""The serving engine: slots that requests join and leave at every step, and the prefix cache.

The reference for every answer is `Generator.generate` on the prompt alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from tiny_configs import LLAVA

from llava_jax.inference import engine as engine_module
from llava_jax.inference.engine import Engine, Request
from llava_jax.inference.generator import Generator, Prompt, SamplingConfig
from llava_jax.inference.prefix_cache import Block, PrefixCache
from llava_jax.media.feature_plan import Media, build_feature_plan
from llava_jax.models.llava import LlavaModel

IMG = LLAVA.image_token_id
MEDIA_IDS = (IMG,)


@pytest.fixture(scope="module")
def generator():
    return Generator(LlavaModel(LLAVA, rngs=nnx.Rngs(0)))


def make_prompt(rng, text_len, image=True, views=None, before=()):
    """[1, before..., text..., image tokens, 3 more]; `views` reuses an image's pixels."""
    media = (Media.image(42, 42),) if image else ()
    ids = [1, *before, *rng.randint(3, 140, size=text_len)]
    if image:
        plan = build_feature_plan(LLAVA, [media])
        ids += [IMG] * plan.num_image_tokens[0] + list(rng.randint(3, 140, size=3))
        if views is None:
            views = rng.randn(plan.num_views[0], 42, 42, 3).astype(np.float32)
    return Prompt(np.array(ids, np.int32), views if image else None, media)


def alone(generator, prompt, sampling):
    return generator.generate([prompt], sampling)[0].token_ids


def run_until(engine, requests):
    while not all(r.finish_reason for r in requests):
        engine.step()


GREEDY = SamplingConfig(max_new_tokens=8)
SAMPLED = SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=20, seed=7)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_request_joining_a_busy_engine_matches_alone(generator, sampling):
    rng = np.random.RandomState(0)
    prompt = make_prompt(rng, 6)
    others = [make_prompt(rng, 2 + 7 * i, image=i % 2 == 0) for i in range(3)]
    engine = Engine(generator, num_slots=4, max_length=128)
    by_itself = engine.generate([prompt], sampling)[0].token_ids
    busy = [Request(p, SamplingConfig(max_new_tokens=30, temperature=0.8, seed=i))
            for i, p in enumerate(others)]  # fmt: skip
    for r in busy:
        engine.add(r)
    for _ in range(5):
        engine.step()
    joined = Request(prompt, sampling)
    engine.add(joined)
    run_until(engine, [joined])
    assert all(not r.finish_reason for r in busy), "the busy rows ended before it joined"
    assert joined.token_ids == by_itself
    if sampling is GREEDY:  # sampled: the generator's batch shape differs, its floats may too
        assert joined.token_ids == alone(generator, prompt, sampling)
    run_until(engine, busy)


def test_the_cache_grows_and_shrinks_with_its_rows(generator, monkeypatch):
    """The cache holds the occupied slots and the longest row's columns (rounded up), not
    every slot at the slot length: it grows for more requests and a long answer, shrinks once
    they have left, and no answer changes."""
    monkeypatch.setattr(engine_module, "SHRINK_AFTER", 1)  # shrink as soon as it may
    rng = np.random.RandomState(9)
    engine = Engine(generator, num_slots=4, max_length=256)
    shape = lambda: engine._cache.segment.shape  # noqa: E731 (slots, columns)
    short = Request(make_prompt(rng, 3, image=False), SamplingConfig(max_new_tokens=4))
    engine.add(short)
    run_until(engine, [short])
    assert shape() == (1, 16)  # one row; prompt and answer: 11 tokens
    long = Request(make_prompt(rng, 4), SamplingConfig(max_new_tokens=60))
    two = [Request(make_prompt(rng, 2, image=False), SamplingConfig(max_new_tokens=5))
           for _ in range(2)]  # fmt: skip
    for r in (long, *two):
        engine.add(r)
    seen = set()
    while not long.finish_reason:
        engine.step()
        seen.add(shape())
    # Three rows (rounded up to 4) while the short ones decode, then the long one alone.
    assert max(r for r, _ in seen) == 4 and (1, 96) in seen and max(seen)[1] < 96, sorted(seen)
    after = Request(make_prompt(rng, 2, image=False), SamplingConfig(max_new_tokens=3))
    engine.add(after)
    run_until(engine, [after])
    assert shape() == (1, 16), "the cache kept the rows and columns of requests that left"
    for r in (short, long, *two, after):
        assert r.token_ids == alone(generator, r.prompt, r.sampling)


def test_requests_coming_and_going_do_not_resize_the_cache_back_and_forth(generator):
    """A need below half the cache must last `SHRINK_AFTER` steps before the cache shrinks:
    short requests joining and leaving beside a long one do not shrink it after each."""
    rng = np.random.RandomState(10)
    engine = Engine(generator, num_slots=4, max_length=256)
    long = Request(make_prompt(rng, 4, image=False), SamplingConfig(max_new_tokens=40))
    engine.add(long)
    slots = []
    for _ in range(6):  # 1 row, then 2 while a short one decodes beside it, and again
        short = Request(make_prompt(rng, 3, image=False), SamplingConfig(max_new_tokens=2))
        engine.add(short)
        while not short.finish_reason:
            engine.step()
            slots.append(engine._cache.segment.shape[0])
        for _ in range(3):  # the long one alone for a few steps
            engine.step()
            slots.append(engine._cache.segment.shape[0])
    assert 2 in slots and slots == sorted(slots), f"slots went back and forth: {slots}"
    run_until(engine, [long])
    assert long.token_ids == alone(generator, long.prompt, long.sampling)


def test_finished_row_frees_its_slot_at_once(generator):
    rng = np.random.RandomState(1)
    engine = Engine(generator, num_slots=2, max_length=128)
    long = Request(make_prompt(rng, 4, image=False), SamplingConfig(max_new_tokens=40))
    short = Request(make_prompt(rng, 5, image=False), SamplingConfig(max_new_tokens=2))
    third = Request(make_prompt(rng, 6, image=False), SamplingConfig(max_new_tokens=2))
    for r in (long, short, third):
        engine.add(r)
    run_until(engine, [third])
    assert not long.finish_reason, "the third request waited for the long one"
    # short: prefill + 1 step; third: prefill + 1 step; a step is in flight while the tokens of
    # the one before are handed out, so each slot frees a step later.
    assert engine.stats["steps"] <= 4
    assert (short.finish_reason, third.finish_reason) == ("length", "length")
    run_until(engine, [long])
    assert long.token_ids == alone(generator, long.prompt, long.sampling)


def test_no_request_compiles_a_new_program(generator):
    """Programs depend on shapes only (prompt buckets, occupied slots, cache length, whether
    every row is greedy), never on a request's tokens, pixels or sampling values: the same
    shapes again, with other prompts and settings, compile nothing."""
    rng = np.random.RandomState(2)
    engine = Engine(generator, num_slots=4, max_length=128)
    compiled = (engine._prefill, engine._insert, engine._step, engine._move, engine._resize)

    def run(settings):
        prompts = [make_prompt(rng, 5), make_prompt(rng, 9, image=False), make_prompt(rng, 7),
                   make_prompt(rng, 4, image=False), make_prompt(rng, 6)]  # fmt: skip
        engine.generate(prompts, settings)

    lengths = (12, 5, 9, 3, 7)  # rows leave mid-decode, later ones take their slots
    run([SamplingConfig(max_new_tokens=n, temperature=0.0 if i % 2 else 1.3, top_k=20, seed=i)
         for i, n in enumerate(lengths)])  # fmt: skip
    programs = [f._cache_size() for f in compiled]
    assert engine.stats["resizes"] > 0 and programs[3] > 0, "no row moved, no resize: weak"
    run([SamplingConfig(max_new_tokens=n, temperature=0.0 if i % 2 else 0.6, top_p=0.7,
                        repetition_penalty=1.3, seed=10 + i)
         for i, n in enumerate(lengths)])  # fmt: skip
    assert [f._cache_size() for f in compiled] == programs


def test_cancel_ends_a_request_and_frees_its_slot(generator):
    rng = np.random.RandomState(3)
    engine = Engine(generator, num_slots=1, max_length=128)
    first = Request(make_prompt(rng, 4, image=False), SamplingConfig(max_new_tokens=50))
    second = Request(make_prompt(rng, 4, image=False), GREEDY)
    engine.add(first)
    engine.add(second)
    engine.step()
    engine.cancel(first)
    run_until(engine, [second])
    assert first.finish_reason == "cancelled" and len(first.token_ids) < 50
    assert second.token_ids == alone(generator, second.prompt, GREEDY)


def test_a_prompt_over_a_slot_is_refused(generator):
    engine = Engine(generator, num_slots=1, max_length=32)
    prompt = Prompt(np.arange(1, 30, dtype=np.int32))
    with pytest.raises(ValueError, match="29 tokens \\+ 8 new tokens exceeds the 32 tokens"):
        engine.add(Request(prompt, GREEDY))


# -- the prefix cache ---------------------------------------------------------------------------


def test_multi_turn_hits_the_prefix_cache_and_answers_as_a_miss(generator):
    rng = np.random.RandomState(4)
    turn1 = make_prompt(rng, 6)
    turns = [turn1]
    for _ in range(2):  # the next turn: the whole conversation so far, an answer, a question
        more = rng.randint(3, 140, size=7).astype(np.int32)
        turns.append(Prompt(np.concatenate([turns[-1].input_ids, more]), turn1.views,
                            turn1.media))  # fmt: skip
    cache = PrefixCache(10**8, MEDIA_IDS)
    engine = Engine(generator, num_slots=2, max_length=128, prefix_cache=cache)
    requests = [Request(p, GREEDY) for p in turns]
    for r in requests:
        engine.add(r)
        run_until(engine, [r])
    assert [r.cached_tokens for r in requests] == [0] + [len(p.input_ids) - 1 for p in turns[:2]]
    assert cache.stats["prefix_hits"] == 2
    for r, p in zip(requests, turns, strict=True):
        assert r.token_ids == alone(generator, p, GREEDY), f"turn of {len(p.input_ids)} tokens"


def test_other_questions_about_the_same_image_reuse_it(generator):
    rng = np.random.RandomState(5)
    first = make_prompt(rng, 6)
    question = rng.randint(3, 140, size=5).astype(np.int32)
    end = int(np.flatnonzero(first.input_ids == IMG)[-1]) + 1
    second = Prompt(np.concatenate([first.input_ids[:end], question]), first.views, first.media)
    engine = Engine(generator, num_slots=2, max_length=128,
                    prefix_cache=PrefixCache(10**8, MEDIA_IDS))  # fmt: skip
    a, b = (Request(p, GREEDY) for p in (first, second))
    engine.add(a)
    run_until(engine, [a])
    engine.add(b)
    run_until(engine, [b])
    assert b.cached_tokens == end
    assert b.token_ids == alone(generator, second, GREEDY)


def test_the_same_tokens_with_other_pixels_miss(generator):
    rng = np.random.RandomState(6)
    first = make_prompt(rng, 6)
    other = Prompt(first.input_ids, first.views + 1.0, first.media)
    again = Prompt(first.input_ids.copy(), first.views.copy(), first.media)  # equal content
    cache = PrefixCache(10**8, MEDIA_IDS)
    engine = Engine(generator, num_slots=2, max_length=128, prefix_cache=cache)
    results = {}
    for name, p in (("first", first), ("other", other), ("again", again)):
        r = Request(p, GREEDY)
        engine.add(r)
        run_until(engine, [r])
        results[name] = r
    assert results["other"].cached_tokens == 0, "the prefix of other pixels was reused"
    assert results["again"].cached_tokens == len(first.input_ids) - 1
    assert results["other"].token_ids == alone(generator, other, GREEDY)
    assert results["again"].token_ids == results["first"].token_ids


def _block(columns: int) -> Block:
    k = np.zeros((2, 1, 2, columns, 12), np.float32)
    return Block(k, k, np.ones((1, columns), np.int32))


def test_prefix_cache_evicts_least_recently_used_within_its_budget():
    size = _block(16).nbytes
    cache = PrefixCache(2 * size + size // 2, MEDIA_IDS)  # room for two blocks
    prompts = [np.array([1, 10 + i, 11, 12], np.int32) for i in range(3)]
    cache.store(prompts[0], b"", _block(16))
    cache.store(prompts[1], b"", _block(16))
    assert cache.lookup(np.array([*prompts[0][:3], 99]), b"") is not None  # 0 is now recent
    cache.store(prompts[2], b"", _block(16))
    assert cache.bytes <= cache.budget_bytes and len(cache) == 2
    assert cache.stats["prefix_evictions"] == 1
    found = [cache.lookup(np.array([*p[:3], 99]), b"") is not None for p in prompts]
    assert found == [True, False, True], "not the least recently used entry was evicted"
    cache.store(np.arange(1, 200, dtype=np.int32), b"", _block(256))  # over the budget alone
    assert len(cache) == 2 and cache.bytes <= cache.budget_bytes


def test_prefix_cache_never_leaves_media_tokens_to_the_rest():
    cache = PrefixCache(10**6, MEDIA_IDS)
    stored = np.array([1, 5, IMG, IMG, 6, 7, 8], np.int32)
    cache.store(stored, b"m", _block(16))
    asked = np.array([1, 5, IMG, IMG, 6, 7, 8, 9], np.int32)
    assert cache.lookup(asked, b"m").length == 6
    assert cache.lookup(asked, b"other media") is None
    # The stored image-end prefix (4 tokens) is reachable; a shorter one would cut the image.
    assert cache.lookup(np.array([1, 5, IMG, IMG, 40, 41], np.int32), b"m").length == 4
