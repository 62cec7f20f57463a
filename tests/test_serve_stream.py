"""`TextStream`: one row's tokens -> text deltas, stop strings and stop tokens, per request."""

from __future__ import annotations

import numpy as np
import pytest

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.inference.generator import Prompt, SamplingConfig
from llava_jax.serve.scheduler import Job, TextStream

TOKENIZER = build_tiny_tokenizer()
EOS = TOKENIZER.eos_token_id


def decode(ids):
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def run(text: str, stop=(), max_tokens=100, extra=()):
    """Pushes the tokens of `text` (then `extra` ids); returns (deltas, done event)."""
    events = []
    sampling = SamplingConfig(max_new_tokens=max_tokens, stop_token_ids=(EOS,))
    job = Job(Prompt(np.zeros(1, np.int32)), sampling, tuple(stop), events.append)
    stream = TextStream(job, decode)
    for token in [*TOKENIZER.encode(text, add_special_tokens=False), *extra]:
        stream.push(token)
    stream.finish("stop")  # as the scheduler does after the generator returns
    deltas = [e.text for e in events if e.kind == "delta"]
    done = [e for e in events if e.kind == "done"]
    assert len(done) == 1 and events[-1] is done[0], events
    return deltas, done[0]


def test_deltas_add_up_to_the_answer():
    deltas, done = run("the cat is on the mat", extra=[EOS])
    assert "".join(deltas) == "the cat is on the mat"
    assert len(deltas) > 3  # streamed token by token, not at the end
    assert done.finish_reason == "stop"


@pytest.mark.parametrize("stop", ["cat", "t i", "mat", "###"])
def test_stop_string_is_cut_and_never_sent(stop):
    text = "the cat is on the mat"
    deltas, done = run(text, stop=[stop, "zzzz"])
    want = text[: text.find(stop)] if stop in text else text
    assert "".join(deltas) == want
    assert done.finish_reason == "stop"
    assert done.completion_tokens <= len(TOKENIZER.encode(text, add_special_tokens=False))


def test_max_tokens_ends_the_row():
    deltas, done = run("the cat is on the mat", max_tokens=3)
    ids = TOKENIZER.encode("the cat is on the mat", add_special_tokens=False)[:3]
    assert "".join(deltas) == decode(ids)
    assert (done.finish_reason, done.completion_tokens) == ("length", 3)


def test_cancelled_row_sends_nothing_more():
    events = []
    job = Job(Prompt(np.zeros(1, np.int32)), SamplingConfig(max_new_tokens=50), (), events.append)
    stream = TextStream(job, decode)
    ids = TOKENIZER.encode("the cat is on the mat", add_special_tokens=False)
    stream.push(ids[0])
    job.cancelled.set()
    for token in ids[1:]:
        stream.push(token)
    assert stream.finished and [e.kind for e in events] == ["delta"]
