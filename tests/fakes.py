"""Scriptable fake upstream providers: a threaded raw-socket HTTP server that writes exact bytes.

Real providers misbehave in ways a mocking library cannot express: bodies cut mid-chunk, events that
straddle TCP reads, connections that hang or reset after the request was sent. Like the test server of
psf/requests, ``FakeUpstream`` owns the socket and writes every byte itself, so a test can reproduce
each of those on loopback.

Model: every accepted connection carries exactly one request. The fake reads the whole request,
records it, takes the next scripted action (or the default one when the script is empty) and lets it
write the response. Every response says ``Connection: close`` and the socket is closed afterwards:
the simplest honest HTTP/1.1, and a pooled ``requests.Session`` simply opens a new connection next time.

    with FakeUpstream("alpha") as up:
        up.script(status_then(503, times=2))          # 503, 503, then the default answer
        ...point arbstr at up.url...
        first, second, third = up.wait_for_requests(3)

Actions: ``reply``, ``error``, ``sse``, ``hang``, ``reset``, ``disconnect``, ``raw``, ``slow_headers``,
``auto`` (the default: SSE when the request says ``"stream": true``, JSON otherwise), ``status_then``
and ``mixed`` (a seeded random pick among labelled actions, recorded). Any callable taking an
``Exchange`` works as an action too.

Waiting is done with ``select`` on the client socket plus a per-connection wake-up socketpair, so a
stalled stream notices at once when its client leaves (``Connection.closed_by_client``), a ``hang``
returns the moment it is released, and ``stop()`` never waits for a timer.
"""

from __future__ import annotations

import bisect
import itertools
import json as jsonlib
import random
import selectors
import socket
import struct
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from requests.structures import CaseInsensitiveDict

HOST = "127.0.0.1"
CREATED = 1_700_000_000  # fixed `created` so bodies are deterministic
DEFAULT_USAGE: dict[str, int] = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
IO_TIMEOUT = 30.0  # bound on any single blocking socket call, so a confused test cannot hang forever
_MAX_HEAD = 64 * 1024


class _Gone(Exception):
    """The client closed the connection (or the fake is stopping): the exchange ends quietly."""


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass
class Connection:
    """One accepted TCP connection; ``closed_by_client`` fires when the peer leaves before we finish."""

    index: int
    opened_at: float
    request: Request | None = None
    events_sent: int = 0  # SSE events fully written (``[DONE]`` not counted)
    bytes_sent: int = 0
    closed_by_client_at: float | None = None  # time.monotonic()
    closed_by_client: threading.Event = field(default_factory=threading.Event, repr=False)
    finished_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait_closed_by_client(self, timeout: float = 10.0) -> float:
        """Block until the client closes this connection; return that moment (time.monotonic)."""
        if not self.closed_by_client.wait(timeout):
            raise AssertionError(f"connection {self.index}: client did not close it within {timeout}s")
        assert self.closed_by_client_at is not None
        return self.closed_by_client_at


@dataclass
class Request:
    """A request as the fake received it. ``headers`` is case-insensitive; ``json`` is None if unparsable."""

    method: str
    path: str
    headers: CaseInsensitiveDict[str]
    body: bytes
    json: Any
    received_at: float  # time.monotonic()
    connection: Connection = field(repr=False)

    @property
    def model(self) -> str:
        model = self.json.get("model") if isinstance(self.json, dict) else None
        return model if isinstance(model, str) else "unknown"

    @property
    def stream(self) -> bool:
        return isinstance(self.json, dict) and self.json.get("stream") is True

    @property
    def include_usage(self) -> bool:
        opts = self.json.get("stream_options") if isinstance(self.json, dict) else None
        return isinstance(opts, dict) and bool(opts.get("include_usage"))


# ---------------------------------------------------------------------------------------------------
# Bodies


def completion_body(
    model: str = "gpt-4o", content: str = "Hello!", *, usage: Mapping[str, int] | bool | None = True,
    id: str | None = None,
) -> dict[str, Any]:
    """A valid ``chat.completion`` object; ``usage=False`` leaves usage out (cost must become null)."""
    body: dict[str, Any] = {
        "id": id or f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": None,
            "finish_reason": "stop",
        }],
    }
    if usage:
        body["usage"] = dict(DEFAULT_USAGE if usage is True else usage)
    return body


def error_body(message: str, type: str = "upstream_error", code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error object."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def stream_chunks(
    model: str = "gpt-4o", content: str = "Hello from the fake!", *, include_usage: bool = True,
    usage: Mapping[str, int] | None = None, id: str | None = None, pieces: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The chunk sequence a real provider streams: role, content pieces, finish, then the usage chunk.

    ``pieces`` fixes the content split (default: one piece per word); the usage chunk has
    ``"choices": []`` and is the last one, as with ``stream_options.include_usage``.
    """
    cid = id or f"chatcmpl-{uuid.uuid4().hex[:12]}"
    if pieces is None:
        words = content.split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            c["usage"] = None
        return c

    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in pieces]
    chunks.append(chunk({}, "stop"))
    if include_usage:
        chunks.append({
            "id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "choices": [], "usage": dict(usage or DEFAULT_USAGE),
        })
    return chunks


def sse_event(data: dict[str, Any] | str, eol: bytes = b"\n") -> bytes:
    """Encode one ``data:`` event; dicts as JSON with raw UTF-8 (so multibyte splits can be tested)."""
    text = jsonlib.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
    lines = text.encode().split(b"\n")
    return b"".join(b"data: " + line + eol for line in lines) + eol


def splits_at(pattern: bytes | str, offset: int = 1) -> Callable[[bytes], list[int]]:
    """A ``write_splits`` value that splits writes inside every occurrence of ``pattern``.

    ``splits_at(b"\\r\\n")`` puts CR and LF in different writes; ``splits_at("é")`` splits the UTF-8
    bytes of é.
    """
    pat = pattern.encode() if isinstance(pattern, str) else pattern

    def find(payload: bytes) -> list[int]:
        out, i = [], payload.find(pat)
        while i >= 0:
            out.append(i + offset)
            i = payload.find(pat, i + 1)
        return out

    return find


def head(status: int, headers: Mapping[str, str | None] | None = None, reason: str | None = None) -> bytes:
    """Status line and headers; ``Connection: close`` unless given. A None value drops that header."""
    merged: CaseInsensitiveDict[str | None] = CaseInsensitiveDict({"Connection": "close"})
    merged.update(headers or {})
    reason = reason if reason is not None else _REASONS.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in merged.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 409: "Conflict", 413: "Payload Too Large", 422: "Unprocessable Entity",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


# ---------------------------------------------------------------------------------------------------
# Waiting primitives


class Gate:
    """A releasable event that also wakes connections blocked in ``select`` (threading.Event cannot)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: set[Exchange] = set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters = list(self._waiters)
        for ex in waiters:
            ex.wake()

    def is_set(self) -> bool:
        return self._event.is_set()

    def _add(self, ex: Exchange) -> None:
        with self._lock:
            self._waiters.add(ex)

    def _discard(self, ex: Exchange) -> None:
        with self._lock:
            self._waiters.discard(ex)


class Pause:
    """Inside an ``sse`` event list: stall the stream for ``seconds`` or until ``release()``."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self.gate = Gate()

    def release(self) -> None:
        self.gate.set()

    @property
    def released(self) -> bool:
        return self.gate.is_set()


# ---------------------------------------------------------------------------------------------------
# The per-connection handle actions write to


class Exchange:
    """One connection and its request: what actions use to write bytes, wait, or reset."""

    def __init__(self, fake: FakeUpstream, sock: socket.socket, conn: Connection) -> None:
        self.fake = fake
        self.sock = sock
        self.conn = conn
        self.request: Request  # set once the request has been read
        self.waiting_on: Gate | None = None  # the gate a hang/pause is blocked on, for release_all()
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ)
        self._sel.register(self._wake_r, selectors.EVENT_READ)

    # -- reading --------------------------------------------------------------------------------

    def read_request(self) -> tuple[str, str, CaseInsensitiveDict[str], bytes] | None:
        """Read one full request (Content-Length or chunked). None if the client sent nothing."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self._recv()
            if not data:
                if buf:
                    raise _Gone
                return None
            buf += data
            if len(buf) > _MAX_HEAD and b"\r\n\r\n" not in buf[:_MAX_HEAD]:
                raise _Gone
        raw_head, _, rest = buf.partition(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked(rest)
        else:
            length = int(headers.get("Content-Length", "0") or 0)
            while len(rest) < length:
                data = self._recv()
                if not data:
                    raise _Gone
                rest += data
            body = rest[:length]
        return method, path, headers, body

    def _read_chunked(self, buf: bytes) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in buf:
                buf += self._recv_or_gone()
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += self._recv_or_gone()
            if size == 0:
                return body  # trailers are not supported; none of our clients send them
            body += buf[:size]
            buf = buf[size + 2:]

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except OSError:
            raise _Gone from None

    def _recv_or_gone(self) -> bytes:
        data = self._recv()
        if not data:
            raise _Gone
        return data

    # -- writing --------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write bytes now (TCP_NODELAY is on); a vanished client ends the exchange."""
        if self.fake.stopping or self._closed:
            raise _Gone
        try:
            self.sock.sendall(data)
        except OSError:
            self._client_left()
        self.conn.bytes_sent += len(data)

    def wait(self, seconds: float | None, gate: Gate | None = None) -> bool:
        """Sleep up to ``seconds`` while watching the client; True if ``gate`` was released first.

        Raises ``_Gone`` the moment the client closes the connection or the fake stops.
        """
        deadline = None if seconds is None else time.monotonic() + seconds
        if gate is not None:
            gate._add(self)
            self.waiting_on = gate
        try:
            while True:
                if self.fake.stopping:
                    raise _Gone
                if gate is not None and gate.is_set():
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                for key, _ in self._sel.select(remaining):
                    if key.fileobj is self._wake_r:
                        self._drain_wake()
                    else:
                        self._check_client()
        finally:
            if gate is not None:
                gate._discard(self)
                self.waiting_on = None

    def abort(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees ECONNRESET, not a clean end."""
        if self._closed:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def finish(self) -> None:
        """Graceful end: FIN after everything written (this is what delimits close-delimited bodies)."""
        if self._closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in (self.sock, self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass
        self._sel.close()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # already closed, or the buffer is full of pending wake-ups anyway

    def interrupt(self) -> None:
        """Used by ``FakeUpstream.stop``: unblock any recv/send/select of this exchange."""
        self.wake()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- client-close detection -----------------------------------------------------------------

    def _drain_wake(self) -> None:
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass

    def _check_client(self) -> None:
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._client_left()
        # anything else (a client pipelining despite Connection: close) is ignored

    def _client_left(self) -> None:
        if not self.fake.stopping and self.conn.closed_by_client_at is None:
            self.conn.closed_by_client_at = time.monotonic()
            self.conn.closed_by_client.set()
        raise _Gone


# ---------------------------------------------------------------------------------------------------
# Actions


class Action:
    """What the fake does with one request. Subclasses write the response through the Exchange."""

    def run(self, ex: Exchange) -> None:
        raise NotImplementedError


ActionLike = Action | Callable[[Exchange], None]


def _greeting(ex: Exchange) -> str:
    return f"Hello from {ex.fake.name}!"


_UNSET: Any = object()


class Reply(Action):
    """A complete response with Content-Length.

    Default body: a chat.completion echoing the requested model, content ``Hello from <fake name>!``
    and ``usage`` (``usage=False`` drops it); for status ≥ 400 an OpenAI error body instead. ``json``
    or ``body`` (exact bytes) replace it. Header value None drops a default header, e.g.
    ``headers={"Content-Length": None}`` for a close-delimited body.
    """

    def __init__(
        self, status: int = 200, json: Any = _UNSET, headers: Mapping[str, str | None] | None = None,
        body: bytes | None = None, *, reason: str | None = None, content: str | None = None,
        usage: Mapping[str, int] | bool | None = True,
    ) -> None:
        self.status, self.json, self.headers, self.body = status, json, headers, body
        self.reason, self.content, self.usage = reason, content, usage

    def render(self, ex: Exchange) -> bytes:
        if self.body is not None:
            body = self.body
        elif self.json is not _UNSET:
            body = jsonlib.dumps(self.json).encode()
        elif self.status >= 400:
            body = jsonlib.dumps(error_body(f"{ex.fake.name} answered {self.status}", code=f"http_{self.status}"))
            body = body.encode()
        else:
            content = self.content if self.content is not None else _greeting(ex)
            body = jsonlib.dumps(completion_body(ex.request.model, content, usage=self.usage)).encode()
        headers: dict[str, str | None] = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        merged: CaseInsensitiveDict[str | None] = CaseInsensitiveDict(headers)
        merged.update(self.headers or {})
        return head(self.status, dict(merged), self.reason) + body

    def run(self, ex: Exchange) -> None:
        ex.send(self.render(ex))


def error(
    status: int, message: str | None = None, *, type: str = "upstream_error", code: str | None = None,
    headers: Mapping[str, str | None] | None = None, retry_after: float | None = None,
) -> Reply:
    """An OpenAI-shaped error reply; ``retry_after`` sets the Retry-After header (seconds)."""
    hdrs = dict(headers or {})
    if retry_after is not None:
        hdrs["Retry-After"] = f"{retry_after:g}"
    msg = message if message is not None else f"upstream said {status}"
    return Reply(status, json=error_body(msg, type, code), headers=hdrs)


SSEItem = bytes | str | dict | Pause


class SSE(Action):
    """A text/event-stream response written event by event.

    ``events``: dicts (JSON ``data:`` events), strs (``data: <str>``), bytes (written verbatim, framing
    included) and ``Pause`` markers; None = ``stream_chunks`` for the request (model echoed, content
    naming this fake, usage chunk only if the request asked ``include_usage``, like a real provider).
    ``done`` appends ``data: [DONE]``. ``chunked`` picks Transfer-Encoding: chunked, else the body is
    close-delimited (no Content-Length; FIN ends it). ``interval`` separates events, ``first_delay``
    precedes the first write. ``cut_after=N`` sends N events and then drops the connection (``cut``:
    ``"close"`` = FIN, which leaves a chunked body incomplete, or ``"rst"``), never sending ``[DONE]``.
    ``write_splits`` (byte offsets into the concatenated payload, or a callable such as ``splits_at``)
    splits writes mid-event, ``split_delay`` apart so they arrive as separate reads; with ``coalesce``
    events are not written separately, only at split offsets and pauses.
    """

    def __init__(
        self, events: Iterable[SSEItem] | None = None, *, interval: float = 0.0, chunked: bool = True,
        done: bool = True, cut_after: int | None = None, cut: Literal["close", "rst"] = "close",
        write_splits: Iterable[int] | Callable[[bytes], Iterable[int]] | None = None, split_delay: float = 0.02,
        coalesce: bool = False, first_delay: float = 0.0, eol: bytes = b"\n", status: int = 200,
        headers: Mapping[str, str | None] | None = None, content: str | None = None,
        usage: Mapping[str, int] | None = None,
    ) -> None:
        self.events = None if events is None else list(events)
        self.interval, self.chunked, self.done = interval, chunked, done
        self.cut_after, self.cut = cut_after, cut
        self.write_splits, self.split_delay, self.coalesce = write_splits, split_delay, coalesce
        self.first_delay, self.eol, self.status, self.headers = first_delay, eol, status, headers
        self.content, self.usage = content, usage

    def _items(self, ex: Exchange) -> list[SSEItem]:
        if self.events is not None:
            return list(self.events)
        req = ex.request
        content = self.content if self.content is not None else _greeting(ex)
        return list(stream_chunks(req.model, content, include_usage=req.include_usage, usage=self.usage))

    def run(self, ex: Exchange) -> None:
        # Lay the events out as one payload, remembering frame boundaries and pause positions.
        frames: list[tuple[int, bytes]] = []
        pauses: dict[int, list[Pause]] = {}
        pos = n_events = 0
        for item in self._items(ex):
            if isinstance(item, Pause):
                pauses.setdefault(pos, []).append(item)
                continue
            if self.cut_after is not None and n_events >= self.cut_after:
                break
            frame = item if isinstance(item, bytes) else sse_event(item, self.eol)
            frames.append((pos, frame))
            pos += len(frame)
            n_events += 1
        event_ends = [start + len(f) for start, f in frames]
        if self.done and self.cut_after is None:
            frame = b"data: [DONE]" + self.eol + self.eol
            frames.append((pos, frame))
            pos += len(frame)
        payload = b"".join(f for _, f in frames)
        starts = {start for start, _ in frames}

        splits = self.write_splits(payload) if callable(self.write_splits) else (self.write_splits or ())
        bounds = {0, len(payload)} | {s for s in splits if 0 < s < len(payload)} | set(pauses)
        if not self.coalesce:
            bounds |= starts
        ordered = sorted(b for b in bounds if b <= len(payload))

        hdrs: CaseInsensitiveDict[str | None] = CaseInsensitiveDict(
            {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        if self.chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        hdrs.update(self.headers or {})
        ex.send(head(self.status, dict(hdrs)))

        first = True
        for a, b in itertools.pairwise(ordered):
            for p in pauses.pop(a, []):
                ex.wait(p.seconds, p.gate)
            delay = self.first_delay if first else (self.interval if a in starts else self.split_delay)
            if delay > 0:
                ex.wait(delay)
            first = False
            data = payload[a:b]
            ex.send(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
            ex.conn.events_sent = bisect.bisect_right(event_ends, b)
        for p in [p for ps in pauses.values() for p in ps]:  # pauses after the last event
            ex.wait(p.seconds, p.gate)

        if self.cut_after is not None:
            if self.cut == "rst":
                ex.abort()
            return  # FIN without the terminating chunk: an incomplete body
        if self.chunked:
            ex.send(b"0\r\n\r\n")


class Hang(Pause, Action):
    """Read the request, then send nothing for ``seconds`` or until ``release()``; then run ``then``
    (default: close the connection without a response). One Hang may serve many connections."""

    def __init__(self, seconds: float = 30.0, then: ActionLike | None = None) -> None:
        super().__init__(seconds)
        self.then = then

    def run(self, ex: Exchange) -> None:
        ex.wait(self.seconds, self.gate)
        if self.then is not None:
            _run(self.then, ex)


class Reset(Action):
    """Read the request and answer with a TCP RST: 'reset after the request was sent'."""

    def run(self, ex: Exchange) -> None:
        ex.abort()


class Disconnect(Action):
    """Read the request and close cleanly without a response (the client sees RemoteDisconnected)."""

    def run(self, ex: Exchange) -> None:
        ex.finish()


class Raw(Action):
    """Write these exact bytes, then close (``end="close"``, FIN) or reset (``end="rst"``)."""

    def __init__(self, data: bytes, end: Literal["close", "rst"] = "close") -> None:
        self.data, self.end = data, end

    def run(self, ex: Exchange) -> None:
        ex.send(self.data)
        if self.end == "rst":
            ex.abort()


class SlowHeaders(Action):
    """Delay the response head by ``seconds``, then run ``then`` (default ``auto``).

    With ``trickle`` the status line goes out at once and filler headers (``X-Fake-Trickle``) follow
    every ``trickle_every`` seconds: a per-read timeout never fires, only a total deadline can.
    """

    def __init__(
        self, seconds: float, then: ActionLike | None = None, *, trickle: bool = False, trickle_every: float = 0.1,
    ) -> None:
        self.seconds, self.then, self.trickle, self.trickle_every = seconds, then, trickle, trickle_every

    def run(self, ex: Exchange) -> None:
        then = self.then if self.then is not None else Auto()
        if not self.trickle:
            ex.wait(self.seconds)
            _run(then, ex)
            return
        original_send = ex.send
        buffered = b""
        state = {"done": False}

        def send(data: bytes) -> None:  # hold back everything after the status line until time is up
            nonlocal buffered
            if state["done"]:
                original_send(data)
                return
            buffered += data
            if b"\r\n" not in buffered:
                return
            status_line, _, rest = buffered.partition(b"\r\n")
            state["done"] = True
            original_send(status_line + b"\r\n")
            end, n = time.monotonic() + self.seconds, 0
            while (left := end - time.monotonic()) > 0:
                ex.wait(min(self.trickle_every, left))
                n += 1
                original_send(b"X-Fake-Trickle: %d\r\n" % n)
            original_send(rest)

        ex.send = send  # type: ignore[method-assign]
        try:
            _run(then, ex)
        finally:
            ex.send = original_send  # type: ignore[method-assign]


class Auto(Action):
    """Behave like a healthy provider: SSE when the request streams, a JSON completion otherwise."""

    def run(self, ex: Exchange) -> None:
        (SSE() if ex.request.stream else Reply()).run(ex)


def status_then(
    status: int, times: int = 1, then: ActionLike | None = None, *, retry_after: float | None = None,
) -> list[ActionLike]:
    """``status`` errors ``times`` times, then ``then`` (default ``auto``): “503 twice then 200”."""
    return [error(status, retry_after=retry_after)] * times + [then if then is not None else Auto()]


class Mixed(Action):
    """Pick one of ``choices`` — ``(label, weight, action)`` — per request, at random, and record it.

    The generator is seeded (``seed``) and drawn under a lock, so the sequence of picks is
    reproducible (their assignment to concurrent requests is not). ``picks`` holds ``(request, label)``
    in the order the picks were made: what each request was answered with, for soak-test assertions.
    """

    def __init__(self, choices: Sequence[tuple[str, float, ActionLike]], seed: int = 0) -> None:
        self.choices = list(choices)
        self.seed = seed
        self.picks: list[tuple[Request, str]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def run(self, ex: Exchange) -> None:
        with self._lock:
            label, _, action = self._rng.choices(self.choices, weights=[w for _, w, _ in self.choices])[0]
            self.picks.append((ex.request, label))
        _run(action, ex)


# Lower-case names so scripts read as prose: up.script(reply(503), sse(cut_after=2), hang(5)).
reply = Reply
sse = SSE
hang = Hang
reset = Reset
disconnect = Disconnect
raw = Raw
slow_headers = SlowHeaders
auto = Auto
pause = Pause
mixed = Mixed


def _run(action: ActionLike, ex: Exchange) -> None:
    if isinstance(action, Action):
        action.run(ex)
    else:
        action(ex)


# ---------------------------------------------------------------------------------------------------
# The server


class FakeUpstream:
    """A fake OpenAI-compatible provider on 127.0.0.1 (ephemeral port); see the module docstring.

    The port is bound in ``__init__`` so ``url`` is known before ``start()``.
    """

    def __init__(self, name: str = "fake", default: ActionLike | None = None) -> None:
        self.name = name
        self.default: ActionLike = default if default is not None else Auto()
        self.stopping = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[ActionLike] = deque()
        self._requests: list[Request] = []
        self._connections: list[Connection] = []
        self._exchanges: set[Exchange] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((HOST, 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<FakeUpstream {self.name} {self.url}>"

    @property
    def url(self) -> str:
        """The provider base URL for a config: arbstr posts to ``url + "/chat/completions"``."""
        return f"http://{HOST}:{self.port}/v1"

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._accept_thread is None:
            self._accept_thread = threading.Thread(target=self._accept_loop, name=f"fake-{self.name}", daemon=True)
            self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, wake and end every open exchange (hangs included), join the threads."""
        with self._lock:
            if self.stopping:
                return
            self.stopping = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            exchanges = list(self._exchanges)
        for ex in exchanges:
            ex.interrupt()
        end = time.monotonic() + timeout
        for t in list(self._threads):
            if t.ident is not None:
                t.join(max(0.0, end - time.monotonic()))
        for s in (self._listener, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting ------------------------------------------------------------------------------

    def script(self, *actions: ActionLike | Iterable[ActionLike]) -> Self:
        """Queue actions for the next requests, in order (lists such as ``status_then(...)`` flatten)."""
        flat: list[ActionLike] = []
        for a in actions:
            if isinstance(a, Action) or callable(a):
                flat.append(a)  # type: ignore[arg-type]
            else:
                flat.extend(a)
        with self._lock:
            self._queue.extend(flat)
        return self

    @property
    def pending(self) -> int:
        """Scripted actions not yet used."""
        with self._lock:
            return len(self._queue)

    def release_all(self) -> None:
        """Release every hang/pause a connection is blocked on right now (later ones still wait)."""
        with self._lock:
            gates = {ex.waiting_on for ex in self._exchanges}
        for gate in gates - {None}:
            gate.set()  # type: ignore[union-attr]

    # -- records --------------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._connections)

    @property
    def last_request(self) -> Request:
        with self._lock:
            if not self._requests:
                raise AssertionError(f"{self.name}: no request received")
            return self._requests[-1]

    def wait_for_requests(self, n: int = 1, timeout: float = 10.0) -> list[Request]:
        """Block until at least ``n`` requests have been read; return them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise AssertionError(f"{self.name}: expected {n} request(s) within {timeout}s, "
                                     f"got {len(self._requests)}")
            return list(self._requests)

    def wait_for_request(self, index: int = 0, timeout: float = 10.0) -> Request:
        """The ``index``-th request (0-based), waiting for it if needed."""
        return self.wait_for_requests(index + 1, timeout)[index]

    # -- internals ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping:
                ready = {key.fileobj for key, _ in sel.select()}
                if self.stopping or self._listener not in ready:
                    continue
                try:
                    sock, _ = self._listener.accept()
                except OSError:
                    continue
                sock.settimeout(IO_TIMEOUT)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._lock:
                    conn = Connection(index=len(self._connections), opened_at=time.monotonic())
                    self._connections.append(conn)
                    ex = Exchange(self, sock, conn)
                    self._exchanges.add(ex)
                    t = threading.Thread(target=self._serve, args=(ex,), name=f"fake-{self.name}-{conn.index}",
                                         daemon=True)
                    self._threads.append(t)
                    self._cond.notify_all()
                t.start()

    def _serve(self, ex: Exchange) -> None:
        conn = ex.conn
        try:
            parsed = ex.read_request()
            if parsed is None:
                return
            method, path, headers, body = parsed
            try:
                parsed_json = jsonlib.loads(body) if body else None
            except ValueError:
                parsed_json = None
            with self._cond:
                req = Request(method, path, headers, body, parsed_json, time.monotonic(), conn)
                conn.request = req
                ex.request = req
                self._requests.append(req)
                action = self._queue.popleft() if self._queue else self.default
                self._cond.notify_all()
            _run(action, ex)
            ex.finish()
        except _Gone:
            pass
        except Exception:  # noqa: BLE001 - a handler thread's last resort: report, never crash the fake
            if not self.stopping:
                traceback.print_exc()  # a broken script: pytest shows it with the failing test
        finally:
            ex.close()
            with self._lock:
                self._exchanges.discard(ex)
            conn.finished_at = time.monotonic()
            conn.finished.set()


# ---------------------------------------------------------------------------------------------------
# Connection refused

_refusers: list[socket.socket] = []


def refused_url() -> str:
    """A loopback provider URL on which every connect is refused.

    The port stays bound (never listening) for the rest of the session, so no other process can
    start listening on it and turn "refused" into something else.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    _refusers.append(s)
    return f"http://{HOST}:{s.getsockname()[1]}/v1"
