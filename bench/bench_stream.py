"""Streaming benchmark: the delay arbstr adds to each SSE event and to the first token.

    .venv/bin/python bench/bench_stream.py [--streams 30] [--events 50] [--interval-ms 20] [--json PATH]

A fake provider (bench/fake_upstream.py, its own process) writes one chat-completion chunk every 20 ms
and stamps each with ``time.monotonic_ns()`` as it writes it. A raw-socket client (no ``requests``, no
line iteration) stamps each event when the read that completes it returns, so per-event delay =
arrival − write on the one system-wide monotonic clock. Streams rotate between reading the fake
directly, through arbstr (as shipped: gunicorn.conf.py, request log on) and through the bare
forwarder (bench/bare_forwarder.py: the floor of arbstr's stack, for scale), for a chunked upstream
and for a close-delimited one (HTTP/1.0-style: no length, the body ends at close). TTFT overhead is a
proxy's TTFT minus the direct TTFT of the stream just before it.

Targets (printed, not asserted): per-event delay through arbstr and TTFT overhead, median < 2 ms and
p99 < 10 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_upstream
from harness import (
    CHAT_PATH,
    HOST,
    arbstr_revision,
    arbstr_server,
    bare_server,
    chat_status,
    free_port,
    machine_note,
    pct,
    write_arbstr_config,
)

TARGET_MEDIAN_MS = 2.0
TARGET_P99_MS = 10.0
FRAMINGS = ("chunked", "close")
_STAMP = re.compile(rb'"content": ?" tok\d+@(\d+)"')  # see fake_upstream: the write time is in the text
_IO_TIMEOUT = 30.0


@dataclass
class StreamTiming:
    ttft_ms: float  # request written → first content event complete at the client
    delays_ms: list[float]  # per content event: arrival at the client − write by the upstream


class SSEClient:
    """HTTP/1.1 on a raw socket, kept alive when the server allows; stamps events as their bytes arrive."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.stamp = 0  # monotonic_ns when the last recv returned

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _recv(self) -> bool:
        assert self.sock is not None
        data = self.sock.recv(65536)
        self.stamp = time.monotonic_ns()
        self.buf += data
        return bool(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            if not self._recv():
                raise ConnectionError("server closed the connection mid-response")

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if not self._recv():
                raise ConnectionError("server closed the connection mid-response")
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def stream(self, path: str, body: bytes) -> StreamTiming:
        if self.sock is None:
            self.sock = socket.create_connection((HOST, self.port), timeout=_IO_TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf.clear()
        request = (b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
                   b"Content-Length: %d\r\n\r\n" % (path.encode(), HOST.encode(), self.port, len(body))) + body
        sent = time.monotonic_ns()
        self.sock.sendall(request)
        status_line = self._line()
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if status_line.split()[1:2] != [b"200"]:
            raise RuntimeError(f"POST {path} on port {self.port}: {status_line.decode()} {bytes(self.buf[:500])!r}")
        chunked = headers.get("transfer-encoding") == "chunked"
        keep = status_line.startswith(b"HTTP/1.1") and headers.get("connection") != "close" and (
            chunked or "content-length" in headers)
        pieces = self._chunked() if chunked else self._until_close()
        timing = self._events(pieces, sent)
        if not keep:
            self.close()
        return timing

    def _events(self, pieces: Iterator[bytes], sent: int) -> StreamTiming:
        events = bytearray()
        ttft: float | None = None
        delays: list[float] = []
        for piece in pieces:
            events += piece
            while (end := events.find(b"\n\n")) >= 0:
                m = _STAMP.search(events, 0, end)
                written = int(m.group(1)) if m is not None else None
                del events[:end + 2]
                if written is not None:
                    arrived = self.stamp
                    delays.append((arrived - written) / 1e6)
                    if ttft is None:
                        ttft = (arrived - sent) / 1e6
        if ttft is None:
            raise RuntimeError(f"stream on port {self.port} carried no content event")
        return StreamTiming(ttft, delays)

    def _chunked(self) -> Iterator[bytes]:
        """The body's bytes as they arrive, chunk framing removed (a partial chunk is yielded at once)."""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():  # trailers, up to the blank line
                    pass
                return
            while size:
                if not self.buf:
                    self._fill(1)
                take = bytes(self.buf[:size])
                del self.buf[:len(take)]
                size -= len(take)
                yield take
            self._fill(2)
            del self.buf[:2]

    def _until_close(self) -> Iterator[bytes]:
        while True:
            if self.buf:
                yield bytes(self.buf)
                self.buf.clear()
            if not self._recv():
                return


def chat_body(model: str, stream: bool = True) -> bytes:
    return json.dumps({"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "Count to fifty, one word per line."}]}).encode()


def shape_path(framing: str, events: int, interval_ms: int) -> str:
    """The base path that makes the fake upstream stream this way (see fake_upstream.Shape)."""
    return f"/{framing}/n{events}/ms{interval_ms}/v1"


def run_streams(targets: dict[str, tuple[int, str, bytes]], streams: int, warmup: int = 2) -> dict[str, list[StreamTiming]]:
    """Alternate streams over ``targets`` (name → port, path, body), so a disturbance hits all alike."""
    clients = {name: SSEClient(port) for name, (port, _, _) in targets.items()}
    results: dict[str, list[StreamTiming]] = {name: [] for name in targets}
    try:
        for i in range(warmup + streams):
            for name, (_, path, body) in targets.items():
                timing = clients[name].stream(path, body)
                if i >= warmup:
                    results[name].append(timing)
    finally:
        for client in clients.values():
            client.close()
    return results


def summarize(results: dict[str, list[StreamTiming]], baseline: str = "direct") -> dict[str, dict[str, float]]:
    """Per target: per-event delay and TTFT percentiles, and TTFT overhead paired with ``baseline``'s streams."""
    base = results[baseline]
    out = {}
    for name, timings in results.items():
        delays = [d for t in timings for d in t.delays_ms]
        ttft = [t.ttft_ms for t in timings]
        overhead = [t.ttft_ms - b.ttft_ms for t, b in zip(timings, base, strict=True)]
        out[name] = {
            "events": len(delays),
            "delay_p50_ms": statistics.median(delays), "delay_p99_ms": pct(delays, 99), "delay_max_ms": max(delays),
            "ttft_p50_ms": statistics.median(ttft), "ttft_p99_ms": pct(ttft, 99),
            "ttft_overhead_p50_ms": statistics.median(overhead), "ttft_overhead_p99_ms": pct(overhead, 99),
        }
    return out


def verdict(value: float, limit: float) -> str:
    return f"{'met' if value < limit else 'MISSED'} ({value:.2f} < {limit:g} ms)"


def print_table(summary: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"{'framing':8} {'path':8} {'events':>6} | {'event delay p50':>15} {'p99':>7} {'max':>7} | "
          f"{'TTFT p50':>8} {'p99':>7} | {'TTFT overhead p50':>17} {'p99':>7}")
    for framing, rows in summary.items():
        for name, r in rows.items():
            overhead = ("" if name == "direct" else
                        f"{r['ttft_overhead_p50_ms']:17.2f} {r['ttft_overhead_p99_ms']:7.2f}")
            print(f"{framing:8} {name:8} {r['events']:6d} | {r['delay_p50_ms']:15.2f} {r['delay_p99_ms']:7.2f} "
                  f"{r['delay_max_ms']:7.2f} | {r['ttft_p50_ms']:8.2f} {r['ttft_p99_ms']:7.2f} | {overhead}")
    print("(all in ms; event delay = arrival at the client − write by the upstream; direct = no proxy;\n"
          " bare = Flask + requests under the same gunicorn settings, the floor of arbstr's stack)")
    for framing, rows in summary.items():
        a = rows["arbstr"]
        print(f"targets, {framing}: event delay p50 {verdict(a['delay_p50_ms'], TARGET_MEDIAN_MS)}, "
              f"p99 {verdict(a['delay_p99_ms'], TARGET_P99_MS)}; TTFT overhead p50 "
              f"{verdict(a['ttft_overhead_p50_ms'], TARGET_MEDIAN_MS)}, "
              f"p99 {verdict(a['ttft_overhead_p99_ms'], TARGET_P99_MS)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=30, help="measured streams per framing and path")
    parser.add_argument("--events", type=int, default=50, help="content events per stream")
    parser.add_argument("--interval-ms", type=int, default=20, help="time between events")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="arbstr-bench-stream-") as tmp:
        tmp_dir = Path(tmp)
        upstream, up_port = fake_upstream.start(tmp_dir)
        base = f"http://{HOST}:{up_port}"
        config = write_arbstr_config(tmp_dir, [
            (f"up-{f}", base + shape_path(f, args.events, args.interval_ms), [f"bench-{f}"]) for f in FRAMINGS])
        server = arbstr_server(config, free_port(), tmp_dir / "arbstr.log")
        bare = bare_server(base, config, tmp_dir / "bare.log")
        load_before = machine_note()
        try:
            server.start(lambda: chat_status(server.port, body=chat_body("bench-chunked", stream=False)))
            bare.start()
            summary = {}
            for framing in FRAMINGS:
                body = chat_body(f"bench-{framing}")
                upstream_path = shape_path(framing, args.events, args.interval_ms) + "/chat/completions"
                results = run_streams({
                    "direct": (up_port, upstream_path, body),
                    "arbstr": (server.port, CHAT_PATH, body),
                    "bare": (bare.port, upstream_path, body),
                }, args.streams)
                summary[framing] = summarize(results)
        finally:
            server.stop()
            bare.stop()
            upstream.kill()
            upstream.wait()
    machine = f"{load_before}; after: load {machine_note().split('load ')[1]}"
    revision = arbstr_revision()
    print(f"arbstr {revision} streaming delay: {args.events} events every {args.interval_ms} ms, {args.streams} "
          f"streams per framing and path ({machine})")
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps({
            "bench": "stream", "arbstr_revision": revision, "machine": machine, "streams": args.streams, "events": args.events,
            "interval_ms": args.interval_ms, "targets_ms": {"p50": TARGET_MEDIAN_MS, "p99": TARGET_P99_MS},
            "results": summary,
        }, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
