"""Concurrency benchmark: 16, 64 and 256 slow streams at once, through arbstr, the bare forwarder and LiteLLM.

    .venv/bin/python bench/bench_concurrency.py [--quick] [--no-litellm] [--arbstr-threads N]
        [--baseline-threads 16] [--levels 16,64,256] [--json PATH]

The issue: each stream holds one gthread thread for its whole life, so with T threads the (T+1)-th
concurrent stream waits in gunicorn's queue for a whole stream before it gets its first token.

Everything runs on 127.0.0.1. The upstream is bench/fake_upstream.py in its own process (asyncio, one
event loop: it keeps hundreds of slow streams going; the **direct** row, clients straight to it, shows
that it does). Each stream sends its first event at once, then one every 250 ms (11 content events,
2.5 s), then the finish, usage and ``[DONE]`` events. Targets: **bare** (bench/bare_forwarder.py under
arbstr's gunicorn.conf.py), **arbstr** as shipped (``gunicorn arbstr:app -c gunicorn.conf.py``, its own
default thread count unless ``--arbstr-threads N``: gunicorn's ``--threads``, which the bare forwarder
gets too), and **LiteLLM**'s
proxy (one uvicorn worker, started as bench_proxy.py starts it: remote fetches and telemetry off;
``--no-litellm`` skips it). When arbstr's thread count is not ``--baseline-threads`` (16, the old
default), an **arbstr@16t** row measures arbstr with that many threads too: "before", in the same run.

At each level N, N client threads (http.client, raw reads with ``read1`` as bytes arrive) wait on one
barrier; its release is time zero. First token = the first read that brings the text of a content event
of the fake's; stream = the body's end. Worker RSS is the peak, sampled every 50 ms from /proc during the
level, of the gunicorn worker(s), the uvicorn process, or (direct) the fake upstream. Each level runs on
every target in turn, repeated (``ceil(48 / N)`` rounds) so each row has at least 48 streams; a level
that is not done after its deadline has its unfinished streams cut and counted as errors.

Targets of the issue, printed beside the figures, never asserted: at 256 streams arbstr's first-token
p90 ≤ 1/5 of LiteLLM's and its worker RSS ≤ 100 MB; at 16 streams its first-token p90 no worse than
with 16 threads (≤ 1.25×, or + 5 ms). The default run takes about 3 minutes (170 s measured; a target
with 16 threads spends 40 s on the 256-stream level alone); ``--quick`` (16 and 64 streams of 0.5 s)
under one.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_upstream
from bench_proxy import litellm_cli, litellm_server
from harness import (
    CHAT_PATH,
    HOST,
    Server,
    arbstr_revision,
    arbstr_server,
    bare_server,
    free_port,
    machine_note,
    pct,
    stop_on_sigterm,
    write_arbstr_config,
)

MIN_STREAMS = 48  # per target and level: small levels are repeated up to this
WARMUP_STREAMS = 8
RSS_SAMPLE_S = 0.05
BODY = json.dumps({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "Count to eleven, one word per line."}]}).encode()
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
_CONTENT = re.compile(rb"tok\d+@\d+")  # the fake's content text; proxies that re-encode chunks keep it
_ERROR_EVENT = re.compile(rb'data: ?\{"error"')
_DONE = b"data: [DONE]"
TARGET_RATIO_LITELLM = 0.2
TARGET_RSS_MB = 100.0
TARGET_16_RATIO, TARGET_16_SLACK_S = 1.25, 0.005


@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]
    events: int  # content events per stream, the first at once
    interval_ms: int

    @property
    def stream_s(self) -> float:
        return (self.events - 1) * self.interval_ms / 1000

    @property
    def shape(self) -> str:  # see fake_upstream.Shape
        return f"/n{self.events}/ms{self.interval_ms}/v1"


DEFAULT = Settings(levels=(16, 64, 256), events=11, interval_ms=250)
QUICK = Settings(levels=(16, 64), events=6, interval_ms=100)


@dataclass
class Target:
    name: str
    port: int
    path: str
    pids: Callable[[], list[int]]
    threads: int | None = None  # gthread threads per worker; None: an event loop
    server: Server | None = None


@dataclass
class Outcome:
    first_s: float | None = None
    total_s: float | None = None
    error: str | None = None


@dataclass
class Level:
    """One target at one concurrency, over its rounds."""

    outcomes: list[Outcome] = field(default_factory=list)
    rss_peak_mb: float = 0.0
    seconds: float = 0.0


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass  # a worker that exited
    return total_kb / 1024


class PeakRSS:
    """Samples the summed VmRSS of ``pids`` every 50 ms until stopped; keeps the peak."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = rss_mb(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, rss_mb(self.pids))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pids))
        return self.peak


def one_stream(port: int, path: str, out: Outcome, conns: list[http.client.HTTPConnection], t0: list[float],
               timeout: float) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    conns.append(conn)  # list.append is atomic: the main thread cuts what is still open at the deadline
    buf = bytearray()
    try:
        conn.request("POST", path, BODY, HEADERS)
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read(200)!r}"
            return
        while data := resp.read1(65536):
            buf += data
            if out.first_s is None and _CONTENT.search(buf):
                out.first_s = time.monotonic() - t0[0]
        out.total_s = time.monotonic() - t0[0]
    except (OSError, http.client.HTTPException) as e:
        out.error = f"{type(e).__name__}: {e}"
        return
    finally:
        conn.close()
    if _ERROR_EVENT.search(buf):
        out.error = "error event: " + buf[_ERROR_EVENT.search(buf).start():][:200].decode(errors="replace")
    elif out.first_s is None:
        out.error = "no content event"
    elif _DONE not in buf:
        out.error = "no [DONE]"


def run_round(target: Target, n: int, deadline_s: float) -> tuple[list[Outcome], float]:
    """``n`` streams released together; returns their outcomes and the worker RSS peak meanwhile."""
    outcomes = [Outcome() for _ in range(n)]
    conns: list[http.client.HTTPConnection] = []
    t0 = [0.0]
    barrier = threading.Barrier(n, action=lambda: t0.__setitem__(0, time.monotonic()))

    def client(out: Outcome) -> None:
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            out.error = "barrier broken"
            return
        one_stream(target.port, target.path, out, conns, t0, deadline_s)

    rss = PeakRSS(target.pids())
    threads = [threading.Thread(target=client, args=(o,), daemon=True) for o in outcomes]
    for t in threads:
        t.start()
    started = time.monotonic()
    for t in threads:
        t.join(max(0.0, started + 10 + deadline_s - time.monotonic()))
    cut = [i for i, t in enumerate(threads) if t.is_alive()]
    for conn in conns:
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # only those still streaming have a socket left
            except OSError:
                pass
    for i in cut:
        threads[i].join(5)
        outcomes[i].error = f"not done within the {deadline_s:.0f} s deadline"
    return outcomes, rss.stop()


def deadline(settings: Settings, target: Target, n: int) -> float:
    """Seconds a level may take: twice what queueing behind ``threads`` explains, plus 30 s; at most 300."""
    waves = math.ceil(n / target.threads) if target.threads else 1
    return min(300.0, 30 + 2 * settings.stream_s * waves)


def gunicorn_threads(server: Server) -> int | None:
    """The thread count gunicorn resolves from the config file and command line (``--print-config``)."""
    out = subprocess.run([*server.argv, "--print-config"], cwd=server.cwd, env=server.env, capture_output=True,
                         text=True, timeout=60, check=False).stdout
    m = re.search(r"^threads\s*=\s*(\d+)", out, re.MULTILINE)
    return int(m.group(1)) if m else None


def build_servers(settings: Settings, tmp: Path, up_port: int, arbstr_threads: int | None, baseline_threads: int,
                  cli: Path | None) -> dict[str, Server]:
    base = f"http://{HOST}:{up_port}"
    config = write_arbstr_config(tmp, [("fake", base + settings.shape, ["gpt-4o"])])
    extra = ["--threads", str(arbstr_threads)] if arbstr_threads else []
    servers = {"bare": bare_server(base, config, tmp / "bare.log"),
               "arbstr": arbstr_server(config, free_port(), tmp / "arbstr.log")}
    for s in servers.values():
        s.argv += extra
    arbstr_default = gunicorn_threads(servers["arbstr"])
    if baseline_threads and arbstr_default != baseline_threads:
        before = arbstr_server(config, free_port(), tmp / "arbstr-before.log")
        before.argv += ["--threads", str(baseline_threads)]
        before.name = f"arbstr@{baseline_threads}t"
        servers[before.name] = before
    if cli is not None:
        servers["litellm"] = litellm_server(cli, base + settings.shape, tmp)
    return servers


def start_targets(settings: Settings, servers: dict[str, Server], upstream_pid: int,
                  up_port: int, results: dict[str, Any]) -> list[Target]:
    """Start every proxy (a LiteLLM that will not start is left out, with the reason printed)."""
    upstream_path = settings.shape + "/chat/completions"  # the bare forwarder passes its path on unchanged
    targets = [Target("direct", up_port, upstream_path, lambda: [upstream_pid])]
    for name, server in servers.items():
        print(f"starting {name}", flush=True)
        try:
            results["startup_s"][name] = server.start(timeout=180)
        except RuntimeError as e:
            if name != "litellm":
                raise
            print(f"LiteLLM row skipped: {e}")
            continue
        threads = None if name == "litellm" else gunicorn_threads(server)
        targets.append(Target(name, server.port, upstream_path if name == "bare" else CHAT_PATH,
                              server.worker_pids, threads, server))
    results["threads"] = {t.name: t.threads for t in targets}
    return targets


def summarize(level: Level) -> dict[str, Any]:
    ok = [o for o in level.outcomes if o.error is None]
    first = [o.first_s for o in ok if o.first_s is not None]
    total = [o.total_s for o in ok if o.total_s is not None]
    errors = [o.error for o in level.outcomes if o.error is not None]
    return {
        "streams": len(level.outcomes), "errors": len(errors), "error_samples": sorted(set(errors))[:3],
        "first_p50_s": pct(first, 50), "first_p90_s": pct(first, 90), "first_max_s": max(first, default=math.nan),
        "total_p50_s": pct(total, 50), "total_max_s": max(total, default=math.nan),
        "rss_peak_mb": level.rss_peak_mb, "seconds": level.seconds,
    }


def measure(settings: Settings, targets: list[Target], results: dict[str, Any]) -> None:
    """Each level on every target in turn, so a change in the shared machine's load shifts the rows alike."""
    for t in targets:
        run_round(t, WARMUP_STREAMS, deadline(settings, t, WARMUP_STREAMS))
    for n in settings.levels:
        rounds = math.ceil(MIN_STREAMS / n)
        levels = {t.name: Level() for t in targets}
        for _ in range(rounds):
            for t in targets:
                started = time.monotonic()
                outcomes, peak = run_round(t, n, deadline(settings, t, n))
                lv = levels[t.name]
                lv.outcomes += outcomes
                lv.rss_peak_mb = max(lv.rss_peak_mb, peak)
                lv.seconds += time.monotonic() - started
                time.sleep(0.3)  # closed connections settle
        for t in targets:
            r = results["levels"].setdefault(str(n), {})[t.name] = summarize(levels[t.name])
            print(f"  {n:3d} streams {t.name:12} first token p50 {r['first_p50_s']:6.3f} p90 {r['first_p90_s']:6.3f} "
                  f"max {r['first_max_s']:6.3f} s  stream p50 {r['total_p50_s']:6.3f} max {r['total_max_s']:6.3f} s  "
                  f"errors {r['errors']}  RSS {r['rss_peak_mb']:6.1f} MB  ({machine_note()})", flush=True)
            for sample in r["error_samples"]:
                print(f"      error: {sample}")


def run(settings: Settings, with_litellm: bool, arbstr_threads: int | None, baseline_threads: int) -> dict[str, Any]:
    cli = litellm_cli() if with_litellm else None
    results: dict[str, Any] = {"arbstr_revision": arbstr_revision(), "machine_before": machine_note(),
                               "startup_s": {}, "levels": {}}
    with tempfile.TemporaryDirectory(prefix="arbstr-bench-concurrency-") as tmp_name:
        tmp = Path(tmp_name)
        upstream, up_port = fake_upstream.start(tmp)
        servers: dict[str, Server] = {}
        try:
            servers = build_servers(settings, tmp, up_port, arbstr_threads, baseline_threads, cli)
            targets = start_targets(settings, servers, upstream.pid, up_port, results)
            measure(settings, targets, results)
        finally:
            for server in servers.values():
                server.stop()
            upstream.kill()
            upstream.wait()
    results["machine_after"] = machine_note()
    return results


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def check(name: str, value: float | None, limit: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "met": met}


def evaluate(results: dict[str, Any], baseline_threads: int) -> list[dict[str, Any]]:
    def get(n: int, target: str, key: str) -> float | None:
        value = results["levels"].get(str(n), {}).get(target, {}).get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    before = f"arbstr@{baseline_threads}t"
    checks = []
    own, lite = get(256, "arbstr", "first_p90_s"), get(256, "litellm", "first_p90_s")
    ratio = own / lite if own is not None and lite else None
    checks.append(check("256 streams: first-token p90, arbstr / LiteLLM", ratio, f"≤ {TARGET_RATIO_LITELLM:g}",
                        None if ratio is None else ratio <= TARGET_RATIO_LITELLM))
    rss = get(256, "arbstr", "rss_peak_mb")
    checks.append(check("256 streams: arbstr worker RSS peak (MB)", rss, f"≤ {TARGET_RSS_MB:g}",
                        None if rss is None else rss <= TARGET_RSS_MB))
    own, old = get(16, "arbstr", "first_p90_s"), get(16, before, "first_p90_s")
    ratio = own / old if own is not None and old else None
    met = None if ratio is None else ratio <= TARGET_16_RATIO or own - old <= TARGET_16_SLACK_S
    label = f"16 streams: first-token p90, arbstr / {before}"
    if before not in results["threads"] and results["threads"].get("arbstr") == baseline_threads:
        label += f" (arbstr runs {baseline_threads})"
    checks.append(check(label, ratio, f"≤ {TARGET_16_RATIO:g}× or +{TARGET_16_SLACK_S * 1000:g} ms", met))
    return checks


def markdown(results: dict[str, Any]) -> list[str]:
    lines = ["| streams | target | threads | first token p50 s | p90 s | max s | stream p50 s | max s | errors | "
             + "worker RSS peak MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, rows in results["levels"].items():
        for name, r in rows.items():
            threads = results["threads"].get(name) or ("fake" if name == "direct" else "async")
            lines.append(f"| {n} | {name} | {threads} | {_fmt(r['first_p50_s'])} | {_fmt(r['first_p90_s'])} | "
                         f"{_fmt(r['first_max_s'])} | {_fmt(r['total_p50_s'])} | {_fmt(r['total_max_s'])} | "
                         f"{r['errors']}/{r['streams']} | {_fmt(r['rss_peak_mb'], 1)} |")
    return lines


def print_report(results: dict[str, Any], settings: Settings, checks: list[dict[str, Any]]) -> None:
    print(f"\narbstr {results['arbstr_revision']}; machine: before {results['machine_before']}; "
          f"after {results['machine_after']}")
    print(f"streams: {settings.events} content events {settings.interval_ms} ms apart, the first at once "
          f"({settings.stream_s:.1f} s upstream); times from the release of all clients together; RSS of "
          f"direct = the fake upstream's process\n")
    print("\n".join(markdown(results)))
    top = str(max(settings.levels))
    direct = results["levels"].get(top, {}).get("direct")
    if direct:
        kept_up = direct["errors"] == 0 and direct["total_max_s"] <= settings.stream_s + 0.5
        print(f"\nfake upstream at {top} streams (direct): first token max {direct['first_max_s']:.3f} s, stream max "
              f"{direct['total_max_s']:.3f} s for {settings.stream_s:.1f} s upstream: "
              f"{'kept up' if kept_up else 'DID NOT KEEP UP: the rows above measure the fake, not the proxies'}")
    print("\ntargets")
    for c in checks:
        state = "n/a" if c["met"] is None else "met" if c["met"] else "MISSED"
        print(f"  {c['target']:60} {_fmt(c['value'], 2):>8}  target {c['limit']:16} {state}")


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 streams of 0.5 s")
    parser.add_argument("--levels", help="comma-separated concurrency levels (default 16,64,256)")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM row")
    parser.add_argument("--arbstr-threads", type=int, help="gunicorn --threads for arbstr and bare (default: "
                        "arbstr's own default)")
    parser.add_argument("--baseline-threads", type=int, default=16, help="also measure arbstr with this many "
                        "threads when its own count differs (0: never)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    settings = QUICK if args.quick else DEFAULT
    if args.levels:
        settings = Settings(tuple(int(x) for x in args.levels.split(",")), settings.events, settings.interval_ms)
    started = time.monotonic()
    results = run(settings, not args.no_litellm, args.arbstr_threads, args.baseline_threads)
    checks = evaluate(results, args.baseline_threads)
    print_report(results, settings, checks)
    elapsed = time.monotonic() - started
    print(f"\nrun took {elapsed:.0f} s")
    if args.json:
        results["targets"] = checks
        results["table_markdown"] = markdown(results)
        results["settings"] = {"levels": settings.levels, "events": settings.events,
                               "interval_ms": settings.interval_ms, "min_streams": MIN_STREAMS,
                               "arbstr_threads_flag": args.arbstr_threads, "seconds": elapsed}
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
