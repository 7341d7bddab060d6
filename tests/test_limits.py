"""The rate-limit TokenBucket (injected clock)."""

from __future__ import annotations

import threading

import pytest

from arbstr_core.request.limits import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- TokenBucket ------------------------------------------------------------------------------


def test_bucket_allows_one_second_of_burst_then_asks_to_wait() -> None:
    clock = Clock()
    rate = 4.0
    bucket = TokenBucket(rate, clock=clock)
    assert [bucket.take() for _ in range(int(rate))] == [0.0] * int(rate)
    assert bucket.take() == pytest.approx(1 / rate)


def test_bucket_refills_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, clock=clock)
    assert bucket.take() == 0 and bucket.take() == 0
    wait = bucket.take()
    assert wait == pytest.approx(0.5)
    clock.now += 0.25  # half a token
    assert bucket.take() == pytest.approx(0.25)
    clock.now += 0.25
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.5)


def test_bucket_never_holds_more_than_its_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(3.0, clock=clock)
    clock.now += 3600
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() > 0


def test_fractional_rate_has_a_capacity_of_one() -> None:
    clock = Clock()
    bucket = TokenBucket(0.5, clock=clock)
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(2.0)
    clock.now += 1.0
    assert bucket.take() == pytest.approx(1.0)
    clock.now += 1.0
    assert bucket.take() == 0.0


def test_bucket_under_concurrency_hands_out_exactly_its_tokens() -> None:
    clock = Clock()  # frozen: no refill while the threads race
    bucket = TokenBucket(10.0, clock=clock)
    threads = 20
    barrier = threading.Barrier(threads)
    results: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        got = bucket.take()
        with lock:
            results.append(got)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert sum(1 for r in results if r == 0.0) == 10
    assert all(r > 0 for r in results if r != 0.0)
