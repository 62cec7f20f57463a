"""Fetching a remote image (`--allow-remote-images`) without becoming a proxy into the
server's own network.

Every hop (the URL and each redirect) must be http or https and resolve to public addresses
only (or to `fetch_networks` the operator allowed); the connection goes to the address that was
checked, so a name cannot resolve differently between check and connect. The whole fetch,
name lookups and redirects included, ends at `fetch_timeout_s` (a timer shuts the socket, so
a server trickling bytes cannot stretch it) and at `max_body_bytes`; at most `max_fetches`
run at once. Every
failure is one message to the client, so the server cannot be used to tell closed ports from
open ones or to read other services' banners; the cause goes to the log.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse

from llava_jax.serve.config import ServeConfig
from llava_jax.serve.errors import APIError, invalid

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 1024


class _Refused(Exception):
    """Why a fetch failed; logged, never sent to the client."""


class Fetcher:
    """Fetches remote images under `cfg`'s limits; shared by every request of a server."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.networks = [ipaddress.ip_network(n, strict=False) for n in cfg.fetch_networks]
        self._slots = threading.BoundedSemaphore(cfg.max_fetches)
        # The system resolver takes no timeout: lookups run here, waited on until the deadline.
        self._lookups = concurrent.futures.ThreadPoolExecutor(cfg.max_fetches, "image-dns")

    def fetch(self, url: str) -> bytes:
        """The image's bytes, or `APIError` (400 `image_fetch_failed`, 413 when too large)."""
        deadline = time.monotonic() + self.cfg.fetch_timeout_s
        try:
            if not self._slots.acquire(timeout=self.cfg.fetch_timeout_s):
                raise _Refused(f"{self.cfg.max_fetches} fetches were running for the whole timeout")
            try:
                return self._follow(url, deadline)
            finally:
                self._slots.release()
        except (_Refused, OSError, ValueError, http.client.HTTPException) as e:
            log.info("image fetch %s failed: %s: %s", url, type(e).__name__, e)
            raise invalid(f"cannot fetch the image at {url[:200]}", "image_url",
                          "image_fetch_failed") from None  # fmt: skip

    def _follow(self, url: str, deadline: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, data = self._get(url, deadline)
            if status in REDIRECTS and location:
                url = urllib.parse.urljoin(url, location)
                continue
            if status != 200:
                raise _Refused(f"HTTP status {status}")
            return data
        raise _Refused(f"more than {MAX_REDIRECTS} redirects")

    def _address(self, host: str, port: int, deadline: float) -> str:
        """The address to connect to: every address `host` resolves to must be allowed."""
        lookup = self._lookups.submit(_resolve, host, port)
        try:
            infos = lookup.result(timeout=_left(deadline))
        except concurrent.futures.TimeoutError:
            raise _Refused(f"looking up {host} timed out") from None
        addresses = [info[4][0] for info in infos]
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip
            public = ip.is_global and not ip.is_multicast
            if not public and not any(ip in n for n in self.networks):
                raise _Refused(f"{host} resolves to {ip}, not a public address")
        return addresses[0]

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        """One hop: (status, Location, body of a 200)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Refused(f"scheme {parts.scheme!r} or host missing")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        sock = socket.create_connection((self._address(parts.hostname, port, deadline), port),
                                        timeout=_left(deadline))  # fmt: skip
        # Shutting the socket at the deadline ends any read in progress, however slow the peer.
        held = [sock]  # the TLS socket replaces the plain one, whose descriptor it takes
        timer = threading.Timer(_left(deadline), lambda: _shutdown(held[0]))
        timer.start()
        try:
            if parts.scheme == "https":
                context = ssl.create_default_context()
                sock = held[0] = context.wrap_socket(sock, server_hostname=parts.hostname)
            connection = http.client.HTTPConnection(parts.hostname, port, timeout=_left(deadline))
            connection.sock = sock
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            headers = {"User-Agent": "llava-jax", "Accept": "image/*"}
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                return response.status, response.getheader("Location"), b""
            chunks, size = [], 0
            while chunk := response.read1(CHUNK):
                size += len(chunk)
                if size > self.cfg.max_body_bytes:
                    raise APIError(413, f"the image at {url[:200]} is over "
                                   f"{self.cfg.max_body_bytes} bytes", "image_too_large",
                                   "image_url")  # fmt: skip
                chunks.append(chunk)
            _left(deadline)  # the timer's shutdown ends the loop as the end of the file would
            return 200, None, b"".join(chunks)
        finally:
            timer.cancel()
            sock.close()


def _resolve(host: str, port: int) -> list:
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Refused("timed out")
    return left


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
