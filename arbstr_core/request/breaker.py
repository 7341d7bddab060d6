"""Per-provider circuit breakers in one thread-safe registry (SPEC §5.3).

    closed ──(failure_threshold consecutive failures)──▶ open
    open ──(open_secs elapsed)──▶ half_open: exactly one probe permit is handed out
    half_open ──probe success──▶ closed      half_open ──probe failure──▶ open (fresh timer)

A permit is always resolved: :meth:`BreakerRegistry.record` with an outcome, or
:meth:`BreakerRegistry.release` when the request ended without one (the provider stays half_open).
Time is injected so every transition is testable without sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..timefmt import utc_timestamp
from .failures import FAILURE, SUCCESS

log = logging.getLogger("arbstr.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@dataclass(frozen=True)
class Permit:
    provider: str
    probe: bool


class _Circuit:
    __slots__ = ("failures", "key_rejected", "last_error", "opened_at", "opened_wall", "probing")

    def __init__(self) -> None:
        self.failures = 0
        self.opened_at: float | None = None  # monotonic; None = closed
        self.opened_wall: float | None = None
        self.probing = False
        self.last_error: str | None = None
        self.key_rejected: str | None = None  # what the provider answered when it refused its key


class BreakerRegistry:
    def __init__(
        self,
        names: Iterable[str],
        failure_threshold: int,
        open_secs: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._threshold = failure_threshold
        self._open_secs = open_secs
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._circuits = {name: _Circuit() for name in names}

    def _state(self, c: _Circuit) -> str:
        if c.opened_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() - c.opened_at >= self._open_secs else OPEN

    def is_available(self, name: str) -> bool:
        """Could a request use this provider now? (No permit is taken.)"""
        with self._lock:
            c = self._circuits[name]
            state = self._state(c)
            return c.key_rejected is None and (state == CLOSED or (state == HALF_OPEN and not c.probing))

    def acquire(self, name: str) -> Permit | None:
        """A permit to send to ``name``, or None when its circuit is open or its probe is in flight."""
        with self._lock:
            c = self._circuits[name]
            state = self._state(c)
            if c.key_rejected is not None:
                return None
            if state == CLOSED:
                return Permit(name, probe=False)
            if state == HALF_OPEN and not c.probing:
                c.probing = True
                return Permit(name, probe=True)
            return None

    def record(self, permit: Permit, outcome: str, error: str | None = None) -> None:
        """Apply an attempt's outcome (SUCCESS, FAILURE or NEUTRAL) to the permit's circuit."""
        change: str | None = None
        with self._lock:
            c = self._circuits[permit.provider]
            if permit.probe:
                c.probing = False
            if outcome == SUCCESS:
                # Any success proves the provider answers, including a stream that began before the
                # circuit opened; it closes the circuit.
                if c.opened_at is not None:
                    change = "closed"
                c.failures, c.opened_at, c.opened_wall = 0, None, None
            elif outcome == FAILURE:
                c.last_error = error
                c.failures += 1
                if permit.probe or (c.opened_at is None and c.failures >= self._threshold):
                    c.opened_at, c.opened_wall = self._clock(), self._wall()
                    change = "opened"
            failures = c.failures
        if change == "opened":
            log.warning("circuit opened provider=%s failures=%d last_error=%s", permit.provider, failures, error)
        elif change == "closed":
            log.info("circuit closed provider=%s (recovered)", permit.provider)

    def release(self, permit: Permit) -> None:
        """Resolve a permit without an outcome: a probe's provider stays half_open for the next request."""
        if permit.probe:
            with self._lock:
                self._circuits[permit.provider].probing = False

    def reject_key(self, permit: Permit, complaint: str) -> None:
        """The provider refused its key (SPEC §5.1, §11): never sent another request until restart. The
        permit is resolved with it."""
        with self._lock:
            c = self._circuits[permit.provider]
            if permit.probe:
                c.probing = False
            first = c.key_rejected is None
            c.key_rejected = complaint
        if first:
            log.warning("provider key rejected provider=%s: %s; it is skipped until restart", permit.provider,
                        complaint)

    def seconds_until_probe(self, names: Iterable[str]) -> float:
        """How long until one of ``names``' open circuits lets a probe through: the honest Retry-After."""
        with self._lock:
            now = self._clock()
            circuits = [self._circuits[n] for n in names if n in self._circuits]
            waits = [c.opened_at + self._open_secs - now for c in circuits if c.opened_at is not None]
        return max(min(waits), 0.0) if waits else 0.0

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            out = {}
            for name, c in self._circuits.items():
                opened = utc_timestamp(c.opened_wall) if c.opened_wall is not None else None
                out[name] = {
                    "state": self._state(c),
                    "failure_count": c.failures,
                    "opened_at": opened,
                    "last_error": c.last_error,
                    "key_rejected": c.key_rejected,
                }
            return out
