"""Proxy benchmark: arbstr against no proxy, the bare Flask+requests floor, and LiteLLM's proxy, in one run.

    .venv/bin/python bench/bench_proxy.py [--quick] [--json bench/results-proxy.json] [--no-litellm]

Everything runs on 127.0.0.1. The upstream is bench/fake_upstream.py in its own process: asyncio on
raw sockets, HTTP/1.1 keep-alive, pre-encoded answers (a JSON completion with ``usage``, or SSE). The
same load goes four ways: **direct** to it; through the **bare** forwarder (bench/bare_forwarder.py,
Flask + one requests.Session per thread, under gunicorn with arbstr's own gunicorn.conf.py: 1 gthread
worker × 16 threads); through **arbstr** as shipped (``gunicorn arbstr:app -c gunicorn.conf.py``, one
provider, request log in a temp dir); through **LiteLLM**'s proxy (one uvicorn worker, an
``openai/gpt-4o`` model whose ``api_base`` is the fake), installed by this script into
bench/.litellm-venv and run with its remote fetches and telemetry off and any non-loopback request
pointed at a dead local proxy. wrk (Debian: ``apt-get install -y wrk``) drives it, one thread, at 1, 8
and 32 keep-alive connections. Streams are timed with bench_stream's raw-socket client.

All proxies run side by side (idle when not measured: LiteLLM idles at ~3 % of a core) and each load
level is measured on every target in turn, so a change in the shared machine's load shifts the columns
alike; the load average is printed with every figure. Targets are printed beside the figures, never
asserted. The default run takes about 6-10 minutes; ``--quick`` about 3.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fake_upstream
from bench_stream import chat_body, run_streams, summarize
from harness import (
    CHAT_BODY,
    CHAT_PATH,
    HOST,
    ROOT,
    Server,
    arbstr_revision,
    arbstr_server,
    bare_server,
    free_port,
    machine_note,
    stop_on_sigterm,
    write_arbstr_config,
)

BENCH = ROOT / "bench"
LITELLM_VENV = BENCH / ".litellm-venv"
LITELLM_MODULES = ("litellm", "fastapi", "uvicorn", "backoff", "orjson", "apscheduler")
STREAM_SHAPE = "/n20/ms20/v1"  # SSE answers: 20 content events, 20 ms apart (see fake_upstream.Shape)
UPSTREAM_PATH = STREAM_SHAPE + "/chat/completions"  # the bare forwarder passes its path on unchanged
LEVELS = (1, 8, 32)
RSS_REQUESTS = 10_000
TARGETS = ("direct", "bare", "arbstr", "litellm")
# LiteLLM's own outbound fetches (cost map, blog, presets…) and telemetry off; a .env in the cwd not read;
# and anything it would still send off-machine goes to a dead loopback proxy instead of the internet.
LITELLM_ENV = {
    "LITELLM_OFFLINE_MODE": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True", "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True", "LITELLM_TELEMETRY": "False", "LITELLM_MODE": "PRODUCTION",
    "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True", "NO_REDOC": "True",
    # No master key, like arbstr without auth_token: both accept any request on loopback.
    "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
    "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "all_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
}
WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [[%s]]
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"p50_us\\": %%.1f, "
    .. "\\"p99_us\\": %%.1f, \\"errors\\": %%d}\\n", summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


@dataclass(frozen=True)
class Settings:
    seconds: int  # per concurrency level
    warmup_seconds: int
    streams: int
    startups: int  # arbstr starts timed, the one benchmarked included
    rss_requests: int
    rss_max_seconds: int  # LiteLLM serves tens of requests/s here: its memory phase stops at this instead


DEFAULT = Settings(seconds=10, warmup_seconds=2, streams=20, startups=3, rss_requests=RSS_REQUESTS, rss_max_seconds=90)
QUICK = Settings(seconds=3, warmup_seconds=1, streams=5, startups=2, rss_requests=2_000, rss_max_seconds=20)


class Wrk:
    """wrk with one thread (the box has 2 cores; one event-loop thread outruns every proxy here)."""

    def __init__(self, tmp: Path) -> None:
        self.script = tmp / "chat.lua"
        self.script.write_text(WRK_SCRIPT % CHAT_BODY.decode())

    def run(self, url: str, connections: int, seconds: int) -> dict[str, float]:
        """Requests/s, p50 and p99 latency (ms) and errors of one wrk run."""
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                              "-s", str(self.script), url], capture_output=True, text=True, check=True).stdout
        line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary:\n{out}")
        r = json.loads(line.removeprefix("WRK_JSON "))
        return {"rps": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
                "p99_ms": r["p99_us"] / 1000, "requests": r["requests"], "errors": r["errors"]}

    def at_least(self, url: str, connections: int, requests: int, rate: float, max_seconds: int) -> int:
        """Send ``requests`` requests or more, unless that takes over ``max_seconds``; returns how many.
        wrk only knows durations, so each run lasts as long as the rest should take at the last rate."""
        done, left = 0, max_seconds
        while done < requests and left > 0:
            seconds = min(left, max(1, math.ceil((requests - done) / max(rate, 1.0))))
            result = self.run(url, connections, seconds)
            done += int(result["requests"])
            rate, left = result["rps"], left - seconds
        return done


@dataclass
class Target:
    """One way to reach the upstream: its URL path for chat completions and, for proxies, its server."""

    name: str
    port: int
    path: str
    server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self.path}"


def litellm_cli() -> Path | None:
    """The litellm command from bench/.litellm-venv, installed there first if missing or broken."""
    python, cli = LITELLM_VENV / "bin" / "python", LITELLM_VENV / "bin" / "litellm"
    probe = [str(python), "-c", f"import importlib.util as u; assert all(map(u.find_spec, {LITELLM_MODULES!r}))"]
    if cli.exists() and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return cli
    print(f"installing litellm[proxy] into {LITELLM_VENV} (about 600 MB; takes a few minutes) ...", flush=True)
    shutil.rmtree(LITELLM_VENV, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "litellm[proxy]"], check=True, timeout=1800)
        subprocess.run(probe, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"LiteLLM column skipped: could not install litellm[proxy] ({e})")
        return None
    return cli


def litellm_server(cli: Path, upstream_base: str, tmp: Path) -> Server:
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params:\n"
        "      model: openai/gpt-4o\n"
        f"      api_base: {upstream_base}\n"
        "      api_key: bench-not-a-key\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    argv = [str(cli), "--config", str(config), "--host", HOST, "--port", str(port), "--num_workers", "1"]
    return Server("LiteLLM", argv, port, tmp / "litellm.log", env=LITELLM_ENV, cwd=tmp)


def memory(target: Target, wrk: Wrk, settings: Settings) -> dict[str, Any]:
    """Worker RSS after warm-up and after a fixed number of requests."""
    assert target.server is not None
    print(f"  {target.name}: warm-up, then {settings.rss_requests} requests for memory", flush=True)
    warm = wrk.run(target.url, 8, settings.warmup_seconds)
    out: dict[str, Any] = {"rss_warm_mb": target.server.rss_mb()}
    out["rss_requests"] = wrk.at_least(target.url, 8, settings.rss_requests, warm["rps"], settings.rss_max_seconds)
    out["rss_after_n_mb"] = target.server.rss_mb()
    out["rss_growth_mb"] = out["rss_after_n_mb"] - out["rss_warm_mb"]
    return out


def streams(target: Target, direct: Target, count: int) -> dict[str, float]:
    """Stream timings through ``target``, each stream paired with one read directly just before it."""
    body = chat_body("gpt-4o")
    pair = {"direct": (direct.port, direct.path, body)}
    if target.name != "direct":
        pair[target.name] = (target.port, target.path, body)
    return summarize(run_streams(pair, count))[target.name]


def arbstr_startups(config: Path, tmp: Path, count: int) -> list[float]:
    """Seconds from process start to the first answered chat completion, ``count`` fresh starts."""
    times = []
    for i in range(count):
        server = arbstr_server(config, free_port(), tmp / f"arbstr-start-{i}.log")
        try:
            times.append(server.start())
        finally:
            server.stop()
    return times


def start_targets(servers: dict[str, Server], up_port: int, results: dict[str, Any]) -> list[Target]:
    """Start every proxy (a LiteLLM that will not start is left out, with the reason printed)."""
    targets = [Target("direct", up_port, UPSTREAM_PATH)]
    for name, server in servers.items():
        print(f"starting {name}", flush=True)
        try:
            results.setdefault("startup_s", {})[name] = server.start(timeout=180)
        except RuntimeError as e:
            if name != "litellm":
                raise
            print(f"LiteLLM column skipped: {e}")
            continue
        targets.append(Target(name, server.port, UPSTREAM_PATH if name == "bare" else CHAT_PATH, server))
    return targets


def measure_all(results: dict[str, Any], settings: Settings, tmp: Path, up_port: int, cli: Path | None) -> None:
    """All proxies run side by side (idle when not measured), and each load level is measured on every
    target in turn, so a change in the shared machine's load shifts the columns alike."""
    base = f"http://{HOST}:{up_port}"
    config = write_arbstr_config(tmp, [("fake", base + STREAM_SHAPE, ["gpt-4o"])])
    wrk = Wrk(tmp)
    servers = {"bare": bare_server(base, config, tmp / "bare.log"),
               "arbstr": arbstr_server(config, free_port(), tmp / "arbstr.log")}
    if cli is not None:
        servers["litellm"] = litellm_server(cli, base + STREAM_SHAPE, tmp)
    try:
        targets = start_targets(servers, up_port, results)
        for t in targets:
            results[t.name] = memory(t, wrk, settings) if t.server is not None else {}
        for c in LEVELS:
            for t in targets:
                wrk.run(t.url, c, 1)  # open this level's connections before timing
                cpu = t.server.cpu_seconds() if t.server is not None else math.nan
                results[t.name][f"c{c}"] = r = wrk.run(t.url, c, settings.seconds)
                if t.server is not None:
                    r["cpu_ms_per_req"] = (t.server.cpu_seconds() - cpu) * 1000 / max(r["requests"], 1)
                print(f"  c={c:<2} {t.name:8} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                      f"p99 {r['p99_ms']:7.2f} ms  ({machine_note()})", flush=True)
        for t in targets:
            print(f"  {t.name}: {settings.streams} streams", flush=True)
            results[t.name]["stream"] = streams(t, targets[0], settings.streams)
            if t.server is not None:
                results[t.name]["rss_end_mb"] = t.server.rss_mb()
    finally:
        for server in servers.values():
            server.stop()
    print("arbstr: fresh starts", flush=True)
    first = results.get("startup_s", {}).get("arbstr")
    results["arbstr_startups_s"] = [first, *arbstr_startups(config, tmp, settings.startups - 1)]


def run(settings: Settings, with_litellm: bool) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        sys.exit("bench_proxy needs wrk: apt-get install -y wrk")
    cli = litellm_cli() if with_litellm else None
    results: dict[str, Any] = {"arbstr_revision": arbstr_revision(), "machine_before": machine_note()}
    with tempfile.TemporaryDirectory(prefix="arbstr-bench-proxy-") as tmp_name:
        tmp = Path(tmp_name)
        upstream, up_port = fake_upstream.start(tmp)
        try:
            measure_all(results, settings, tmp, up_port, cli)
        finally:
            upstream.kill()
            upstream.wait()
    results["machine_after"] = machine_note()
    return results


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def check(name: str, value: float | None, limit: str, ok: Callable[[float], bool]) -> dict[str, Any]:
    met = None if value is None else ok(value)
    return {"target": name, "value": value, "limit": limit, "met": met}


def evaluate(results: dict[str, Any]) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """The table rows (metric, value per target) and the target checks."""
    def get(target: str, *keys: str) -> float | None:
        value: Any = results.get(target)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def added(target: str, c: int, q: str) -> float | None:
        own, direct = get(target, f"c{c}", q), get("direct", f"c{c}", q)
        return None if own is None or direct is None else own - direct

    rows: list[list[Any]] = []
    for c in LEVELS:
        rows.append([f"req/s c={c}", *(get(t, f"c{c}", "rps") for t in TARGETS)])
        for q in ("p50_ms", "p99_ms"):
            rows.append([f"{q[:3]} ms c={c}", *(get(t, f"c{c}", q) for t in TARGETS)])
    for q in ("p50_ms", "p99_ms"):
        rows.append([f"added {q[:3]} ms c=1", *(added(t, 1, q) for t in TARGETS)])
    for c in LEVELS:
        rows.append([f"worker CPU ms/req c={c}", *(get(t, f"c{c}", "cpu_ms_per_req") for t in TARGETS)])
    rows.append(["errors (all levels)", *(
        sum(get(t, f"c{c}", "errors") or 0 for c in LEVELS) if t in results else None for t in TARGETS)])
    for key, label in (("ttft_p50_ms", "stream TTFT p50 ms"), ("ttft_overhead_p50_ms", "TTFT overhead p50 ms"),
                       ("ttft_overhead_p99_ms", "TTFT overhead p99 ms"), ("delay_p50_ms", "event delay p50 ms"),
                       ("delay_p99_ms", "event delay p99 ms")):
        rows.append([label, *(None if t == "direct" and "overhead" in key else get(t, "stream", key)
                              for t in TARGETS)])
    rows.append(["RSS after warm-up MB", *(get(t, "rss_warm_mb") for t in TARGETS)])
    rows.append(["requests between readings", *(get(t, "rss_requests") for t in TARGETS)])
    rows.append(["RSS after them MB", *(get(t, "rss_after_n_mb") for t in TARGETS)])
    rows.append(["RSS growth MB", *(get(t, "rss_growth_mb") for t in TARGETS)])
    rows.append(["RSS at end MB", *(get(t, "rss_end_mb") for t in TARGETS)])
    rows.append(["startup s", *(get("startup_s", t) for t in TARGETS)])

    arbstr_added, bare_added = added("arbstr", 1, "p50_ms"), added("bare", 1, "p50_ms")
    startups = results.get("arbstr_startups_s") or []
    checks = []
    for c in (8, 32):
        rps = get("arbstr", f"c{c}", "rps")
        checks.append(check(f"req/s c={c} vs bare", _ratio(rps, get("bare", f"c{c}", "rps")), "≥ 0.80×",
                            lambda v: v >= 0.8))
        checks.append(check(f"req/s c={c} vs LiteLLM", _ratio(rps, get("litellm", f"c{c}", "rps")), "≥ 4×",
                            lambda v: v >= 4))
        own, lite = get("arbstr", f"c{c}", "p99_ms"), get("litellm", f"c{c}", "p99_ms")
        checks.append(check(f"p99 c={c} minus LiteLLM's (ms)", None if own is None or lite is None else own - lite,
                            "< 0", lambda v: v < 0))
    checks.append(check("added p50 c=1 minus bare's (ms)",
                        None if arbstr_added is None or bare_added is None else arbstr_added - bare_added, "≤ 0.4",
                        lambda v: v <= 0.4))
    checks.append(check("added p99 c=1 (ms)", added("arbstr", 1, "p99_ms"), "≤ 5", lambda v: v <= 5))
    checks.append(check(f"RSS after {get('arbstr', 'rss_requests')} requests (MB)", get("arbstr", "rss_after_n_mb"),
                        "≤ 60", lambda v: v <= 60))
    checks.append(check("RSS growth between readings (MB)", get("arbstr", "rss_growth_mb"), "≤ 5", lambda v: v <= 5))
    checks.append(check("startup, median of starts (s)", statistics.median(startups) if startups else None,
                        "≤ 2", lambda v: v <= 2))
    return rows, checks


def print_report(results: dict[str, Any], rows: list[list[Any]], checks: list[dict[str, Any]]) -> None:
    print(f"\narbstr {results['arbstr_revision']}; machine: before {results['machine_before']}; "
          f"after {results['machine_after']}")
    header = f"{'metric':24}" + "".join(f"{t:>10}" for t in TARGETS) + f"{'arb/direct':>11}{'arb/bare':>10}{'arb/LiteLLM':>12}"
    print(header)
    print("-" * len(header))
    for label, *values in rows:
        direct, bare, arbstr, lite = values
        ratios = [_ratio(arbstr, direct), _ratio(arbstr, bare), _ratio(arbstr, lite)]
        if label.startswith(("added", "TTFT overhead", "errors", "requests")):
            ratios = [None, None, None]  # a difference or a count: a ratio of it means nothing
        digits = 0 if label.startswith(("req/s", "errors", "requests")) else 2
        print(f"{label:24}" + "".join(f"{_fmt(v, digits):>10}" for v in values)
              + "".join(f"{_fmt(r):>11}" for r in ratios[:1]) + f"{_fmt(ratios[1]):>10}{_fmt(ratios[2]):>12}")
    if results.get("arbstr_startups_s"):
        print("arbstr starts, process start to first answer (s): "
              + ", ".join(f"{s:.2f}" for s in results["arbstr_startups_s"]))
    print("\ntargets")
    for c in checks:
        state = "n/a" if c["met"] is None else "met" if c["met"] else "MISSED"
        print(f"  {c['target']:40} {_fmt(c['value']):>8}  target {c['limit']:8} {state}")


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run (3 s per level, 2,000 requests for memory)")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM column")
    parser.add_argument("--json", type=Path, default=BENCH / "results-proxy.json")
    args = parser.parse_args()
    settings = QUICK if args.quick else DEFAULT
    started = time.monotonic()
    results = run(settings, with_litellm=not args.no_litellm)
    rows, checks = evaluate(results)
    print_report(results, rows, checks)
    results["table"] = [dict(zip(["metric", *TARGETS], row, strict=True)) for row in rows]
    results["targets"] = checks
    results["settings"] = vars(settings) | {"levels": LEVELS, "wrk": "1 thread, keep-alive",
                                            "upstream": "bench/fake_upstream.py, asyncio raw sockets, own process"}
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json} ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
