"""Errors that reach a client, rendered in OpenAI's error shape.

    ArbstrError                 status, type, code, message, param, extra headers
    ├── ConfigError             startup only: names the file, the key and the fix (never an HTTP answer)

Every HTTP error leaves arbstr as ``{"error": {"message", "type", "param", "code"}}`` through
:func:`ArbstrError.body`; the web layer renders it in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ArbstrError(Exception):
    """A failure with the HTTP status and OpenAI ``type``/``code`` a client should see."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self, scrub: Callable[[str], str] | None = None) -> dict[str, Any]:
        """The OpenAI error body; ``scrub`` is applied to every text field (an upstream 4xx passed
        through brings its own message, type, param and code, and a provider may quote its key in any)."""
        fields = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if scrub is not None:
            fields = {k: scrub(v) if isinstance(v, str) else v for k, v in fields.items()}
        return {"error": fields}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> ArbstrError:
    return ArbstrError(400, message, code=code, param=param)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which file, which key, and how to fix it."""
