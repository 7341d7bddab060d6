"""One upstream attempt, non-streaming or streaming, turned into an :class:`AttemptResult`.

This is where an HTTP answer meets the failure table: status → verdict, unreadable body → verdict,
and the first SSE event of a stream is read so a provider that fails before its first byte can
still be failed over (SPEC §5.2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import requests

from ..config import Provider
from ..errors import ArbstrError
from . import failures
from .body import capped, encode
from .cost import REPORTED_HEADER
from .debug import Attempt, Capture
from .failures import AttemptResult, Verdict
from .relay import OpenStream
from .sse import EventSplitter, event_data, parse_json
from .upstream import Cutoff, Upstream, UpstreamError, finish, read_body, read_chunks, set_read_timeout

ERROR_BODY_LIMIT = 64 * 1024
STREAM_ERROR = Verdict("stream_error", retry_same=False, fallback=True, breaker=failures.FAILURE)


class Caller:
    """Binds the request's fixed parts (body, id, timeouts, secret scrubbing) for the retry loop."""

    def __init__(
        self,
        upstream: Upstream,
        body: bytes,
        parsed: dict[str, Any],
        request_id: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float | None = None,
        max_response_bytes: int,
        max_retry_after: float,
        scrub: Callable[[str], str],
        capture: Capture | None = None,
    ) -> None:
        self.upstream = upstream
        self.body = body  # as the client sent it (or as re-encoded for a stream)
        self.parsed = parsed
        self.request_id = request_id
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_response_bytes = max_response_bytes
        self.max_retry_after = max_retry_after
        self.scrub = scrub
        self.capture = capture  # debug capture of this request, if any
        self.cutoff = Cutoff()  # fired by the request thread when the deadline passes

    def _post(self, provider: Provider, body: bytes, left: float | None, stream: bool) -> requests.Response:
        """Send to ``provider``: the read timeout is its ``timeout_secs`` (a hung provider is left for
        the next candidate) or the caller's default, capped by the time left of the deadline."""
        connect, read = self.connect_timeout, self.read_timeout
        if provider.timeout_secs is not None:
            read = min(read, provider.timeout_secs)
        if left is not None:
            connect, read = min(connect, left), min(read, left)
        return self.upstream.post(
            provider, body, self.request_id, stream=stream, connect_timeout=connect, read_timeout=read,
            cutoff=self.cutoff,
        )

    def _body_for(self, provider: Provider) -> bytes:
        """The body for ``provider``: the client's bytes unchanged, unless its ``max_output_tokens`` is lower
        than what the client asked for (a 400 at many models, and the whole worst case reserved from a
        Routstr balance)."""
        lowered = capped(self.parsed, provider.max_output_tokens)
        return self.body if lowered is None else encode(lowered)

    def json(self, provider: Provider, left: float | None) -> AttemptResult:
        """A non-streaming attempt; on success ``payload`` is ``(status, body bytes, parsed body, the
        provider's reported-cost header or None)``.

        Firing :attr:`cutoff` ends it at once, wherever it is (see :class:`Cutoff`).
        """
        return self._attempt(provider, left, self._json)

    def stream(self, provider: Provider, left: float | None) -> AttemptResult:
        """A streaming attempt, read up to its first data event; ``payload`` is an :class:`OpenStream`."""
        return self._attempt(provider, left, self._stream)

    def _attempt(self, provider: Provider, left: float | None,
                 send: Callable[[Provider, bytes, float | None, Attempt | None], AttemptResult]) -> AttemptResult:
        """One attempt; under debug capture also recorded: what was sent, what came back, how it ended."""
        body = self._body_for(provider)
        if self.capture is None:
            return send(provider, body, left, None)
        record = self.capture.attempt(provider.name, provider.endpoint, body)
        result = send(provider, body, left, record)
        record.ended(result.verdict.kind, result.status, result.message)
        return result

    def _json(self, provider: Provider, body: bytes, left: float | None, record: Attempt | None) -> AttemptResult:
        cutoff = self.cutoff
        try:
            resp = self._post(provider, body, left, stream=False)
        except UpstreamError as e:
            return _out_of_time() if cutoff.fired else _transport_failure(e)
        if record is not None:
            _record_response(record, resp)
        try:
            if cutoff.fired:
                resp.close()
                return _out_of_time()
            if not 200 <= resp.status_code < 300:
                return self._http_failure(resp, record)
            answer = read_body(resp, self.max_response_bytes)
            if record is not None:
                record.answer = answer
            if cutoff.fired:
                resp.close()
                return _out_of_time()
            finish(resp)
        except UpstreamError as e:
            resp.close()
            return _out_of_time() if cutoff.fired else _transport_failure(e)
        parsed = _json_object(answer)
        if parsed is None:
            return AttemptResult(failures.BAD_BODY, resp.status_code, "answer is not a JSON object")
        reported = resp.headers.get(REPORTED_HEADER)
        return AttemptResult(failures.OK, resp.status_code, payload=(resp.status_code, answer, parsed, reported))

    def _stream(self, provider: Provider, body: bytes, left: float | None, record: Attempt | None) -> AttemptResult:
        """Its answer's bytes are recorded by the relay (``StreamContext.tap``), from the first byte read."""
        try:
            resp = self._post(provider, body, left, stream=True)
        except UpstreamError as e:
            return _transport_failure(e)
        if record is not None:
            _record_response(record, resp)
        if not 200 <= resp.status_code < 300:
            return self._http_failure(resp, record)
        chunks = read_chunks(resp)
        splitter = EventSplitter()
        held: list[bytes] = []
        try:
            for chunk in chunks:
                events = splitter.feed(chunk)
                for event in events:
                    data = event_data(event)
                    if data is None:
                        continue  # a comment (keep-alive): hold it and wait for real data
                    err = parse_json(data) if b'"error"' in data else None
                    if err is not None and "error" in err and "choices" not in err:
                        resp.close()
                        return AttemptResult(STREAM_ERROR, resp.status_code, self._message(err, data))
                    if provider.timeout_secs is not None and self.idle_timeout is not None:
                        set_read_timeout(resp, self.idle_timeout)  # the first event came: now silence is idleness
                    # Hold every event of this read, not just up to the first data event: one read
                    # often carries several events, and the relay starts after the held ones.
                    opened = OpenStream(resp, chunks, splitter, held + events)
                    return AttemptResult(failures.OK, resp.status_code, payload=opened, close=resp.close)
                held.extend(events)
        except UpstreamError as e:
            resp.close()
            return _transport_failure(e)
        resp.close()
        rest = splitter.pending()
        err = parse_json(rest)
        if err is not None and "error" in err:
            return AttemptResult(STREAM_ERROR, resp.status_code, self._message(err, rest))
        return AttemptResult(failures.BAD_BODY, resp.status_code, "stream ended before its first event")

    def _http_failure(self, resp: requests.Response, record: Attempt | None) -> AttemptResult:
        """A non-2xx answer: classify it, and for the request's own faults shape the client's error."""
        retry_after = failures.parse_retry_after(resp.headers.get("Retry-After"))
        try:
            raw = read_body(resp, ERROR_BODY_LIMIT)
            finish(resp)
        except UpstreamError:
            resp.close()
            raw = b""
        if record is not None:
            record.answer = raw
        parsed = _json_object(raw)
        message = self._message(parsed, raw)
        err = parsed.get("error") if parsed else None
        err = err if isinstance(err, dict) else {}
        verdict = failures.classify_status(resp.status_code, retry_after, self.max_retry_after, _str(err.get("code")))
        payload = None
        if verdict in (failures.CLIENT_FAULT, failures.MODEL_NOT_FOUND):
            payload = ArbstrError(
                resp.status_code,
                message,
                type=_str(err.get("type")) or "invalid_request_error",
                code=_str(err.get("code")) or ("model_not_found" if resp.status_code == 404
                                               else "upstream_rejected_request"),
                param=_str(err.get("param")),
            )
        return AttemptResult(verdict, resp.status_code, message, retry_after, payload)

    def _message(self, parsed: dict[str, Any] | None, raw: bytes) -> str:
        """The upstream's error message, with every configured secret scrubbed out of it."""
        err = parsed.get("error") if parsed else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            text = err["message"]
        elif isinstance(err, str):
            text = err
        else:
            text = raw[:500].decode("utf-8", "replace").strip()
        return self.scrub(text)[:1000]


def _record_response(record: Attempt, resp: requests.Response) -> None:
    """The request's headers as sent (the prepared request's) and the answer's status and headers."""
    sent = resp.request.headers if resp.request is not None else None
    record.response(sent, resp.status_code, resp.headers)


def _out_of_time() -> AttemptResult:
    """The deadline cut the attempt off: the request was sent, so it counts as a read timeout."""
    return AttemptResult(failures.SENT_FAILED, None, "read timeout (no complete answer in the time left)")


def _transport_failure(e: UpstreamError) -> AttemptResult:
    return AttemptResult(failures.SENT_FAILED if e.sent else failures.CONNECT_FAILED, None, str(e))


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
