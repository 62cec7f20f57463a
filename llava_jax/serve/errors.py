"""Errors a client sees as OpenAI does: a 4xx/5xx status and
`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client; the server goes on serving.

    Args:
      status: the HTTP status.
      message: one line saying what was wrong and what is accepted.
      code: a machine-readable reason (`invalid_image`, `context_length_exceeded`, ...).
      param: the request field at fault, if one is.
    """

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 404:
            return "not_found_error"
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    """A 400 for a request that cannot be served as written."""
    return APIError(400, message, code, param)
