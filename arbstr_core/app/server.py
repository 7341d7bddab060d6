"""Running arbstr under gunicorn with gthread workers, embedded (`arbstr serve`) or via gunicorn_conf.py.

gthread because the sync worker kills any request longer than ``timeout``, streams included; each
stream holds one thread for its life. ``max_requests = 0`` and a long ``graceful_timeout`` because
both would otherwise cut streams in flight.
"""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from ..config import Config

GRACEFUL_TIMEOUT = 130  # above stream_idle_timeout_secs' default; systemd's TimeoutStopSec is above this
# Connections a worker holds beyond its threads: kept-alive idle ones and ones waiting for a thread.
# gthread stops accepting at ``worker_connections`` open connections and keeps alive at most
# ``worker_connections - threads``; gunicorn's fixed default (1000) would cap the streams below a
# ``threads`` of 1000 or more, so the room is added to the threads instead.
SPARE_CONNECTIONS = 1000


def settings(config: Config, workers: int = 1) -> dict[str, Any]:
    """gunicorn settings for ``config``; ``[server] threads`` is how many streams a worker serves at once.

    gthread starts its threads only as requests need them, so a large ``threads`` costs nothing idle.
    """
    threads = config.server.threads
    return {
        "bind": [config.server.listen],
        "worker_class": "gthread",
        "workers": workers,
        "threads": threads,
        "worker_connections": threads + SPARE_CONNECTIONS,
        "graceful_timeout": GRACEFUL_TIMEOUT,
        "timeout": 60,
        "keepalive": 5,
        "max_requests": 0,
        "preload_app": False,
        "accesslog": None,
        "errorlog": "-",
        # gunicorn ≥ 27 opens a control socket under $HOME by default: nothing arbstr needs, and
        # a poor fit for systemd's DynamicUser.
        "control_socket_disable": True,
    }


class EmbeddedServer(BaseApplication):
    """gunicorn with our settings; each worker builds its own app after the fork."""

    def __init__(self, config: Config, options: dict[str, Any]) -> None:
        self.config = config
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # older gunicorns lack some settings
                self.cfg.set(key, value)

    def load(self) -> Any:
        from .factory import create_app

        return create_app(self.config)
