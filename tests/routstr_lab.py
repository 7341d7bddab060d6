"""A real Routstr node, a real Cashu mint and a fake LLM for end-to-end tests (/work/shared/routstr-lab).

Why: arbstr's providers are Routstr nodes paid with Cashu ecash. Tests against ``tests/fakes`` only
check arbstr against a fake that agrees with arbstr; this lab checks it against what a real node
charges, to the msat.

Use: ``pytest_plugins = ["routstr_lab"]`` in the test module (pytest registers the plugin once, so
every module that asks for it shares one lab). ``from routstr_lab import routstr_lab  # noqa: F401``
also works, but ruff then flags each test parameter of that name (F811), and it defines the fixture
in the importing module: two modules doing so bring up two labs.
Import its names for type hints under ``TYPE_CHECKING`` only: imported before pytest loads it as a
plugin, the module cannot be assertion-rewritten and pytest warns.

The session fixture ``routstr_lab`` runs the lab's ``up.sh`` once per session (LAB = a pytest temp
dir, NS = a unique namespace name, default ports; about 30 s with the venvs cached in
``~/.cache/routstr-lab``, about a minute the first time) and ``down.sh`` at the end, whatever happens.
One lab per cache at a time: a second session waits for the first one's lock (``_cache_lock``). It
yields a ``RoutstrLab``:
  ``node_url``                     the node's base URL inside the namespace (``http://127.0.0.1:8000/v1``)
  ``token``                        the minted 1000-sat Cashu token, a ``SecretStr``
  ``models()``                     the node's ``/v1/models`` JSON (``sats_pricing`` in sats per token)
  ``balance_info(key)``            the node's ``/v1/balance/info`` JSON (msats); ``wait_settled`` polls it
  ``restart_node(btc_usd=...)``    the same node with another BTC price, same DB (balances survive);
                                   the price stays for the session (``btc_usd``): read prices from
                                   ``models()``, or restart the node at the price a test needs
  ``start_arbstr(config, env=...)`` ``gunicorn arbstr:app`` in the namespace → ``ArbstrInNamespace``
                                   (``get``/``post``/``openai_client``/``log_text``/``stop``)
  ``send_tokens(*sats, spend=)``   fresh Cashu tokens from the lab's wallet (SecretStr); those at the
                                   indexes in ``spend`` taken back at once, so the mint says spent
  ``run(fn, ...)``, ``session()``  anything else in the namespace; ``upstream_requests()``, ``node_log()``

Skip or fail: it skips, with the reason in pytest's summary, when the lab cannot run here: not root,
``ip``/``curl``/``python3`` missing, the lab scripts missing, ``ip netns add`` or ``setns`` refused,
or ``ROUTSTR_LAB=0`` (the explicit opt-out, e.g. for a machine without access to PyPI). Once the
namespace exists, a failing ``up.sh`` (or a node without models, or no token) is a test *error* with
the tail of the lab's logs: at that point the machine can run the lab, so a failure is a broken
harness or a broken lab, and a skip would let it pass unnoticed.

Namespace access: the lab lives in a network namespace with only ``lo``; the test process stays in
the host namespace. Network namespace membership is per thread on Linux, so ``in_namespace(ns, fn)``
runs ``fn`` in a fresh thread that first joins the namespace with libc ``setns(fd, CLONE_NEWNET)``
(Python 3.11 has no ``os.setns``); sockets created in that thread live in the namespace, and keep
living there when read from another thread. The ``requests`` session (``RoutstrLab.session``) and
the ``openai`` SDK client (``ArbstrInNamespace.openai_client``) get a transport that opens every
connection that way, so test code calls them as usual from the main thread, and a connection can
never land in the host namespace by mistake. Chosen over binding arbstr to a unix socket because the
node and the mint listen on TCP inside the namespace anyway (one mechanism for everything), and
arbstr keeps serving TCP as in production.

Secrets: the minted token is money. ``RoutstrLab.token`` (and ``api_key`` in ``balance_info``) is a
``SecretStr``: a ``str`` whose ``repr`` is redacted, so pytest's assertion messages do not show it.
Still never put it in a message, and test for it in text as a precomputed bool, not ``assert token
not in text`` (on failure pytest would print ``text``, which then holds the token). Lab log tails in
failure messages are scrubbed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import requests
import requests.adapters

if TYPE_CHECKING:
    import openai

__all__ = ["NODE_URL", "ArbstrInNamespace", "RoutstrLab", "SecretStr", "in_namespace", "routstr_lab"]

ROOT = Path(__file__).resolve().parent.parent
LAB_SRC = Path(os.environ.get("ROUTSTR_LAB_SRC", "/work/shared/routstr-lab"))
NODE_PORT = 8000  # up.sh's default; inside the namespace, so it cannot clash with the host
NODE_URL = f"http://127.0.0.1:{NODE_PORT}/v1"
MINT_PORT = 3338  # up.sh's default mint port, inside the namespace
UP_TIMEOUT = float(os.environ.get("ROUTSTR_LAB_UP_TIMEOUT", "900"))  # first run installs two venvs
LOCK_TIMEOUT = float(os.environ.get("ROUTSTR_LAB_LOCK_TIMEOUT", "900"))  # another session's lab is up
CLONE_NEWNET = 0x40000000
_TOKEN_RE = re.compile(r"cashu[AB][A-Za-z0-9_=-]{20,}|sk-[A-Za-z0-9]{16,}")

T = TypeVar("T")

# The lab wallet's CLI (as up.sh runs it), driven in one process: argv[1] is [[sats, spend], ...]; prints
# "TOKEN <token>" per entry, in order. Run by RoutstrLab.wallet_python with the mint venv's Python.
_WALLET_SCRIPT = r"""
import contextlib, io, json, re, sys
from cashu.wallet.cli.cli import cli

def run(*args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli.main(args=["--yes", *args], prog_name="cashu", standalone_mode=False)
    return buf.getvalue()

for sats, spend in json.loads(sys.argv[1]):
    token = re.search(r"cashu[AB][A-Za-z0-9_=-]+", run("send", str(sats))).group(0)
    if spend:
        run("receive", token)
    print("TOKEN " + token, flush=True)
"""


# ---------------------------------------------------------------------------------------------------
# Network namespace access


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_netns(ns: str) -> None:
    """Move the *calling thread* into network namespace ``ns`` (only that thread: netns is per thread)."""
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns(/var/run/netns/{ns}, CLONE_NEWNET): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_namespace(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` in a fresh thread joined to ``ns`` and return its result (or raise).

    A fresh thread per call: the thread dies with its namespace membership, and there is no pool to
    exhaust or deadlock when calls nest. If joining fails, ``fn`` never runs.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(ns)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class _NamespacedAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose connections are opened inside the namespace."""

    def __init__(self, ns: str) -> None:
        super().__init__()
        self._ns = ns

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        return in_namespace(self._ns, super().send, request, *args, **kwargs)


def namespaced_session(ns: str) -> requests.Session:
    """A ``requests.Session`` whose http:// connections live in ``ns``."""
    session = requests.Session()
    session.trust_env = False  # no proxy variables: the namespace has nothing but loopback
    session.mount("http://", _NamespacedAdapter(ns))
    return session


def _httpx_module() -> Any:
    """The httpx package the installed openai SDK is built on: ``httpx``, or ``httpx2`` in its 3.x
    releases (whichever ``import openai`` loaded; an http_client of the other one is rejected)."""
    import openai  # noqa: F401 - loads its httpx

    return sys.modules.get("httpx2") or sys.modules["httpx"]


def namespaced_httpx_client(ns: str, **kwargs: Any) -> Any:
    """An httpx client (for ``openai.OpenAI(http_client=...)``) whose connections live in ``ns``.

    Only ``handle_request`` (connect, send, read the headers) runs in a namespaced thread; a stream's
    body is read later from the caller's thread, from a socket that stays in the namespace.
    """
    httpx = _httpx_module()

    class NamespacedTransport(httpx.BaseTransport):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self._inner = httpx.HTTPTransport(trust_env=False)

        def handle_request(self, request: Any) -> Any:
            return in_namespace(ns, self._inner.handle_request, request)

        def close(self) -> None:
            self._inner.close()

    return httpx.Client(transport=NamespacedTransport(), trust_env=False, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Small helpers


class SecretStr(str):
    """A bearer secret (the Cashu token, a node sk- key): a plain ``str`` to use, whose ``repr`` (what
    pytest prints for assertion operands, a dict holding it included) shows only its kind."""

    def __repr__(self) -> str:
        kind = re.match(r"cashu[AB]|sk-", self)
        return f"'{kind.group(0) if kind else ''}…[REDACTED]'"


def _scrub(text: str, *values: str) -> str:
    """Text for a failure message: known secrets and anything shaped like a token or sk- key removed."""
    for value in values:
        if value:
            text = text.replace(value, "[REDACTED]")
    return _TOKEN_RE.sub("[REDACTED]", text)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({path.name}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it is not ours to reap)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status or "\nState:\tX" in status


@functools.cache
def _no_control_socket() -> list[str]:
    """gunicorn ≥ 25.1 opens a control socket at one fixed path per user (a file, shared by every
    namespace): several servers would fight over it."""
    import gunicorn.config

    known = any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS)
    return ["--no-control-socket"] if known else []


def _unavailable_reason() -> str | None:
    """Why the lab cannot run on this machine (checked before anything is created), or None."""
    if os.environ.get("ROUTSTR_LAB", "1") == "0":
        return "ROUTSTR_LAB=0 (explicit opt-out)"
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces (platform {sys.platform})"
    if os.geteuid() != 0:
        return "needs root (ip netns add, setns)"
    missing = [tool for tool in ("ip", "curl", "python3") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (up.sh needs iproute2, curl and python3)"
    absent = [name for name in ("up.sh", "down.sh") if not (LAB_SRC / name).is_file()]
    if absent:
        return f"{', '.join(absent)} not found in {LAB_SRC} (set ROUTSTR_LAB_SRC)"
    return None


# ---------------------------------------------------------------------------------------------------
# arbstr inside the namespace


class ArbstrInNamespace:
    """``gunicorn arbstr:app`` run with ``ip netns exec NS`` from the repo root (so it reads
    ./gunicorn.conf.py), bound to a free loopback port of the namespace; stdout+stderr go to a file."""

    def __init__(
        self, lab: RoutstrLab, config: Path, log_path: Path, *, env: Mapping[str, str | None] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.lab = lab
        self.config = config
        self.log_path = log_path
        self.port = lab.free_port()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("ARBSTR_")}  # keep a dev's keys out
        environ.update(PYTHONUNBUFFERED="1", ARBSTR_CONFIG=str(config),
                       PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        for k, v in (env or {}).items():
            if v is None:
                environ.pop(k, None)
            else:
                environ[k] = v
        self.env = environ
        self.argv = ["ip", "netns", "exec", lab.ns, sys.executable, "-m", "gunicorn", "arbstr:app",
                     *_no_control_socket(), "--bind", f"127.0.0.1:{self.port}", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._session = namespaced_session(lab.ns)
        self._clients: list[openai.OpenAI] = []
        self._streams: list[requests.Response] = []

    @property
    def base_url(self) -> str:
        """Its URL inside the namespace (reach it through ``get``/``post``/``openai_client``)."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready_timeout: float = 20.0) -> ArbstrInNamespace:
        """Start gunicorn and wait until GET /health answers (any status); fail with the log otherwise."""
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"arbstr exited with {self.proc.returncode} before answering /health:\n"
                                     f"{_scrub(self.log_text(), self.lab.token)}")
            try:
                self._session.get(self.url("/health"), timeout=1, headers={"Connection": "close"})
                return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"arbstr did not answer /health within {ready_timeout}s:\n"
                                     f"{_scrub(self.log_text(), self.lab.token)}")
            time.sleep(0.05)  # another process is binding: nothing to wait on but the port

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Close this handle's SDK clients and streams (an idle keep-alive connection holds gunicorn's
        graceful stop for 2 s), send ``sig``, wait; returns the exit code. Kills and fails if too slow."""
        assert self.proc is not None, "arbstr was never started"
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
                                     f"{_scrub(self.log_text(), self.lab.token)}") from None
        self._session.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        """Everything gunicorn and arbstr wrote (stdout and stderr). May hold secrets if arbstr leaks:
        search it, do not print it."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return self.request("POST", path, **kw)

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        """One request from inside the namespace, with ``Connection: close`` unless the caller sets it
        (no idle keep-alive connection to hold gunicorn's graceful stop); streams are closed by stop()."""
        kw.setdefault("timeout", 30)
        headers = dict(kw.pop("headers", None) or {})
        if not any(k.lower() == "connection" for k in headers):
            headers["Connection"] = "close"
        response = self._session.request(method, self.url(path), headers=headers, **kw)
        if kw.get("stream"):
            self._streams.append(response)
        return response

    def openai_client(self, api_key: str = "x", **kw: Any) -> openai.OpenAI:
        """The real SDK pointed at this arbstr through the namespace; no SDK retries, 30 s timeout."""
        import openai

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30.0)
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key=api_key,
                               http_client=namespaced_httpx_client(self.lab.ns), **kw)
        self._clients.append(client)
        return client


# ---------------------------------------------------------------------------------------------------
# The lab


class RoutstrLab:
    """One running lab: the namespace, its directory, the token, and the node and arbstr helpers."""

    def __init__(self, ns: str, lab_dir: Path, cache_dir: Path) -> None:
        self.ns = ns
        self.lab_dir = lab_dir
        self.cache_dir = cache_dir  # up.sh's LAB_CACHE: the venvs and the node's source copy
        self.node_url = NODE_URL
        self.token = SecretStr("")
        self.btc_usd = 100_000.0  # up.sh's BTC_USD; restart_node changes it
        self._session = namespaced_session(ns)
        self._children: list[subprocess.Popen[bytes]] = []  # nodes started by restart_node
        self._arbstrs: list[ArbstrInNamespace] = []

    def __repr__(self) -> str:
        return f"RoutstrLab(ns={self.ns!r}, lab_dir={str(self.lab_dir)!r})"

    # -- running things in the namespace

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` in a thread inside the lab's namespace."""
        return in_namespace(self.ns, fn, *args, **kwargs)

    def session(self) -> requests.Session:
        """A new requests session whose connections live in the namespace (close it when done)."""
        return namespaced_session(self.ns)

    def free_port(self) -> int:
        """A loopback port of the namespace that was free a moment ago."""

        def pick() -> int:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        return self.run(pick)

    # -- the node

    def _node(self, path: str, key: str | None = None, timeout: float = 10.0) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self._session.get(NODE_URL.removesuffix("/v1") + path, headers=headers, timeout=timeout)

    def models(self) -> dict[str, Any]:
        """The node's ``GET /v1/models`` JSON (``data[i].sats_pricing`` is in sats per token)."""
        response = self._node("/v1/models")
        if response.status_code != 200:
            raise AssertionError(f"node /v1/models answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def balance_info(self, key: str) -> dict[str, Any]:
        """The node's ``GET /v1/balance/info`` for bearer ``key`` (the token, or the sk- key it became):
        ``balance`` (net of reservations), ``reserved``, ``total_spent``, ``total_requests``, all msats,
        and ``api_key`` (``sk-`` + sha256(token): a bearer secret too, so a SecretStr here).
        The first call with a fresh token redeems it at the mint."""
        response = self._node("/v1/balance/info", key)
        if response.status_code != 200:
            raise AssertionError(f"node /v1/balance/info answered {response.status_code}: "
                                 f"{_scrub(response.text[:500], key, self.token)}")
        info = response.json()
        if isinstance(info.get("api_key"), str):
            info["api_key"] = SecretStr(info["api_key"])
        return info

    def wait_settled(self, key: str, requests_total: int, timeout: float = 15.0) -> dict[str, Any]:
        """``balance_info(key)`` once the node counts ``requests_total`` requests and holds no
        reservation (a stream is settled after its last byte reached the client: poll, briefly)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.balance_info(key)
            if info.get("total_requests") == requests_total and info.get("reserved") == 0:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"node not settled within {timeout}s (want total_requests={requests_total},"
                                     f" reserved=0): {_scrub(json.dumps(info), key, self.token)}")
            time.sleep(0.1)

    def node_log(self) -> str:
        return (self.lab_dir / "node.log").read_text(errors="replace")

    def upstream_requests(self) -> list[dict[str, Any]]:
        """What the node sent to the fake LLM (one dict per request: t, method, path, headers, body)."""
        path = self.lab_dir / "upstream-requests.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def restart_node(self, btc_usd: float, timeout: float = 60.0) -> None:
        """Restart the node with ``BTC_USD=btc_usd`` and otherwise the same command, directory and
        environment (read from /proc of the running node, so this follows up.sh step 5 as it is). Its
        SQLite DB is kept, so accounts and balances survive. Returns once ``/v1/models`` shows prices
        rescaled to the new BTC price."""
        pid_file = self.lab_dir / "node.pid"
        pid = int(pid_file.read_text().split()[0])
        proc_dir = Path(f"/proc/{pid}")
        argv = proc_dir.joinpath("cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
        env = dict(item.split("=", 1) for item in proc_dir.joinpath("environ").read_bytes().decode().split("\0")
                   if "=" in item)
        cwd = os.readlink(proc_dir / "cwd")
        old_btc = float(env.get("BTC_USD", "100000"))
        old_prompt = self.models()["data"][0]["sats_pricing"]["prompt"]
        self._terminate_node(pid)
        env["BTC_USD"] = repr(float(btc_usd))
        with open(self.lab_dir / "node.log", "ab") as log:
            log.write(f"\n--- restart_node: BTC_USD={btc_usd} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], cwd=cwd, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._children.append(proc)
        pid_file.write_text(f"{proc.pid}\n")  # down.sh stops this one
        want = old_prompt * old_btc / float(btc_usd)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"restarted node exited with {proc.returncode}:\n"
                                     f"{_scrub(_tail(self.lab_dir / 'node.log'), self.token)}")
            with contextlib.suppress(requests.RequestException, KeyError, IndexError, ValueError):
                prompt = self.models()["data"][0]["sats_pricing"]["prompt"]
                if math.isclose(prompt, want, rel_tol=1e-6):
                    self.btc_usd = float(btc_usd)
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"restarted node did not list prompt price {want} sat/token within {timeout}s:"
                                     f"\n{_scrub(_tail(self.lab_dir / 'node.log'), self.token)}")
            time.sleep(0.2)

    def _terminate_node(self, pid: int, timeout: float = 20.0) -> None:
        """SIGTERM (SIGKILL after ``timeout``) and wait until the node is gone and its port is free."""
        own = next((p for p in self._children if p.pid == pid), None)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline, killed = time.monotonic() + timeout, False
        while not (own.poll() is not None if own else _pid_gone(pid)):
            if time.monotonic() > deadline:
                if killed:
                    raise AssertionError(f"node pid {pid} survived SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline, killed = time.monotonic() + 10, True
            time.sleep(0.05)

        def port_free() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", NODE_PORT)) != 0

        while not self.run(port_free):
            if time.monotonic() > deadline:
                raise AssertionError(f"port {NODE_PORT} still taken after the node exited")
            time.sleep(0.05)

    # -- the wallet (up.sh step 3: it minted 5000 sat and sent 1000 as ``token``)

    def send_tokens(self, *amounts: int, spend: Collection[int] = ()) -> list[SecretStr]:
        """New Cashu tokens of ``amounts`` sat from the lab wallet (its ``cashu send``), made in one wallet
        process: the cashu import alone takes about 4 s, so one process per token would add up. A fresh
        token is unspent and unknown to the node: its first use there redeems it into an account of about
        that balance (the mint keeps a small fee). The tokens at the indexes in ``spend`` are received
        back into the wallet at once (``cashu receive``, a swap at the mint): a node that never saw
        such a token tries to redeem it and answers 400 ``cashu_token_already_spent``."""
        plan = [[int(sats), i in set(spend)] for i, sats in enumerate(amounts)]
        out = self.wallet_python(_WALLET_SCRIPT, json.dumps(plan))
        found = [line.removeprefix("TOKEN ") for line in out.splitlines() if line.startswith("TOKEN ")]
        if len(found) != len(plan) or not all(_TOKEN_RE.fullmatch(t) for t in found):
            raise AssertionError(f"the wallet made {len(found)} of {len(plan)} tokens: "
                                 f"{_scrub(out[-1000:], self.token)}")
        return [SecretStr(t) for t in found]

    def send_token(self, sats: int) -> SecretStr:
        """One fresh token (see ``send_tokens``)."""
        return self.send_tokens(sats)[0]

    def spent_token(self, sats: int = 2) -> SecretStr:
        """One token the mint knows as spent (see ``send_tokens``)."""
        return self.send_tokens(sats, spend={0})[0]

    def wallet_python(self, script: str, *args: str, timeout: float = 120.0) -> str:
        """``python -c script ARGS`` with the mint venv's Python and the lab wallet's settings, inside the
        namespace; its stdout. Output may hold tokens: a failure shows it scrubbed."""
        argv = ["ip", "netns", "exec", self.ns, str(self.cache_dir / "mintenv/bin/python"), "-c", script, *args]
        env = {**os.environ, "CASHU_DIR": str(self.lab_dir / "wallet"), "MINT_URL": f"http://127.0.0.1:{MINT_PORT}",
               "TOR": "false", "HOME": str(self.lab_dir / "wallet")}  # HOME: no ~/.cashu of the machine's user
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise AssertionError(f"wallet script exited with {done.returncode}:\n"
                                 f"{_scrub(done.stdout[-1500:] + done.stderr[-3000:], self.token)}")
        return done.stdout

    # -- arbstr

    def start_arbstr(
        self, config_path: Path, *, env: Mapping[str, str | None] | None = None, args: Sequence[str] = (),
        log_path: Path | None = None, ready_timeout: float = 20.0,
    ) -> ArbstrInNamespace:
        """Start ``gunicorn arbstr:app`` (ARBSTR_CONFIG=config_path, plus ``env``; None unsets) inside
        the namespace and wait for /health. Stopped at session end if the test did not stop it."""
        log_path = log_path or config_path.with_name(f"arbstr-{len(self._arbstrs) + 1}.log")
        server = ArbstrInNamespace(self, config_path, log_path, env=env, args=args)
        self._arbstrs.append(server)
        return server.start(ready_timeout)

    # -- lifecycle (used by the fixture)

    def _env(self) -> dict[str, str]:
        return {**os.environ, "LAB": str(self.lab_dir), "NS": self.ns, "LAB_CACHE": str(self.cache_dir)}

    def _logs_tail(self) -> str:
        parts = [f"--- {name} (last lines) ---\n{_tail(self.lab_dir / name)}"
                 for name in ("up.log", "mint.log", "node.log", "fake.log")]
        return _scrub("\n".join(parts), self.token)

    def up(self, timeout: float = UP_TIMEOUT, attempts: int = 3) -> None:
        """Run up.sh (output to $LAB/up.log) and check its result; pytest.fail with the logs if not.

        A known race of the lab's mint is repaired: with ``FAKEWALLET_DELAY_INCOMING_PAYMENT=0`` (up.sh)
        the FakeWallet can report the invoice paid before the quote is stored; the mint logs ``Quote not
        found``, the quote stays unpaid, and up.sh's ``cashu invoice 5000`` waits for it forever (seen
        here in 2 of 5 runs; up.sh then hit the 900 s timeout). ``_run_up`` first asks the mint for the
        state of its unpaid quotes (``GET /v1/mint/quote/bolt11/<id>``: the mint then checks the backend,
        marks the quote paid and notifies the waiting wallet); if that does not free it, up.sh's process
        group is killed, down.sh cleans up, and up.sh runs again in a fresh namespace and directory (the
        failed attempt's logs are kept as ``attempt-N/``)."""
        for attempt in range(1, attempts + 1):
            outcome = self._run_up(timeout)
            if outcome != "mint race":
                break
            if attempt == attempts:
                pytest.fail(f"routstr lab: the mint's invoice race hung up.sh {attempts} times (LAB={self.lab_dir})\n"
                            f"{self._logs_tail()}", pytrace=False)
            print(f"routstr lab: mint invoice race ('Quote not found'), retrying up.sh ({attempt}/{attempts})",
                  file=sys.stderr)
            subprocess.run([str(LAB_SRC / "down.sh")], env=self._env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60, check=False)
            kept = self.lab_dir / f"attempt-{attempt}"
            kept.mkdir()
            for entry in list(self.lab_dir.iterdir()):
                if entry.name.startswith("attempt-"):
                    continue
                if entry.suffix == ".log":
                    entry.rename(kept / entry.name)
                elif entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            reason = _create_namespace(self.ns)
            if reason:
                pytest.fail(f"routstr lab: could not recreate the namespace for a retry: {reason}", pytrace=False)
        if outcome == "timeout":
            pytest.fail(f"routstr lab: up.sh did not finish within {timeout:.0f}s (LAB={self.lab_dir})\n"
                        f"{self._logs_tail()}", pytrace=False)
        if outcome != 0:
            pytest.fail(f"routstr lab: up.sh exited with {outcome} (LAB={self.lab_dir})\n{self._logs_tail()}",
                        pytrace=False)
        token_path = self.lab_dir / "token.txt"
        token = token_path.read_text().strip() if token_path.exists() else ""
        if not token.startswith("cashu"):
            pytest.fail(f"routstr lab: up.sh wrote no Cashu token to {token_path}\n{self._logs_tail()}", pytrace=False)
        self.token = SecretStr(token)
        try:
            models = self.models()["data"]
        except Exception as e:  # noqa: BLE001 - reported with the logs
            pytest.fail(f"routstr lab: node /v1/models failed after up.sh: {e}\n{self._logs_tail()}", pytrace=False)
        if not models:
            pytest.fail(f"routstr lab: the node lists no model (upstream not registered?)\n{self._logs_tail()}",
                        pytrace=False)

    def _run_up(self, timeout: float, give_up_after_nudge: float = 10.0) -> int | str:
        """One up.sh run: its exit code, "timeout", or "mint race" (killed: see ``up``)."""
        mint_log = self.lab_dir / "mint.log"
        with open(self.lab_dir / "up.log", "wb") as log:
            proc = subprocess.Popen([str(LAB_SRC / "up.sh")], env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        nudged: float | None = None
        while True:
            try:
                return proc.wait(0.25)
            except subprocess.TimeoutExpired:
                pass
            stuck = not (self.lab_dir / "token.txt").exists() and "Quote not found" in (
                mint_log.read_text(errors="replace") if mint_log.exists() else "")
            if stuck and nudged is None:
                nudged = time.monotonic()
                print(f"routstr lab: mint invoice race ('Quote not found'): asked the mint to recheck "
                      f"{self._nudge_unpaid_quotes()} unpaid quote(s)", file=sys.stderr)
            raced = stuck and nudged is not None and time.monotonic() - nudged > give_up_after_nudge
            if raced or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # up.sh's own group: the hung wallet, the mint, …
                proc.wait(10)
                return "mint race" if raced else "timeout"

    def _nudge_unpaid_quotes(self) -> int:
        """GET every unpaid mint quote from the mint (which then rechecks its backend); how many."""
        db = self.lab_dir / "mintdata" / "mint" / "mint.sqlite3"
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
                quotes = [row[0] for row in conn.execute("SELECT quote FROM mint_quotes WHERE state = 'UNPAID'")]
        except sqlite3.Error as e:
            print(f"routstr lab: cannot read the mint's quotes: {e}", file=sys.stderr)
            return 0
        for quote in quotes:
            with contextlib.suppress(requests.RequestException):
                self._session.get(f"http://127.0.0.1:{MINT_PORT}/v1/mint/quote/bolt11/{quote}", timeout=10)
        return len(quotes)

    def down(self) -> None:
        """Stop arbstr servers, then down.sh (by pid files, then every process left in the namespace,
        then the namespace); reap the nodes restart_node started; make sure the namespace is gone."""
        for server in self._arbstrs:
            with contextlib.suppress(Exception):
                if server.running:
                    server.stop(timeout=10)
            server.kill()
        self._session.close()
        subprocess.run([str(LAB_SRC / "down.sh")], env=self._env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, timeout=60, check=False)
        for proc in self._children:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if Path(f"/var/run/netns/{self.ns}").exists():
            subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=30, check=False)


def _create_namespace(ns: str) -> str | None:
    """Create ``ns`` with ``lo`` up and check a thread can join it; the reason it cannot, or None.

    up.sh ignores a failing ``ip netns add`` (``|| true``) and would then die on the next line;
    creating it here first tells "this machine cannot" (skip) from "the lab is broken" (fail)."""
    added = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=30, check=False)
    if added.returncode != 0:
        return f"`ip netns add {ns}` failed: {added.stderr.strip() or added.returncode}"
    try:
        lo = subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], capture_output=True,
                            text=True, timeout=30, check=False)
        if lo.returncode != 0:
            raise OSError(f"`ip netns exec {ns} ip link set lo up` failed: {lo.stderr.strip()}")
        in_namespace(ns, lambda: None)
    except OSError as e:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        return f"cannot use network namespace {ns}: {e}"
    return None


@contextlib.contextmanager
def _cache_lock(cache: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive lock on the lab cache for the session: one lab per cache at a time.

    Why: the node runs from the cache's copy of its source and keeps its Cashu wallet
    (``.wallet/wallet.sqlite3``: the redeemed ecash) and ``logs/`` there, not in $LAB, and up.sh
    deletes both at start; a second session's up.sh would pull them from under the first one's node.
    A concurrent session waits here (up to ``timeout``, then fails) instead."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".arbstr-session.lock", "a+") as lock:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    print(f"routstr lab: waiting for another session's lab ({cache} is locked)", file=sys.stderr)
                    waited = True
                if time.monotonic() > deadline:
                    pytest.fail(f"routstr lab: {cache} stayed locked by another session's lab for {timeout:.0f}s",
                                pytrace=False)
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def routstr_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoutstrLab]:
    """The lab, up once per session (skipped with the reason when this machine cannot run it; an
    error with the lab's logs when it can but up.sh fails); torn down at session end in any case."""
    reason = _unavailable_reason()
    if reason:
        pytest.skip(f"routstr lab: {reason}")
    cache = Path(os.environ.get("LAB_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "routstr-lab")
    with _cache_lock(cache):
        ns = f"arbstr-lab-{os.getpid()}-{secrets.token_hex(3)}"
        reason = _create_namespace(ns)
        if reason:
            pytest.skip(f"routstr lab: {reason}")
        lab = RoutstrLab(ns, tmp_path_factory.mktemp("routstr-lab"), cache)
        try:
            lab.up()
            yield lab
        finally:
            lab.down()
