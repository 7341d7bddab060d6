"""POST /v1/chat/completions, top to bottom: parse → route → retry/relay → answer → log.

Exactly one log row per client request, written here (or by the stream's end callback), never by
an abandoned attempt.
"""

from __future__ import annotations

import json
import logging
import math
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any

from flask import Request, Response

from ..config import PolicyRule, Provider
from ..errors import ArbstrError, bad_request
from ..secrets import scrub_bytes
from . import cost as costs
from .attempt import Caller, OpenStream
from .failures import FAILURE, SUCCESS
from .relay import StreamContext, StreamSummary, relay
from .retry import Attempts, Outcome, deadline_error, run_chain
from .routing import match_policy, select_candidates
from .state import AppState

log = logging.getLogger("arbstr.request")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_RETRY_AFTER = 60
EXHAUSTED = (502, 503, 504)  # arbstr already retried and failed over: tell SDKs not to multiply it


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The chat request, whatever the Content-Type said; anything unusable is a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"Request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # e.g. 100,000 '[': json's C scanner recurses per level
        raise bad_request("Request body is not valid JSON: nested too deeply", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        _encode(body)  # an unpaired surrogate is valid JSON grammar but no text: unloggable, unencodable
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object", code="invalid_body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("'model' is required and must be a string", code="invalid_model", param="model")
    if not isinstance(body.get("messages"), list):
        raise bad_request("'messages' is required and must be an array", code="invalid_messages", param="messages")
    return body


# Cheap pre-check for a surrogate, escaped or as (CESU-8) bytes, which json.loads lets through; _encode decides.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _encode(body: Any) -> bytes:
    """``body`` as compact UTF-8 JSON; a 400 if it holds an unpaired surrogate or is too deep to re-encode."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("Request body is not valid JSON: it contains an unpaired UTF-16 surrogate escape "
                          "(\\ud800-\\udfff)", code="invalid_json") from None
    except RecursionError:
        raise bad_request("Request body is not valid JSON: nested too deeply", code="invalid_json") from None


def loggable(fields: dict[str, Any], scrub: Callable[[str], str]) -> dict[str, Any]:
    """Row values safe to store: no secret (a client may send a key as its model name), and text SQLite
    can encode (an unpaired surrogate, which a provider's JSON may escape into an error message, becomes
    its ``\\udXXX`` text instead of an exception on the log writer's thread)."""
    return {k: scrub(v).encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v
            for k, v in fields.items()}


def stream_body(body: dict[str, Any]) -> tuple[bytes, bool]:
    """Upstream body for a stream (usage always requested) and whether the client asked for usage."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    wants_usage = options.get("include_usage") is True
    options.setdefault("include_usage", True)
    upstream = dict(body, stream_options=options)
    return _encode(upstream), wants_usage


class ChatRequest:
    """One client request's identity, timing and the headers every answer to it carries."""

    def __init__(self, state: AppState, request: Request) -> None:
        self.state = state
        self.started = time.perf_counter()
        self.timestamp = iso_now()
        self.id = str(uuid.uuid4())
        self.headers: dict[str, str] = {"x-arbstr-request-id": self.id, "x-request-id": self.id}
        self.model: str | None = None
        self.policy: PolicyRule | None = None
        self.streaming = False
        self.client_retry_count = _int_or_none(request.headers.get("x-stainless-retry-count"))
        self.attempts = Attempts()
        self.logged = False

    def finalize(self, response: Response) -> None:
        """Last look at any answer on this route: every one carries the ids and has its row, even the
        answers Flask produced itself (401 from auth, 405, 413)."""
        for name, value in self.headers.items():
            response.headers.setdefault(name, value)
        if response.status_code >= 400 and self.attempts.sent:
            # Even a crash in arbstr: a provider may already charge for this request, and SDKs re-send
            # 409, 429 and 5xx unless told not to.
            response.headers["x-should-retry"] = "false"
        if not self.logged:
            error = response.get_json(silent=True) or {}
            error = error.get("error") if isinstance(error.get("error"), dict) else {}
            self.insert(self.row(http_status=response.status_code, error_type=error.get("type"),
                                 error_message=error.get("message")))

    def insert(self, row: dict[str, Any]) -> None:
        self.logged = True
        self.state.logstore.insert(loggable(row, self.state.scrub))

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def row(self, **fields: Any) -> dict[str, Any]:
        base = {
            "request_id": self.id,
            "timestamp": self.timestamp,
            "model": self.model,
            "provider": None,
            "policy": self.policy.name if self.policy else None,
            "streaming": self.streaming,
            "status": "error",
            "success": False,
            "http_status": None,
            "input_tokens": None,
            "output_tokens": None,
            "cost_sats": None,
            "latency_ms": self.elapsed_ms(),
            "ttft_ms": None,
            "stream_duration_ms": None,
            "retries": None,
            "error_type": None,
            "error_message": None,
            "client_retry_count": self.client_retry_count,
        }
        base.update(fields)
        return base

    def fail(self, error: ArbstrError, outcome: Outcome | None = None) -> Response:
        """Answer with an OpenAI error; log its row."""
        headers = dict(self.headers)
        # The provider that answered, or the last one sent the request (a 504): it may charge for it.
        provider = outcome.provider.name if outcome and outcome.provider else self.attempts.last
        retries = self.attempts.header()
        if provider:
            headers["x-arbstr-provider"] = provider
        if retries:
            headers["x-arbstr-retries"] = retries
        if error.status in EXHAUSTED or self.attempts.sent:
            headers["x-should-retry"] = "false"
        headers.update(error.headers)
        if error.code == "all_circuits_open":
            serving = [p.name for p in self.state.config.providers if self.model in p.models]
            wait = self.state.breakers.seconds_until_probe(serving)
            headers["Retry-After"] = str(min(max(1, math.ceil(wait)), MAX_RETRY_AFTER))
        elif error.status in (429, 503):
            headers.setdefault("Retry-After", "1")
        latency = self.elapsed_ms()
        if not self.streaming:
            headers["x-arbstr-latency-ms"] = str(latency)
        # A provider's 4xx passed through may come with an empty body: still say what happened.
        message = self.state.scrub(error.message) or f"{provider or 'arbstr'} answered HTTP {error.status} with no message"
        self.insert(self.row(
            provider=provider, http_status=error.status, latency_ms=latency, retries=retries,
            error_type=error.type, error_message=message,
        ))
        log.info("request_id=%s model=%s provider=%s status=%d code=%s latency_ms=%d",
                 self.id, self.model, provider, error.status, error.code, latency)
        body = error.body(self.state.scrub)
        body["error"]["message"] = message
        return Response(json.dumps(body), error.status, headers, mimetype="application/json")


def handle(chat: ChatRequest, request: Request) -> Response:
    state = chat.state
    slot = state.slots
    if slot is not None and not slot.acquire(blocking=False):
        return chat.fail(ArbstrError(503, "arbstr is at its max_concurrent limit; retry shortly",
                                     type="server_error", code="server_busy", headers={"Retry-After": "1"}))
    handed_over = False
    try:
        if state.bucket is not None and (wait := state.bucket.take()) > 0:
            raise ArbstrError(429, "arbstr's rate limit was exceeded; slow down", type="rate_limit_error",
                              code="rate_limit_exceeded", headers={"Retry-After": str(min(60, math.ceil(wait)))})
        raw = request.get_data(cache=False)
        body = parse_body(raw)
        chat.model = body["model"]
        chat.streaming = body.get("stream") is True
        chat.policy = match_policy(state.config.policies.rules, request.headers.get("X-Arbstr-Policy"),
                                   body["messages"])
        if chat.policy is not None:
            chat.headers["x-arbstr-policy"] = chat.policy.name
        candidates = select_candidates(
            chat.model, chat.policy, state.config.providers, state.config.policies.default_strategy,
            is_available=state.breakers.is_available, median_latency=state.latency.median,
            rotation=next(state.rotation),
        )
        if chat.streaming:
            response, handed_over = _stream(chat, body, candidates, _client_socket(request))
            return response
        return _complete(chat, raw, candidates)
    except ArbstrError as e:
        return chat.fail(e)
    finally:
        if slot is not None and not handed_over:
            slot.release()


def _caller(chat: ChatRequest, body: bytes, read_timeout: float, idle_timeout: float | None = None) -> Caller:
    server = chat.state.config.server
    return Caller(
        chat.state.upstream, body, chat.id,
        connect_timeout=server.connect_timeout_secs, read_timeout=read_timeout, idle_timeout=idle_timeout,
        max_response_bytes=MAX_RESPONSE_BYTES, max_retry_after=chat.state.config.retry.max_retry_after_secs,
        scrub=chat.state.scrub,
    )


def _complete(chat: ChatRequest, raw: bytes, candidates: list[Provider]) -> Response:
    """Non-streaming: the whole chain runs in an executor thread under one deadline."""
    state = chat.state
    timeout = state.config.server.request_timeout_secs
    deadline = time.monotonic() + timeout
    cancel = threading.Event()
    caller = _caller(chat, raw, timeout)
    attempts = chat.attempts

    def chain() -> Outcome:
        outcome = run_chain(candidates, caller.json, retry=state.config.retry, breakers=state.breakers,
                            cancel=cancel, deadline=deadline, attempts=attempts)
        if outcome.permit is not None:
            state.breakers.record(outcome.permit, SUCCESS)
        return outcome

    future = state.executor().submit(chain)
    try:
        outcome = future.result(timeout=max(deadline - time.monotonic(), 0))
    except FutureTimeout:
        cancel.set()
        attempts.abandon()
        caller.cutoff.fire()  # the abandoned attempt closes its connection now, not at its next read
        return chat.fail(deadline_error(), Outcome(attempts))
    if outcome.error is not None:
        return chat.fail(outcome.error, outcome)
    assert outcome.provider is not None and outcome.result is not None
    provider = outcome.provider
    status, body, parsed = outcome.result.payload
    body = scrub_bytes(body, state.scrub)
    input_tokens, output_tokens, cost = costs.usage_cost(provider, parsed.get("usage"))
    latency = chat.elapsed_ms()
    state.latency.add(provider.name, latency)
    headers = dict(chat.headers)
    headers["x-arbstr-provider"] = provider.name
    headers["x-arbstr-latency-ms"] = str(latency)
    if cost is not None:
        headers["x-arbstr-cost-sats"] = costs.header_value(cost)
    retries = chat.attempts.header()
    if retries:
        headers["x-arbstr-retries"] = retries
    chat.insert(chat.row(
        provider=provider.name, status="ok", success=True, http_status=status, input_tokens=input_tokens,
        output_tokens=output_tokens, cost_sats=cost, latency_ms=latency, retries=retries,
    ))
    log.info("request_id=%s model=%s provider=%s status=%d latency_ms=%d cost_sats=%s",
             chat.id, chat.model, provider.name, status, latency, _fmt(cost))
    return Response(body, status, headers, mimetype="application/json")


def _stream(chat: ChatRequest, body: dict[str, Any], candidates: list[Provider],
            client: socket.socket | None) -> tuple[Response, bool]:
    """Streaming: fail over until the first event, then relay; the row is finished when the stream ends.

    Returns the response and whether the stream took over the concurrency slot (released at its end).
    """
    state = chat.state
    upstream_body, wants_usage = stream_body(body)
    idle = state.config.server.stream_idle_timeout_secs
    caller = _caller(chat, upstream_body, idle, idle_timeout=idle)
    outcome = run_chain(candidates, caller.stream, retry=state.config.retry, breakers=state.breakers,
                        cancel=threading.Event(), attempts=chat.attempts)
    if outcome.error is not None:
        return chat.fail(outcome.error, outcome), False
    assert outcome.provider is not None and outcome.result is not None and outcome.permit is not None
    provider, permit = outcome.provider, outcome.permit
    opened: OpenStream = outcome.result.payload
    retries = chat.attempts.header()
    headers = dict(chat.headers)
    headers.update({"x-arbstr-provider": provider.name, "x-arbstr-streaming": "true",
                    "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if retries:
        headers["x-arbstr-retries"] = retries
    chat.insert(chat.row(provider=provider.name, status="streaming", http_status=200, retries=retries,
                                   latency_ms=None))

    def on_end(summary: StreamSummary) -> None:
        ok = summary.status == "complete"
        try:
            input_tokens, output_tokens, cost = costs.usage_cost(provider, summary.usage)
            if ok:
                state.latency.add(provider.name, summary.duration_ms or 0)
            state.logstore.update(chat.id, loggable({
                "status": summary.status, "success": ok, "input_tokens": input_tokens,
                "output_tokens": output_tokens, "cost_sats": cost, "latency_ms": summary.duration_ms,
                "ttft_ms": summary.ttft_ms, "stream_duration_ms": summary.duration_ms,
                "error_type": None if ok else "upstream_error" if summary.status == "interrupted" else "client",
                "error_message": summary.error if not ok else None,
            }, state.scrub))
            log.info("request_id=%s model=%s provider=%s stream=%s ttft_ms=%s duration_ms=%s cost_sats=%s",
                     chat.id, chat.model, provider.name, summary.status, summary.ttft_ms, summary.duration_ms,
                     _fmt(cost))
        finally:  # whatever failed above, the permit and the slot are never left taken
            if summary.status == "client_disconnected":
                state.breakers.release(permit)
            else:
                state.breakers.record(permit, SUCCESS if ok else FAILURE, summary.error)
            if state.slots is not None:
                state.slots.release()

    ctx = StreamContext(
        request_id=chat.id, provider=provider.name, started=chat.started, client_wants_usage=wants_usage,
        choices=_choices(body),
        cost=lambda usage: costs.usage_cost(provider, usage)[2], on_end=on_end, scrub=state.scrub,
        client_gone=(lambda: _peer_closed(client)) if client is not None else (lambda: False),
    )
    return Response(relay(ctx, opened), 200, headers, mimetype="text/event-stream", direct_passthrough=True), True


def _choices(body: dict[str, Any]) -> int:
    """How many choices the stream will finish (``n``): all finished and a clean end is complete."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def _client_socket(request: Request) -> socket.socket | None:
    sock = request.environ.get("gunicorn.socket")
    return sock if isinstance(sock, socket.socket) else None


def _peer_closed(sock: socket.socket) -> bool:
    """Has the client hung up? Lets a stream close its upstream before writing into a dead socket."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _fmt(cost: float | None) -> str:
    return "unknown" if cost is None else f"{cost:.6g}"


def _int_or_none(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else None
    except ValueError:
        return None
    return number if number is None or 0 <= number < 2**63 else None  # the column is a SQLite INTEGER
