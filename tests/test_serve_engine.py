"""`serve` on the decode engine (the default) next to the batch scheduler, and the prefix
cache over HTTP. The reference for every answer is the pipeline run directly."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import urllib.request

import openai
import pytest
from serve_helpers import MODEL, NEW, QUESTIONS, client, png_bytes, reference, server_of, user

from llava_jax.media.image_processing import load_image
from llava_jax.serve import ServeConfig, create_app


def ask(url: str, i: int, max_tokens: int = NEW) -> str:
    out = client(url).chat.completions.create(
        model=MODEL, messages=[user(QUESTIONS[i], seed=i)], max_tokens=max_tokens, temperature=0
    )
    return out.choices[0].message.content


def test_batch_and_engine_schedulers_answer_alike(serve, pipeline):
    want = [reference(pipeline, QUESTIONS[i], seed=i)[0] for i in range(4)]
    for scheduler in ("batch", "engine"):
        url = serve(scheduler=scheduler)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(functools.partial(ask, url), range(4)))
        assert got == want, scheduler


def test_requests_join_a_running_engine(serve, pipeline):
    """Two slots, a long answer decoding: short requests come and go beside it."""
    url = serve(max_batch=2, prefix_cache_bytes=0)
    stats = server_of(url).scheduler.stats
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        long = pool.submit(ask, url, 0, 40)
        short = [pool.submit(ask, url, i) for i in (1, 2, 3)]
        answers = [f.result() for f in short]
        assert not long.done() or stats["batches"] == 1
        assert long.result() == reference(pipeline, QUESTIONS[0], seed=0, max_tokens=40)[0]
    assert answers == [reference(pipeline, QUESTIONS[i], seed=i)[0] for i in (1, 2, 3)]
    assert stats["largest_batch"] == 2


def test_a_second_turn_reuses_the_first_turns_prefix(serve, pipeline):
    url = serve()
    scheduler = server_of(url).scheduler
    first = [user(QUESTIONS[5], seed=5)]
    chat = client(url).chat.completions
    answer = chat.create(model=MODEL, messages=first, max_tokens=NEW, temperature=0)
    answer = answer.choices[0].message.content
    before = scheduler.stats["prefix_hits"], scheduler.stats["prefix_hit_tokens"]
    second = [*first, {"role": "assistant", "content": answer},
              {"role": "user", "content": "And then?"}]  # fmt: skip
    got = chat.create(model=MODEL, messages=second, max_tokens=NEW, temperature=0)
    got = got.choices[0].message.content
    assert scheduler.stats["prefix_hits"] == before[0] + 1
    assert scheduler.stats["prefix_hit_tokens"] - before[1] >= 9 + 10  # image and question
    messages = [{"role": "user", "content": f"<image>\n{QUESTIONS[5]}"},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And then?"}]  # fmt: skip
    prompt = pipeline.prompt(messages, [load_image(png_bytes(5))])
    sampling = pipeline.stop_config(max_new_tokens=NEW)
    ids = pipeline.generator.generate([prompt], sampling)[0].token_ids
    if ids and ids[-1] in sampling.stop_token_ids:
        ids = ids[:-1]
    assert got == pipeline.decode(ids)


def test_config_refuses_an_unknown_scheduler():
    with pytest.raises(ValueError, match="scheduler must be one of engine, batch"):
        ServeConfig(scheduler="fifo")
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0"):
        ServeConfig(prefix_cache_bytes=-1)


def test_slot_tokens_bound_the_slots_and_the_requests_served(serve, pipeline):
    """`--slot-tokens`: slots that long (not the model's context), a request that fits
    answers as the pipeline does, one over the slot is a 400 that names the flag."""
    url = serve(slot_tokens=64)
    assert server_of(url).scheduler.engine.max_length == 64
    with urllib.request.urlopen(url + "/health") as response:
        assert json.loads(response.read())["context"] == 64
    _, _, prompt_tokens = reference(pipeline, QUESTIONS[0], seed=0)
    room = 64 - prompt_tokens
    assert ask(url, 0, room) == reference(pipeline, QUESTIONS[0], seed=0, max_tokens=room)[0]
    with pytest.raises(openai.BadRequestError, match=r"This server's \(--slot-tokens\) "
                       r"maximum context length is 64 tokens"):  # fmt: skip
        ask(url, 0, room + 1)


def test_slot_tokens_over_the_context_or_without_the_engine_are_refused(pipeline):
    context = pipeline.cfg.text.max_position_embeddings
    with pytest.raises(ValueError, match=f"--slot-tokens {context + 1} is over the model's "
                       f"context of {context} tokens"):  # fmt: skip
        create_app(pipeline, ServeConfig(slot_tokens=context + 1))
    with pytest.raises(ValueError, match="slot_tokens sizes the engine's slots"):
        ServeConfig(slot_tokens=64, scheduler="batch")
