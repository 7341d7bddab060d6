"""The streaming relay (SPEC §6): events out as they come in, accounted, never silently truncated.

The generator owns the upstream response for the rest of the stream. Whatever ends it (``[DONE]``,
an upstream break or silence, EOF, the client leaving), the upstream response is closed in
``finally`` (so the provider stops generating) and ``on_end`` receives the summary exactly once.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..secrets import scrub_bytes
from . import sse
from .cost import merge_usage
from .upstream import UpstreamError

if TYPE_CHECKING:
    import requests

log = logging.getLogger("arbstr.relay")

COMPLETE, INTERRUPTED, CLIENT_DISCONNECTED = "complete", "interrupted", "client_disconnected"
# A chunk that finishes a choice ("finish_reason": "stop"); most chunks carry "finish_reason": null.
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')


@dataclass
class OpenStream:
    """A 2xx stream whose first data event has been read (and is held in ``first``)."""

    response: requests.Response
    chunks: Iterator[bytes]
    splitter: sse.EventSplitter
    first: list[bytes]


@dataclass
class StreamSummary:
    status: str = INTERRUPTED
    usage: dict[str, Any] | None = None
    ttft_ms: int | None = None
    duration_ms: int | None = None
    error: str | None = None
    saw_done: bool = False
    finished: set[int] = field(default_factory=set)  # indexes of the choices given a finish_reason


@dataclass
class StreamContext:
    request_id: str
    provider: str
    started: float  # time.perf_counter() at request receipt
    client_wants_usage: bool
    cost: Callable[[dict[str, Any] | None], float | None]
    on_end: Callable[[StreamSummary], None]
    scrub: Callable[[str], str]
    client_gone: Callable[[], bool] = lambda: False
    choices: int = 1  # the request's ``n``
    tap: Callable[[bytes], None] | None = None  # debug capture: the upstream's bytes as received


def _ms(ctx: StreamContext) -> int:
    return int((time.perf_counter() - ctx.started) * 1000)


def relay(ctx: StreamContext, opened: OpenStream) -> Iterator[bytes]:
    summary = StreamSummary()
    try:
        try:
            yield from _events(ctx, opened, summary)
        except Exception:
            # A bug of ours must still end the stream as an error the client sees, never as a cut
            # connection or (worse) a stream that looks complete.
            log.exception("request_id=%s stream relay failed", ctx.request_id)
            summary.status, summary.saw_done = INTERRUPTED, False
            summary.error = "internal error in arbstr while relaying the stream"
        if summary.status == INTERRUPTED and not summary.saw_done:
            # After [DONE] the client reads nothing more; an upstream error event before it was relayed.
            yield sse.error_event(
                f"The upstream stream from {ctx.provider} was interrupted: {summary.error}", "stream_interrupted"
            ) + sse.DONE_EVENT
    except GeneratorExit:
        summary.status = CLIENT_DISCONNECTED
        raise
    finally:
        opened.response.close()
        summary.duration_ms = _ms(ctx)
        ctx.on_end(summary)


def _events(ctx: StreamContext, opened: OpenStream, summary: StreamSummary) -> Iterator[bytes]:
    """Relay events until [DONE]; on a break, leave ``summary.status`` INTERRUPTED with a reason."""
    pending = opened.first
    chunks = opened.chunks
    tap = ctx.tap
    if tap is not None:  # what the attempt read: the events it held and the start of the next one
        tap(b"".join(pending) + opened.splitter.pending())
    replaced = False  # the last event was dropped or rewritten
    try:
        while True:
            for event in pending:
                if event == b"\n" and replaced:
                    continue  # the rest of that event's CRLF, cut off by a read (see EventSplitter)
                out = _handle(ctx, event, summary)
                replaced = out is not event
                # A key the provider wrote into an event (its text, an id) goes out redacted; the
                # event keeps its framing, so a lone LF still belongs to it. A key cut across two
                # events (one token each) is not recognised: that would mean holding back the stream.
                out = scrub_bytes(out, ctx.scrub)
                if out:
                    if ctx.client_gone():
                        summary.status = CLIENT_DISCONNECTED
                        return
                    yield out
                if summary.saw_done:
                    return
            chunk = next(chunks, None)
            if chunk is None:
                if len(summary.finished) >= ctx.choices and not opened.splitter.pending().strip():
                    # Every choice finished and the body ended cleanly: complete, though the provider
                    # left out [DONE]. The client gets arbstr's trailer and [DONE] as usual (SPEC §6.2).
                    yield _done(ctx, summary, sse.DONE_EVENT)
                    return
                summary.error = "the provider ended the stream without [DONE]"
                return
            if tap is not None:
                tap(chunk)
            pending = opened.splitter.feed(chunk)
    except UpstreamError as e:
        summary.error = "provider went silent" if e.timeout else f"connection to the provider broke ({e})"


def _done(ctx: StreamContext, summary: StreamSummary, done: bytes) -> bytes:
    """The end of a stream: arbstr's ``: arbstr`` comment, then the ``[DONE]`` event."""
    summary.saw_done = True
    summary.status = COMPLETE if summary.error is None else INTERRUPTED
    trailer = {
        "cost_sats": ctx.cost(summary.usage),
        "latency_ms": _ms(ctx),
        "provider": ctx.provider,
        "request_id": ctx.request_id,
    }
    return sse.comment("arbstr " + json.dumps(trailer, separators=(", ", ": "))) + done


def _handle(ctx: StreamContext, event: bytes, summary: StreamSummary) -> bytes:
    """The bytes to send for one upstream event (possibly none, possibly rewritten)."""
    data = sse.event_data(event)
    if data is None:
        return event  # comments and keep-alives pass through
    if data == sse.DONE:
        return _done(ctx, summary, event)
    wants_ttft = summary.ttft_ms is None
    if not (wants_ttft or b'"usage"' in data or b'"error"' in data or _FINISHED.search(data)):
        return event
    chunk = sse.parse_json(data)
    if chunk is None:
        return event
    if wants_ttft and sse.has_content(chunk):
        summary.ttft_ms = _ms(ctx)
    summary.finished.update(sse.finished_choices(chunk))
    if "error" in chunk and "choices" not in chunk:
        # Relayed so the client's SDK raises, but scrubbed: providers echo keys in error messages.
        err = chunk["error"]
        summary.error = ctx.scrub(str(err.get("message") if isinstance(err, dict) else err))[:300]
        return ctx.scrub(event.decode("utf-8", "replace")).encode("utf-8")
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        summary.usage = merge_usage(summary.usage, usage)
        if sse.is_usage_only(chunk):
            if not ctx.client_wants_usage:
                return b""
            chunk["arbstr"] = {
                "cost_sats": ctx.cost(summary.usage),
                "latency_ms": _ms(ctx),
                "provider": ctx.provider,
                "request_id": ctx.request_id,
            }
            return sse.data_event(chunk)
    return event
