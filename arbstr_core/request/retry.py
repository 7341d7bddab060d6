"""Retry, fallback and the one deadline around them (SPEC §5.2).

The loop is I/O-free: it is handed an ``attempt`` function that performs one upstream call and
returns an :class:`AttemptResult`, so every path (backoff, Retry-After, fallback, open circuits,
cancellation) is testable without a socket. The caller runs it under a ``concurrent.futures``
deadline; on expiry it sets ``cancel`` and the loop stops at its next checkpoint.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..config import Provider, RetryConfig
from ..errors import ArbstrError
from .breaker import BreakerRegistry, Permit
from .failures import BALANCE, KEY_REJECTED, MODEL_NOT_FOUND, OK, AttemptResult

MAX_CLIENT_RETRY_AFTER = 60
# No new attempt with less time left: no provider answers that fast, but it may still charge for it.
MIN_ATTEMPT_SECS = 0.1


class Attempts:
    """Failed attempts per provider, in order: the ``x-arbstr-retries`` header and the log column.

    Shared with the request thread, which calls :meth:`abandon` when the deadline passes: the attempt
    sent and not yet counted as failed (``pending``) failed too. The lock makes sure that attempt is
    counted exactly once, whichever thread gets there first, and nothing is counted after.
    ``last`` is the provider most recently sent the request: whoever may charge for it.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.pending: str | None = None
        self.last: str | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def sent(self) -> bool:
        """Whether any attempt was sent: from then on a client's re-send may be paid again."""
        return self.last is not None

    def start(self, provider: str) -> None:
        with self._lock:
            self.pending = self.last = provider

    def add(self, provider: str) -> None:
        """One failed attempt at ``provider``."""
        with self._lock:
            self.pending = None
            if not self._closed:
                self.counts[provider] = self.counts.get(provider, 0) + 1

    def abandon(self) -> None:
        """The deadline passed: count the pending attempt (even one that just succeeded: the client
        gets the 504, not its answer), then stop counting."""
        with self._lock:
            if self.pending is not None and not self._closed:
                self.counts[self.pending] = self.counts.get(self.pending, 0) + 1
            self.pending = None
            self._closed = True

    def header(self) -> str | None:
        with self._lock:
            return ", ".join(f"{n}/{p}" for p, n in self.counts.items()) or None


@dataclass
class Outcome:
    """What the chain produced: a success (provider, result, and the permit when the caller holds it)
    or an error to answer with."""

    attempts: Attempts
    provider: Provider | None = None
    permit: Permit | None = None
    result: AttemptResult | None = None
    error: ArbstrError | None = None
    started: float | None = None  # time.perf_counter() when the successful attempt began


class Abandoned(Exception):
    """The request stopped waiting (deadline or client gone); nothing more may be recorded."""


AttemptFn = Callable[[Provider, float | None], AttemptResult]


def backoff_secs(base_ms: float, retry_index: int, rand: Callable[[], float] = random.random) -> float:
    """base · 2^n with ±25 % jitter, so clients that failed together do not retry together."""
    return base_ms / 1000 * (2**retry_index) * (0.75 + 0.5 * rand())


def run_chain(
    candidates: Sequence[Provider],
    attempt: AttemptFn,
    *,
    retry: RetryConfig,
    breakers: BreakerRegistry,
    cancel: threading.Event,
    deadline: float | None = None,
    attempts: Attempts | None = None,
    hold: bool = False,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> Outcome:
    """Try candidates in order: the first up to 1 + max_retries times, later ones once each.

    ``attempt(provider, time_left)`` is called with the seconds left before ``deadline`` (or None).
    Raises :class:`Abandoned` when ``cancel`` is set. An attempt in flight when that happened and cut
    off by it (or failed anyway) is recorded as the failure it is, so a provider that hangs until the
    deadline trips its breaker (SPEC §5.2); one that answered too late releases its permit unrecorded.
    ``attempts``, if given, is filled in as the chain goes, for a caller that stops waiting for it.

    Every breaker permit is resolved here, in one ``finally`` per attempt, except a success's when
    ``hold`` is set: a stream's outcome is known only at its end, so its caller resolves that one.
    """
    attempts = Attempts() if attempts is None else attempts
    last: tuple[Provider, AttemptResult] | None = None
    all_rate_limited = all_not_found = all_broke = True
    complaints: dict[str, str] = {}  # each provider's last failure, for the final error
    retry_afters: list[float] = []
    reached_any = False
    for index, provider in enumerate(candidates):
        if index > 0 and not retry.fallback:
            break
        tries = 1 + retry.max_retries if index == 0 else 1
        for n in range(tries):
            if cancel.is_set():
                raise Abandoned
            left = None if deadline is None else deadline - clock()
            if left is not None and left < MIN_ATTEMPT_SECS:
                return Outcome(attempts, error=deadline_error())
            permit = breakers.acquire(provider.name)
            if permit is None:
                break  # circuit opened (or its probe is taken) since the candidates were chosen
            attempts.start(provider.name)
            started = time.perf_counter()
            result: AttemptResult | None = None
            used = handed_over = False
            try:
                result = attempt(provider, left)
                if cancel.is_set():
                    result.close()
                    raise Abandoned
                used = True
                handed_over = hold and result.verdict is OK
            finally:
                if not handed_over:
                    _resolve(breakers, permit, result, used)
            reached_any = True
            if result.verdict is OK:
                return Outcome(attempts, provider=provider, permit=permit if hold else None, result=result,
                               started=started)
            attempts.add(provider.name)
            last = (provider, result)
            if result.verdict.kind == "rate_limited":
                retry_afters.append(result.retry_after if result.retry_after is not None else 1)
            else:
                all_rate_limited = False
            if result.verdict is not MODEL_NOT_FOUND:
                all_not_found = False
            if result.verdict is not BALANCE:
                all_broke = False
            complaints[provider.name] = (f"{result.verdict.kind}{f' HTTP {result.status}' if result.status else ''}"
                                         f" {result.message}").rstrip()
            if not result.verdict.fallback:
                # The request's own fault: the attempt function shaped the upstream error for the client.
                return Outcome(attempts, provider=provider, error=result.payload)
            if not result.verdict.retry_same or n == tries - 1:
                break
            if result.retry_after is not None and result.retry_after > retry.max_retry_after_secs:
                break  # a 5xx asking for a longer pause than we may wait: fall back, as for 429 (§5.1)
            delay = result.retry_after if result.retry_after is not None else backoff_secs(
                retry.backoff_base_ms, n, rand
            )
            if deadline is not None:
                delay = min(delay, max(deadline - clock(), 0))
            if cancel.wait(delay):
                raise Abandoned
    if not reached_any:
        return Outcome(attempts, error=ArbstrError(
            503, "Every candidate provider has an open circuit; try again shortly",
            type="upstream_error", code="all_circuits_open", headers={"Retry-After": "1"},
        ))
    assert last is not None
    provider, result = last
    if all_not_found:
        return Outcome(attempts, provider=provider, error=result.payload)  # no provider knows the model
    if all_rate_limited:
        wait = min(max(1, math.ceil(min(retry_afters))), MAX_CLIENT_RETRY_AFTER)
        return Outcome(attempts, provider=provider, error=ArbstrError(
            429, "Every candidate provider is rate limiting; retry later",
            type="rate_limit_error", code="upstream_rate_limited", headers={"Retry-After": str(wait)},
        ))
    said = "; ".join(f"{name}: {complaint}" for name, complaint in complaints.items())
    if all_broke:  # say plainly that the money ran out, not that the provider broke
        return Outcome(attempts, provider=provider, error=ArbstrError(
            502, f"The balance ran out at every provider tried (HTTP 402); top up or add a key. {said}",
            type="upstream_error", code="insufficient_balance",
        ))
    return Outcome(attempts, provider=provider, error=ArbstrError(
        502, f"All providers failed. {said}", type="upstream_error", code="upstream_failed",
    ))


def _resolve(breakers: BreakerRegistry, permit: Permit, result: AttemptResult | None, used: bool) -> None:
    """Tell the breaker what the attempt showed. Nothing is learnt from an attempt that raised, or that
    answered after the request stopped waiting; one cut off by the deadline failed (SPEC §5.2)."""
    if result is None or (result.verdict is OK and not used):
        breakers.release(permit)
    elif result.verdict is KEY_REJECTED:
        breakers.reject_key(permit, f"HTTP {result.status} {result.message}"[:300])
    else:
        breakers.record(permit, result.verdict.breaker, f"{result.verdict.kind}: {result.message}"[:300])


def deadline_error() -> ArbstrError:
    return ArbstrError(504, "The request deadline was exceeded before a provider answered",
                       type="upstream_error", code="deadline_exceeded")
