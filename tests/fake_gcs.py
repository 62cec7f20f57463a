"""A fake Google Cloud Storage for tests: `gs://` paths with no network and no local path.

Two clients read `gs://` in llava-jax, and the fake serves both from one in-memory store:

  * etils.epath, which without TensorFlow goes through fsspec's `gcs` protocol (gcsfs in
    production): here an fsspec `MemoryFileSystem` registered as `gs` / `gcs`;
  * ArrayRecord's C++ reader (riegeli's `GcsReader` on the google-cloud-cpp client), which
    talks to `CLOUD_STORAGE_EMULATOR_ENDPOINT` when it is set: here a local HTTP server
    answering the JSON API's object download, `GET /storage/v1/b/BUCKET/o/OBJECT?alt=media`
    with a `Range` header (the only request the reader makes).

Nothing is written to the local disk under a `gs:` name, so a local path cannot pass for a
remote one: `gs://b/x` is found only if it was written through the remote path.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import re
import threading
import urllib.parse

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


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
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (the http.server name)
        url = urllib.parse.urlsplit(self.path)
        match = re.fullmatch(r"/storage/v1/b/([^/]+)/o/([^/]+)", url.path)
        key = match and f"/{match[1]}/{urllib.parse.unquote(match[2])}"
        if not key or key not in FakeGcsFileSystem.store:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = FakeGcsFileSystem.store[key].getvalue()
        start, end = 0, len(data) - 1
        if rng := self.headers.get("range"):  # bytes=A-B, bytes=A- or bytes=-N
            first, last = rng.removeprefix("bytes=").split("-")
            if first:
                start, end = int(first), min(end, int(last)) if last else end
            else:
                start = max(0, len(data) - int(last))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start : end + 1]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@functools.cache
def _endpoint() -> str:
    """Starts the HTTP side once per process: the C++ client may keep the first endpoint."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def fake_gcs(monkeypatch):
    """An empty fake GCS for the test; `gs://` paths go to it. Yields `objects`."""
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", _endpoint())
    monkeypatch.setattr(FakeGcsFileSystem, "store", {})
    monkeypatch.setattr(FakeGcsFileSystem, "pseudo_dirs", [""])
    registry = importlib.import_module("fsspec.registry")._registry  # undone after the test
    for protocol in FakeGcsFileSystem.protocol:
        monkeypatch.setitem(registry, protocol, FakeGcsFileSystem)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the instance
    yield objects
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
