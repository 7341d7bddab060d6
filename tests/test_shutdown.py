"""SIGTERM to the gunicorn master while streams and non-streams are in flight (SPEC §7, §8, §10).

Real ``gunicorn arbstr:app`` with the shipped gunicorn.conf.py (``graceful_timeout`` from
arbstr_core/server.py), one slow fake provider, clients on the openai SDK and raw ``requests``.
The signal is sent only once the fake has received every request and every stream client has read
its first event, so everything is provably in flight.
"""

from __future__ import annotations

import itertools
import json
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import requests
from conftest import ArbstrServer, provider
from fakes import Exchange, FakeUpstream, error, reply, slow_headers, sse

from arbstr_core.app.server import GRACEFUL_TIMEOUT

WORDS = 12
INTERVAL = 0.12  # between upstream events: a stream of WORDS words lasts about 2 s
CONTENT = " ".join(f"w{i}" for i in range(WORDS))
JSON_DELAY = 2.0  # non-streams: the provider answers after this long
MSG = [{"role": "user", "content": "shutdown"}]
EXIT_BOUND = 60.0  # generous: the slowest stream needs ~2 s; far below GRACEFUL_TIMEOUT


def slow_provider(ex: Exchange) -> None:
    if ex.request.stream:
        sse(interval=INTERVAL, content=CONTENT).run(ex)
    else:
        slow_headers(JSON_DELAY, then=reply(content=CONTENT)).run(ex)


@dataclass
class Call:
    client: str
    stream: bool
    content: str = "shutdown"  # the user message
    started: threading.Event = field(default_factory=threading.Event)  # headers in (and a first event)
    status: int | None = None
    request_id: str | None = None
    text: str = ""
    body: bytes = b""
    error: BaseException | None = None


def call_requests(server: ArbstrServer, call: Call) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": call.content}], "stream": call.stream}
    try:
        with requests.post(server.url("/v1/chat/completions"), json=body, stream=True, timeout=EXIT_BOUND) as r:
            call.status, call.request_id = r.status_code, r.headers.get("x-arbstr-request-id")
            if not call.stream:
                call.body = r.content
                call.text = json.loads(call.body)["choices"][0]["message"]["content"]
                return
            while data := r.raw.read1(65536):
                call.body += data
                if b"\n\n" in call.body:
                    call.started.set()
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
        call.error = e
    finally:
        if call.stream:  # the text of the events received, complete or not
            events = [json.loads(e[6:]) for e in call.body.split(b"\n\n") if e.startswith(b"data: {")]
            call.text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c.get("choices"))
        call.started.set()


def call_sdk(client: openai.OpenAI, call: Call) -> None:
    messages: Any = [{"role": "user", "content": call.content}]
    try:
        if call.stream:
            with client.chat.completions.with_streaming_response.create(model="gpt-4o", messages=messages,
                                                                       stream=True) as raw:
                call.status, call.request_id = raw.status_code, raw.headers.get("x-arbstr-request-id")
                for chunk in raw.parse():
                    call.started.set()
                    call.text += "".join(c.delta.content or "" for c in chunk.choices)
        else:
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
            call.status, call.request_id = raw.status_code, raw.headers.get("x-arbstr-request-id")
            call.text = raw.parse().choices[0].message.content or ""
    except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
        call.error = e
    finally:
        call.started.set()


def ends_with_error_event(body: bytes) -> bool:
    """The end of a stream that arbstr interrupted itself (SPEC §6.3): the error event, then [DONE]."""
    events = body.split(b"\n\n")
    if len(events) < 3 or events[-2:] != [b"data: [DONE]", b""] or not events[-3].startswith(b"data: "):
        return False
    try:
        return json.loads(events[-3][6:])["error"]["code"] == "stream_interrupted"
    except (ValueError, KeyError, TypeError):
        return False


def rows(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in con.execute("SELECT * FROM requests")}
    finally:
        con.close()


def launch(server: ArbstrServer, calls: list[Call]) -> list[threading.Thread]:
    threads = []
    for call in calls:
        if call.client == "sdk":
            target: Callable[..., None] = call_sdk
            args: tuple[Any, ...] = (server.openai_client(timeout=EXIT_BOUND), call)
        else:
            target, args = call_requests, (server, call)
        t = threading.Thread(target=target, args=args, name=f"{call.client}-{'stream' if call.stream else 'json'}")
        t.start()
        threads.append(t)
    return threads


def wait_in_flight(up: FakeUpstream, calls: list[Call]) -> None:
    """Every request has reached the provider and every stream has delivered its first event."""
    up.wait_for_requests(len(calls), timeout=30)
    for call in calls:
        if call.stream:
            assert call.started.wait(30), f"{call.client} stream never started: {call.error!r}"
    assert not any(c.started.is_set() for c in calls if not c.stream), "a non-stream was answered too early"


class Hammer:
    """Threads sending quick requests on keep-alive sessions until the server stops answering."""

    def __init__(self, server: ArbstrServer, n: int = 4) -> None:
        self.server = server
        self.answered: list[tuple[int, str]] = []
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"hammer-{i}") for i in range(n)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        body = {"model": "gpt-4o-mini", "messages": MSG}
        with requests.Session() as s:
            for n in itertools.count():
                try:
                    r = s.post(self.server.url("/v1/chat/completions"), timeout=EXIT_BOUND,
                               json={**body, "stream": (i + n) % 3 == 0})
                    r.content  # noqa: B018 - read to the end
                except requests.ConnectionError:
                    return  # the server is going away: no answer, so no row is owed
                except requests.RequestException as e:
                    with self._lock:
                        self.failures.append(e)
                    return
                with self._lock:
                    self.answered.append((r.status_code, r.headers.get("x-arbstr-request-id", "")))

    def join(self) -> None:
        for t in self.threads:
            t.join(EXIT_BOUND)
        assert not any(t.is_alive() for t in self.threads)


def test_sigterm_lets_in_flight_streams_and_requests_finish(fake_upstream, make_config, gunicorn_server,
                                                            tmp_path: Path) -> None:
    """Shipped graceful_timeout: everything in flight (streams, slow non-streams, non-streams waiting out a
    Retry-After) is answered in full, and every answer has its final row, including quick requests that
    kept arriving on keep-alive connections while the worker shut down."""
    slow, fast = fake_upstream(2)
    rate_limited: set[str] = set()

    def slow_after_429(ex: Exchange) -> None:
        """"retry" requests: 429 with Retry-After: 1 first, so the signal finds arbstr waiting to retry."""
        key = ex.request.headers["Idempotency-Key"]
        if ex.request.json["messages"][0]["content"] == "retry" and key not in rate_limited:
            rate_limited.add(key)
            error(429, retry_after=1).run(ex)
        else:
            slow_provider(ex)

    slow.default = slow_after_429
    server = gunicorn_server(make_config([provider(slow, "slow", models=["gpt-4o"]),
                                          provider(fast, "fast", models=["gpt-4o-mini"])]))
    calls = [Call(client, stream, content) for client in ("sdk", "requests")
             for stream, content in ((True, "a"), (True, "b"), (True, "c"), (False, "d"), (False, "retry"))]
    threads = launch(server, calls)
    hammer = Hammer(server)
    wait_in_flight(slow, calls)
    fast.wait_for_requests(20, timeout=30)  # the hammer is going too
    t_term = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    code = server.proc.wait(EXIT_BOUND)
    exit_secs = time.monotonic() - t_term
    for t in threads:
        t.join(EXIT_BOUND)
    hammer.join()
    print(f"\nmaster exited with {code} {exit_secs:.2f}s after SIGTERM (graceful_timeout {GRACEFUL_TIMEOUT}s); "
          f"hammer answered {len(hammer.answered)}")
    assert code == 0
    assert exit_secs < EXIT_BOUND  # the streams' remaining ~2 s plus keep-alive linger, not graceful_timeout
    # Everything in flight got its whole answer.
    for call in calls:
        assert call.error is None, f"{call.client} stream={call.stream}: {call.error!r}"
        assert call.status == 200 and call.text == CONTENT, (call.client, call.stream, call.status, call.text)
        if call.client == "requests" and call.stream:
            assert call.body.endswith(b"\n\ndata: [DONE]\n\n")
    assert hammer.failures == []
    assert {status for status, _ in hammer.answered} == {200}

    # After the exit, one final row per answered request; nothing left streaming, nothing lost.
    logged = rows(tmp_path / "arbstr.db")
    answered = {c.request_id for c in calls} | {rid for _, rid in hammer.answered}
    assert set(logged) == answered
    assert {r["status"] for r in logged.values()} <= {"ok", "complete"}
    for call in calls:
        row = logged[call.request_id]
        assert row["status"] == ("complete" if call.stream else "ok"), row
        assert row["success"] == 1 and row["http_status"] == 200 and row["provider"] == "slow"
        assert row["output_tokens"] == 20  # the fake's usage (fakes.DEFAULT_USAGE): accounted to the end
        assert row["retries"] == ("1/slow" if call.content == "retry" else None)


def test_streams_outliving_graceful_timeout(fake_upstream, make_config, gunicorn_server, tmp_path: Path) -> None:
    """Documented limit (SPEC FIELD-NOTES, README): graceful_timeout cuts longer streams. What is in
    flight and shorter still finishes; a cut stream never looks complete to its client; its row, left
    `streaming` by the killed worker, must become `interrupted` when arbstr starts again (SPEC §6.2)."""
    up = fake_upstream(name="slow")
    long_stream = sse(interval=0.2, content=" ".join(["long"] * 150))  # 30 s

    def provider_action(ex: Exchange) -> None:
        if ex.request.json["messages"][0]["content"] == "long":
            long_stream.run(ex)
        else:
            slow_provider(ex)

    up.default = provider_action
    config = make_config([provider(up, "slow")])
    grace = 3
    server = gunicorn_server(config, args=["--graceful-timeout", str(grace)])
    cut = [Call("sdk", True), Call("requests", True)]
    for call in cut:
        call.content = "long"
    short = [Call("sdk", True), Call("requests", False)]
    threads = launch(server, cut + short)
    wait_in_flight(up, cut + short)
    t_term = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(grace + EXIT_BOUND)
    exit_secs = time.monotonic() - t_term
    for t in threads:
        t.join(EXIT_BOUND)
    print(f"\nmaster exited with {code} {exit_secs:.2f}s after SIGTERM (graceful_timeout {grace}s)")
    for call in cut:
        print(f"cut {call.client} stream: {len(call.text)} chars, then {call.error!r}")
    assert exit_secs < grace + 15

    for call in short:
        assert call.error is None and call.text == CONTENT, (call.client, call.stream, call.error, call.text)
    for call in cut:
        # Cut when the master kills the worker: no error event can be sent then, but the client can tell
        # (the SDK raises, requests sees the chunked body end early); never a silent success.
        assert call.status == 200 and call.text.startswith("long")
        assert call.error is not None or ends_with_error_event(call.body), \
            f"{call.client}: a cut stream ended like a complete one"
        assert b": arbstr " not in call.body
    logged = rows(tmp_path / "arbstr.db")
    assert set(logged) == {c.request_id for c in cut + short}
    for call in short:
        assert logged[call.request_id]["status"] == ("complete" if call.stream else "ok")
    assert {logged[c.request_id]["status"] for c in cut} <= {"streaming", "interrupted"}  # killed mid-stream

    # The next start marks the dead process' streams interrupted. Its writer sweeps before it writes
    # its first row, so once one request's row is in, the sweep has run.
    again = gunicorn_server(config)
    rid = again.chat(model="no-such-model").headers["x-arbstr-request-id"]  # a 404 has its row too
    deadline = time.monotonic() + 20
    while rid not in rows(tmp_path / "arbstr.db"):
        assert time.monotonic() < deadline, "the restarted arbstr wrote no row"
        time.sleep(0.05)
    after = {c.request_id: rows(tmp_path / "arbstr.db")[c.request_id] for c in cut}
    for row in after.values():
        assert row["status"] == "interrupted" and row["success"] == 0, row
