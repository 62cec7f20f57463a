"""A client for OpenAI-compatible chat completions (a hosted model, or a local vLLM / SGLang
server), on the standard library only.

- `POST {base_url}/chat/completions` with `{"model", "messages", ...}`; the key comes from an
  environment variable (never a file), sent as `Authorization: Bearer ...` when set.
- Retries with exponential backoff on the statuses that may pass (408, 429 and every 5xx but
  501 and 505) and on connection errors (a `Retry-After` header, when given, is honoured up to
  the backoff cap). 401 / 403 stop everything with one line that names the variable to set;
  any other 4xx fails that request at once.
- A disk cache keyed by the SHA-256 of the request (URL and body): a rerun sends nothing it
  already has an answer for. Only successful replies are cached.
- `map` runs requests on a bounded thread pool and yields results as they complete; closing
  it early stops the requests still retrying.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import socket
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def is_transient(status: int) -> bool:
    """Whether an HTTP status may pass on a retry: 408 (timeout), 429 (rate limit) and the 5xx
    but 501 (Not Implemented) and 505 (HTTP Version Not Supported), which never do."""
    return status in (408, 429) or (500 <= status < 600 and status not in (501, 505))


class LLMError(RuntimeError):
    """A request that failed for good (after retries, or a 4xx other than auth).

    Attributes:
      transient: the cause may pass on its own (a rate limit, an overloaded server, a
        timeout); False for a refused connection, an unknown host, a 4xx, a malformed reply.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class LLMAuthError(PermissionError):
    """401 / 403: the key is missing or wrong. An OSError, so the CLI prints one line."""


Messages = Sequence[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Reply:
    """The outcome of one request of a `map`: `text` on success, else `error` (and whether
    its cause may pass, `LLMError.transient`)."""

    index: int
    text: str | None = None
    error: str | None = None
    cached: bool = False
    transient: bool = False


class ChatClient:
    """Chat completions against one endpoint and model.

    Args:
      base_url: e.g. `https://api.openai.com/v1` or `http://localhost:8000/v1`.
      model: the model name the endpoint expects.
      api_key_env: the environment variable holding the key (unset: no Authorization header,
        fine for a local server).
      cache_dir: where replies are cached (None: no cache).
      concurrency: requests in flight at most.
      max_retries: retries after the first try, for 408 / 429 / 5xx / connection errors.
      backoff_s: the first retry's delay; it doubles each retry, up to `max_backoff_s`.
      timeout_s: per HTTP request.
      sleep: the delay function (tests pass a recorder); default: a wait that a closed `map`
        cuts short.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        cache_dir: str | os.PathLike | None = None,
        concurrency: int = 8,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        timeout_s: float = 120.0,
        sleep: Callable[[float], None] | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.api_key = os.environ.get(api_key_env) or None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.timeout_s = timeout_s
        self.sleep = sleep

    # -- one request -----------------------------------------------------------------------

    def body(self, messages: Messages, **params: Any) -> dict[str, Any]:
        """The JSON body; `params` (temperature, max_tokens, seed, ...) pass through as given."""
        return {"model": self.model, "messages": [dict(m) for m in messages], **params}

    def key(self, body: dict[str, Any]) -> str:
        canonical = json.dumps({"url": self.url, "body": body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def chat(self, messages: Messages, **params: Any) -> str:
        """The reply text of one chat completion (from the cache when there)."""
        text, _ = self._chat(self.body(messages, **params))
        return text

    def drop_cached(self, body: dict[str, Any]) -> None:
        """Forgets the cached reply to `body`, so that the next request really asks again."""
        path = self._cache_path(self.key(body))
        if path is not None:
            path.unlink(missing_ok=True)

    def _chat(self, body: dict[str, Any], stop: threading.Event | None = None) -> tuple[str, bool]:
        key = self.key(body)
        cached = self._cache_get(key)
        if cached is not None:
            return _content(cached, self.url), True
        response = self._post(body, stop or threading.Event())
        text = _content(response, self.url)
        self._cache_put(key, body, response)
        return text, False

    def _post(self, body: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, transient = "", False
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise LLMError(f"{self.url}: the reply is not JSON: {raw[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code in (401, 403):
                    hint = (f"set {self.api_key_env}" if not self.api_key
                            else f"check the key in {self.api_key_env}")  # fmt: skip
                    raise LLMAuthError(f"{self.url}: HTTP {e.code} {detail}; {hint}") from None
                if not is_transient(e.code):
                    raise LLMError(f"{self.url}: HTTP {e.code} {detail}") from None
                last, transient = f"HTTP {e.code} {detail}", True
                after = _retry_after(e.headers.get("Retry-After"))
                if after is not None:
                    delay = min(self.max_backoff_s, max(delay, after))
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError,
                    ConnectionError) as e:  # fmt: skip
                reason = getattr(e, "reason", e)
                # A refused connection or an unknown host is retried (a server may be
                # starting) but is not expected to pass; a reset or a timeout is.
                last = str(reason)
                transient = not isinstance(reason, (ConnectionRefusedError, socket.gaierror))
            if attempt < self.max_retries:
                self._wait(delay, stop)
            if stop.is_set():
                raise LLMError(f"{self.url}: cancelled ({last})", transient)
        raise LLMError(f"{self.url}: gave up after {self.max_retries + 1} tries ({last})",
                       transient)  # fmt: skip

    def _wait(self, delay: float, stop: threading.Event) -> None:
        if self.sleep is not None:
            self.sleep(delay)
        else:
            stop.wait(delay)

    # -- many requests ---------------------------------------------------------------------

    def map(self, bodies: Sequence[dict[str, Any]]) -> Iterator[Reply]:
        """Sends `bodies` (from `body()`), at most `concurrency` at once; yields a `Reply` per
        body as each completes. An auth error cancels the rest and is raised; closing the
        iterator early cancels the requests not yet sent and ends the retries of the others."""
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            futures = {pool.submit(self._chat, b, stop): i for i, b in enumerate(bodies)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    try:
                        text, cached = future.result()
                        yield Reply(i, text=text, cached=cached)
                    except LLMError as e:
                        yield Reply(i, error=str(e), transient=e.transient)
            finally:
                for f in futures:
                    f.cancel()
                stop.set()

    # -- cache -------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict[str, Any] | None:
        path = self._cache_path(key)
        if path is None or not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["response"]
        except (ValueError, KeyError):
            return None  # a damaged entry is asked again and overwritten

    def _cache_put(self, key: str, body: dict[str, Any], response: dict[str, Any]) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole then renamed, so a reader never sees half an entry.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"request": body, "response": response}, f, ensure_ascii=False)
        os.replace(tmp, path)


def _content(response: dict[str, Any], url: str) -> str:
    try:
        content = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise LLMError(f"{url}: no choices[0].message.content in the reply") from None
    if not isinstance(content, str):
        raise LLMError(f"{url}: choices[0].message.content is not text")
    return content


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.strip()
    return " ".join(str(message).split())[:300] or (error.reason or "")


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
