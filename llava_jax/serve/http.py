"""The uvicorn side: an HTTP/1.1 protocol that closes connections slow to send headers.

uvicorn bounds only the idle time between keep-alive requests, not the time a client takes to
send a request's headers: a client trickling a header line every few seconds holds its
connection (and a file descriptor) for ever. `HeaderTimeoutH11` starts a clock when a
connection opens and after each response, and closes the connection if a complete request
head has not arrived when it runs out. The body's deadline is the app's (`app.py`).
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llava_jax.serve.config import ServeConfig


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head."""

    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._header_clock: asyncio.TimerHandle | None = None
        self._start_header_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_header_clock()

    def connection_lost(self, exc) -> None:
        if self._header_clock is not None:
            self._header_clock.cancel()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        if self._header_clock is not None:
            self._header_clock.cancel()
        self._header_clock = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        # IDLE: no complete request head since the clock started (idle or trickling).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, cfg: ServeConfig, host: str, port: int) -> uvicorn.Config:
    """uvicorn's config for `app`: h11 with `cfg.header_timeout_s` on request heads, and 503
    beyond `cfg.max_connections` open connections."""
    protocol = type("HeaderTimeoutH11", (HeaderTimeoutH11,),
                    {"header_timeout_s": cfg.header_timeout_s})  # fmt: skip
    return uvicorn.Config(app, host=host, port=port, http=protocol, log_level="warning",
                          limit_concurrency=cfg.max_connections)  # fmt: skip
