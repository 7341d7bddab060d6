"""How arbstr is served (SPEC §4.1, §8): gunicorn settings from the package, the worker-class warning,
and the refusal to serve a non-loopback address without ``auth_token``.

The end-to-end tests run real gunicorn subprocesses from a temporary directory (so no
./gunicorn.conf.py is found), on loopback; a server bound to 0.0.0.0 is only ever reached through
127.0.0.1.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ROOT, ArbstrServer, _no_control_socket, free_port, provider, run_cli, write_config
from gunicorn.workers.gthread import ThreadWorker
from gunicorn.workers.sync import SyncWorker

from arbstr_core.app import cli, server, startup
from arbstr_core.config import Config, from_mapping

PACKAGE_CONF = ("-c", "python:arbstr_core.gunicorn_conf")
EXIT_BOUND = 60.0  # generous: a refusing gunicorn exits within a second or two
TOKEN = "auth-token-SECRET-0123456789"
SYNC_WARNING = "serves one request at a time"
FIXES = ("[server] auth_token", "allow_unauthenticated = true")


def config_of(**server_table: Any) -> Config:
    return from_mapping({"server": server_table, "providers": [provider("http://127.0.0.1:9/v1", "p")]},
                        env={}, path="/etc/arbstr/config.toml")


# --- gunicorn settings ------------------------------------------------------------------------------


def test_settings_take_threads_from_the_config() -> None:
    options = server.settings(config_of())
    assert (options["worker_class"], options["threads"], options["workers"]) == ("gthread", 256, 1)
    assert server.settings(config_of(threads=8), workers=2)["threads"] == 8


@pytest.mark.parametrize("threads", [1, 256, 1000, 5000])
def test_every_thread_gets_a_connection_and_keep_alive_has_room(threads: int) -> None:
    """gthread stops accepting at worker_connections and keeps alive at most worker_connections - threads."""
    options = server.settings(config_of(threads=threads))
    assert options["worker_connections"] - threads >= 1000


@pytest.mark.parametrize(
    ("argv", "listen", "threads"),
    [
        ([], "127.0.0.1:8080", 256),
        (["--threads", "32"], "127.0.0.1:8080", 32),
        (["-l", "127.0.0.2:9999", "--threads", "512"], "127.0.0.2:9999", 512),
    ],
)
def test_serve_overrides_listen_and_threads(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], listen: str, threads: int
) -> None:
    started: list[tuple[Config, dict[str, Any]]] = []

    class Recorder:
        def __init__(self, config: Config, options: dict[str, Any]) -> None:
            started.append((config, options))

        def run(self) -> None:
            pass

    monkeypatch.setattr(server, "EmbeddedServer", Recorder)
    assert cli.main(["serve", "--mock", *argv]) == 0
    ((config, options),) = started
    assert (config.server.listen, config.server.threads) == (listen, threads)  # the app sees them too
    assert (options["bind"], options["threads"]) == ([listen], threads)


def test_serve_in_mock_mode_refuses_a_network_listen_with_a_fix_it_can_use(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--mock", "-l", "0.0.0.0:9"]) == 1  # refused before gunicorn would start
    err = capsys.readouterr().err
    assert "0.0.0.0:9" in err and "Mock mode reads no config file" in err and "listen on 127.0.0.1" in err


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--threads", "x"], ["-l", "8080"], ["-l", "host:http"]])
def test_serve_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["serve", *argv])
    assert e.value.code == 2
    assert argv[1] in capsys.readouterr().err


# --- judging addresses and workers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.0.2.7", False), ("2001:db8::1", False)],
)
def test_host_is_loopback(host: str, loopback: bool) -> None:
    assert startup.host_is_loopback(host) is loopback


class FakeListener:
    """What a gunicorn listener offers the check: its name and how it prints."""

    def __init__(self, name: Any) -> None:
        self.name = name

    def getsockname(self) -> Any:
        return self.name

    def __str__(self) -> str:
        return f"listener {self.name}"


def fake_worker(kind: type, threads: int, *names: Any) -> Any:
    """A gunicorn worker of class ``kind`` as far as the checks look at one (never initialised)."""
    worker = kind.__new__(kind)
    worker.cfg = SimpleNamespace(threads=threads)
    worker.sockets = [FakeListener(n) for n in names]
    return worker


def load_wsgi(self: Any, config: Config) -> None:
    """Stands in for gunicorn's Worker.load_wsgi: the check finds the worker as ``self`` of a caller."""
    startup.check_worker(config)


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog attached to the "arbstr" logger itself: an app built earlier in this process may have
    stopped it propagating to the root logger, or set a higher level."""
    logger = logging.getLogger("arbstr")
    saved = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # each record once, whatever an earlier app did
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def test_no_check_outside_a_gunicorn_worker(caplog: pytest.LogCaptureFixture) -> None:
    startup.check_worker(config_of(listen="0.0.0.0:8080"))  # the config alone is no reason to refuse
    assert caplog.records == []


@pytest.mark.parametrize(
    "names",
    [[("127.0.0.1", 8080)], [("::1", 8080, 0, 0)], ["/run/arbstr.sock"], [("::ffff:127.0.0.1", 8080, 0, 0)]],
)
def test_local_listeners_pass(names: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    load_wsgi(fake_worker(ThreadWorker, 256, *names), config_of())
    assert caplog.records == []


@pytest.mark.parametrize("name", [("0.0.0.0", 8080), ("::", 8080, 0, 0), ("192.0.2.7", 8080)])
def test_a_network_listener_without_token_stops_the_worker(name: Any, caplog: pytest.LogCaptureFixture) -> None:
    worker = fake_worker(ThreadWorker, 256, ("127.0.0.1", 8080), name)
    with pytest.raises(SystemExit) as e:
        load_wsgi(worker, config_of())
    assert e.value.code == 3  # gunicorn's WORKER_BOOT_ERROR: the arbiter halts instead of respawning
    (record,) = caplog.records
    assert record.levelname == "ERROR" and record.name == "arbstr"
    assert f"listener {name}" in record.message and "listener ('127.0.0.1'" not in record.message
    assert all(fix in record.message for fix in FIXES)


def test_a_network_listener_is_served_with_a_token_or_when_allowed(caplog: pytest.LogCaptureFixture) -> None:
    load_wsgi(fake_worker(ThreadWorker, 256, ("0.0.0.0", 8080)), config_of(auth_token=TOKEN))
    assert caplog.records == []
    load_wsgi(fake_worker(ThreadWorker, 256, ("0.0.0.0", 8080)), config_of(allow_unauthenticated=True))
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "allow_unauthenticated = true" in record.message


@pytest.mark.parametrize(("kind", "threads", "shown"), [
    (SyncWorker, 1, "gunicorn.workers.sync.SyncWorker,"),
    (ThreadWorker, 1, "gunicorn.workers.gthread.ThreadWorker with 1 thread"),
])
def test_a_worker_serving_one_request_at_a_time_warns(
    kind: type, threads: int, shown: str, caplog: pytest.LogCaptureFixture
) -> None:
    load_wsgi(fake_worker(kind, threads, ("127.0.0.1", 8080)), config_of())
    (record,) = caplog.records
    assert record.levelname == "WARNING" and shown in record.message and SYNC_WARNING in record.message
    assert startup.PACKAGE_COMMAND in record.message and "--worker-class gthread --threads 256" in record.message


# --- real gunicorn ----------------------------------------------------------------------------------


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[..., ArbstrServer]]:
    """Factory: ``gunicorn(config, *args)`` → an unstarted ``python -m gunicorn ARGS arbstr:app`` in
    tmp_path (or ``cwd``); ``{port}`` in ARGS is the server's port (``port=`` to choose it)."""
    servers: list[ArbstrServer] = []

    def make(config: Path, *args: str, port: int | None = None, cwd: Path | None = None) -> ArbstrServer:
        s = ArbstrServer(tmp_path / f"gunicorn-{len(servers) + 1}.log", config, cwd=cwd or tmp_path)
        s.port = port or s.port
        s.argv = [sys.executable, "-m", "gunicorn", *(a.format(port=s.port) for a in args), "arbstr:app"]
        servers.append(s)
        return s

    yield make
    for s in servers:
        if s.running:
            s.stop(timeout=10)
        s.kill()


def refused(s: ArbstrServer) -> subprocess.CompletedProcess[str]:
    """Run a server that must refuse to start; its exit code and output."""
    return subprocess.run(s.argv, cwd=s.cwd, env=s.env, capture_output=True, text=True, timeout=EXIT_BOUND,
                          check=False)


def test_plain_gunicorn_elsewhere_warns_about_the_sync_worker(
    tmp_path: Path, gunicorn: Callable[..., ArbstrServer]
) -> None:
    assert not (tmp_path / "gunicorn.conf.py").exists()
    s = gunicorn(write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")]),
                 *_no_control_socket(), "-b", "127.0.0.1:{port}").start()
    log = s.wait_for_log(SYNC_WARNING)
    assert "Using worker: sync" in log
    assert startup.PACKAGE_COMMAND in log


def test_package_settings_work_from_any_directory(tmp_path: Path, gunicorn: Callable[..., ArbstrServer]) -> None:
    port = free_port()
    config = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")], server={"listen": f"127.0.0.1:{port}"})
    s = gunicorn(config, *PACKAGE_CONF, port=port).start()  # bound from [server] listen: no -b
    assert s.get("/health").status_code == 200
    assert s.stop() == 0
    log = s.log_text()
    assert "Using worker: gthread" in log
    assert SYNC_WARNING not in log and "WARNING" not in log


def test_plain_gunicorn_in_the_project_directory_reads_its_gunicorn_conf(
    tmp_path: Path, gunicorn: Callable[..., ArbstrServer]
) -> None:
    config = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")])
    s = gunicorn(config, "-b", "127.0.0.1:{port}", cwd=ROOT).start()
    assert s.stop() == 0
    log = s.log_text()
    assert "Using worker: gthread" in log and SYNC_WARNING not in log


def test_config_listen_on_the_network_without_token_stops_gunicorn(
    tmp_path: Path, gunicorn: Callable[..., ArbstrServer]
) -> None:
    port = free_port()
    config = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")], server={"listen": f"0.0.0.0:{port}"})
    done = refused(gunicorn(config, *PACKAGE_CONF, port=port))
    assert done.returncode == 3, done.stderr
    assert all(fix in done.stderr for fix in FIXES)
    assert "Worker failed to boot" in done.stderr


def test_bind_option_on_the_network_without_token_stops_gunicorn(
    tmp_path: Path, gunicorn: Callable[..., ArbstrServer]
) -> None:
    config = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")])  # listen: 127.0.0.1:8080
    done = refused(gunicorn(config, *PACKAGE_CONF, "-b", "0.0.0.0:{port}"))
    assert done.returncode == 3, done.stderr
    assert all(fix in done.stderr for fix in FIXES)
    assert "0.0.0.0:" in done.stderr


@pytest.mark.parametrize("server_table", [{"allow_unauthenticated": True}, {"auth_token": TOKEN}])
def test_network_bind_starts_with_a_token_or_when_allowed(
    tmp_path: Path, gunicorn: Callable[..., ArbstrServer], server_table: dict[str, Any]
) -> None:
    config = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")], server=server_table)
    s = gunicorn(config, *PACKAGE_CONF, "-b", "0.0.0.0:{port}").start()
    assert s.get("/health").status_code == 200
    warned = "allow_unauthenticated = true" in s.log_text()
    assert warned is ("allow_unauthenticated" in server_table)


def test_serve_refuses_a_network_listen_without_token(tmp_path: Path) -> None:
    config = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "p")])
    done = run_cli("serve", "-c", config, "-l", f"0.0.0.0:{free_port()}", timeout=EXIT_BOUND)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("arbstr: config error: ") and all(fix in line for fix in FIXES)
    assert done.stdout == ""
