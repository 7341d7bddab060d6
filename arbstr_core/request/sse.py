"""Server-sent events at the byte level (SPEC §6). Pure: bytes in, bytes out.

Events are split where a blank line ends them, whatever mix of CR, LF and CRLF the provider uses
and wherever TCP cut the bytes. Nothing is decoded, re-encoded or dropped, so a multi-byte UTF-8
character split across reads is relayed exactly as it came, the pieces handed out concatenate to the
bytes fed in, and an event is released the moment its blank line arrives.
"""

from __future__ import annotations

import json
import re
from typing import Any

DONE = b"[DONE]"

# Two line terminators in a row end an event. A CR followed by LF is one terminator (CRLF), never a
# CR line end plus an empty LF line: without the lookahead the regex would backtrack into "\r" + "\n"
# and end an event after every CRLF line.
_BOUNDARY = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_MAX_BOUNDARY = 4  # "\r\n\r\n"
_LINE = re.compile(rb"\r\n|\n|\r")


class EventSplitter:
    """Accumulates bytes and hands back each complete event (with its terminator) as soon as it ends.

    One piece handed back is not an event: when an event's blank line ended on a CR at the end of a
    read (it is complete: a CR ends a line), the LF that may start the next read is the rest of that
    CRLF. It is handed back alone, so the relay passes it on and the client gets the provider's bytes
    exactly; an SSE parser pairs it with the CR, and :func:`event_data` finds no data in it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cr_end = False  # the last event ended on a bare CR; an LF that follows belongs to it

    def feed(self, data: bytes) -> list[bytes]:
        events: list[bytes] = []
        if self._cr_end and data:
            self._cr_end = False
            if data[:1] == b"\n":
                events.append(b"\n")
                data = data[1:]
        buf = self._buf
        # The buffered bytes held no boundary, so a new one ends in ``data``: rescanning only its last
        # few bytes keeps a large event that trickles in small reads linear instead of quadratic.
        start, scan = 0, max(0, len(buf) - (_MAX_BOUNDARY - 1))
        buf += data
        while True:
            m = _BOUNDARY.search(buf, max(start, scan))
            if m is None:
                break
            events.append(bytes(buf[start : m.end()]))
            start = m.end()
            if start == len(buf) and buf[-1:] == b"\r":
                self._cr_end = True
        del buf[:start]
        return events

    def pending(self) -> bytes:
        """Bytes of an event that has not ended yet (what is left when the upstream stops)."""
        return bytes(self._buf)


def event_data(event: bytes) -> bytes | None:
    """The event's data field (data lines joined by LF), or None for comment-only events."""
    parts: list[bytes] = []
    for line in _LINE.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value[:1] == b" " else value)
        elif line == b"data":
            parts.append(b"")
    return b"\n".join(parts) if parts else None


def parse_json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def has_content(chunk: dict[str, Any]) -> bool:
    """Whether a chunk carries generated output (content, reasoning or tool calls): the TTFT mark."""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("refusal")
        ):
            return True
    return False


def finished_choices(chunk: dict[str, Any]) -> set[int]:
    """Indexes of the choices this chunk gives a ``finish_reason``."""
    done: set[int] = set()
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason"):
            index = choice.get("index", 0)
            done.add(index if isinstance(index, int) else 0)
    return done


def is_usage_only(chunk: dict[str, Any]) -> bool:
    """A chunk that carries usage and no choice: ``choices`` empty, null or absent (SPEC §6.2)."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


def data_event(obj: Any) -> bytes:
    # An unpaired surrogate (a provider may escape one into a chunk) can only sit inside a JSON string,
    # where backslashreplace writes it back as the very escape it came in as: same JSON, valid UTF-8.
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode("utf-8", "backslashreplace") + b"\n\n"


def comment(text: str) -> bytes:
    return b": " + text.encode("utf-8") + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


def error_event(message: str, code: str, type: str = "upstream_error") -> bytes:
    return data_event({"error": {"message": message, "type": type, "param": None, "code": code}})
