"""Debug capture (README "Debug capture"): what one request sent and got, kept only when [debug] asks.

Off by default, and free when off: a :class:`~.chat.ChatRequest` then holds no :class:`Capture`, and
every hook is one ``is not None`` test. When on, the hooks keep references to bytes the request holds
anyway (the client's body, each upstream body, a non-streaming answer) and copy only a stream's bytes,
up to ``max_bytes``. The stored document is built once, at the request's end (:meth:`Capture.row`):
every part is scrubbed of every secret, then cut at ``max_bytes``, before it is queued for the writer.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..secrets import Secret

HEADER = "X-Arbstr-Debug"
# Request headers that carry a credential: stored masked, as /providers shows keys (``cashuA...***``).
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key"})

Scrub = Callable[[str], str]


def off_reason(config: Config) -> str | None:
    """Why no request is captured, or None when capture is on."""
    if not config.debug.enabled:
        return "debug capture is off ([debug] enabled = false)"
    if not config.logging.log_requests:
        return "debug capture is off: [logging] log_requests = false stores nothing"
    return None


def wanted(config: Config, headers: Mapping[str, str]) -> bool:
    """Is this request captured: capture on, for every request or for this one's ``X-Arbstr-Debug: true``."""
    debug = config.debug
    return debug.enabled and config.logging.log_requests and (
        debug.capture == "all" or headers.get(HEADER, "").strip().lower() == "true")


@dataclass
class Attempt:
    """One upstream attempt: what was sent, what came back, how it ended."""

    provider: str
    url: str
    body: bytes  # as sent
    limit: int  # how much of a stream is kept
    headers: Mapping[str, str] | None = None  # as sent; None when no connection was made
    status: int | None = None
    answer_headers: Mapping[str, str] | None = None
    answer: bytes | None = None  # a whole answer (or error body)
    stream: bytearray | None = None  # a stream's bytes as received, up to ``limit``
    more: bool = False  # the stream sent more than was kept
    outcome: str | None = None  # the failure table's verdict ("ok", "server_error", …)
    error: str | None = None

    def response(self, headers: Mapping[str, str] | None, status: int, answer_headers: Mapping[str, str]) -> None:
        """The provider answered (headers as sent, then its status and headers)."""
        self.headers, self.status, self.answer_headers = headers, status, answer_headers

    def feed(self, data: bytes) -> None:
        """Stream bytes as received; past ``limit`` only the fact that more came is kept."""
        if self.stream is None:
            self.stream = bytearray()
        room = self.limit - len(self.stream)
        if len(data) > room:
            self.more = True
            data = data[:room]
        self.stream += data

    def ended(self, outcome: str, status: int | None, error: str | None) -> None:
        self.outcome = outcome
        self.status = self.status if status is None else status
        self.error = None if outcome == "ok" else error or None


class Capture:
    """One request's capture: the client's request and each upstream attempt, in order.

    Attempts of a non-streaming request are recorded on the retry loop's executor thread, and one that
    the deadline abandoned may still record while the request thread builds the row: the list is
    guarded, and each attempt's fields are only ever replaced whole.
    """

    def __init__(self, max_bytes: int, path: str, body: bytes) -> None:
        self.max_bytes = max_bytes
        self.path = path
        self.body = body  # as the client sent it
        self._attempts: list[Attempt] = []
        self._lock = threading.Lock()

    def attempt(self, provider: str, url: str, body: bytes) -> Attempt:
        record = Attempt(provider, url, body, self.max_bytes)
        with self._lock:
            self._attempts.append(record)
        return record

    @property
    def last(self) -> Attempt:
        """The latest attempt: after a successful chain, the one that answered."""
        with self._lock:
            return self._attempts[-1]

    def row(self, request_id: str, timestamp: str, scrub: Scrub) -> dict[str, Any]:
        """The ``debug_captures`` row: every part scrubbed, each body cut at ``max_bytes``."""
        with self._lock:
            attempts = list(self._attempts)
        try:
            return self._row(request_id, timestamp, attempts, _Parts(self.max_bytes, scrub, parse=True))
        except RecursionError:  # a body nested too deep to be written inside the document: keep it as text
            return self._row(request_id, timestamp, attempts, _Parts(self.max_bytes, scrub, parse=False))

    def _row(self, request_id: str, timestamp: str, attempts: list[Attempt], parts: _Parts) -> dict[str, Any]:
        scrub = parts.scrub
        document = {
            "request": {"path": scrub(self.path), "body": parts.body(self.body)},
            "attempts": [parts.attempt(a) for a in attempts],
        }
        # A lone surrogate (a JSON escape in a body) becomes its escape again: SQLite takes only UTF-8.
        data = _dumps(document).encode("utf-8", "backslashreplace")
        return {"request_id": request_id, "timestamp": timestamp, "capture": data.decode("utf-8"),
                "bytes": len(data), "truncated": int(parts.truncated)}


class _Parts:
    """Turns what was captured into what is stored: scrubbed, bodies parsed when JSON, cut at ``limit``."""

    def __init__(self, limit: int, scrub: Scrub, *, parse: bool) -> None:
        self.limit = limit
        self.scrub = scrub
        self.parse = parse
        self.truncated = False

    def attempt(self, a: Attempt) -> dict[str, Any]:
        scrub = self.scrub
        entry: dict[str, Any] = {
            "provider": a.provider,
            "url": scrub(a.url),
            "request": {"headers": self.headers(a.headers), "body": self.body(a.body)},
            "outcome": a.outcome,
            "status": a.status,
        }
        if a.error is not None:
            entry["error"] = scrub(a.error)
        if a.answer_headers is not None:
            if a.stream is not None:
                body = self.body(bytes(a.stream), parse=False, more=a.more)
            else:
                body = None if a.answer is None else self.body(a.answer)
            entry["answer"] = {"status": a.status, "headers": self.headers(a.answer_headers), "body": body}
        return entry

    def headers(self, headers: Mapping[str, str] | None) -> dict[str, str] | None:
        if headers is None:
            return None
        return {self.scrub(k): _masked(v) if k.lower() in CREDENTIAL_HEADERS else self.scrub(v)
                for k, v in headers.items()}

    def body(self, raw: bytes, *, parse: bool = True, more: bool = False) -> Any:
        """The body as JSON when it is JSON and fits, else as text, scrubbed; text past ``limit`` is cut."""
        limit = self.limit
        cut = more or len(raw) > limit
        text = self.scrub(raw[:limit].decode("utf-8", "replace"))  # scrubbing a cut key: its fragment rule
        if parse and self.parse and not cut and (parsed := _json(text)) is not None:
            if (clean := self.scrub(parsed[1])) != parsed[1]:  # a JSON escape spelled out what the scrub missed
                text, parsed = clean, _json(clean)
            if parsed is not None and len(parsed[1].encode("utf-8", "backslashreplace")) <= limit:
                return parsed[0]
        data = text.encode("utf-8", "backslashreplace")
        if len(data) > limit:  # invalid bytes became U+FFFD, or a short secret became [REDACTED]
            text, cut = data[:limit].decode("utf-8", "ignore"), True
        self.truncated |= cut
        return text


def _masked(value: str) -> str:
    """``Bearer cashuAbcdef…`` → ``Bearer cashuA...***``."""
    scheme, _, credential = value.rpartition(" ")
    masked = Secret(credential).masked()
    return f"{scheme} {masked}" if scheme else masked


def _json(text: str) -> tuple[Any, str] | None:
    """The JSON value and its compact form, or None; NaN and infinities are refused (not JSON again)."""
    try:
        value = json.loads(text, parse_constant=_refuse, parse_float=_finite)
        return value, _dumps(value)
    except (ValueError, RecursionError):
        return None


def _refuse(constant: str) -> Any:
    raise ValueError(constant)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
