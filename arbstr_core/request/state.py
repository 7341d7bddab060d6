"""Everything one app instance shares between requests, built once by the app factory."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import Config
from ..log.writer import LogStore
from ..secrets import Secret
from .breaker import BreakerRegistry
from .latency import LatencyWindow
from .upstream import Upstream


class Scrubber:
    """Replaces every configured secret in a text. Used on anything that echoes upstream words."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        # Longest first, so a key that contains another key is never left half visible.
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = secret.scrub(text)
        return text


class TokenBucket:
    """`rate_limit_rps` as a token bucket holding one second of burst."""

    def __init__(self, rate: float, clock=time.monotonic) -> None:
        self._rate = rate
        self._capacity = max(rate, 1.0)
        self._tokens = self._capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = threading.Lock()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one will be there."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self._rate


@dataclass
class AppState:
    config: Config
    upstream: Upstream
    breakers: BreakerRegistry
    logstore: LogStore
    scrub: Scrubber
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    rotation: itertools.count = field(default_factory=itertools.count)
    bucket: TokenBucket | None = None
    slots: threading.BoundedSemaphore | None = None
    _executor: ThreadPoolExecutor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

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
        ),
        scrub=Scrubber(secrets),
        bucket=TokenBucket(config.server.rate_limit_rps) if config.server.rate_limit_rps > 0 else None,
        slots=threading.BoundedSemaphore(config.server.max_concurrent) if config.server.max_concurrent else None,
    )

