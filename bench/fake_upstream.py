"""A fast fake OpenAI-compatible provider for the benchmarks: asyncio, raw bytes, HTTP/1.1 keep-alive.

    .venv/bin/python bench/fake_upstream.py [--port 0]      # prints "listening PORT", serves until killed

It runs as its own process (see :func:`start`) so it never shares a GIL with the load generator, the
proxy or the measuring client, and it does no JSON work per request: answers are pre-encoded, and the
only per-request parsing is the request head and a byte search of the body for ``"stream": true``.

Any POST to a path ending in ``/chat/completions`` is answered: a JSON completion with ``usage`` and a
Content-Length, or, when the body asks to stream, SSE chunk events. Path segments before it shape the
stream: ``close`` (HTTP/1.0-style, body ends when the connection closes; default chunked),
``n<events>`` (default 50) and ``ms<interval>`` (default 20), e.g. ``/close/n50/ms20/v1/chat/completions``.
The first event goes out at once, then one every interval. Each content event's text ends in
``@<ns>``, ``time.monotonic_ns()`` just before it was written (in the text, because proxies that
re-encode chunks, like LiteLLM, drop unknown fields). CLOCK_MONOTONIC is system-wide, so a client in
another process measures each event's delay against it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
MODEL = "gpt-4o"
USAGE = {"prompt_tokens": 25, "completion_tokens": 12, "total_tokens": 37}
_COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": USAGE,
}, separators=(",", ":")).encode()
JSON_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(_COMPLETION)) + _COMPLETION
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
CLOSE_HEAD = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"

_PREFIX = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
           b'"model":"' + MODEL.encode() + b'","choices":[{"index":0,')
CONTENT_EVENT = _PREFIX + b'"delta":{"content":" tok%d@%d"},"logprobs":null,"finish_reason":null}]}\n\n'
FINISH_EVENT = _PREFIX + b'"delta":{},"logprobs":null,"finish_reason":"stop"}]}\n\n'
USAGE_EVENT = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"'
               + MODEL.encode() + b'","choices":[],"usage":' + json.dumps(USAGE, separators=(",", ":")).encode() + b"}\n\n")
DONE_EVENT = b"data: [DONE]\n\n"

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')


@dataclass(frozen=True)
class Shape:
    """How a stream is framed and paced, read from the request path."""

    close: bool = False
    events: int = 50
    interval: float = 0.020

    @classmethod
    def from_path(cls, path: str) -> Shape:
        parts = path.split("/")
        events = next((int(p[1:]) for p in parts if re.fullmatch(r"n\d+", p)), cls.events)
        ms = next((int(p[2:]) for p in parts if re.fullmatch(r"ms\d+", p)), None)
        return cls("close" in parts, events, cls.interval if ms is None else ms / 1000)


class _Connection(asyncio.Protocol):
    """One client connection; requests are answered in order, a stream holding the next one back."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # asyncio sets TCP_NODELAY on TCP sockets

    def connection_lost(self, exc: Exception | None) -> None:
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve()

    def _serve(self) -> None:
        transport = self.transport
        assert transport is not None
        while self.streaming is None and not transport.is_closing():
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end + 2])
            m = _CONTENT_LENGTH.search(head)
            stop = end + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < stop:
                return
            body = bytes(self.buf[end + 4:stop])
            del self.buf[:stop]
            method, path, _ = head[:head.find(b"\r\n")].decode("latin-1").split(" ", 2)
            if method != "POST" or not path.endswith("/chat/completions"):
                transport.write(NOT_FOUND)
            elif _STREAM.search(body):
                task = asyncio.ensure_future(self._stream(Shape.from_path(path), bool(_INCLUDE_USAGE.search(body))))
                self.streaming = task
                task.add_done_callback(self._stream_done)
                return
            else:
                transport.write(JSON_ANSWER)
            if _CLOSE.search(head):
                transport.close()

    def _stream_done(self, task: asyncio.Task[None]) -> None:
        self.streaming = None
        if not task.cancelled() and self.buf:
            self._serve()  # a request pipelined behind the stream

    async def _stream(self, shape: Shape, include_usage: bool) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        frame = (lambda b: b) if shape.close else (lambda b: b"%x\r\n%s\r\n" % (len(b), b))
        transport.write(CLOSE_HEAD if shape.close else CHUNKED_HEAD)
        start = loop.time()
        for i in range(shape.events):
            wait = start + i * shape.interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if transport.is_closing():
                return
            transport.write(frame(CONTENT_EVENT % (i, time.monotonic_ns())))
        tail = FINISH_EVENT + (USAGE_EVENT if include_usage else b"") + DONE_EVENT
        if shape.close:
            transport.write(tail)
            transport.close()
        else:
            transport.write(frame(tail) + b"0\r\n\r\n")


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Connection, HOST, port, backlog=1024)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def start(log_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run the fake in its own process; returns it and the port it listens on."""
    with open(log_dir / "fake_upstream.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--port", "0"], stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if line[:1] != ["listening"]:
        proc.kill()
        raise RuntimeError(f"fake upstream did not start: {(log_dir / 'fake_upstream.log').read_text()}")
    return proc, int(line[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
