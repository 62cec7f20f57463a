"""The chat client against a real local HTTP server: replies, retries with backoff on 429 and
5xx, auth errors, the disk cache, bounded concurrency."""

from __future__ import annotations

import threading
import time

import pytest
from llm_server import FakeLLM

from llava_jax.eval.llm_client import ChatClient, LLMAuthError, LLMError


def echo(body):
    return "echo: " + body["messages"][-1]["content"]


def client(llm, tmp_path=None, **kw):
    delays = []
    kw.setdefault("backoff_s", 0.5)
    c = ChatClient(llm.base_url, "judge-1", cache_dir=tmp_path, sleep=delays.append, **kw)
    return c, delays


def test_reply_and_request_body():
    with FakeLLM(echo) as llm:
        c, _ = client(llm)
        assert c.chat([{"role": "user", "content": "hi"}], temperature=0.2) == "echo: hi"
    assert llm.requests == [
        {"model": "judge-1", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}
    ]


def test_retries_408_429_and_5xx_with_exponential_backoff():
    with FakeLLM(echo) as llm:
        llm.failures = {"flaky": [408, 429, 500, 504, 507, 599]}
        c, delays = client(llm)
        assert c.chat([{"role": "user", "content": "flaky"}]) == "echo: flaky"
    assert len(llm.requests) == 7
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_retry_after_is_honoured():
    with FakeLLM(echo) as llm:
        llm.failures, llm.retry_after = {"slow": [429]}, "7"
        c, delays = client(llm)
        c.chat([{"role": "user", "content": "slow"}])
    assert delays == [7.0]


def test_gives_up_after_max_retries():
    with FakeLLM(echo) as llm:
        llm.failures = {"down": [500] * 10}
        c, delays = client(llm, max_retries=2)
        with pytest.raises(LLMError, match="gave up after 3 tries.*HTTP 500"):
            c.chat([{"role": "user", "content": "down"}])
    assert delays == [0.5, 1.0] and len(llm.requests) == 3


@pytest.mark.parametrize("status", [400, 404, 422, 501, 505])
def test_other_4xx_and_501_505_fail_at_once(status):
    with FakeLLM(echo) as llm:
        llm.failures = {"bad": [status]}
        c, delays = client(llm)
        with pytest.raises(LLMError, match=f"HTTP {status} status {status}") as error:
            c.chat([{"role": "user", "content": "bad"}])
    assert delays == [] and len(llm.requests) == 1 and not error.value.transient


def test_auth_errors_name_the_variable(monkeypatch):
    monkeypatch.delenv("TEST_LLM_KEY", raising=False)
    with FakeLLM(echo, key="sk-right") as llm:
        c, _ = client(llm, api_key_env="TEST_LLM_KEY")
        with pytest.raises(
            LLMAuthError, match="HTTP 401 Incorrect API key provided; set TEST_LLM_KEY"
        ):
            c.chat([{"role": "user", "content": "x"}])
        monkeypatch.setenv("TEST_LLM_KEY", "sk-wrong")
        c, _ = client(llm, api_key_env="TEST_LLM_KEY")
        with pytest.raises(LLMAuthError, match="check the key in TEST_LLM_KEY"):
            c.chat([{"role": "user", "content": "x"}])
        monkeypatch.setenv("TEST_LLM_KEY", "sk-right")
        c, _ = client(llm, api_key_env="TEST_LLM_KEY")
        assert c.chat([{"role": "user", "content": "x"}]) == "echo: x"


def test_cache_makes_reruns_free(tmp_path):
    with FakeLLM(echo) as llm:
        c, _ = client(llm, tmp_path)
        bodies = [c.body([{"role": "user", "content": f"q{i}"}], seed=0) for i in range(3)]
        first = sorted((r.index, r.text, r.cached) for r in c.map(bodies))
        again = sorted((r.index, r.text, r.cached) for r in client(llm, tmp_path)[0].map(bodies))
        other_seed = c.chat([{"role": "user", "content": "q0"}], seed=1)
    assert [t for _, t, _ in first] == ["echo: q0", "echo: q1", "echo: q2"]
    assert [c for *_, c in first] == [False] * 3 and [c for *_, c in again] == [True] * 3
    assert other_seed == "echo: q0"
    assert len(llm.requests) == 4  # three, then only the new seed
    assert len(list(tmp_path.rglob("*.json"))) == 4


def test_failures_in_map_are_reported_per_request():
    with FakeLLM(echo) as llm:
        llm.failures = {"q1": [500] * 10}
        c, _ = client(llm, max_retries=1)
        replies = {r.index: r for r in c.map([c.body([{"role": "user", "content": f"q{i}"}])
                                              for i in range(3)])}  # fmt: skip
    assert replies[0].text == "echo: q0" and replies[2].text == "echo: q2"
    assert replies[1].text is None and "HTTP 500" in replies[1].error


def test_concurrency_is_bounded():
    active, peak, lock = [0], [0], threading.Lock()

    def slow(body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return "ok"

    with FakeLLM(slow) as llm:
        c, _ = client(llm, concurrency=3)
        replies = list(c.map([c.body([{"role": "user", "content": str(i)}]) for i in range(9)]))
    assert len(replies) == 9 and peak[0] == 3


def test_unreachable_server_is_retried_then_fails():
    c = ChatClient("http://127.0.0.1:9/v1", "m", max_retries=1, backoff_s=0.0, sleep=lambda s: 0)
    with pytest.raises(LLMError, match="gave up after 2 tries"):
        c.chat([{"role": "user", "content": "x"}])
    with pytest.raises(LLMError) as error:
        c.chat([{"role": "user", "content": "x"}])
    assert "Connection refused" in str(error.value) and not error.value.transient


def test_a_server_error_that_persists_is_transient():
    with FakeLLM(echo) as llm:
        llm.failures = {"down": [503] * 10}
        c, _ = client(llm, max_retries=1)
        with pytest.raises(LLMError) as error:
            c.chat([{"role": "user", "content": "down"}])
    assert error.value.transient


def test_closing_map_early_ends_the_retries_in_flight():
    def ok_once_all_arrived(body):
        deadline = time.perf_counter() + 5.0
        while len(llm.requests) < 3 and time.perf_counter() < deadline:
            time.sleep(0.01)
        return "ok"

    with FakeLLM(ok_once_all_arrived) as llm:
        llm.failures = {"down": [503] * 1000}
        c = ChatClient(llm.base_url, "m", concurrency=4, max_retries=100, backoff_s=10.0)
        bodies = [c.body([{"role": "user", "content": m}]) for m in ("ok", "down", "down")]
        replies = c.map(bodies)
        assert next(replies).text == "ok"
        start = time.perf_counter()
        replies.close()  # the two "down" requests are waiting 10 s before their second try
        assert time.perf_counter() - start < 5.0
    assert len(llm.requests) == 3
