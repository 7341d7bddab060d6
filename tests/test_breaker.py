"""Circuit breaker (SPEC §5.3): every transition with an injected clock, the single probe, snapshots."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import pytest

from arbstr_core.request.breaker import CLOSED, HALF_OPEN, OPEN, BreakerRegistry, Permit
from arbstr_core.request.failures import FAILURE, NEUTRAL, SUCCESS

THRESHOLD = 3
OPEN_SECS = 30.0
WALL0 = 1_700_000_000.25


class Clock:
    """A monotonic clock that only moves when told; ``wall`` moves with it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.start = start

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return WALL0 + (self.now - self.start)

    def advance(self, secs: float) -> None:
        self.now += secs


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> BreakerRegistry:
    return BreakerRegistry(["alpha", "beta"], THRESHOLD, OPEN_SECS, clock=clock, wall=clock.wall)


def state(reg: BreakerRegistry, name: str = "alpha") -> str:
    return reg.snapshot()[name]["state"]


def fail(reg: BreakerRegistry, name: str = "alpha", times: int = 1, error: str = "server_error: 500") -> None:
    for _ in range(times):
        permit = reg.acquire(name)
        assert permit is not None, f"{name} gave no permit"
        reg.record(permit, FAILURE, error)


def succeed(reg: BreakerRegistry, name: str = "alpha") -> None:
    permit = reg.acquire(name)
    assert permit is not None
    reg.record(permit, SUCCESS)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def open_circuit(reg: BreakerRegistry, name: str = "alpha") -> None:
    fail(reg, name, THRESHOLD)
    assert state(reg, name) == OPEN


# --- closed ------------------------------------------------------------------------------------


def test_starts_closed_with_the_documented_snapshot_shape(reg: BreakerRegistry) -> None:
    snap = reg.snapshot()
    assert set(snap) == {"alpha", "beta"}
    assert snap["alpha"] == {"state": "closed", "failure_count": 0, "opened_at": None, "last_error": None,
                             "key_rejected": None}
    assert reg.is_available("alpha")
    assert reg.acquire("alpha") == Permit("alpha", probe=False)


def test_failures_below_the_threshold_keep_it_closed(reg: BreakerRegistry) -> None:
    fail(reg, times=THRESHOLD - 1)
    snap = reg.snapshot()["alpha"]
    assert snap["state"] == CLOSED
    assert snap["failure_count"] == THRESHOLD - 1
    assert snap["last_error"] == "server_error: 500"
    assert reg.is_available("alpha")


def test_threshold_consecutive_failures_open_it(reg: BreakerRegistry, clock: Clock) -> None:
    fail(reg, times=THRESHOLD - 1)
    clock.advance(5)
    fail(reg, error="read_failed: read timeout")
    snap = reg.snapshot()["alpha"]
    assert snap["state"] == OPEN
    assert snap["failure_count"] == THRESHOLD
    assert snap["opened_at"] == iso(clock.wall())
    assert snap["opened_at"].endswith("Z")
    assert snap["last_error"] == "read_failed: read timeout"
    assert not reg.is_available("alpha")
    assert reg.acquire("alpha") is None


def test_success_resets_the_count(reg: BreakerRegistry) -> None:
    fail(reg, times=THRESHOLD - 1)
    succeed(reg)
    assert reg.snapshot()["alpha"]["failure_count"] == 0
    fail(reg, times=THRESHOLD - 1)  # not consecutive with the first run: still closed
    assert state(reg) == CLOSED


def test_neutral_outcomes_change_nothing(reg: BreakerRegistry) -> None:
    fail(reg, times=THRESHOLD - 1)
    for _ in range(10):
        permit = reg.acquire("alpha")
        assert permit is not None
        reg.record(permit, NEUTRAL, "rate_limited: 429")
    snap = reg.snapshot()["alpha"]
    assert (snap["state"], snap["failure_count"]) == (CLOSED, THRESHOLD - 1)
    fail(reg)  # neutral outcomes did not break the run of failures
    assert state(reg) == OPEN


def test_providers_are_independent(reg: BreakerRegistry) -> None:
    open_circuit(reg, "alpha")
    assert state(reg, "beta") == CLOSED
    assert reg.acquire("beta") == Permit("beta", probe=False)


def test_threshold_of_one(clock: Clock) -> None:
    reg = BreakerRegistry(["p"], 1, OPEN_SECS, clock=clock, wall=clock.wall)
    fail(reg, "p")
    assert state(reg, "p") == OPEN


# --- open → half_open ---------------------------------------------------------------------------


def test_open_lasts_exactly_open_secs(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS - 0.001)
    assert state(reg) == OPEN
    assert reg.acquire("alpha") is None
    clock.advance(0.001)
    assert state(reg) == HALF_OPEN
    assert reg.is_available("alpha")


def test_neutral_and_extra_failures_while_open_do_not_extend_the_timer(reg: BreakerRegistry, clock: Clock) -> None:
    # Permits handed out while closed can resolve after the circuit opened (slow requests, streams).
    late = [reg.acquire("alpha") for _ in range(2)]
    open_circuit(reg)
    clock.advance(OPEN_SECS / 2)
    reg.record(late[0], FAILURE, "late failure")
    reg.record(late[1], NEUTRAL)
    clock.advance(OPEN_SECS / 2)
    assert state(reg) == HALF_OPEN
    assert reg.snapshot()["alpha"]["failure_count"] == THRESHOLD + 1


def test_exactly_one_probe_permit(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS)
    probe = reg.acquire("alpha")
    assert probe == Permit("alpha", probe=True)
    assert reg.acquire("alpha") is None
    assert not reg.is_available("alpha"), "other requests skip the provider while its probe is in flight"
    assert state(reg) == HALF_OPEN


def test_probe_success_closes(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS)
    probe = reg.acquire("alpha")
    assert probe is not None
    reg.record(probe, SUCCESS)
    snap = reg.snapshot()["alpha"]
    assert (snap["state"], snap["failure_count"], snap["opened_at"]) == (CLOSED, 0, None)
    assert reg.acquire("alpha") == Permit("alpha", probe=False)
    assert reg.acquire("alpha") == Permit("alpha", probe=False), "closed circuits hand out any number"


def test_probe_failure_reopens_with_a_fresh_timer(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS + 7)
    probe = reg.acquire("alpha")
    assert probe is not None and probe.probe
    reg.record(probe, FAILURE, "connect_failed: connection refused")
    snap = reg.snapshot()["alpha"]
    assert snap["state"] == OPEN
    assert snap["opened_at"] == iso(clock.wall())
    assert snap["last_error"] == "connect_failed: connection refused"
    assert reg.acquire("alpha") is None
    clock.advance(OPEN_SECS - 0.001)
    assert state(reg) == OPEN
    clock.advance(0.001)
    assert state(reg) == HALF_OPEN
    assert reg.acquire("alpha") == Permit("alpha", probe=True)


def test_released_probe_stays_half_open_and_frees_the_permit(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS)
    probe = reg.acquire("alpha")
    assert probe is not None
    before = reg.snapshot()["alpha"]
    reg.release(probe)
    after = reg.snapshot()["alpha"]
    assert after == before and after["state"] == HALF_OPEN
    assert reg.is_available("alpha")
    assert reg.acquire("alpha") == Permit("alpha", probe=True)


def test_neutral_probe_outcome_resolves_the_permit_and_stays_half_open(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS)
    probe = reg.acquire("alpha")
    assert probe is not None
    reg.record(probe, NEUTRAL, "rate_limited: 429")
    assert state(reg) == HALF_OPEN
    assert reg.acquire("alpha") == Permit("alpha", probe=True)


def test_releasing_a_normal_permit_changes_nothing(reg: BreakerRegistry) -> None:
    fail(reg, times=THRESHOLD - 1)
    before = reg.snapshot()
    permit = reg.acquire("alpha")
    assert permit is not None
    reg.release(permit)
    assert reg.snapshot() == before


def test_release_of_a_stale_probe_after_recovery_is_harmless(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS)
    probe = reg.acquire("alpha")
    assert probe is not None
    reg.record(probe, SUCCESS)
    reg.release(probe)
    assert state(reg) == CLOSED


def test_any_success_closes_an_open_circuit(reg: BreakerRegistry, clock: Clock) -> None:
    """Documented choice: a request that began before the circuit opened and then succeeded proves the
    provider answers, so it closes the circuit."""
    early = reg.acquire("alpha")
    assert early is not None
    open_circuit(reg)
    reg.record(early, SUCCESS)
    assert reg.snapshot()["alpha"]["state"] == CLOSED


def test_full_cycle_closed_open_half_open_open_half_open_closed(reg: BreakerRegistry, clock: Clock) -> None:
    seen = [state(reg)]
    open_circuit(reg)
    seen.append(state(reg))
    clock.advance(OPEN_SECS)
    seen.append(state(reg))
    fail(reg)  # the probe fails
    seen.append(state(reg))
    clock.advance(OPEN_SECS)
    seen.append(state(reg))
    succeed(reg)  # the probe succeeds
    seen.append(state(reg))
    assert seen == [CLOSED, OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


# --- concurrency ----------------------------------------------------------------------------------


def test_single_probe_permit_under_20_concurrent_threads(reg: BreakerRegistry, clock: Clock) -> None:
    open_circuit(reg)
    clock.advance(OPEN_SECS)
    threads = 20
    for _round in range(25):
        barrier = threading.Barrier(threads)
        results: list[Permit | None] = [None] * threads

        def worker(i: int, barrier: threading.Barrier = barrier, results: list[Permit | None] = results) -> None:
            barrier.wait()
            results[i] = reg.acquire("alpha")

        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        granted = [r for r in results if r is not None]
        assert granted == [Permit("alpha", probe=True)]
        reg.release(granted[0])  # stays half_open: the next round has a permit to fight over
        assert state(reg) == HALF_OPEN


def test_concurrent_failures_are_all_counted(clock: Clock) -> None:
    reg = BreakerRegistry(["p"], 10_000, OPEN_SECS, clock=clock, wall=clock.wall)
    threads, each = 20, 200
    barrier = threading.Barrier(threads)

    def worker() -> None:
        barrier.wait()
        for _ in range(each):
            permit = reg.acquire("p")
            assert permit is not None
            reg.record(permit, FAILURE, "x")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert reg.snapshot()["p"]["failure_count"] == threads * each


# --- logging and Retry-After help -----------------------------------------------------------------


def test_state_changes_are_logged(reg: BreakerRegistry, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="arbstr.breaker"):
        open_circuit(reg)
        clock.advance(OPEN_SECS)
        succeed(reg)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "arbstr.breaker"]
    assert len(levels) == 2
    assert levels[0][0] == logging.WARNING and "opened" in levels[0][1] and "alpha" in levels[0][1]
    assert levels[1][0] == logging.INFO and "alpha" in levels[1][1]


def test_failures_below_threshold_are_not_logged(reg: BreakerRegistry, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="arbstr.breaker"):
        fail(reg, times=THRESHOLD - 1)
        succeed(reg)
    assert [r for r in caplog.records if r.name == "arbstr.breaker"] == []


def test_seconds_until_probe(reg: BreakerRegistry, clock: Clock) -> None:
    both = ["alpha", "beta"]
    assert reg.seconds_until_probe(both) == 0.0
    open_circuit(reg, "alpha")
    clock.advance(10)
    open_circuit(reg, "beta")
    assert reg.seconds_until_probe(both) == pytest.approx(OPEN_SECS - 10)
    # Only the providers that serve the request's model count: beta alone opened 10 s later.
    assert reg.seconds_until_probe(["beta"]) == pytest.approx(OPEN_SECS)
    clock.advance(OPEN_SECS)
    assert reg.seconds_until_probe(both) == 0.0
