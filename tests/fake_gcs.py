"""A fake Google Cloud Storage for tests: `gs://` paths with no network and no local path.

Two clients read `gs://` in llava-jax, and the fake serves both from one in-memory store:

  * etils.epath, which without TensorFlow goes through fsspec's `gcs` protocol (gcsfs in
    production): here an fsspec `MemoryFileSystem` registered as `gs` / `gcs`;
  * ArrayRecord's C++ reader (riegeli's `GcsReader` on the google-cloud-cpp client), which
    talks to `CLOUD_STORAGE_EMULATOR_ENDPOINT` when it is set, and TensorStore's `gcs`
    kvstore (orbax's arrays), which talks to `TENSORSTORE_GCS_HTTP_URL`: here a local HTTP
    server answering the JSON API requests they make (object download with a `Range`,
    metadata, listing, media upload with `ifGenerationMatch`, delete).

Nothing is written to the local disk under a `gs:` name, so a local path cannot pass for a
remote one: `gs://b/x` is found only if it was written through the remote path.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import itertools
import json
import re
import sys
import threading
import types
import urllib.parse

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem


class FakeGcsFileSystem(MemoryFileSystem):
    """`gs://BUCKET/OBJECT` kept in memory as `/BUCKET/OBJECT`."""

    protocol = ("gs", "gcs")
    store: dict = {}  # its own, not MemoryFileSystem's
    pseudo_dirs: list = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        path = path.strip("/")
        return "/" + path if path else ""


def objects() -> dict[str, bytes]:
    """Every object in the fake, as `gs://BUCKET/OBJECT` -> bytes."""
    return {f"gs:/{k}": v.getvalue() for k, v in FakeGcsFileSystem.store.items()}


class _Handler(http.server.BaseHTTPRequestHandler):
    """The JSON API as ArrayRecord's reader and TensorStore's `gcs` kvstore use it."""

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes = b"", headers=()):
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value) -> None:
        self._reply(200, json.dumps(value).encode(), [("Content-Type", "application/json")])

    def _route(self):
        """(key "/BUCKET/OBJECT" or None, bucket, query)."""
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if match := re.fullmatch(r"/storage/v1/b/([^/]+)/o/([^/]+)", url.path):
            return f"/{match[1]}/{urllib.parse.unquote(match[2])}", match[1], query
        if match := re.fullmatch(r"/(?:upload/)?storage/v1/b/([^/]+)/o", url.path):
            return None, match[1], query
        return None, None, query

    def do_GET(self):  # noqa: N802 (the http.server name)
        key, bucket, query = self._route()
        store = FakeGcsFileSystem.store
        if key is None and bucket is not None:  # a listing, by prefix or by key range
            low = f"/{bucket}/" + query.get("prefix", query.get("startOffset", ""))
            high = query.get("endOffset")
            names = sorted(k for k in store if k.startswith(f"/{bucket}/") and k >= low)
            if "prefix" in query:
                names = [k for k in names if k.startswith(low)]
            if high is not None:
                names = [k for k in names if k < f"/{bucket}/{high}"]
            return self._json({"items": [_metadata(k) for k in names]})
        if key not in store:
            return self._reply(404, b'{"error": {"code": 404}}')
        if query.get("alt") != "media":
            return self._json(_metadata(key))
        data = store[key].getvalue()
        start, end = 0, len(data) - 1
        headers = [("x-goog-generation", str(_generation(key)))]
        if rng := self.headers.get("range"):  # bytes=A-B, bytes=A- or bytes=-N
            first, last = rng.removeprefix("bytes=").split("-")
            if first:
                start, end = int(first), min(end, int(last)) if last else end
            else:
                start = max(0, len(data) - int(last))
            headers.append(("Content-Range", f"bytes {start}-{end}/{len(data)}"))
            return self._reply(206, data[start : end + 1], headers)
        return self._reply(200, data, headers)

    def do_POST(self):  # noqa: N802
        _, bucket, query = self._route()
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if bucket is None or query.get("uploadType") != "media":
            return self._reply(400)
        key = f"/{bucket}/{query['name']}"
        if "ifGenerationMatch" in query:  # 0: only if absent
            current = _generation(key) if key in FakeGcsFileSystem.store else 0
            if int(query["ifGenerationMatch"]) != current:
                return self._reply(412)
        FakeGcsFileSystem.store[key] = MemoryFile(None, key, body)
        _GENERATIONS[key] = next(_COUNTER)
        return self._json(_metadata(key))

    def do_DELETE(self):  # noqa: N802
        key, _, _ = self._route()
        if key not in FakeGcsFileSystem.store:
            return self._reply(404)
        del FakeGcsFileSystem.store[key]
        return self._reply(204)


_COUNTER = itertools.count(1)
_GENERATIONS: dict[str, int] = {}


def _generation(key: str) -> int:
    """An object's generation: new with each write through the HTTP side."""
    return _GENERATIONS.setdefault(key, next(_COUNTER))


def _metadata(key: str) -> dict:
    bucket, name = key[1:].split("/", 1)
    size = len(FakeGcsFileSystem.store[key].getvalue())
    generation = str(_generation(key))
    return {"bucket": bucket, "name": name, "size": str(size), "generation": generation}


@functools.cache
def _endpoint() -> str:
    """Starts the HTTP side once per process: the C++ client may keep the first endpoint."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def fake_gcs(monkeypatch):
    """An empty fake GCS for the test; `gs://` paths go to it. Yields `objects`."""
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", _endpoint())  # ArrayRecord
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", _endpoint())  # orbax's arrays
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake")  # TensorStore's credentials
    monkeypatch.setattr(FakeGcsFileSystem, "store", {})
    monkeypatch.setattr(FakeGcsFileSystem, "pseudo_dirs", [""])
    monkeypatch.setitem(globals(), "_GENERATIONS", {})
    # orbax asks the google-cloud-storage client (gcsfs's dependency) whether a bucket has a
    # hierarchical namespace; the fake's buckets are flat.
    flat = types.SimpleNamespace(hierarchical_namespace_enabled=False)
    client = types.SimpleNamespace(get_bucket=lambda name: flat)
    storage = types.ModuleType("google.cloud.storage")
    storage.Client = lambda *args, **kwargs: client
    monkeypatch.setitem(sys.modules, "google.cloud.storage", storage)
    registry = importlib.import_module("fsspec.registry")._registry  # undone after the test
    for protocol in FakeGcsFileSystem.protocol:
        monkeypatch.setitem(registry, protocol, FakeGcsFileSystem)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the instance
    yield objects
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
