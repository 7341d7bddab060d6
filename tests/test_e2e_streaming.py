"""End to end streaming (SPEC §6, §5.2 before the first byte, §5.3 stream outcomes, §7 stream rows).

Real `gunicorn arbstr:app`, fake providers on loopback that write exact bytes (and die, stall or cut
on script), and two clients: the openai SDK, which is what users run, and `requests` reading with
``raw.read1``, which shows the exact bytes as they arrive.

Order, not speed: where a test needs "arbstr has passed event N on", the fake holds event N+1 behind a
``Pause`` the test releases only once the client has event N. How fast events go through is measured
by bench/bench_stream.py (per-event delay and TTFT overhead, chunked and close-delimited upstreams),
not asserted here: a subprocess on a shared 2-core machine has no latency a test could rely on.

A stream's log row is finished by arbstr's background writer after the stream ends; nothing crosses
the process boundary to wait on, so ``settled_row`` polls ``GET /v1/requests/<id>`` until the row has
left the ``streaming`` state.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import requests
from conftest import ArbstrServer, provider
from fakes import CREATED, Pause, splits_at, sse, sse_event, stream_chunks

MSG = [{"role": "user", "content": "hello there"}]
RATES = {"input_rate": 4, "output_rate": 10, "base_fee": 2}
USAGE = {"prompt_tokens": 123, "completion_tokens": 45, "total_tokens": 168}
NEVER_OPEN = {"failure_threshold": 1000, "open_secs": 60}  # failures are counted, the circuit stays closed
INTERVAL = 0.25  # seconds between upstream events, for streams that must still be running
HELD = 60.0  # a Pause that only the test ends: far beyond every client timeout below
READ_TIMEOUT = 10.0  # the client's per-read timeout where a held event must not be needed
UNHURRIED = 2 * HELD  # stream_idle_timeout_secs where a Pause must end only when released
COMMENT = re.compile(rb": arbstr (\{[^\n]*\})\n\n")


def expected_cost(usage: dict[str, int], rates: dict[str, float] = RATES) -> float:
    """SPEC §2.3, written out independently of arbstr_core.request.cost."""
    return (usage["prompt_tokens"] * rates["input_rate"]
            + usage["completion_tokens"] * rates["output_rate"]) / 1000 + rates["base_fee"]


@pytest.fixture
def single(fake_upstream, make_config, gunicorn_server):
    """One fake provider `p` with RATES; ``start(**server_table)`` runs arbstr with a 1 s idle timeout."""
    up = fake_upstream(name="p")

    def start(**server: Any) -> ArbstrServer:
        config = make_config([provider(up, "p", **RATES)], server={"stream_idle_timeout_secs": 1, **server},
                             circuit_breaker=NEVER_OPEN)
        return gunicorn_server(config)

    return up, start


def failure_count(server: ArbstrServer, name: str = "p") -> int:
    return server.get("/health").json()["providers"][name]["failure_count"]


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def sse_events(resp: requests.Response) -> Iterator[bytes]:
    """Each LF-framed event of a streamed response, yielded as soon as its last byte has been read
    (``read1`` returns what has arrived and never waits for more)."""
    buf = b""
    while True:
        while b"\n\n" not in buf:
            data = resp.raw.read1(65536)
            if not data:
                assert not buf, f"body ended inside an event: {buf[:200]!r}"
                return
            buf += data
        event, buf = buf.split(b"\n\n", 1)
        yield event


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-e2e", "object": "chat.completion.chunk", "created": CREATED, "model": "gpt-4o",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def stream_of(stream: Any, on_chunk: Callable[[int], object] | None = None) -> tuple[list[Any], BaseException | None]:
    """Iterate an SDK stream to its end; the chunks seen and the exception that ended it, if any.
    ``on_chunk(n)`` runs once the n-th chunk (1-based) has arrived."""
    got: list[Any] = []
    try:
        for c in stream:
            got.append(c)
            if on_chunk is not None:
                on_chunk(len(got))
    except openai.APIError as e:
        return got, e
    return got, None


# ---------------------------------------------------------------------------------------------------
# A normal stream through the SDK (§6.1)


def test_sdk_stream_content_usage_chunk_and_final_completion(single) -> None:
    up, start = single
    up.default = sse(usage=USAGE)
    server = start()
    client = server.openai_client()

    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}) as raw:
        request_id = raw.headers["x-arbstr-request-id"]
        chunks = list(raw.parse())
    assert text_of(chunks) == "Hello from p!"
    assert all(c.choices for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == 123 and last.usage.completion_tokens == 45
    extra = last.model_extra["arbstr"]
    assert extra["cost_sats"] == pytest.approx(expected_cost(USAGE), abs=1e-12)
    assert extra["provider"] == "p" and extra["request_id"] == request_id
    assert isinstance(extra["latency_ms"], int) and extra["latency_ms"] >= 0

    # Not asked for: no chunk with empty choices, no usage, although arbstr asked the provider for it.
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert text_of(chunks) == "Hello from p!"
    assert up.requests[-1].json["stream_options"] == {"include_usage": True}

    # The helper concatenates repeated string fields and keeps the last usage: role once, usage last.
    with client.chat.completions.stream(model="gpt-4o", messages=MSG,
                                        stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.content == "Hello from p!" and message.role == "assistant"
    assert final.choices[0].finish_reason == "stop"
    assert final.usage is not None and final.usage.completion_tokens == 45
    with client.chat.completions.stream(model="gpt-4o", messages=MSG) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from p!" and final.choices[0].message.role == "assistant"
    assert final.usage is None


def test_complete_stream_row_has_usage_cost_and_timing(single) -> None:
    up, start = single
    up.default = sse(usage=USAGE, interval=0.1)
    server = start()
    t0 = time.monotonic()
    r = server.chat(stream=True)
    body = r.content  # read through the final chunk: the stream has ended on arbstr's side
    wall_ms = (time.monotonic() - t0) * 1000
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-arbstr-streaming"] == "true" and r.headers["x-arbstr-provider"] == "p"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    assert r.headers["transfer-encoding"] == "chunked"
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    trailer = json.loads(COMMENT.search(body).group(1))
    assert trailer["cost_sats"] == pytest.approx(expected_cost(USAGE), abs=1e-12)

    row = server.settled_row(r.headers["x-arbstr-request-id"])
    assert row["status"] == "complete" and row["success"] is True
    assert row["streaming"] is True and row["http_status"] == 200 and row["provider"] == "p"
    assert row["tokens"] == {"input": 123, "output": 45, "cached": 0, "reasoning": None}
    assert row["cost_sats"] == pytest.approx(expected_cost(USAGE), abs=1e-12)
    assert row["error"] is None and row["retries"] is None
    timing = row["timing"]
    # Events 0.1 s apart: the first content ("Hello") is the second event, [DONE] the eighth frame.
    assert 100 <= timing["ttft_ms"] <= timing["stream_duration_ms"]
    assert timing["latency_ms"] == timing["stream_duration_ms"]
    assert 600 <= timing["stream_duration_ms"] <= wall_ms + 1
    assert trailer["latency_ms"] <= timing["stream_duration_ms"]
    # Speed: the 45 output tokens over first content → end (about 0.5 s of events 0.1 s apart).
    generating_ms = timing["stream_duration_ms"] - timing["ttft_ms"]
    assert timing["output_tokens_per_sec"] == pytest.approx(45 * 1000 / generating_ms, abs=0.001)
    assert 400 <= generating_ms <= wall_ms
    assert failure_count(server) == 0


# ---------------------------------------------------------------------------------------------------
# Failures after the first byte (§6.3): the SDK raises, the row says interrupted


def running_usage(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chunks that each carry the usage so far, as providers with continuous usage stats send them."""
    return [{**c, "usage": {"prompt_tokens": 10, "completion_tokens": i + 1, "total_tokens": 11 + i}}
            for i, c in enumerate(chunks)]


@pytest.mark.parametrize("with_usage", [False, True], ids=["no-usage", "usage-seen"])
@pytest.mark.parametrize(("chunked", "cut"), [(True, "close"), (True, "rst"), (False, "rst")],
                         ids=["chunked-fin", "chunked-rst", "close-delimited-rst"])
def test_upstream_dying_after_three_chunks(single, chunked: bool, cut: str, with_usage: bool) -> None:
    up, start = single
    chunks = stream_chunks(content="one two three four five", usage=USAGE)
    if with_usage:
        chunks = running_usage(chunks)
    # The connection dies only once the client has the third chunk, so arbstr has read all three (an
    # RST discards unread bytes): the pause is released from the client side, not by a timer.
    die = Pause(HELD)
    up.default = sse([*chunks[:3], die, *chunks[3:]], cut_after=3, cut=cut, chunked=chunked)
    server = start(stream_idle_timeout_secs=UNHURRIED)  # the cut, not a slow release, ends the stream
    with server.openai_client(timeout=READ_TIMEOUT).chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MSG, stream=True) as raw:
        request_id = raw.headers["x-arbstr-request-id"]
        got, err = stream_of(raw.parse(), on_chunk=lambda n: die.release() if n == 3 else None)
    assert isinstance(err, openai.APIError), "a truncated stream must not look like a completion"
    assert err.code == "stream_interrupted" and err.type == "upstream_error"
    assert "interrupted" in err.message
    assert text_of(got) == "one two" and len(got) == 3

    row = server.settled_row(request_id)
    assert row["status"] == "interrupted" and row["success"] is False and row["http_status"] == 200
    assert row["error"]["type"] == "upstream_error" and "broke" in row["error"]["message"]
    if with_usage:
        assert row["tokens"] == {"input": 10, "output": 3, "cached": 0, "reasoning": None}
        assert row["cost_sats"] == pytest.approx((10 * 4 + 3 * 10) / 1000 + 2, abs=1e-12)
    else:
        assert row["tokens"] == {"input": None, "output": None, "cached": None, "reasoning": None} and row["cost_sats"] is None
    assert row["timing"]["latency_ms"] == row["timing"]["stream_duration_ms"]
    assert failure_count(server) == 1  # upstream broke mid-stream: a breaker failure (§5.3)


def test_upstream_going_idle_past_the_idle_timeout(single) -> None:
    up, start = single
    chunks = stream_chunks(content="one two three", usage=USAGE)
    silence = Pause(HELD)
    up.default = sse([*chunks[:2], silence, *chunks[2:]])
    server = start()  # stream_idle_timeout_secs = 1
    asked = time.monotonic()  # arbstr's last upstream read (the second event) comes after this
    stream = server.openai_client(timeout=30).chat.completions.create(model="gpt-4o", messages=MSG, stream=True)
    it = iter(stream)
    got = [next(it), next(it)]
    more, err = stream_of(it)
    ended = time.monotonic() - asked
    assert isinstance(err, openai.APIError) and err.code == "stream_interrupted"
    assert not more and text_of(got) == "one"
    assert not silence.released  # the provider was still silent: arbstr's idle timeout ended it
    # Not before the 1 s idle timeout (counted from a moment before the last read, so this bound is
    # exact); long before the 60 s silence would have ended (generous for a loaded machine).
    assert 1.0 <= ended < 10.0
    up.connections[0].wait_closed_by_client(5)  # arbstr hung up on the silent provider

    request_id = stream.response.headers["x-arbstr-request-id"]
    row = server.settled_row(request_id)
    assert row["status"] == "interrupted" and row["success"] is False
    assert "silent" in row["error"]["message"]
    assert row["tokens"] == {"input": None, "output": None, "cached": None, "reasoning": None} and row["cost_sats"] is None


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_a_finished_stream_without_done_is_complete(single, chunked: bool) -> None:
    """SPEC §6.2: every choice has a finish_reason and the body ended cleanly, only [DONE] is missing.
    Clients get arbstr's trailer and [DONE]; the openai SDK sees a normal end."""
    up, start = single
    up.default = sse(usage=USAGE, done=False, chunked=chunked)
    server = start()
    with server.openai_client().chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}) as raw:
        request_id = raw.headers["x-arbstr-request-id"]
        got, err = stream_of(raw.parse())
    assert err is None
    assert text_of(got) == "Hello from p!" and got[-1].usage.completion_tokens == 45

    row = server.settled_row(request_id)
    assert row["status"] == "complete" and row["success"] is True and row["error"] is None
    assert row["cost_sats"] == pytest.approx(expected_cost(USAGE), abs=1e-12)
    assert failure_count(server) == 0

    # The raw bytes end with the trailer comment, then [DONE], then a clean end of the body.
    r = server.chat(stream=True)
    events = r.content.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]" and events[-3].startswith(b": arbstr {")
    assert b"stream_interrupted" not in r.content


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_upstream_ending_unfinished_without_done(single, chunked: bool) -> None:
    """A clean end of body before any finish_reason: the answer may be cut short, so it is an error."""
    up, start = single
    chunks = [c for c in stream_chunks("gpt-4o", "Hello from p!", usage=USAGE)
              if not any(ch.get("finish_reason") for ch in c["choices"])]
    up.default = sse(chunks, done=False, chunked=chunked)
    server = start()
    with server.openai_client().chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}) as raw:
        request_id = raw.headers["x-arbstr-request-id"]
        got, err = stream_of(raw.parse())
    assert isinstance(err, openai.APIError) and err.code == "stream_interrupted"
    assert text_of(got) == "Hello from p!" and got[-1].usage.completion_tokens == 45

    row = server.settled_row(request_id)
    assert row["status"] == "interrupted" and row["success"] is False
    assert "[DONE]" in row["error"]["message"]
    assert row["tokens"] == {"input": 123, "output": 45, "cached": 0, "reasoning": None}  # the usage seen before the end still counts
    assert row["cost_sats"] == pytest.approx(expected_cost(USAGE), abs=1e-12)

    # The raw bytes: the error event in OpenAI's shape, then [DONE], then a clean end of the body.
    r = server.chat(stream=True)
    events = r.content.split(b"\n\n")
    assert events[-3:] == [events[-3], b"data: [DONE]", b""]
    error = json.loads(events[-3].removeprefix(b"data: "))
    assert error["error"]["code"] == "stream_interrupted" and error["error"]["param"] is None
    assert not COMMENT.search(r.content)  # the `: arbstr` trailer belongs to complete streams only


# ---------------------------------------------------------------------------------------------------
# The client leaving (§6.3): upstream closed at once, row client_disconnected, breaker neutral


def _leave_after_one_chunk_sdk(server: ArbstrServer) -> str:
    raw = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG,
                                                                           stream=True)
    stream = raw.parse()
    next(iter(stream))
    stream.close()
    return raw.headers["x-arbstr-request-id"]


def _leave_after_one_chunk_requests(server: ArbstrServer) -> str:
    r = server.chat(stream=True)
    assert r.raw.read1(65536)
    r.close()
    return r.headers["x-arbstr-request-id"]


@pytest.mark.parametrize("leave", [_leave_after_one_chunk_sdk, _leave_after_one_chunk_requests],
                         ids=["sdk", "requests"])
def test_client_leaving_closes_the_upstream(single, leave: Callable[[ArbstrServer], str]) -> None:
    """The client leaves after the first chunk. The provider then sends a few events (which arbstr can
    only fail to deliver) and stalls for 60 s: its connection closes before that only if arbstr hangs up."""
    up, start = single
    chunks = stream_chunks(content=" ".join(f"w{i}" for i in range(60)))
    resume, stall = Pause(HELD), Pause(HELD)
    up.default = sse([chunks[0], resume, *chunks[1:4], stall, *chunks[4:]])
    server = start(stream_idle_timeout_secs=UNHURRIED)  # no idle timeout during the stall: only a hang-up
    asked = time.monotonic()
    request_id = leave(server)
    resume.release()  # only now does the provider go on: the client is gone by then
    conn = up.last_request.connection
    conn.wait_closed_by_client(timeout=10)  # generous: the alternative is the 60 s stall
    assert not stall.released and conn.events_sent <= 4  # the provider stopped generating

    row = server.settled_row(request_id)
    assert row["status"] == "client_disconnected" and row["success"] is False
    assert row["tokens"] == {"input": None, "output": None, "cached": None, "reasoning": None} and row["cost_sats"] is None
    # The stream's duration is real time within this test, not the whole stream's 60 s and more.
    assert row["timing"]["stream_duration_ms"] <= (time.monotonic() - asked) * 1000
    assert failure_count(server) == 0  # neutral for the breaker


def test_stream_outcomes_feed_the_breaker(single) -> None:
    """§5.3: completed → success (count reset), broke mid-stream → failure, client gone → neutral."""
    up, start = single
    server = start()
    up.script(sse(cut_after=2, cut="rst", interval=0.05))
    r = server.chat(stream=True)
    assert b'"stream_interrupted"' in r.content
    assert server.settled_row(r.headers["x-arbstr-request-id"])["status"] == "interrupted"
    assert failure_count(server) == 1

    up.script(sse(content=" ".join(["w"] * 40), interval=INTERVAL))
    request_id = _leave_after_one_chunk_sdk(server)
    up.connections[-1].wait_closed_by_client(timeout=10)
    assert server.settled_row(request_id)["status"] == "client_disconnected"
    assert failure_count(server) == 1

    r = server.chat(stream=True)
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert server.settled_row(r.headers["x-arbstr-request-id"])["status"] == "complete"
    assert failure_count(server) == 0


# ---------------------------------------------------------------------------------------------------
# Relay order (§3, §6.1): each event goes out when it arrives, chunked or close-delimited upstream


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_events_are_relayed_as_they_arrive(single, chunked: bool) -> None:
    """The client has each event while the provider still holds back the next one: the fake stops after
    every event until the test, having received that event through arbstr, releases the next. A relay
    that held back even one event would starve the client, whose reads time out (10 s) long before
    the fake gives up waiting (60 s). No clock is read: a busy machine makes this slower, never wrong.
    """
    up, start = single
    server = start(stream_idle_timeout_secs=UNHURRIED)  # however long the test takes to release a gate
    events = stream_chunks("gpt-4o", "a b c", usage=USAGE)  # role, "a", " b", " c", finish, usage
    assert len(events) == 6

    def gated() -> list[Pause]:
        """Script the next stream: event i, then gate i (the last one holds back [DONE])."""
        gates = [Pause(HELD) for _ in events]
        up.script(sse([item for pair in zip(events, gates, strict=True) for item in pair], chunked=chunked))
        return gates

    gates = gated()
    r = server.chat(stream=True, extra={"stream_options": {"include_usage": True}}, timeout=READ_TIMEOUT)
    conn = up.last_request.connection
    received = sse_events(r)
    for i, gate in enumerate(gates):
        got = json.loads(next(received).removeprefix(b"data: "))
        if i == len(events) - 1:
            assert got.pop("arbstr")["provider"] == "p"  # the usage chunk, with arbstr's cost added
        assert got == events[i]
        assert not gate.released and conn.events_sent <= i + 1  # event i + 1 is still at the provider
        gate.release()
    trailer, done = list(received)
    assert trailer.startswith(b": arbstr {") and done == b"data: [DONE]"

    # The same through the SDK's iterator: chunk n is in the client's hands before gate n opens.
    gates = gated()
    stream = server.openai_client(timeout=READ_TIMEOUT).chat.completions.create(
        model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True})
    conn = up.last_request.connection
    chunks = []
    for n, c in enumerate(stream, 1):
        chunks.append(c)
        assert not gates[n - 1].released and conn.events_sent <= n
        gates[n - 1].release()
    assert len(chunks) == 6 and text_of(chunks) == "a b c" and chunks[-1].usage.completion_tokens == 45


# ---------------------------------------------------------------------------------------------------
# Byte-exactness through the whole proxy (§6.1)


def _byte_script() -> tuple[list[bytes], int, Callable[[bytes], list[int]], str]:
    """Upstream frames covering the awkward cases, the index of the usage frame, the write splits and
    the content the SDK must reassemble."""
    big = ("0123456789 abcdé 😀 " * 10_000)[:190_000]  # ~200 KB in one event, multi-byte throughout
    pieces = ["", "héllo 世界 🎉", " line\u2028sep\u2029para", " crlf", " " + big, " tail"]
    frames = [
        b": keep-alive before the first event\n\n",
        sse_event(chunk({"role": "assistant", "content": pieces[0]})),
        sse_event(chunk({"content": pieces[1]})),
        b": a comment line inside an event\n" + sse_event(chunk({"content": pieces[2]})),
        sse_event(chunk({"content": pieces[3]}), eol=b"\r\n"),
        b": keep-alive between events\r\n\r\n",
        sse_event(chunk({"content": pieces[4]})),
        b"data:" + json.dumps(chunk({"content": pieces[5]}), ensure_ascii=False).encode() + b"\r\n\r\n",
        sse_event(chunk({}, "stop"), eol=b"\r\n"),
        sse_event({**chunk({}), "choices": [], "usage": USAGE}, eol=b"\r\n"),
        b"data: [DONE]\n\n",
    ]
    usage_index = 9
    big_at = b"".join(frames).index(big.encode())

    def splits(payload: bytes) -> list[int]:
        cuts = [*splits_at("世", 1)(payload), *splits_at("🎉", 2)(payload), *splits_at("é", 1)(payload)[:3],
                *splits_at("\u2028", 2)(payload), *splits_at(b"\r\n", 1)(payload), *splits_at(b"\r\n\r\n", 2)(payload)]
        mid = payload.index("😀".encode(), big_at + 100_000) + 3  # inside a 4-byte character of the big event
        return [*cuts, mid]

    return frames, usage_index, splits, "".join(pieces)


@pytest.mark.parametrize(("chunked", "include_usage"), [(True, False), (False, True)],
                         ids=["chunked-no-usage", "close-delimited-usage"])
def test_events_reach_the_client_byte_identical(single, chunked: bool, include_usage: bool) -> None:
    up, start = single
    frames, usage_index, splits, content = _byte_script()
    up.default = sse(frames, done=False, chunked=chunked, write_splits=splits, split_delay=0.01)
    server = start()
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    r = server.chat(stream=True, extra=extra)
    body = r.content
    assert r.status_code == 200

    before_usage = b"".join(frames[:usage_index])
    at = _first_difference(body, before_usage)
    assert body.startswith(before_usage), f"first difference at byte {at}: {body[at-40:at+40]!r} vs {before_usage[at-40:at+40]!r}"
    rest = body[len(before_usage):]
    if include_usage:
        # The one rewritten event: the usage chunk with the `arbstr` field added.
        usage_event, _, rest = rest.partition(b"\n\n")
        sent = json.loads(usage_event.removeprefix(b"data: "))
        arbstr = sent.pop("arbstr")
        assert sent == {**chunk({}), "choices": [], "usage": USAGE}
        assert arbstr["provider"] == "p" and arbstr["request_id"] == r.headers["x-arbstr-request-id"]
    m = COMMENT.match(rest)
    assert m, rest[:200]
    assert json.loads(m.group(1))["cost_sats"] == pytest.approx(expected_cost(USAGE), abs=1e-12)
    assert rest[m.end():] == frames[-1]

    # And the SDK reassembles exactly the text the provider sent (U+2028 and split characters intact).
    chunks = list(server.openai_client().chat.completions.create(model="gpt-4o", messages=MSG, stream=True,
                                                                 **extra))
    assert text_of(chunks) == content
    assert (chunks[-1].usage is not None) == include_usage


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ---------------------------------------------------------------------------------------------------
# Fail-over before the first byte (§5.2)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_error_as_first_event_fails_over_to_the_next_provider(fake_upstream, make_config, gunicorn_server,
                                                             chunked: bool) -> None:
    primary, fallback = fake_upstream(2)
    overloaded = {"error": {"message": "model overloaded", "type": "server_error", "param": None,
                            "code": "overloaded"}}
    # A keep-alive comment first: arbstr holds it, so nothing of the failed provider reaches the client.
    primary.default = sse([b": keep-alive\n\n", overloaded], chunked=chunked, first_delay=0.05)
    config = make_config([provider(primary, "primary", **RATES), provider(fallback, "fallback", **RATES)],
                         circuit_breaker=NEVER_OPEN)
    server = gunicorn_server(config)

    r = server.chat(stream=True)
    assert r.status_code == 200
    assert r.headers["x-arbstr-provider"] == "fallback" and r.headers["x-arbstr-retries"] == "1/primary"
    body = r.content
    assert b"keep-alive" not in body and b"overloaded" not in body
    assert body.endswith(b"data: [DONE]\n\n")
    row = server.settled_row(r.headers["x-arbstr-request-id"])
    assert row["status"] == "complete" and row["provider"] == "fallback" and row["retries"] == "1/primary"
    assert failure_count(server, "primary") == 1 and failure_count(server, "fallback") == 0

    chunks = list(server.openai_client().chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    assert text_of(chunks) == f"Hello from {fallback.name}!"
    assert len(primary.requests) == 2 and len(fallback.requests) == 2
