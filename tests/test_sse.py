"""SSE at the byte level (SPEC §6.1): event splitting wherever TCP cuts, terminators, UTF-8, helpers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence

import pytest

from arbstr_core.request.sse import (
    DONE,
    DONE_EVENT,
    EventSplitter,
    comment,
    data_event,
    error_event,
    event_data,
    has_content,
    is_usage_only,
    parse_json,
)


def chunk(content: str, **extra: object) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}
    obj.update(extra)
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def feed_all(pieces: Iterable[bytes]) -> tuple[list[bytes], bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    for piece in pieces:
        events.extend(splitter.feed(piece))
    return events, splitter.pending()


def split_at(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# Events written with every terminator style. None ends with a bare CR followed by an event that
# starts with LF (that pair is one CRLF, so it is not two events by definition).
EVENTS = [
    b"data: " + chunk("Hel") + b"\n\n",
    b"data: " + chunk("lo") + b"\r\n\r\n",
    b": keep-alive\n\n",
    b"data: " + chunk(" wor") + b"\r\r",
    b"event: message\r\nid: 7\r\ndata: " + chunk("ld") + b"\r\n\r\n",
    b"data: line one\ndata: line two\n\n",
    b"data: " + chunk("é€😀\u2028\u2029") + b"\n\r\n",
    b"data: mixed\r\n\n",
    b"data: cr then crlf\r\r\n",
    b"data: " + chunk("", usage={"prompt_tokens": 5, "completion_tokens": 7}) + b"\n\n",
    b"data: [DONE]\n\n",
]
STREAM = b"".join(EVENTS)


def test_one_feed_yields_every_event_intact() -> None:
    events, pending = feed_all([STREAM])
    assert events == EVENTS
    assert pending == b""


# Where each event ends in STREAM. A cut exactly between the CR and LF of an event's final CRLF is the
# one place the pieces differ from EVENTS: a CR already ends the blank line, so the event is released
# at once (never held for bytes that may not come), and the LF that follows is handed back alone, so
# the bytes relayed are still the bytes received (a conforming SSE parser, the OpenAI SDK's included,
# pairs that LF with the CR).
ENDS = list(itertools.accumulate(len(e) for e in EVENTS))


def expected_events(cuts: Sequence[int]) -> list[bytes]:
    out: list[bytes] = []
    for e, end in zip(EVENTS, ENDS, strict=True):
        out += [e[:-1], b"\n"] if e.endswith(b"\r\n") and end - 1 in cuts else [e]
    return out


def data_of(events: Iterable[bytes]) -> list[bytes | None]:
    """Each event's data, leaving out the lone LFs that complete a CRLF split from its CR."""
    return [event_data(e) for e in events if e != b"\n"]


def test_every_single_split_point_gives_identical_events() -> None:
    for cut in range(len(STREAM) + 1):
        events, pending = feed_all(split_at(STREAM, [cut]))
        assert events == expected_events([cut]), f"split at byte {cut}"
        assert data_of(events) == data_of(EVENTS)
        assert pending == b""


def test_every_pair_of_split_points_around_terminators_gives_identical_events() -> None:
    # Every pair of cuts within 6 bytes of each other: covers every way a terminator run can be cut in three.
    for a in range(len(STREAM) + 1):
        for b in range(a, min(a + 6, len(STREAM)) + 1):
            events, pending = feed_all(split_at(STREAM, [a, b]))
            assert events == expected_events([a, b]), f"split at bytes {a}, {b}"
            assert pending == b""


def test_byte_by_byte_feed() -> None:
    events, pending = feed_all(STREAM[i : i + 1] for i in range(len(STREAM)))
    assert events == expected_events(range(len(STREAM) + 1)) and pending == b""
    assert data_of(events) == data_of(EVENTS)


@pytest.mark.parametrize("size", [2, 3, 5, 7, 64, 1000])
def test_fixed_size_reads(size: int) -> None:
    cuts = range(size, len(STREAM), size)
    events, pending = feed_all(split_at(STREAM, list(cuts)))
    assert events == expected_events(cuts) and pending == b""


def test_concatenated_output_is_the_input_byte_for_byte() -> None:
    cr_lf_cuts = {end - 1 for e, end in zip(EVENTS, ENDS, strict=True) if e.endswith(b"\r\n")}
    assert len(cr_lf_cuts) == 4  # the events ending "\r\n\r\n" (twice), "\n\r\n" and "\r\r\n"
    for cut in range(len(STREAM) + 1):
        events, _ = feed_all(split_at(STREAM, [cut]))
        assert b"".join(events) == STREAM, f"split at byte {cut}"
        assert (b"\n" in events) == (cut in cr_lf_cuts)
    events, _ = feed_all(STREAM[i : i + 1] for i in range(len(STREAM)))
    assert b"".join(events) == STREAM


@pytest.mark.parametrize(
    "terminator", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n", b"\n\r", b"\r\r\n", b"\r\n\r"]
)
def test_each_blank_line_form_ends_an_event(terminator: bytes) -> None:
    event = b"data: {}" + terminator
    splitter = EventSplitter()
    assert splitter.feed(event) == [event]
    assert splitter.pending() == b""


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n", b"\r"])
def test_one_line_ending_does_not_end_an_event(terminator: bytes) -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: {}" + terminator) == []
    assert splitter.pending() == b"data: {}" + terminator


def test_crlf_lines_inside_one_event_stay_one_event() -> None:
    event = b"id: 1\r\nevent: message\r\ndata: a\r\ndata: b\r\n\r\n"
    assert feed_all([event]) == ([event], b"")
    assert event_data(event) == b"a\nb"


def test_event_released_as_soon_as_its_blank_line_arrives() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: first\n\ndata: sec") == [b"data: first\n\n"]
    assert splitter.pending() == b"data: sec"
    assert splitter.feed(b"ond\n") == []
    assert splitter.feed(b"\n") == [b"data: second\n\n"]


def test_crlf_split_across_feeds() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\r\n") == [b"data: a\r\n\r\n"]
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r") == []
    assert splitter.feed(b"\n\r") == [b"data: a\r\n\r"]  # the blank line ended at its CR
    assert splitter.feed(b"\n") == [b"\n"]  # ... and its LF, passed on alone, is not a new line
    assert splitter.feed(b"data: b\n\n") == [b"data: b\n\n"]


def test_bare_cr_end_followed_by_lf_in_the_next_feed() -> None:
    splitter = EventSplitter()
    # "\r\n\r" is a complete blank line already (CR ends a line): the event is released at once.
    assert splitter.feed(b"data: a\r\n\r") == [b"data: a\r\n\r"]
    # The LF that follows completes that CRLF; it is passed on alone and does not start the next event.
    assert splitter.feed(b"\ndata: b\r\n\r\n") == [b"\n", b"data: b\r\n\r\n"]
    assert splitter.pending() == b""


def test_bare_cr_cr_end_followed_by_lf() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\r") == [b"data: a\r\r"]
    assert splitter.feed(b"\n") == [b"\n"]
    assert splitter.pending() == b""
    assert splitter.feed(b"data: b\r\r") == [b"data: b\r\r"]


def test_split_off_lf_survives_an_empty_read() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\r") == [b"data: a\r\r"]
    assert splitter.feed(b"") == []
    assert splitter.feed(b"\ndata: b\n\n") == [b"\n", b"data: b\n\n"]


def test_only_one_lf_is_split_off_and_only_right_after_a_cr_end() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\r\r") == [b"data: a\r\r"]
    assert splitter.feed(b"data: b\n\n") == [b"data: b\n\n"]  # no CR end: nothing to split off
    assert splitter.feed(b"\ndata: c\n\n") == [b"\ndata: c\n\n"]  # an LF here is a real (empty) line


def test_multibyte_utf8_split_mid_character_is_relayed_byte_identical() -> None:
    text = "é€😀 日本語 \u2028 🎉"
    event = b"data: " + chunk(text) + b"\n\n"
    encoded = text.encode("utf-8")
    start = event.index(encoded)
    for cut in range(start, start + len(encoded) + 1):  # every cut inside the multi-byte text
        events, _ = feed_all([event[:cut], event[cut:]])
        assert events == [event]
        assert json.loads(event_data(events[0]) or b"")["choices"][0]["delta"]["content"] == text


def test_unicode_line_separators_inside_json_do_not_split() -> None:
    # U+2028, U+2029 and U+0085 (NEL) are line breaks to str.splitlines, not to SSE.
    payload = chunk("a\u2028b\u2029c\u0085d")
    assert b"\xe2\x80\xa8" in payload and b"\xe2\x80\xa9" in payload and b"\xc2\x85" in payload
    event = b"data: " + payload + b"\n\n"
    events, _ = feed_all([event])
    assert events == [event]
    assert event_data(event) == payload


def test_escaped_newlines_inside_json_strings_do_not_split() -> None:
    payload = chunk("line1\n\nline2\r\n\r\n")  # json escapes them as \n, \r: no raw terminators
    event = b"data: " + payload + b"\n\n"
    assert feed_all([event]) == ([event], b"")


def test_comment_lines() -> None:
    events, _ = feed_all([b": ping\n\n: another\r\n\r\n:\n\n"])
    assert events == [b": ping\n\n", b": another\r\n\r\n", b":\n\n"]
    assert all(event_data(e) is None for e in events)


def test_comment_inside_a_data_event() -> None:
    event = b": note\ndata: x\n: more\ndata: y\n\n"
    assert feed_all([event]) == ([event], b"")
    assert event_data(event) == b"x\ny"


@pytest.mark.parametrize("read_size", [1024, 65536, 200_001])
def test_200kb_single_event(read_size: int) -> None:
    big = "x" * 100_000 + "ü" * 50_000  # 200,000 bytes of content
    event = b"data: " + chunk(big) + b"\n\n"
    assert len(event) > 200_000
    splitter = EventSplitter()
    out: list[bytes] = []
    for i in range(0, len(event), read_size):
        got = splitter.feed(event[i : i + read_size])
        if i + read_size < len(event):
            assert got == [], "nothing is released before the blank line"
        out.extend(got)
    assert out == [event]
    assert splitter.pending() == b""


def test_large_event_trickling_in_small_reads() -> None:
    event = b"data: " + chunk("y" * 200_000) + b"\r\n\r\n"
    events, pending = feed_all(event[i : i + 97] for i in range(0, len(event), 97))
    assert events == [event] and pending == b""


def test_pending_holds_an_unfinished_event_at_eof() -> None:
    events, pending = feed_all([b"data: a\n\ndata: {\"error\": {\"message\": \"x\"}}"])
    assert events == [b"data: a\n\n"]
    assert pending == b'data: {"error": {"message": "x"}}'
    assert isinstance(pending, bytes)


def test_feed_returns_bytes() -> None:
    (event,) = EventSplitter().feed(bytearray(b"data: a\n\n"))
    assert type(event) is bytes


# --- event_data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "data"),
    [
        (b"data: hello\n\n", b"hello"),
        (b"data:hello\n\n", b"hello"),
        (b"data:  two spaces\n\n", b" two spaces"),
        (b"data: a\ndata: b\ndata: c\n\n", b"a\nb\nc"),
        (b"data: a\r\ndata: b\r\n\r\n", b"a\nb"),
        (b"data: a\rdata: b\r\r", b"a\nb"),
        (b"data\n\n", b""),
        (b"data:\n\n", b""),
        (b"data: a\ndata\ndata: b\n\n", b"a\n\nb"),
        (b"event: delta\nid: 3\nretry: 100\ndata: x\n\n", b"x"),
        (b"data: [DONE]\n\n", DONE),
        (b"data: [DONE]\r\n\r\n", DONE),
        (b"data: caf\xc3\xa9\n\n", "café".encode()),
    ],
)
def test_event_data(event: bytes, data: bytes) -> None:
    assert event_data(event) == data


@pytest.mark.parametrize("event", [b": comment\n\n", b"event: ping\n\n", b"id: 5\n\n", b"\n\n", b"datax: y\n\n"])
def test_event_without_data(event: bytes) -> None:
    assert event_data(event) is None


# --- JSON helpers and event builders ------------------------------------------------------------


def test_parse_json() -> None:
    assert parse_json(b'{"a": 1}') == {"a": 1}
    assert parse_json('{"c": "é"}'.encode()) == {"c": "é"}
    assert parse_json(b"[1, 2]") is None
    assert parse_json(b"[DONE]") is None
    assert parse_json(b"") is None
    assert parse_json(b"\xff\xfe") is None


@pytest.mark.parametrize(
    "delta",
    [{"content": "x"}, {"tool_calls": [{"index": 0}]}, {"reasoning_content": "hmm"}, {"refusal": "no"}],
)
def test_has_content(delta: dict) -> None:
    assert has_content({"choices": [{"index": 0, "delta": delta}]})


@pytest.mark.parametrize(
    "chunk_obj",
    [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": ""}}]},
        {"choices": [{"delta": {"content": None}, "finish_reason": "stop"}]},
        {"choices": []},
        {"choices": None},
        {},
        {"choices": ["junk"]},
        {"choices": [{"delta": "junk"}]},
    ],
)
def test_has_no_content(chunk_obj: dict) -> None:
    assert not has_content(chunk_obj)


def test_is_usage_only() -> None:
    """Usage and no choice: ``choices`` empty, null or absent (SPEC §6.2)."""
    usage = {"prompt_tokens": 1, "completion_tokens": 2}
    assert is_usage_only({"choices": [], "usage": usage})
    assert is_usage_only({"choices": None, "usage": usage})
    assert is_usage_only({"usage": usage})
    assert not is_usage_only({"choices": [{"delta": {}}], "usage": usage})
    assert not is_usage_only({"choices": [], "usage": None})
    assert not is_usage_only({"choices": []})


def test_data_event_is_one_compact_utf8_event() -> None:
    obj = {"choices": [], "usage": {"prompt_tokens": 1}, "arbstr": {"provider": "prövider"}}
    event = data_event(obj)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert "prövider".encode() in event
    assert feed_all([event]) == ([event], b"")
    assert parse_json(event_data(event) or b"") == obj


def test_error_event_shape() -> None:
    event = error_event("The upstream stream was interrupted", "stream_interrupted")
    assert parse_json(event_data(event) or b"") == {
        "error": {
            "message": "The upstream stream was interrupted",
            "type": "upstream_error",
            "param": None,
            "code": "stream_interrupted",
        }
    }


def test_comment_and_done_events() -> None:
    trailer = comment('arbstr {"cost_sats": 1.23}')
    assert trailer == b': arbstr {"cost_sats": 1.23}\n\n'
    assert event_data(trailer) is None
    assert DONE_EVENT == b"data: [DONE]\n\n"
    assert event_data(DONE_EVENT) == DONE
    assert feed_all([trailer + DONE_EVENT]) == ([trailer, DONE_EVENT], b"")
