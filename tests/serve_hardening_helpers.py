"""Raw-socket and request helpers for the `llava-jax serve` hardening tests
(tests/test_serve_hardening_*.py): requests with exactly the bytes and headers a test names."""

from __future__ import annotations

import http.client
import socket
import time

from serve_helpers import MODEL, QUESTIONS, user


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


def _image_at(url: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    return {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": parts}]}
