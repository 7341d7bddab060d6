"""Everything one app instance shares between requests, built once by the app factory."""

from __future__ import annotations

import functools
import itertools
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import Config
from ..log.writer import LogStore
from ..secrets import Scrubber
from .breaker import BreakerRegistry
from .limits import TokenBucket
from .market import Market
from .perf import PerfWindow
from .upstream import Upstream


@dataclass
class AppState:
    config: Config
    upstream: Upstream
    breakers: BreakerRegistry
    logstore: LogStore
    scrub: Scrubber
    market: Market
    perf: PerfWindow = field(default_factory=PerfWindow)
    rotation: itertools.count = field(default_factory=itertools.count)
    explore_draw: Callable[[], float] = random.random  # the speed strategies' exploration draw, in [0, 1)
    bucket: TokenBucket | None = None
    slots: threading.BoundedSemaphore | None = None
    _executor: ThreadPoolExecutor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def is_available(self, name: str) -> bool:
        """May routing pick this provider now: circuit closed (or its probe free), key not rejected,
        balance not known to be short (SPEC §2.2, §11)."""
        return self.breakers.is_available(name) and not self.market.balance_low(name)

    def executor(self) -> ThreadPoolExecutor:
        """Threads for the deadline-bounded retry loops, created on first use (never before fork).

        One per request thread at most (``[server] threads``), so a burst of non-streaming requests
        never queues behind another's retry loop; the pool starts threads only as they are needed.
        """
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=self.config.server.threads,
                                                        thread_name_prefix="arbstr-attempt")
        return self._executor


def build_state(config: Config, upstream: Upstream) -> AppState:
    secrets = [p.api_key for p in config.providers if p.api_key is not None]
    if config.server.auth_token is not None:
        secrets.append(config.server.auth_token)
    return AppState(
        config=config,
        upstream=upstream,
        breakers=BreakerRegistry(
            [p.name for p in config.providers],
            config.circuit_breaker.failure_threshold,
            config.circuit_breaker.open_secs,
        ),
        logstore=LogStore(
            config.database.path,
            queue_size=config.database.queue_size,
            retention_days=config.database.retention_days,
            enabled=config.logging.log_requests,
            # Captures go after [debug] retention_days even with capture off now: it may have been on before.
            capture_retention_days=config.debug.retention_days,
        ),
        scrub=Scrubber(secrets),
        perf=PerfWindow(config.policies.window_minutes),
        market=Market(config.providers, functools.partial(upstream.get_json, timeout=config.server.connect_timeout_secs),
                      refresh_secs=config.market.refresh_secs, min_balance_sats=config.market.min_balance_sats),
        bucket=TokenBucket(config.server.rate_limit_rps) if config.server.rate_limit_rps > 0 else None,
        slots=threading.BoundedSemaphore(config.server.max_concurrent) if config.server.max_concurrent else None,
    )

