"""`llava-jax serve` against cross-site requests and remote image fetches (issue 20), over HTTP
on 127.0.0.1: origins, hosts (DNS rebinding) and the page's security headers; images fetched
only from allowed addresses, every redirect checked, failures alike and bounded in time; API
keys that cannot work refused at start."""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
import time

import pytest
from serve_hardening_helpers import _ask, _closed_within, _connect, _image_at, _request
from serve_helpers import png_bytes, post

from llava_jax.cli.main import main
from llava_jax.serve import ServeConfig

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
