"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for the tests: it plays the
judge or the instruction generator with canned deterministic replies, and fails on request
(429s, 500s, 401s) so that retries, backoff and auth errors are exercised over real HTTP."""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeLLM:
    """Start with `with FakeLLM(reply) as llm:`; `llm.base_url` is the API root.

    Args:
      reply: request body -> reply text.
      key: when set, requests must carry `Authorization: Bearer KEY` or get a 401.
    Attributes:
      failures: marker -> list of HTTP statuses; the n-th request whose last message contains
        the marker gets the n-th status (then normal replies).
      requests: every request body received (any route, any key), in order.
    """

    def __init__(self, reply: Callable[[dict], str], key: str | None = None):
        self.reply, self.key = reply, key
        self.failures: dict[str, list[int]] = {}
        self.requests: list[dict] = []
        self.retry_after: str | None = None
        self._seen: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _status_for(self, body: dict) -> int:
        last = body["messages"][-1]["content"]
        with self._lock:
            for marker, statuses in self.failures.items():
                if marker in last:
                    n = self._seen[marker]
                    self._seen[marker] += 1
                    if n < len(statuses):
                        return statuses[n]
        return 200

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: dict, headers=()):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                if fake.key is not None and self.headers.get("Authorization") != (
                    f"Bearer {fake.key}"
                ):
                    return self._send(401, {"error": {"message": "Incorrect API key provided"}})
                status = fake._status_for(body)
                if status != 200:
                    headers = [("Retry-After", fake.retry_after)] if fake.retry_after else []
                    return self._send(status, {"error": {"message": f"status {status}"}}, headers)
                text = fake.reply(body)
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                })  # fmt: skip

        return Handler
