"""End to end with Claude Code itself (npm @anthropic-ai/claude-code) as the client of POST /v1/messages.

arbstr runs under gunicorn on the host's loopback with a fake OpenAI-speaking provider behind it, as in
every e2e test. ``claude`` runs in a network namespace of its own that has nothing but a loopback
interface, so it cannot phone home (telemetry, updates, error reports) even if an opt-out variable is
missed; inside, a small relay listens on 127.0.0.1:<arbstr's port> and forwards each connection to
arbstr on the host's loopback. Claude Code therefore sees ``ANTHROPIC_BASE_URL`` as in real use, and
the relay is the only way out of its namespace. (Chosen over running arbstr and the fake inside the
namespace: the usual fixtures stay untouched, and only one process, claude, needs ``ip netns exec``.)

Claude Code is installed once per machine into ~/.cache/arbstr-test/claude-code (or
``$ARBSTR_TEST_CACHE``/claude-code; child_env drops ARBSTR_* from servers, not from this process) and
reused by later runs. The tests skip, saying why, without Linux namespaces or root, without node/npm,
or when npm cannot install the package (no registry).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import provider, settled_rows
from fakes import CREATED, Exchange, Request, sse, stream_chunks
from routstr_lab import in_namespace

CLAUDE_CODE_VERSION = "2.1.197"  # what ../shared/CLAUDE-CODE.md observed
CACHE_ROOT = Path(os.environ.get("ARBSTR_TEST_CACHE") or Path.home() / ".cache" / "arbstr-test")
INSTALL_DIR = CACHE_ROOT / "claude-code"
INSTALL_TIMEOUT = 900.0  # a ~245 MB native binary on a slow line
# Fail fast when there is no registry (npm's default backoff makes that take over a minute).
NPM_RETRIES = ("--fetch-retries=2", "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=10000")
RUN_TIMEOUT = 90.0  # one `claude -p`; against a healthy arbstr it takes seconds
MODEL = "gpt-4o"
HOST = "127.0.0.1"
SECRET_WORD = "periwinkle"

# Claude Code's opt-outs (CLAUDE-CODE.md); without them it also tries a git clone at start.
CLAUDE_ENV = {"ANTHROPIC_API_KEY": "sk-test", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
              "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}


# ---------------------------------------------------------------------------------------------------
# Install (once per machine) and the namespace (once per module)


def _unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"needs a Linux network namespace (platform {sys.platform})"
    if os.geteuid() != 0:
        return "needs root to create a network namespace (ip netns add)"
    missing = [tool for tool in ("ip", "unshare", "node", "npm") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH"
    return None


def _npm_error(output: str) -> str:
    """npm's error code and message ("code ECONNREFUSED; FetchError: request to ... failed"), not its stack."""
    lines = [line.removeprefix("npm error").strip() for line in output.splitlines() if line.startswith("npm error")]
    picked = [line for line in lines if line.startswith("code ") or "Error" in line.split(":")[0]][:2]
    return "; ".join(picked) or _tail(output, 3)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def claude_bin() -> Path:
    """The ``claude`` executable, installed with npm into the machine-wide cache on first use.

    A marker file written after a verified install makes later runs skip npm entirely; a lock file
    keeps two test sessions from installing into the same directory at once.
    """
    reason = _unavailable_reason()
    if reason:
        pytest.skip(f"Claude Code e2e: {reason}")
    INSTALL_DIR.mkdir(parents=True, exist_ok=True)
    exe = INSTALL_DIR / "node_modules" / ".bin" / "claude"
    marker = INSTALL_DIR / f"installed-{CLAUDE_CODE_VERSION}"
    with open(CACHE_ROOT / "claude-code.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and exe.exists()):
            started = time.monotonic()
            try:
                done = subprocess.run(
                    ["npm", "install", "--prefix", str(INSTALL_DIR), "--no-audit", "--no-fund", "--no-save",
                     "--loglevel=error", *NPM_RETRIES, f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"],
                    capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pytest.skip(f"Claude Code e2e: npm install did not finish within {INSTALL_TIMEOUT:.0f}s")
            if done.returncode != 0 or not exe.exists():
                pytest.skip(f"Claude Code e2e: npm install @anthropic-ai/claude-code@{CLAUDE_CODE_VERSION} "
                            f"failed (exit {done.returncode}): {_npm_error(done.stderr or done.stdout)}")
            version = subprocess.run(  # offline (unshare -n) and with a HOME of its own, as every run here
                ["unshare", "-n", str(exe), "--version"], capture_output=True, text=True, timeout=60, check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(INSTALL_DIR), **CLAUDE_ENV})
            if version.returncode != 0 or CLAUDE_CODE_VERSION not in version.stdout:
                pytest.skip(f"Claude Code e2e: installed claude does not run: {version.stdout}{version.stderr}")
            marker.write_text(f"{version.stdout.strip()}\ninstalled in {time.monotonic() - started:.1f}s\n")
            print(f"\nClaude Code {CLAUDE_CODE_VERSION} installed into {INSTALL_DIR} "
                  f"in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return exe


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """A fresh network namespace with only ``lo`` (up): no route leaves it."""
    reason = _unavailable_reason()
    if reason:
        pytest.skip(f"Claude Code e2e: {reason}")
    ns = f"arbstr-cc-{os.getpid()}-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"Claude Code e2e: cannot create a network namespace: {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True,
                       capture_output=True, timeout=10)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


class LoopbackRelay:
    """Listens on ``127.0.0.1:port`` inside ``ns`` and relays each connection, byte for byte, to
    ``127.0.0.1:port`` of the host namespace (where arbstr listens).

    The listening socket is created by a thread that joined ``ns`` (``in_namespace``); accepting and
    connecting onwards happen in threads of the host namespace, where ``127.0.0.1`` is the host's.
    """

    def __init__(self, ns: str, port: int) -> None:
        self.port = port
        self.connections = 0
        self._listener = in_namespace(ns, socket.create_server, (HOST, port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                inner, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                outer = socket.create_connection((HOST, self.port), timeout=10)
            except OSError:
                inner.close()
                continue
            outer.settimeout(None)
            with self._lock:
                self.connections += 1
                self._sockets += [inner, outer]
            for src, dst in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()


# ---------------------------------------------------------------------------------------------------
# The fake provider's answers


def _chunk(cid: str, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def tool_call_chunks(name: str, arguments: dict[str, Any], call_id: str = "call_read_1") -> list[dict[str, Any]]:
    """A streamed assistant turn that is one function call, its arguments split over two chunks."""
    cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    args = json.dumps(arguments)
    half = len(args) // 2
    return [
        _chunk(cid, {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
        _chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": args[:half]}}]}),
        _chunk(cid, {"tool_calls": [{"index": 0, "function": {"arguments": args[half:]}}]}),
        _chunk(cid, {}, "tool_calls"),
        {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": MODEL, "choices": [],
         "usage": {"prompt_tokens": 900, "completion_tokens": 25, "total_tokens": 925}},
    ]


def text(content: str) -> sse:
    return sse(stream_chunks(MODEL, content))


def tool_names(req: Request) -> list[str]:
    body = req.json if isinstance(req.json, dict) else {}
    return [t.get("function", {}).get("name") for t in body.get("tools") or []]


def roles(req: Request) -> list[str]:
    body = req.json if isinstance(req.json, dict) else {}
    return [m.get("role") for m in body.get("messages") or []]


# ---------------------------------------------------------------------------------------------------
# Running claude


class ClaudeRun:
    def __init__(self, argv: list[str], done: subprocess.CompletedProcess[str], seconds: float) -> None:
        self.argv, self.returncode, self.stdout, self.stderr = argv, done.returncode, done.stdout, done.stderr
        self.seconds = seconds

    def result(self) -> dict[str, Any]:
        """The ``--output-format json`` object (the last JSON line of stdout)."""
        for line in reversed(self.stdout.strip().splitlines()):
            with contextlib.suppress(ValueError):
                return json.loads(line)
        raise AssertionError(f"no JSON on claude's stdout:\n{self.stdout}\nstderr:\n{self.stderr}")


@pytest.fixture
def claude(claude_bin: Path, netns: str, tmp_path: Path, fake_upstream, make_config, gunicorn_server):
    """``claude(*args)`` runs ``claude`` in the namespace against arbstr (fake provider ``p``
    behind it, ``claude-*`` aliased to gpt-4o, max_output_tokens 4096) and returns a ClaudeRun.
    Also exposes ``.up`` (the fake), ``.server`` and ``.workdir`` (claude's cwd)."""
    up = fake_upstream(name="p")
    config = make_config([provider(up, "p", max_output_tokens=4096)], aliases={"claude-*": MODEL})
    server = gunicorn_server(config)
    relay = LoopbackRelay(netns, server.port)
    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb",
           "ANTHROPIC_BASE_URL": server.base_url, **CLAUDE_ENV}
    runs: list[ClaudeRun] = []

    def run(*args: str) -> ClaudeRun:
        argv = ["ip", "netns", "exec", netns, str(claude_bin), *args]
        started = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"claude did not finish within {RUN_TIMEOUT}s\n{evidence(e.stdout, e.stderr)}") from None
        result = ClaudeRun(argv, done, time.monotonic() - started)
        runs.append(result)
        print(f"\nclaude {' '.join(args)}: exit {done.returncode} in {result.seconds:.1f}s, "
              f"{len(up.requests)} provider request(s), {relay.connections} connection(s); "
              f"stdout {done.stdout.strip()[:600]}", file=sys.stderr)
        return result

    def evidence(stdout: Any = "", stderr: Any = "") -> str:
        """What to look at when claude fails: its output, arbstr's log, what the provider received."""
        def s(x: Any) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
        sent = [f"  {r.method} {r.path} roles={roles(r)} tools={len(tool_names(r))} stream={r.stream}"
                for r in up.requests]
        return (f"claude stdout:\n{_tail(s(stdout), 30)}\nclaude stderr:\n{_tail(s(stderr), 30)}\n"
                f"arbstr log:\n{_tail(server.log_text(), 40)}\nprovider received {len(up.requests)}:\n"
                + "\n".join(sent))

    run.up, run.server, run.workdir, run.evidence = up, server, workdir, evidence  # type: ignore[attr-defined]
    yield run
    relay.close()


# ---------------------------------------------------------------------------------------------------
# Tests


def test_say_pong(claude) -> None:
    claude.up.default = text("pong")
    run = claude("-p", "say pong", "--output-format", "json")
    assert run.returncode == 0, claude.evidence(run.stdout, run.stderr)
    result = run.result()
    assert result.get("is_error") is False and "pong" in result.get("result", ""), claude.evidence(run.stdout,
                                                                                                   run.stderr)
    main = [r for r in claude.up.requests if "say pong" in json.dumps(r.json)]
    assert main, claude.evidence(run.stdout, run.stderr)
    sent = main[0].json
    assert sent["model"] == MODEL and sent["max_tokens"] <= 4096 and sent["stream"] is True
    logged = settled_rows(claude.server, len(claude.up.requests))
    assert logged and all(r["success"] for r in logged), logged
    assert any(r["model"].startswith("claude-") and r["provider"] == "p" and r["streaming"] for r in logged), logged


def test_one_tool_then_the_second_turn(claude) -> None:
    """The provider asks for Read(note.txt); Claude Code runs it and sends the result back, which
    arbstr forwards as a role "tool" message; the provider's second answer is the final text."""
    note = claude.workdir / "note.txt"
    note.write_text(f"The secret word is {SECRET_WORD}.\n")
    final = f"The secret word is {SECRET_WORD}."

    def answer(ex: Exchange) -> None:
        req = ex.request
        if "Read" not in tool_names(req):  # a side request (a title, a topic check): plain text
            text("Reading a note").run(ex)
        elif "tool" in roles(req):
            text(final).run(ex)
        else:
            sse(tool_call_chunks("Read", {"file_path": str(note)})).run(ex)

    claude.up.default = answer
    run = claude("-p", "What is the secret word in note.txt? Use the Read tool.", "--output-format", "json",
                 "--allowedTools=Read")  # with "=": the option is variadic and would swallow what follows
    assert run.returncode == 0, claude.evidence(run.stdout, run.stderr)
    result = run.result()
    assert result.get("is_error") is False and SECRET_WORD in result.get("result", ""), claude.evidence(
        run.stdout, run.stderr)
    assert result.get("num_turns") == 2, result
    second = [r for r in claude.up.requests if "tool" in roles(r)]
    assert second, claude.evidence(run.stdout, run.stderr)
    messages = second[0].json["messages"]
    call = next(m for m in messages if m.get("tool_calls"))
    assert call["tool_calls"][0]["function"]["name"] == "Read"
    (tool_msg,) = [m for m in messages if m["role"] == "tool"]
    assert tool_msg["tool_call_id"] == call["tool_calls"][0]["id"]
    assert SECRET_WORD in json.dumps(tool_msg["content"]), tool_msg  # the file's content, read by Claude Code
    logged = settled_rows(claude.server, len(claude.up.requests))
    assert len([r for r in logged if r["success"]]) >= 2 and all(r["success"] for r in logged), logged
