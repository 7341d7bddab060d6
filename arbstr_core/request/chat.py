"""POST /v1/chat/completions, top to bottom: limits → parse → route → attempts → answer or relay → row.

:class:`ChatRequest` owns one client request from receipt to its log row. The app creates it before
anything else runs (auth, body limits), hands it every error it renders (:meth:`ChatRequest.failed`)
and every answer (:meth:`ChatRequest.finish`). The row is built in one place (``_row``) and written
once by ``finish``; a stream's row is then updated once more when the stream ends. Breaker permits are
resolved by the retry loop, except a stream's, which its end resolves in one ``finally``. A debug
capture (``debug.py``), when one is taken, is stored by ``finish`` too, or by the stream's end.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from flask import Request, Response

from ..config import PolicyRule, Provider
from ..errors import ArbstrError
from ..secrets import scrub_bytes
from ..timefmt import utc_timestamp
from . import body as chat_body
from . import cost as costs
from . import debug
from .attempt import Caller
from .breaker import Permit
from .edges import EDGES
from .failures import FAILURE, SUCCESS
from .relay import CLIENT_DISCONNECTED, COMPLETE, StreamContext, StreamSummary, relay
from .retry import Attempts, deadline_error, run_chain
from .routing import eligible, match_policy, resolve_alias, select_candidates
from .speed import tokens_per_sec
from .state import AppState

log = logging.getLogger("arbstr.request")

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_RETRY_AFTER = 60
EXHAUSTED = (502, 503, 504)  # arbstr already retried and failed over: tell SDKs not to multiply it


def plan(state: AppState, body: dict[str, Any], policy_header: str | None,
         rotation: int = 0) -> tuple[PolicyRule | None, list[Provider], list[Provider]]:
    """The policy, the ordered candidates, and every provider that could serve the request whatever its
    circuit (what savings are measured against): chat requests and /v1/cost decide alike."""
    config = state.config
    providers = state.market.providers()  # one view of the live prices for the whole request
    policy = match_policy(config.policies.rules, policy_header, body["messages"])
    candidates = select_candidates(
        body["model"], policy, providers, config.policies.default_strategy,
        is_available=state.is_available, recent=state.perf.recent, rotation=rotation,
        explore=state.explore_draw(), explore_share=config.policies.explore_share,
    )
    return policy, candidates, eligible(body["model"], policy, providers)


class ChatRequest:
    """One client request: its identity and timing, what was tried, what it became, and its row."""

    def __init__(self, state: AppState, request: Request, api: str = "chat") -> None:
        self.state = state
        self.edge = EDGES[api]
        self.started = time.perf_counter()
        self.timestamp = utc_timestamp()
        self.id = str(uuid.uuid4())
        self.headers: dict[str, str] = {"x-arbstr-request-id": self.id, "x-request-id": self.id}
        if api == "messages":
            self.headers["request-id"] = self.id  # where the anthropic SDK looks for it
        self.client_retry_count = _int_or_none(request.headers.get("x-stainless-retry-count"))
        self.model: str | None = None  # as the client named it
        self.routed_model: str | None = None  # what an [aliases] entry turned it into
        self.meta: dict[str, Any] = {}  # what the edge's way back needs (see edges.py)
        self.policy: PolicyRule | None = None
        self.streaming = False
        self.attempts = Attempts()
        self.provider: str | None = None  # the provider that answered
        self.outcome: dict[str, Any] = {}  # the row's fields as the request turned out
        self.error: ArbstrError | None = None
        self.field: list[Provider] = []  # every provider that could have served it (savings)
        self._holds_slot = False  # a max_concurrent slot, released when the request (or its stream) ends
        self.capture: debug.Capture | None = None  # [debug]: what was sent and got; None when not captured

    # ---- the request --------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        state = self.state
        if state.slots is not None:
            if not state.slots.acquire(blocking=False):
                raise ArbstrError(503, "arbstr is at its max_concurrent limit; retry shortly",
                                  type="server_error", code="server_busy", headers={"Retry-After": "1"})
            self._holds_slot = True
        streaming_started = False
        try:
            if state.bucket is not None and (wait := state.bucket.take()) > 0:
                raise ArbstrError(429, "arbstr's rate limit was exceeded; slow down", type="rate_limit_error",
                                  code="rate_limit_exceeded", headers={"Retry-After": str(min(60, math.ceil(wait)))})
            raw = request.get_data(cache=False)
            if debug.wanted(state.config, request.headers):
                self.capture = debug.Capture(state.config.debug.max_bytes,
                                             request.full_path if request.query_string else request.path, raw)
            body, forward, self.meta = self.edge.parse(raw)
            self.model = body["model"]
            routed = resolve_alias(state.config.aliases, self.model)
            if routed != self.model:
                self.routed_model = routed
                body = dict(body, model=routed)
                forward = chat_body.encode(body)
            self.streaming = body.get("stream") is True
            self.policy, candidates, self.field = plan(state, body, request.headers.get("X-Arbstr-Policy"),
                                                       next(state.rotation))
            if self.policy is not None:
                self.headers["x-arbstr-policy"] = self.policy.name
            if not self.streaming:
                return self._complete(forward, body, candidates)
            response = self._stream(body, candidates, _client_socket(request))
            streaming_started = True
            return response
        finally:
            if self._holds_slot and not streaming_started:
                self._release_slot()

    def _caller(self, body: bytes, parsed: dict[str, Any], read_timeout: float,
                idle_timeout: float | None = None) -> Caller:
        config = self.state.config
        return Caller(
            self.state.upstream, body, parsed, self.id,
            connect_timeout=config.server.connect_timeout_secs, read_timeout=read_timeout,
            idle_timeout=idle_timeout, max_response_bytes=MAX_RESPONSE_BYTES,
            max_retry_after=config.retry.max_retry_after_secs, scrub=self.state.scrub, capture=self.capture,
        )

    def _complete(self, raw: bytes, request_body: dict[str, Any], candidates: list[Provider]) -> Response:
        """Non-streaming: the whole chain runs in an executor thread under one deadline (SPEC §5.2)."""
        state = self.state
        timeout = state.config.server.request_timeout_secs
        deadline = time.monotonic() + timeout
        cancel = threading.Event()
        caller = self._caller(raw, request_body, timeout)
        future = state.executor().submit(
            run_chain, candidates, caller.json, retry=state.config.retry, breakers=state.breakers,
            cancel=cancel, deadline=deadline, attempts=self.attempts,
        )
        try:
            outcome = future.result(timeout=max(deadline - time.monotonic(), 0))
        except FutureTimeout:
            cancel.set()
            self.attempts.abandon()
            caller.cutoff.fire()  # the abandoned attempt closes its connection now, not at its next read
            raise deadline_error() from None
        if outcome.error is not None:
            raise outcome.error
        assert outcome.provider is not None and outcome.result is not None
        provider = self.provider = outcome.provider.name
        status, body, parsed, reported = outcome.result.payload
        body = scrub_bytes(body, state.scrub)
        charged = costs.charge(outcome.provider, parsed.get("usage"), self.field, reported)
        self._note_balance(provider, parsed.get("usage"))
        cost = charged.cost_sats
        latency = self.elapsed_ms()
        output = charged.usage and charged.usage.output
        speed = tokens_per_sec(output, latency, None, False)
        own = latency - self._before_ms(outcome.started)  # the answering attempt's own time
        state.perf.add(provider, latency_ms=own, ttft_ms=None, tokens_per_sec=tokens_per_sec(output, own, None, False))
        self.outcome = {"status": "ok", "success": True, **charged.row(), "latency_ms": latency,
                        "output_tokens_per_sec": speed}
        headers = self._answer_headers()
        headers["x-arbstr-latency-ms"] = str(latency)
        if cost is not None:
            headers["x-arbstr-cost-sats"] = costs.header_value(cost)
        log.info("request_id=%s model=%s provider=%s status=%d latency_ms=%d cost_sats=%s",
                 self.id, self.model, provider, status, latency, _fmt(cost))
        return Response(self.edge.answer(body, parsed, self.model or "", self.meta), status, headers,
                        mimetype="application/json")

    def _stream(self, body: dict[str, Any], candidates: list[Provider], client: socket.socket | None) -> Response:
        """Streaming: fail over until the first event (SPEC §5.2), then relay; the end updates the row."""
        state = self.state
        upstream_body, wants_usage = chat_body.stream_body(body)
        idle = state.config.server.stream_idle_timeout_secs
        caller = self._caller(chat_body.encode(upstream_body), upstream_body, idle, idle_timeout=idle)
        outcome = run_chain(candidates, caller.stream, retry=state.config.retry, breakers=state.breakers,
                            cancel=threading.Event(), attempts=self.attempts, hold=True)
        if outcome.error is not None:
            raise outcome.error
        assert outcome.provider is not None and outcome.result is not None and outcome.permit is not None
        provider, permit = outcome.provider, outcome.permit
        self.provider = provider.name
        before_ms = self._before_ms(outcome.started)
        self.outcome = {"status": "streaming", "http_status": 200, "latency_ms": None}
        headers = self._answer_headers()
        headers.update({"x-arbstr-streaming": "true", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        capture, self.capture = self.capture, None  # stored by the stream's end, with the stream's bytes
        ctx = StreamContext(
            request_id=self.id, provider=provider.name, started=self.started,
            client_wants_usage=wants_usage or self.edge.wants_usage,
            choices=chat_body.choices(body), cost=lambda usage: costs.charge(provider, usage, self.field).cost_sats,
            on_end=lambda summary: self._stream_ended(provider, permit, summary, capture, before_ms),
            scrub=state.scrub,
            client_gone=(lambda: _peer_closed(client)) if client is not None else (lambda: False),
            tap=capture.last.feed if capture is not None else None,
        )
        events = self.edge.stream(relay(ctx, outcome.result.payload), self.model or "", self.meta)
        return Response(events, 200, headers, mimetype="text/event-stream",
                        direct_passthrough=True)

    def _stream_ended(self, provider: Provider, permit: Permit, summary: StreamSummary,
                      capture: debug.Capture | None, before_ms: float) -> None:
        """The relay's last word: the row's update and capture, the stream's breaker outcome (SPEC §5.3), the slot."""
        state = self.state
        ok = summary.status == COMPLETE
        try:
            charged = costs.charge(provider, summary.usage, self.field)
            self._note_balance(provider.name, summary.usage)
            cost = charged.cost_sats
            speed = tokens_per_sec(charged.usage and charged.usage.output, summary.duration_ms, summary.ttft_ms, True)
            if ok:  # timed from the answering attempt's start, as the provider's own figures
                state.perf.add(provider.name, latency_ms=(summary.duration_ms or 0) - before_ms,
                               ttft_ms=None if summary.ttft_ms is None else summary.ttft_ms - before_ms,
                               tokens_per_sec=speed)
            if capture is not None:  # queued before the row's update: a settled row means its capture is stored
                self._store(capture)
            state.logstore.update(self.id, loggable({
                "status": summary.status, "success": ok, **charged.row(), "latency_ms": summary.duration_ms,
                "ttft_ms": summary.ttft_ms, "stream_duration_ms": summary.duration_ms,
                "output_tokens_per_sec": speed,
                "error_type": None if ok else "upstream_error" if summary.status == "interrupted" else "client",
                "error_message": summary.error if not ok else None,
            }, state.scrub))
            log.info("request_id=%s model=%s provider=%s stream=%s ttft_ms=%s duration_ms=%s cost_sats=%s",
                     self.id, self.model, provider.name, summary.status, summary.ttft_ms, summary.duration_ms,
                     _fmt(cost))
        finally:  # whatever failed above, the permit and the slot are never left taken
            if summary.status == CLIENT_DISCONNECTED:
                state.breakers.release(permit)
            else:
                state.breakers.record(permit, SUCCESS if ok else FAILURE, summary.error)
            if self._holds_slot:
                self._release_slot()

    def _note_balance(self, provider: str, usage: Any) -> None:
        """A Routstr answer says what is left of the balance (``usage.remaining_balance_msats``)."""
        if isinstance(usage, dict) and "remaining_balance_msats" in usage:
            self.state.market.note_balance(provider, usage["remaining_balance_msats"])

    def _release_slot(self) -> None:
        self._holds_slot = False
        assert self.state.slots is not None
        self.state.slots.release()

    # ---- every answer -------------------------------------------------------------------------------

    def _answer_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if provider := self.provider or self.attempts.last:
            headers["x-arbstr-provider"] = provider
        if retries := self.attempts.header():
            headers["x-arbstr-retries"] = retries
        return headers

    def failed(self, error: ArbstrError) -> ArbstrError:
        """An error is the answer: give it this route's headers and remember it for the row. The app's
        one error renderer calls this for every error on the route, arbstr's or Flask's."""
        # On a 504 the provider named is the last one sent the request: it may charge for it.
        headers = self._answer_headers()
        if error.status in EXHAUSTED or self.attempts.sent:
            # SDKs re-send 409, 429 and 5xx unless told not to; a provider may charge for each.
            headers["x-should-retry"] = "false"
        headers.update(error.headers)
        if error.code == "all_circuits_open":
            serving = [p.name for p in self.state.market.providers() if self.model in p.models]
            wait = self.state.breakers.seconds_until_probe(serving)
            headers["Retry-After"] = str(min(max(1, math.ceil(wait)), MAX_RETRY_AFTER))
        elif error.status in (429, 503):
            headers.setdefault("Retry-After", "1")
        latency = self.elapsed_ms()
        if not self.streaming:
            headers["x-arbstr-latency-ms"] = str(latency)
        error.headers = headers
        # A provider's 4xx passed through may come with an empty body: still say what happened.
        provider = headers.get("x-arbstr-provider")
        error.message = (self.state.scrub(error.message)
                         or f"{provider or 'arbstr'} answered HTTP {error.status} with no message")
        self.error = error
        self.outcome = {"latency_ms": latency}
        log.info("request_id=%s model=%s provider=%s status=%d code=%s latency_ms=%d",
                 self.id, self.model, provider, error.status, error.code, latency)
        return error

    def error_body(self, error: ArbstrError) -> dict[str, Any]:
        """The error as this request's API shapes it (OpenAI's, or Anthropic's on /v1/messages)."""
        return self.edge.error_body(error, error.body(self.state.scrub))

    def finish(self, response: Response) -> None:
        """Last look at any answer on this route: it carries the ids, and its row is written."""
        for name, value in self.headers.items():
            response.headers.setdefault(name, value)
        if self.capture is not None:  # queued before the row: once the row can be read, so can the capture
            self._store(self.capture)
        self.state.logstore.insert(loggable(self._row(response.status_code), self.state.scrub))

    def _store(self, capture: debug.Capture) -> None:
        """Queue the capture. It is built from whatever the client and providers sent: should that ever
        fail, the request keeps its answer and its row."""
        try:
            row = capture.row(self.id, self.timestamp, self.state.scrub)
        except Exception:
            log.exception("request_id=%s debug capture not stored", self.id)
            return
        self.state.logstore.capture(row)

    def _row(self, http_status: int) -> dict[str, Any]:
        error = self.error
        row = {
            "request_id": self.id,
            "timestamp": self.timestamp,
            "model": self.model,
            "provider": self.provider or self.attempts.last,
            "policy": self.policy.name if self.policy else None,
            "streaming": self.streaming,
            "status": "error",
            "success": False,
            "http_status": http_status,
            "input_tokens": None,
            "output_tokens": None,
            "cost_sats": None,
            "latency_ms": self.elapsed_ms(),
            "ttft_ms": None,
            "stream_duration_ms": None,
            "retries": self.attempts.header(),
            "error_type": error.type if error else None,
            "error_message": error.message if error else None,
            "client_retry_count": self.client_retry_count,
            "api": self.edge.api,
            "routed_model": self.routed_model,
        }
        row.update(self.outcome)
        return row

    def _before_ms(self, attempt_started: float | None) -> float:
        """How long the request waited before the attempt that answered began (parsing, routing, failed
        attempts, backoff): the provider measurements (``state.perf``) leave it out, or a provider reached
        after another failed would look slow for it. The row's timings keep it (SPEC §6.2)."""
        return 0.0 if attempt_started is None else max((attempt_started - self.started) * 1000, 0.0)

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)


def loggable(fields: dict[str, Any], scrub: Callable[[str], str]) -> dict[str, Any]:
    """Row values safe to store: no secret (a client may send a key as its model name), and text SQLite
    can encode (an unpaired surrogate, which a provider's JSON may escape into an error message, becomes
    its ``\\udXXX`` text instead of an exception on the log writer's thread)."""
    return {k: scrub(v).encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v
            for k, v in fields.items()}


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
