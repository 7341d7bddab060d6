"""Shared fixtures for end-to-end tests: fake providers, config files, a real gunicorn, the CLI.

End-to-end tests run arbstr exactly as production does (``gunicorn arbstr:app`` with the repo's
gunicorn.conf.py, in a subprocess) against ``tests/fakes.FakeUpstream`` providers on loopback, and
talk to it with ``requests`` or the real ``openai`` SDK.

Plain helpers (importable: ``from conftest import write_config, provider, run_cli``):
``toml_dumps``, ``provider``, ``write_config``, ``run_cli``, ``child_env``, ``free_port``,
``ArbstrServer``. Fixtures: ``fake_upstream``, ``make_config``, ``gunicorn_server``.

    def test_fallback(fake_upstream, make_config, gunicorn_server):
        alpha, beta = fake_upstream(2)
        alpha.default = fakes.reset()
        server = gunicorn_server(make_config([alpha, beta]))
        reply = server.openai_client().chat.completions.create(model="gpt-4o", messages=[...])
        assert "fake-2" in reply.choices[0].message.content
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import pytest
import requests
from fakes import FakeUpstream

if TYPE_CHECKING:
    import anthropic  # imported lazily: each costs ~1 s, and most test files never touch a server
    import openai

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
READY_TIMEOUT = 15.0

# Applied by write_config unless the test sets them: a database inside tmp_path, and 10 ms backoff
# so retry tests take milliseconds (SPEC default: 1000 ms). Pass test_defaults=False for pure SPEC defaults.
TEST_DEFAULTS: dict[str, dict[str, Any]] = {"retry": {"backoff_base_ms": 10}}


# ---------------------------------------------------------------------------------------------------
# TOML (stdlib tomllib only reads)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Path):
        return _string(str(v))
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML: {v!r}")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def _emit(table: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    for k, v in table.items():  # scalars and inline values first: they belong to the current header
        if v is not None and not isinstance(v, Mapping) and not _is_table_array(v):
            out.append(f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        name = f"{prefix}.{_key(k)}" if prefix else _key(k)
        if isinstance(v, Mapping):
            out.append(f"\n[{name}]")
            _emit(v, name, out)
        elif _is_table_array(v):
            for item in v:
                out.append(f"\n[[{name}]]")
                _emit(item, name, out)


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Enough TOML for arbstr configs: tables, arrays of tables, inline arrays; None values are omitted."""
    out: list[str] = []
    _emit(data, "", out)
    return "\n".join(out).lstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------
# Config files


def settled_rows(server: Any, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The first page of ``server``'s request log (an arbstr under test: anything with ``get``) once ``n``
    rows are there and none is still ``streaming``. The log writer is asynchronous (it batches for up to
    50 ms, and a stream's row is updated when it ends): nothing signals the write, so this polls, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        rows = server.get("/v1/requests", params={"per_page": 100}).json()["data"]
        if len(rows) >= n and all(r["status"] != "streaming" for r in rows):
            return rows
        assert time.monotonic() < deadline, f"want {n} finished rows, got {json.dumps(rows)}"
        time.sleep(0.05)


def provider(
    upstream: FakeUpstream | str, name: str | None = None, *, models: Sequence[str] = ("gpt-4o", "gpt-4o-mini"),
    input_rate: float = 10, output_rate: float = 30, base_fee: float = 1, **extra: Any,
) -> dict[str, Any]:
    """A ``[[providers]]`` entry for a fake (name and url taken from it) or a URL string."""
    if isinstance(upstream, FakeUpstream):
        url, name = upstream.url, name or upstream.name
    else:
        url = upstream
    if name is None:
        raise ValueError("provider(url) needs a name")
    return {"name": name, "url": url, "models": list(models), "input_rate": input_rate,
            "output_rate": output_rate, "base_fee": base_fee, **extra}


def write_config(
    tmp_path: Path, providers: Sequence[Mapping[str, Any] | FakeUpstream] = (), *, filename: str = "config.toml",
    mode: int = 0o600, rules: Sequence[Mapping[str, Any]] | None = None, raw: str = "", test_defaults: bool = True,
    **tables: Mapping[str, Any],
) -> Path:
    """Write an arbstr config (SPEC §1) into ``tmp_path`` and return its path.

    ``providers``: dicts or FakeUpstreams (a fake becomes ``provider(fake)``, so in config order the
    fakes' rates are equal and the first one is cheapest by tie). Keyword tables: ``server``,
    ``database``, ``retry``, ``circuit_breaker``, ``logging``, ``policies`` (its ``rules`` list, or the
    ``rules`` shortcut, becomes ``[[policies.rules]]``). Any other table is written as given, so tests
    can provoke unknown-table errors; ``raw`` is appended verbatim. The database lives in tmp_path
    unless ``database.path`` is given; see TEST_DEFAULTS.
    """
    data: dict[str, Any] = {name: dict(t) for name, t in tables.items()}
    if test_defaults:
        for name, defaults in TEST_DEFAULTS.items():
            data[name] = {**defaults, **data.get(name, {})}
    data["database"] = {"path": str(tmp_path / "arbstr.db"), **data.get("database", {})}
    if rules is not None:
        data["policies"] = {**data.get("policies", {}), "rules": [dict(r) for r in rules]}
    if providers:
        data["providers"] = [provider(p) if isinstance(p, FakeUpstream) else dict(p) for p in providers]
    path = tmp_path / filename
    path.write_text(toml_dumps(data) + raw)
    path.chmod(mode)
    return path


# ---------------------------------------------------------------------------------------------------
# Subprocesses


@functools.cache
def _no_control_socket() -> list[str]:
    """gunicorn ≥ 25.1 opens a control socket at one fixed path per user: parallel servers would fight."""
    import gunicorn.config

    known = any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


def free_port() -> int:
    """A loopback port that was free a moment ago (the usual small race; fine for tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The test process' environment minus every ``ARBSTR_*`` variable, plus ``extra`` (None unsets).

    Dropping inherited ``ARBSTR_*`` keeps a developer's shell (keys, ARBSTR_CONFIG) out of the tests.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBSTR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_cli(
    *args: str | os.PathLike[str], env: Mapping[str, str | None] | None = None, cwd: str | os.PathLike[str] | None = None,
    input: str | None = None, timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m arbstr_core.app.cli ARGS`` with a clean environment; stdout/stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "arbstr_core.app.cli", *map(str, args)], env=child_env(env), cwd=cwd or ROOT,
        input=input, capture_output=True, text=True, timeout=timeout, check=False,
    )


class ArbstrServer:
    """``gunicorn arbstr:app`` in a subprocess, on a free loopback port, its output captured to a file.

    Config mode runs in the repo root (where gunicorn.conf.py lives); mock mode runs in ``log_path``'s
    directory, because the built-in mock config keeps its database in ./arbstr.db.
    """

    def __init__(
        self, log_path: Path, config: Path | None = None, *, mock: bool = False,
        env: Mapping[str, str | None] | None = None, args: Sequence[str] = (), cwd: Path | None = None,
    ) -> None:
        if config is None and not mock:
            raise ValueError("ArbstrServer needs a config path or mock=True")
        self.log_path = log_path
        self.config = config
        self.port = free_port()
        extra: dict[str, str | None] = {"ARBSTR_MOCK": "1"} if mock else {"ARBSTR_CONFIG": str(config)}
        extra.update(env or {})
        self.env = child_env(extra)
        self.cwd = cwd or (log_path.parent if mock else ROOT)
        conf = ["-c", str(GUNICORN_CONF)] if GUNICORN_CONF.exists() else ["--worker-class", "gthread", "--threads", "16"]
        self.argv = [sys.executable, "-m", "gunicorn", "arbstr:app", *conf, *_no_control_socket(),
                     "--bind", f"127.0.0.1:{self.port}", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._clients: list[openai.OpenAI | anthropic.Anthropic] = []
        self._streams: list[requests.Response] = []  # closed by stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def settled_row(self, request_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The request's /v1/requests row once written and, for a stream, ended (the log writer is
        asynchronous: nothing in the process signals the write, so this polls, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/v1/requests/{request_id}")
            if r.status_code == 200 and r.json()["status"] != "streaming":
                return r.json()
            if time.monotonic() > deadline:
                raise AssertionError(f"row {request_id} not settled within {timeout}s: {r.status_code} {r.text}")
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready_timeout: float = READY_TIMEOUT) -> ArbstrServer:
        """Start gunicorn and wait until GET /health answers (any status); fail with the log otherwise."""
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - stays open for the process' lifetime
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"arbstr exited with {self.proc.returncode} before answering /health:\n"
                                     f"{self.log_text()}")
            try:
                requests.get(self.url("/health"), timeout=1)
                return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"arbstr did not answer /health within {ready_timeout}s:\n{self.log_text()}")
            time.sleep(0.05)  # waiting for another process to bind: nothing to wait on but the port

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0, *, close_clients: bool = True) -> int:
        """Send ``sig`` and wait for exit; returns the exit code. Kills and fails if it takes too long.

        First closes the SDK clients from ``openai_client()`` and the streams opened by ``post``: an
        open keep-alive connection holds a gthread worker's shutdown for up to 2 s (gunicorn's stop
        linger). Pass ``close_clients=False`` when a stream in flight through such a client must meet
        the signal.
        """
        assert self.proc is not None, "server was never started"
        if close_clients:
            for client in self._clients:
                client.close()
            for response in self._streams:
                response.close()
            self._streams.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"arbstr did not exit within {timeout}s of signal {sig}:\n"
                                     f"{self.log_text()}") from None
        self._close_log()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self) -> str:
        """Everything gunicorn and arbstr wrote to stdout/stderr so far (search it for leaked keys)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until ``text`` appears in the log (a file gives no event to wait on: short polls)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log_text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the arbstr log within {timeout}s:\n{log}")
            time.sleep(0.05)
        return log

    def openai_client(self, api_key: str = "x", **kw: Any) -> openai.OpenAI:
        """The real SDK pointed at arbstr; no SDK retries and a 30 s timeout unless overridden."""
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30.0)
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key, **kw)
        self._clients.append(client)
        return client

    def anthropic_client(self, api_key: str = "unused", **kw: Any) -> anthropic.Anthropic:
        """The anthropic SDK pointed at arbstr (it adds ``/v1/messages``); like :meth:`openai_client`,
        closed by :meth:`stop` so its keep-alive connection does not hold the worker's shutdown."""
        import anthropic

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30.0)
        client = anthropic.Anthropic(base_url=self.base_url, api_key=api_key, **kw)
        self._clients.append(client)
        return client

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self._request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self._request("POST", path, **kw)

    def _request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """One request with ``Connection: close`` (unless the caller sets Connection), so no idle
        keep-alive connection outlives it: one held by a live response object (requests closes it
        only when the response is collected) holds gunicorn's graceful shutdown for 2 s. A stream
        not read to its end is closed by ``stop()``."""
        kw.setdefault("timeout", 30)
        headers = dict(kw.pop("headers", None) or {})
        if not any(k.lower() == "connection" for k in headers):
            headers["Connection"] = "close"
        response = requests.request(method, self.url(path), headers=headers, **kw)
        if kw.get("stream"):
            self._streams.append(response)
        return response

    def chat(self, stream: bool = False, model: str = "gpt-4o", content: str = "hi", **kw: Any) -> requests.Response:
        """POST a minimal chat completion with requests (``stream=True`` also streams the response)."""
        body = {"model": model, "messages": [{"role": "user", "content": content}], **kw.pop("extra", {})}
        if stream:
            body["stream"] = True
        return self.post("/v1/chat/completions", json=body, stream=stream, **kw)


# ---------------------------------------------------------------------------------------------------
# Fixtures


class FakeFactory:
    """``fake_upstream()`` → one started FakeUpstream; ``fake_upstream(n)`` → a list of n."""

    def __init__(self) -> None:
        self.fakes: list[FakeUpstream] = []
        self._numbers = itertools.count(1)

    @overload
    def __call__(self, n: None = None, *, name: str | None = None) -> FakeUpstream: ...
    @overload
    def __call__(self, n: int, *, name: str | None = None) -> list[FakeUpstream]: ...

    def __call__(self, n: int | None = None, *, name: str | None = None) -> FakeUpstream | list[FakeUpstream]:
        made = []
        for _ in range(1 if n is None else n):
            number = next(self._numbers)
            fake = FakeUpstream(name if name and n is None else f"{name or 'fake'}-{number}").start()
            self.fakes.append(fake)
            made.append(fake)
        return made[0] if n is None else made

    def stop_all(self) -> None:
        for fake in self.fakes:
            fake.stop()


@pytest.fixture
def fake_upstream() -> Iterator[FakeFactory]:
    """Factory of started fake providers named fake-1, fake-2, ... (stopped at teardown)."""
    factory = FakeFactory()
    yield factory
    factory.stop_all()


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """``write_config`` bound to this test's tmp_path: ``make_config([alpha, beta], server={...})``."""

    def make(providers: Sequence[Mapping[str, Any] | FakeUpstream] = (), **kw: Any) -> Path:
        return write_config(tmp_path, providers, **kw)

    return make


@pytest.fixture
def gunicorn_server(tmp_path: Path, fake_upstream: FakeFactory) -> Iterator[Callable[..., ArbstrServer]]:
    """Factory: ``gunicorn_server(config_path, env={...})`` or ``gunicorn_server(mock=True)`` → a
    started ArbstrServer. Teardown first stops the test's fakes (so streams stuck on a hanging fake end
    and graceful shutdown is quick), then sends SIGTERM (SIGKILL after 10 s); a test asserting on
    shutdown calls ``.stop()`` itself."""
    servers: list[ArbstrServer] = []

    def start(config: Path | None = None, *, mock: bool = False, env: Mapping[str, str | None] | None = None,
              args: Sequence[str] = (), cwd: Path | None = None, ready_timeout: float = READY_TIMEOUT) -> ArbstrServer:
        log_path = tmp_path / f"arbstr-{len(servers) + 1}.log"
        server = ArbstrServer(log_path, config, mock=mock, env=env, args=args, cwd=cwd)
        servers.append(server)
        return server.start(ready_timeout)

    yield start
    fake_upstream.stop_all()
    for server in servers:
        with contextlib.suppress(AssertionError):
            server.stop(timeout=10)
        server.kill()
