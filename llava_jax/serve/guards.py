"""Who may call the server from a browser, and the page's security headers.

Any web page a user visits can POST to a server on their machine: a "simple" request
(`Content-Type: text/plain`, any `Origin`) needs no CORS preflight, so generation runs even
though the page cannot read the answer; and with DNS rebinding (the page's own name re-pointed
at 127.0.0.1) it can read it too. So every request passes `Guard`:

- `Host`, when sent, must be an IP address, `localhost`, or one of `allowed_hosts` (a
  rebound name is not);
- `Origin`, when a browser sends one, must be the server's own (its `Host`) or one of
  `allowed_origins`;
- a POST body must be `application/json`, which a foreign page can only send after a CORS
  preflight this server never approves.

Every response carries a strict Content-Security-Policy (the page has no inline script or
style), `X-Content-Type-Options: nosniff` and frame protection.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from llava_jax.serve.config import ServeConfig
from llava_jax.serve.errors import APIError

SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
     b"img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
     b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip


def _hostname(host: str) -> str:
    """`host[:port]` or `[v6][:port]` -> the name or address alone."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def refusal(method: str, headers: Headers, cfg: ServeConfig) -> APIError | None:
    """Why a request may not be served, or None."""
    host = headers.get("host", "")
    name = _hostname(host).lower()
    # No Host at all is an HTTP/1.0 client, not a browser (browsers always send one).
    if host and not (name == "localhost" or _is_address(name) or name in cfg.allowed_hosts
                     or "*" in cfg.allowed_hosts):  # fmt: skip
        return APIError(400, f"Host {host[:100]!r} is not served here (an IP address, localhost "
                        "or --allowed-hosts)", "host_not_allowed")  # fmt: skip
    origin = headers.get("origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc != host:
        if origin not in cfg.allowed_origins and "*" not in cfg.allowed_origins:
            return APIError(403, f"Origin {origin[:100]!r} may not call this server (see "
                            "--allowed-origins)", "origin_not_allowed")  # fmt: skip
    if method == "POST":
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            return APIError(415, f"the request body must be Content-Type: application/json, "
                            f"got {kind[:100]!r}", "unsupported_media_type")  # fmt: skip
    return None


class Guard:
    """ASGI middleware: refuses what `refusal` refuses and adds `SECURITY_HEADERS`."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = refusal(scope["method"], Headers(scope=scope), self.cfg)
        if error is not None:
            response = JSONResponse(error.body(), status_code=error.status)
            response.raw_headers.extend(SECURITY_HEADERS)
            return await response(scope, receive, send)

        async def send_secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_secured)
