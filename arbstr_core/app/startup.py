"""Checks of how arbstr is being served: the gunicorn worker class, and who can reach it (SPEC §4.1, §8).

Both depend on things only known once gunicorn has started (the worker class, the addresses bound:
config ``listen``, ``arbstr serve -l`` or gunicorn's ``-b``), so the app factory runs them in each
worker; ``arbstr serve`` and ``arbstr check`` also judge the config's ``listen`` up front.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from typing import Any

from ..config import Config, split_listen
from ..errors import ConfigError

log = logging.getLogger("arbstr")

PACKAGE_COMMAND = "gunicorn -c python:arbstr_core.gunicorn_conf arbstr:app"


def check_worker(config: Config) -> None:
    """Under a gunicorn worker: warn when it cannot serve streams side by side, and refuse to serve a
    non-loopback address without ``auth_token`` (SystemExit(3): gunicorn's arbiter then halts with
    "Worker failed to boot" instead of respawning the worker forever). Elsewhere: nothing."""
    worker = _gunicorn_worker()
    if worker is None:
        return
    warning = _worker_class_warning(worker)
    if warning:
        log.warning("%s", warning)
    exposed = [str(s) for s in worker.sockets if not _is_local(s.getsockname())]
    problem = exposure(config, ", ".join(exposed)) if exposed else None
    if problem and not config.server.allow_unauthenticated:
        log.error("%s", problem)
        from gunicorn.arbiter import Arbiter

        raise SystemExit(Arbiter.WORKER_BOOT_ERROR)
    if problem:
        log.warning("%s", problem)


def check_listen(config: Config) -> str | None:
    """The config's ``listen`` judged before serving: ConfigError when it is exposed without
    ``auth_token``, the warning to print when ``allow_unauthenticated`` lets it through, else None."""
    host, _ = split_listen(config.server.listen)
    if host_is_loopback(host):
        return None
    problem = exposure(config, config.server.listen)
    if problem and not config.server.allow_unauthenticated:
        raise ConfigError(problem)
    return problem


def exposure(config: Config, where: str) -> str | None:
    """What is wrong with serving ``where`` (not loopback) under ``config``, naming both fixes."""
    if config.server.auth_token is not None:
        return None
    risk = (f"{config.path}: listening on {where}, which is not loopback, without [server] auth_token: "
            "anyone who can reach it can spend the provider balances and read the request log")
    if config.server.allow_unauthenticated:
        return f"{risk} (allowed by [server] allow_unauthenticated = true)"
    if config.mock:
        return (f"{risk}. Mock mode reads no config file, so it cannot set [server] auth_token or "
                "allow_unauthenticated = true: listen on 127.0.0.1, or serve a config file that sets one of them")
    return (f"{risk}. Set [server] auth_token (clients send it as their API key), or set "
            "[server] allow_unauthenticated = true if something else guards the network; "
            "or listen on 127.0.0.1")


def host_is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is loopback; 0.0.0.0, :: and unresolvable names are not."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return all(_is_local(info[4]) for info in infos)


def _is_local(sockname: Any) -> bool:
    """A listening socket's name is local when it is a unix socket path or a loopback IP (127/8, ::1)."""
    if isinstance(sockname, (str, bytes)):
        return True
    try:
        ip = ipaddress.ip_address(sockname[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _gunicorn_worker() -> Any | None:
    """The gunicorn worker loading this app, found as ``self`` of a calling frame (its load_wsgi).

    gunicorn hands the app no reference to its worker. Nothing is imported: if gunicorn's worker module
    was never loaded, no worker can be calling.
    """
    base = sys.modules.get("gunicorn.workers.base")
    if base is None:
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, base.Worker):
            return candidate
        frame = frame.f_back
    return None


def _worker_class_warning(worker: Any) -> str | None:
    """Why this worker is wrong for streams, or None for gthread with more than one thread."""
    gthread = sys.modules.get("gunicorn.workers.gthread")
    sync = sys.modules.get("gunicorn.workers.sync")
    threaded = gthread is not None and isinstance(worker, gthread.ThreadWorker)
    threads = worker.cfg.threads
    if threaded and threads > 1:
        return None
    kind = type(worker)
    what = f"{kind.__module__}.{kind.__qualname__}" + (" with 1 thread" if threaded else "")
    if threaded or (sync is not None and isinstance(worker, sync.SyncWorker)):
        why = "which serves one request at a time: a single stream blocks every other request"
    else:
        why = "not the gthread worker arbstr is built for (one thread per stream)"
    return (f"gunicorn runs arbstr on the worker {what}, {why}. Start it with `{PACKAGE_COMMAND}` (works from "
            "any directory), or add `--worker-class gthread --threads 256`")
