"""`llava-jax serve` against slow and large requests (issue 20), over HTTP on 127.0.0.1: slow
clients, the connection cap, image memory, oversized prompts, clients leaving mid-answer,
errors that must be 400s, stop strings."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image
from serve_hardening_helpers import _ask, _closed_within, _connect, _image_at
from serve_helpers import (
    MODEL,
    QUESTIONS,
    LiveServer,
    post,
    server_of,
    tiny_image_message,
    user,
    wait_for,
)

from llava_jax.serve import ServeConfig, create_app

# -- 1. slow clients --------------------------------------------------------------------------


def test_trickled_bodies_hold_no_queue_place_and_time_out(serve):
    url = serve(max_queue=2, read_timeout_s=1.5)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")  # fmt: skip
    slow = [_connect(url) for _ in range(3)]
    for s in slow:
        s.sendall(head)
    try:
        status, answer = post(url, _ask())
        assert status == 200, answer  # the unread bodies held no place in the queue
        for s in slow:
            got = _closed_within(s, 10)
            assert got is not None, "a trickled body held its connection past the deadline"
            assert got.startswith(b"HTTP/1.1 408"), got[:200]
            assert b"request_timeout" in got
    finally:
        for s in slow:
            s.close()


def test_slow_headers_are_cut_off(serve):
    url = serve(header_timeout_s=1.0)
    with _connect(url) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        closed = None
        while closed is None and time.monotonic() - start < 6:
            s.sendall(b"X-Slow: 1\r\n")  # a header line now and then, never the blank line
            closed = _closed_within(s, 0.3)
        assert closed is not None, "a client trickling headers kept its connection for 6 s"
        assert time.monotonic() - start < 4


def test_connections_beyond_the_cap_get_503_until_some_close(serve):
    """Idle connections hold file descriptors; past `max_connections` a request is refused
    at once (uvicorn counts the asking connection too), and served again once they close."""
    import urllib.error
    import urllib.request

    url = serve(max_connections=4)

    def health() -> int:
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    assert health() == 200
    idle = [_connect(url) for _ in range(4)]
    try:
        wait_for(lambda: health() == 503, timeout=10)
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: health() == 200, timeout=10)


# -- 2. image memory --------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(buf, format="PNG")  # a small file
    return buf.getvalue()


def test_decoded_images_stay_within_the_image_memory(serve):
    url = serve(image_memory_bytes=100 * 100 * 8)  # 8 bytes a decoded pixel
    body = {"model": MODEL, "max_tokens": 1, "messages": tiny_image_message(_png(200, 200))}
    status, answer = post(url, body)
    assert status == 413 and answer["error"]["code"] == "image_too_large", answer
    assert "--image-memory-mb" in answer["error"]["message"]
    memory = server_of(url).image_memory
    with memory.reserve(60_000):  # another request's images being decoded
        status, answer = post(url, _ask())  # 60 x 90 pixels: 43,200 bytes decoded
        assert status == 429 and answer["error"]["code"] == "image_memory_full", answer
    assert memory.used == 0
    status, answer = post(url, _ask())
    assert status == 200, answer
    assert memory.used == 0


# -- 3. oversized prompts ---------------------------------------------------------------------


def test_oversized_prompt_is_refused_before_tokenizing(serve, pipeline, monkeypatch):
    url = serve(max_body_bytes=8 * 1024 * 1024)
    tokenized = []
    monkeypatch.setattr(pipeline, "prompt", lambda *a, **k: tokenized.append(1))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a" * 4_000_000}]}
    status, answer = post(url, body)
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert "characters" in answer["error"]["message"]
    assert not tokenized, "the prompt was tokenized before its 400"


def test_json_is_parsed_off_the_event_loop(serve, monkeypatch):
    import llava_jax.serve.app as app_module

    url = serve()
    on_loop = []

    def parse(body, parse=app_module._parse_json):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return parse(body)

    monkeypatch.setattr(app_module, "_parse_json", parse)
    status, answer = post(url, _ask())
    assert status == 200, answer
    assert on_loop == [False]


# -- 6. a non-streaming client leaving while tokens flow --------------------------------------


class _Paced:
    """The pipeline, its generator slowed to a token every `step_s` (a steady flow, faster
    than any polling interval a server might use)."""

    def __init__(self, pipeline, step_s: float):
        self._pipeline, self._step_s = pipeline, step_s
        self.generator = self
        self.tokens = 0  # sent so far

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def generate(self, prompts, sampling, on_token=None):
        def paced(row, token):
            if row == 0:
                time.sleep(self._step_s)
                self.tokens += 1
            on_token(row, token)

        return self._pipeline.generator.generate(prompts, sampling, on_token=paced)


class _PacedEngine:
    """The engine scheduler's engine, slowed to a step every `step_s`."""

    def __init__(self, scheduler, step_s: float):
        self.tokens, self._step, self._step_s = 0, scheduler.engine.step, step_s
        scheduler.engine.step = self.step

    def step(self):
        time.sleep(self._step_s)
        self._step()
        self.tokens += 1


@pytest.mark.parametrize("scheduler_kind", ["batch", "engine"])
def test_non_streaming_client_leaving_while_tokens_flow(pipeline, scheduler_kind):
    cfg = ServeConfig(model_name=MODEL, max_batch=1, scheduler=scheduler_kind)
    if scheduler_kind == "batch":
        paced = _Paced(pipeline, 0.02)
        server = LiveServer(create_app(paced, cfg), cfg)
    else:
        server = LiveServer(create_app(pipeline, cfg), cfg)
        paced = _PacedEngine(server.app.state.server.scheduler, 0.02)
    try:
        scheduler = server.app.state.server.scheduler
        body = json.dumps({"model": MODEL, "messages": [user(QUESTIONS[4])], "max_tokens": 200,
                           "temperature": 0, "stop": ["never-said"]}).encode()  # fmt: skip
        with _connect(server.url) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            wait_for(lambda: paced.tokens >= 5)  # tokens are flowing
        left = time.monotonic()
        wait_for(lambda: not scheduler.stats["running"], timeout=30)
        assert scheduler.stats["cancelled"] == 1, "the row ran to its end"
        assert time.monotonic() - left < 1.5  # 200 tokens take 4 s
    finally:
        server.close()


# -- 7. errors that are the client's --------------------------------------------------------


def test_client_errors_are_400s_not_500s(serve, tmp_path):
    url = serve(local_image_dir=tmp_path)
    deep = b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 2000 + b"]" * 2000
    deep += b"}"
    cases = {
        "deep-json": (None, deep),
        "nul-in-path": (_image_at("pics/a\x00b.png"), None),
    }
    for name, (body, raw) in cases.items():
        status, answer = post(url, body, raw=raw)
        assert status == 400, (name, answer)
        message = answer["error"]["message"]
        assert "\n" not in message and "Error" not in message, (name, message)


# -- 9. small ---------------------------------------------------------------------------------


def test_long_stop_strings_are_refused(serve):
    status, answer = post(serve(), _ask(stop=["x" * 65]))
    assert status == 400 and answer["error"]["param"] == "stop", answer
    status, answer = post(serve(), _ask(stop=["x" * 64]))
    assert status == 200, answer


def test_ipv6_url_is_bracketed():
    from llava_jax.cli.serve import base_url

    assert base_url("::", 8000) == "http://[::]:8000"
    assert base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
