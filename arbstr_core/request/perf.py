"""What each provider measured lately, for the strategies that order by speed: bounded, in memory,
thread-safe. Samples older than the window (``[policies] window_minutes``) are forgotten, so a provider
that was slow an hour ago is judged by what it does now."""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_SAMPLES = 1000  # per provider: the window's memory bound, whatever the traffic


@dataclass(frozen=True)
class Sample:
    at: float  # the clock's time when it was taken
    latency_ms: float
    ttft_ms: float | None  # streams only
    tokens_per_sec: float | None


@dataclass(frozen=True)
class Recent:
    """A provider's medians over the window; None where no sample had that figure."""
    samples: int
    latency_ms: float | None
    ttft_ms: float | None
    tokens_per_sec: float | None
    last_at: float  # when the newest sample was taken


class PerfWindow:
    def __init__(self, minutes: float = 15, clock: Callable[[], float] = time.monotonic,
                 max_samples: int = MAX_SAMPLES) -> None:
        self._span = minutes * 60
        self._clock = clock
        self._max = max_samples
        self._lock = threading.Lock()
        self._samples: dict[str, deque[Sample]] = {}

    def add(self, provider: str, *, latency_ms: float, ttft_ms: float | None, tokens_per_sec: float | None) -> None:
        with self._lock:
            self._samples.setdefault(provider, deque(maxlen=self._max)).append(
                Sample(self._clock(), latency_ms, ttft_ms, tokens_per_sec))

    def recent(self, provider: str) -> Recent | None:
        """The provider's medians over the window, or None when it has no sample in it."""
        with self._lock:
            samples = self._samples.get(provider)
            if not samples:
                return None
            horizon = self._clock() - self._span
            while samples and samples[0].at < horizon:
                samples.popleft()
            if not samples:
                return None
            kept = list(samples)
        return Recent(
            samples=len(kept),
            latency_ms=_median([s.latency_ms for s in kept]),
            ttft_ms=_median([s.ttft_ms for s in kept if s.ttft_ms is not None]),
            tokens_per_sec=_median([s.tokens_per_sec for s in kept if s.tokens_per_sec is not None]),
            last_at=kept[-1].at,
        )


def snapshot(recent: Recent | None) -> dict[str, Any] | None:
    """What /providers shows of a provider's window: its sample count and medians, or null."""
    if recent is None:
        return None
    return {"samples": recent.samples, "latency_ms": recent.latency_ms, "ttft_ms": recent.ttft_ms,
            "output_tokens_per_sec": recent.tokens_per_sec}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
