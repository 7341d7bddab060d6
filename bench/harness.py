"""What the proxy benchmarks share: servers in subprocesses on loopback, arbstr configs, percentiles, /proc.

Only 127.0.0.1 is ever used. Server processes get a copy of this environment without ``ARBSTR_*``
variables, so a developer's shell (keys, ARBSTR_CONFIG) cannot leak into a measurement.
"""

from __future__ import annotations

import http.client
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
CHAT_BODY = (b'{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},'
             b'{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32}')


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def load_average() -> str:
    """The 1/5/15-minute load averages, to print beside figures: the machine is shared."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine_note() -> str:
    return f"{os.cpu_count()} cores, load {load_average()}"


def arbstr_revision() -> str:
    """The commit measured, and whether arbstr_core had uncommitted changes (the checkout is shared)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--", "arbstr_core", "arbstr.py", "gunicorn.conf.py")
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes in arbstr_core" if dirty else "")


def write_arbstr_config(directory: Path, providers: Sequence[tuple[str, str, Sequence[str]]]) -> Path:
    """An arbstr config with its request log in ``directory``; providers are (name, base url, models)."""
    lines = ["[database]", f'path = "{directory / "arbstr.db"}"', ""]
    for name, url, models in providers:
        quoted = ", ".join(f'"{m}"' for m in models)
        lines += ["[[providers]]", f'name = "{name}"', f'url = "{url}"', f"models = [{quoted}]",
                  "input_rate = 10", "output_rate = 30", "base_fee = 1", ""]
    path = directory / "config.toml"
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The servers' environment: no ``ARBSTR_*``, and this checkout first on the import path, so that a bench
    run from another worktree measures that worktree's arbstr_core, not the venv's editable install (the
    bare forwarder runs from bench/, where only PYTHONPATH finds the package its gunicorn.conf.py imports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBSTR_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def chat_status(port: int, path: str = CHAT_PATH, body: bytes = CHAT_BODY) -> int | None:
    """The status a chat completion POSTed to ``port`` gets (None while nothing listens yet)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return None
    finally:
        conn.close()


class Server:
    """A server in a subprocess, its output in a log file; knows its worker processes' memory."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path: Path, *,
                 env: Mapping[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_path
        self.env = child_env(env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, probe: Callable[[], int | None] | None = None, timeout: float = 60.0) -> float:
        """Start and wait for the first answer to ``probe`` (default: a chat completion), which must be a
        200; returns the seconds from process start to that answer."""
        probe = probe or (lambda: chat_status(self.port))
        with open(self.log_path, "ab") as log:
            started = time.perf_counter()
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = started + timeout
        while (status := probe()) is None:
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self._fail(f"did not answer within {timeout:.0f} s")
            time.sleep(0.005)  # another process is binding: nothing to wait on but the port
        elapsed = time.perf_counter() - started
        if status != 200:
            self._fail(f"answered its first request with {status}")
        return elapsed

    def _fail(self, what: str) -> NoReturn:
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} {what}; its log ends:\n{tail}")

    def worker_pids(self) -> list[int]:
        """gunicorn's (or uvicorn's) worker processes: the children of the started process, else itself."""
        assert self.proc is not None
        children = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    children.append(int(entry.name))
        return children or [self.proc.pid]

    def cpu_seconds(self) -> float:
        """User + system CPU time the worker process(es) used so far: steadier than latency on a busy box."""
        ticks = 0
        for pid in self.worker_pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        """Resident memory of the worker process(es), MB (VmRSS, summed)."""
        total_kb = 0
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        return total_kb / 1024

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def bare_server(upstream: str, config: Path, log_path: Path) -> Server:
    """bench/bare_forwarder.py under arbstr's own gunicorn.conf.py (which reads ``config`` for its settings)."""
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "bare_forwarder:app", "-c", str(ROOT / "gunicorn.conf.py"),
            "--bind", f"{HOST}:{port}"]
    return Server("bare", argv, port, log_path, cwd=ROOT / "bench",
                  env={"BENCH_UPSTREAM": upstream, "ARBSTR_CONFIG": str(config)})


def arbstr_server(config: Path, port: int, log_path: Path) -> Server:
    """arbstr exactly as shipped: ``gunicorn arbstr:app -c gunicorn.conf.py`` from the repo root."""
    argv = [sys.executable, "-m", "gunicorn", "arbstr:app", "-c", str(ROOT / "gunicorn.conf.py"),
            "--bind", f"{HOST}:{port}"]
    return Server("arbstr", argv, port, log_path, env={"ARBSTR_CONFIG": str(config)})


def stop_on_sigterm() -> None:
    """SIGTERM ends a benchmark like Ctrl-C: SystemExit runs the finally blocks that stop its servers."""
    def exit_on_term(signum: int, frame: object) -> None:
        sys.exit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, exit_on_term)
