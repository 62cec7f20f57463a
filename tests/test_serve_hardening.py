"""`llava-jax serve` against slow, large and cross-site requests (issue 20), over HTTP on
127.0.0.1: slow clients, image memory, oversized prompts, cross-site requests, remote image
fetches, clients leaving mid-answer, errors that must be 400s, API keys, stop strings."""

from __future__ import annotations

import asyncio
import functools
import http.client
import http.server
import io
import json
import socket
import threading
import time

import pytest
from PIL import Image
from serve_helpers import (
    MODEL,
    QUESTIONS,
    LiveServer,
    png_bytes,
    post,
    server_of,
    tiny_image_message,
    user,
    wait_for,
)

from llava_jax.cli.main import main
from llava_jax.serve import ServeConfig, create_app


def _ask(**extra) -> dict:
    return {"model": MODEL, "messages": [user(QUESTIONS[0])], "max_tokens": 1, **extra}


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(s: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing `s`, or None if it is still open after `seconds`."""
    s.settimeout(0.2)
    got, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


def _request(url: str, method: str, path: str, body: bytes | None = None, headers=None):
    """(status, headers, body) of a request with exactly these headers (Host included)."""
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


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


# -- 4. cross-site requests -------------------------------------------------------------------


def test_cross_site_requests_are_refused(serve):
    url = serve(allowed_origins=("https://app.example",), allowed_hosts=("llava.lan",))
    own = url.removeprefix("http://")
    body = json.dumps(_ask()).encode()
    path = "/v1/chat/completions"
    # A form or a fetch without a preflight: text/plain, from any page.
    status, _, answer = _request(url, "POST", path, body,
                                 {"Host": own, "Content-Type": "text/plain"})  # fmt: skip
    assert status == 415, answer
    assert json.loads(answer)["error"]["code"] == "unsupported_media_type"
    json_headers = {"Host": own, "Content-Type": "application/json"}
    status, _, answer = _request(url, "POST", path, body,
                                 {**json_headers, "Origin": "https://evil.example"})  # fmt: skip
    assert status == 403 and json.loads(answer)["error"]["code"] == "origin_not_allowed"
    # DNS rebinding: the attacker's name, pointed at this server.
    status, _, answer = _request(
        url, "POST", path, body, {**json_headers, "Host": f"evil.example:{own.split(':')[1]}"}
    )
    assert status == 400 and json.loads(answer)["error"]["code"] == "host_not_allowed"
    status, _, answer = _request(url, "GET", "/v1/models", None, {"Host": "evil.example"})
    assert status == 400
    for headers in (json_headers, {**json_headers, "Origin": url},
                    {**json_headers, "Origin": "https://app.example"},
                    {**json_headers, "Host": "llava.lan:8000"},
                    {**json_headers, "Host": "localhost"}):  # fmt: skip
        status, _, answer = _request(url, "POST", path, body, headers)
        assert status == 200, (headers, answer)
    with _connect(url) as s:  # HTTP/1.0 without Host: not a browser
        s.sendall(b"POST %s HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d"
                  b"\r\n\r\n%s" % (path.encode(), len(body), body))  # fmt: skip
        assert _closed_within(s, 60).startswith(b"HTTP/1.1 200")


def test_page_security_headers(serve):
    status, headers, _ = _request(serve(), "GET", "/", None, {"Host": "127.0.0.1"})
    assert status == 200
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY"


# -- 5. remote images -------------------------------------------------------------------------


class _Listener:
    """A TCP server on 127.0.0.1 that counts connections and answers each with `reply(conn)`."""

    def __init__(self, reply):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            try:
                self.reply(conn)
            except OSError:
                pass

    def close(self):
        self.sock.close()


def _banner(conn):
    conn.sendall(b"220 secret-ftpd 1.0 ready\r\n")
    time.sleep(1)


def _trickle(conn):
    conn.recv(4096)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10000\r\n\r\n")
    end = time.monotonic() + 6
    while time.monotonic() < end:  # one byte now and then: each read is quick, the whole is not
        conn.sendall(b"x")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """An HTTP server on 127.0.0.1: /cat.png, and redirects under /to?url."""
    root = tmp_path_factory.mktemp("www")
    (root / "cat.png").write_bytes(png_bytes(5))
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path.startswith("/to?"):
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/to?"))
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    handler = functools.partial(Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()


def _image_at(url: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}


LOOPBACK = ("127.0.0.1/32",)


def test_remote_images_only_from_public_addresses(serve, web):
    base, hits = web
    hits.clear()
    status, answer = post(serve(allow_remote_images=True), _image_at(base + "/cat.png"))
    assert status == 400 and answer["error"]["code"] == "image_fetch_failed", answer
    assert hits == [], "the server fetched from a loopback address"
    status, answer = post(serve(allow_remote_images=True, fetch_networks=LOOPBACK),
                          _image_at(base + "/cat.png"))  # fmt: skip
    assert status == 200, answer


def test_redirects_are_checked_at_every_hop(serve, web):
    base, hits = web
    url = serve(allow_remote_images=True, fetch_networks=LOOPBACK)
    port = base.rsplit(":", 1)[1]
    ftp = _Listener(_banner)
    try:
        hits.clear()
        # 0.0.0.0 reaches this machine's own services on Linux; ftp:// is not http(s).
        for target in (f"http://0.0.0.0:{port}/cat.png", f"ftp://127.0.0.1:{ftp.port}/cat.png"):
            status, answer = post(url, _image_at(f"{base}/to?{target}"))
            assert status == 400 and answer["error"]["code"] == "image_fetch_failed", answer
        assert len(hits) == 2 and all(h.startswith("/to?") for h in hits), hits
        assert ftp.connections == 0, "a redirect reached the ftp listener"
        status, answer = post(url, _image_at(f"{base}/to?{base}/cat.png"))
        assert status == 200, answer
    finally:
        ftp.close()


def test_fetch_failures_look_alike(serve):
    url = serve(allow_remote_images=True, fetch_networks=LOOPBACK)
    banner = _Listener(_banner)
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    try:
        messages = []
        for target in (f"http://127.0.0.1:{banner.port}/x.png", f"http://127.0.0.1:{closed_port}/x.png",
                       "http://127.0.0.1:99999/x.png"):  # fmt: skip
            status, answer = post(url, _image_at(target))
            assert status == 400 and answer["error"]["code"] == "image_fetch_failed", answer
            messages.append(answer["error"]["message"].replace(target, "URL"))
        assert len(set(messages)) == 1, messages
        assert "220" not in messages[0] and "secret" not in messages[0]
    finally:
        banner.close()


def test_remote_fetch_is_bounded_in_time(serve):
    url = serve(allow_remote_images=True, fetch_networks=LOOPBACK, fetch_timeout_s=1.0)
    slow = _Listener(_trickle)
    try:
        start = time.monotonic()
        status, answer = post(url, _image_at(f"http://127.0.0.1:{slow.port}/slow.png"))
        took = time.monotonic() - start
        assert status == 400 and answer["error"]["code"] == "image_fetch_failed", answer
        assert took < 4, f"a 1 s fetch timeout took {took:.1f} s"
    finally:
        slow.close()


def test_a_slow_name_lookup_ends_at_the_fetch_timeout(monkeypatch):
    """The system resolver takes no timeout; a lookup that hangs still ends the fetch on
    time, with the same one message as any other failure."""
    from llava_jax.serve import fetch
    from llava_jax.serve.errors import APIError

    monkeypatch.setattr(fetch, "_resolve", lambda host, port: time.sleep(5) or [])
    fetcher = fetch.Fetcher(ServeConfig(allow_remote_images=True, fetch_timeout_s=0.5))
    start = time.monotonic()
    with pytest.raises(APIError, match="cannot fetch the image at"):
        fetcher.fetch("http://slow-dns.example/cat.png")
    assert time.monotonic() - start < 2.5


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


# -- 8. API keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, env", [("", None), (None, ""), (" sekrit", None),
                                        ("s\u00e9krit", None), (None, "sekrit\n")])  # fmt: skip
def test_unusable_api_keys_are_refused_at_start(flag, env, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LLAVA_JAX_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("LLAVA_JAX_API_KEY", env)
    argv = ["serve", "--model", str(tmp_path)] + ([] if flag is None else ["--api-key", flag])
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "API key" in error and ("--api-key" in error or "LLAVA_JAX_API_KEY" in error), error
    with pytest.raises(ValueError, match="API key"):
        ServeConfig(api_key=flag if flag is not None else env)


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
