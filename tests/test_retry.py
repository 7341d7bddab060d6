"""Retry, fallback and deadline (SPEC §5.2) through ``run_chain`` with scripted attempts, no sockets,
no sleeping: the clock is injected and waiting on ``cancel`` advances it instead of blocking."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from arbstr_core.config import Provider, RetryConfig
from arbstr_core.errors import ArbstrError
from arbstr_core.request.breaker import BreakerRegistry, Permit
from arbstr_core.request.failures import (
    BAD_BODY,
    CLIENT_FAULT,
    CONNECT_FAILED,
    FAILURE,
    MODEL_NOT_FOUND,
    OK,
    SENT_FAILED,
    AttemptResult,
    classify_status,
)
from arbstr_core.request.retry import Abandoned, Attempts, backoff_secs, run_chain

MAX_RETRY_AFTER = 10.0
BASE_MS = 1000.0


class Clock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, secs: float) -> None:
        self.now += secs


class FakeCancel(threading.Event):
    """``wait(t)`` records t and moves the clock by it instead of sleeping (or stops if cancelled)."""

    def __init__(self, clock: Clock, cancel_on_wait: int | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.waits: list[float] = []
        self.cancel_on_wait = cancel_on_wait

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout >= 0
        self.waits.append(timeout)
        if self.cancel_on_wait is not None and len(self.waits) >= self.cancel_on_wait:
            self.set()
        if not self.is_set():
            self.clock.advance(timeout)
        return self.is_set()


@dataclass
class Script:
    """The attempt function: per provider, the results to hand back in order."""

    plan: dict[str, list[AttemptResult]]
    clock: Clock | None = None
    cost_secs: float = 0.0  # how long each attempt takes on the fake clock
    calls: list[tuple[str, float | None]] = field(default_factory=list)

    def __call__(self, provider: Provider, left: float | None) -> AttemptResult:
        self.calls.append((provider.name, left))
        if self.clock is not None:
            self.clock.advance(self.cost_secs)
        queue = self.plan.get(provider.name)
        assert queue, f"unexpected attempt on {provider.name}"
        return queue.pop(0)

    def order(self) -> list[str]:
        return [name for name, _ in self.calls]


def provider(name: str) -> Provider:
    return Provider(name, f"http://{name}.example/v1", ("gpt-4o",))


ALPHA, BETA, GAMMA = provider("provider-alpha"), provider("provider-beta"), provider("provider-gamma")
CANDIDATES = (ALPHA, BETA, GAMMA)


def ok(payload: Any = "body", close: Callable[[], None] = lambda: None) -> AttemptResult:
    return AttemptResult(OK, 200, payload=payload, close=close)


def http(status: int, retry_after: float | None = None) -> AttemptResult:
    return AttemptResult(classify_status(status, retry_after, MAX_RETRY_AFTER), status, f"upstream said {status}",
                         retry_after)


def refused() -> AttemptResult:
    return AttemptResult(CONNECT_FAILED, None, "connection failed")


def read_timeout() -> AttemptResult:
    return AttemptResult(SENT_FAILED, None, "read timeout")


def client_fault(status: int = 400) -> AttemptResult:
    error = ArbstrError(status, "messages[0].content is required", code="invalid_value")
    return AttemptResult(CLIENT_FAULT, status, error.message, payload=error)


@dataclass
class Env:
    clock: Clock
    cancel: FakeCancel
    breakers: BreakerRegistry

    def run(self, script: Script, candidates: Sequence[Provider] = CANDIDATES, *, retry: RetryConfig | None = None,
            deadline: float | None = None, rand: Callable[[], float] = lambda: 0.5, hold: bool = True) -> Any:
        return run_chain(candidates, script, retry=retry or RetryConfig(), breakers=self.breakers,
                         cancel=self.cancel, deadline=deadline, clock=self.clock, rand=rand, hold=hold)


@pytest.fixture
def env() -> Env:
    clock = Clock()
    breakers = BreakerRegistry([p.name for p in CANDIDATES], failure_threshold=100, open_secs=30, clock=clock)
    return Env(clock, FakeCancel(clock), breakers)


def snap(env: Env, name: str) -> dict[str, Any]:
    return env.breakers.snapshot()[name]


# --- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 5])
def test_backoff_doubles_with_25_percent_jitter(n: int) -> None:
    nominal = BASE_MS / 1000 * 2**n
    assert backoff_secs(BASE_MS, n, lambda: 0.5) == pytest.approx(nominal)
    assert backoff_secs(BASE_MS, n, lambda: 0.0) == pytest.approx(nominal * 0.75)
    assert backoff_secs(BASE_MS, n, lambda: 1.0) == pytest.approx(nominal * 1.25)


def test_backoff_with_real_randomness_stays_within_bounds() -> None:
    rng = random.Random(1234)
    values = [backoff_secs(BASE_MS, 1, rng.random) for _ in range(2000)]
    assert all(1.5 <= v <= 2.5 for v in values)
    assert max(values) - min(values) > 0.9, "jitter actually spreads the retries"


def test_zero_base_means_no_wait() -> None:
    assert backoff_secs(0, 3, lambda: 0.9) == 0


# --- success, retries, fallback -------------------------------------------------------------------


def test_first_attempt_succeeds(env: Env) -> None:
    script = Script({"provider-alpha": [ok("the body")]})
    out = env.run(script)
    assert out.error is None
    assert out.provider is ALPHA
    assert out.permit == Permit("provider-alpha", probe=False)
    assert out.result.payload == "the body"
    assert out.attempts.header() is None
    assert script.calls == [("provider-alpha", None)]
    assert env.cancel.waits == []


@pytest.mark.parametrize("rand_value", [0.0, 0.5, 0.999999])
def test_primary_retries_with_exponential_backoff(env: Env, rand_value: float) -> None:
    script = Script({"provider-alpha": [http(500), refused(), ok()]})
    out = env.run(script, rand=lambda: rand_value)
    assert out.provider is ALPHA and out.error is None
    factor = 0.75 + 0.5 * rand_value
    assert env.cancel.waits == pytest.approx([1.0 * factor, 2.0 * factor])
    assert all(0.75 <= w / nominal <= 1.25 for w, nominal in zip(env.cancel.waits, (1.0, 2.0), strict=True))
    assert out.attempts.header() == "2/provider-alpha"
    assert script.order() == ["provider-alpha"] * 3


def test_backoff_base_comes_from_config(env: Env) -> None:
    script = Script({"provider-alpha": [http(502), http(503), ok()]})
    env.run(script, retry=RetryConfig(backoff_base_ms=250))
    assert env.cancel.waits == pytest.approx([0.25, 0.5])


def test_fallback_gives_each_later_candidate_one_attempt(env: Env) -> None:
    script = Script({
        "provider-alpha": [http(500), http(502), http(503)],
        "provider-beta": [http(504)],
        "provider-gamma": [ok()],
    })
    out = env.run(script)
    assert out.provider is GAMMA and out.error is None
    assert script.order() == ["provider-alpha"] * 3 + ["provider-beta", "provider-gamma"]
    assert out.attempts.header() == "3/provider-alpha, 1/provider-beta"
    assert len(env.cancel.waits) == 2, "no backoff before a fallback"


def test_max_retries_zero_means_one_attempt(env: Env) -> None:
    script = Script({"provider-alpha": [http(500)], "provider-beta": [ok()]})
    out = env.run(script, retry=RetryConfig(max_retries=0))
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.attempts.header() == "1/provider-alpha"


def test_fallback_false_stops_after_the_primary(env: Env) -> None:
    script = Script({"provider-alpha": [http(500), http(500), http(500)]})
    out = env.run(script, retry=RetryConfig(fallback=False))
    assert script.order() == ["provider-alpha"] * 3
    assert out.error is not None and out.error.status == 502
    assert out.error.code == "upstream_failed" and out.error.type == "upstream_error"
    assert out.attempts.header() == "3/provider-alpha"


def test_all_fail_is_502_naming_the_providers_and_last_error(env: Env) -> None:
    script = Script({
        "provider-alpha": [http(500), http(500), http(500)],
        "provider-beta": [refused()],
        "provider-gamma": [http(503)],
    })
    out = env.run(script)
    assert out.error.status == 502
    assert out.provider is GAMMA
    for name in ("provider-alpha", "provider-beta", "provider-gamma"):
        assert name in out.error.message
    assert "503" in out.error.message and "upstream said 503" in out.error.message
    assert out.attempts.header() == "3/provider-alpha, 1/provider-beta, 1/provider-gamma"


def test_empty_candidate_list_is_all_circuits_open(env: Env) -> None:
    out = env.run(Script({}), candidates=())
    assert out.error.status == 503 and out.error.code == "all_circuits_open"


# --- rows of the failure table ------------------------------------------------------------------


def test_read_timeout_is_never_retried_on_the_same_provider(env: Env) -> None:
    script = Script({"provider-alpha": [read_timeout()], "provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA
    assert env.cancel.waits == []
    assert snap(env, "provider-alpha")["failure_count"] == 1


def test_read_timeout_without_fallback_ends_the_chain(env: Env) -> None:
    script = Script({"provider-alpha": [read_timeout()]})
    out = env.run(script, retry=RetryConfig(max_retries=5, fallback=False))
    assert script.order() == ["provider-alpha"]
    assert out.error.status == 502 and "read timeout" in out.error.message


def test_invalid_body_falls_back_without_retry(env: Env) -> None:
    script = Script({"provider-alpha": [AttemptResult(BAD_BODY, 200, "answer is not a JSON object")],
                     "provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA
    assert snap(env, "provider-alpha")["failure_count"] == 1


@pytest.mark.parametrize("status", [401, 402, 403])
def test_key_and_balance_faults_fall_back_without_retry_and_are_neutral(env: Env, status: int) -> None:
    script = Script({"provider-alpha": [http(status)], "provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA
    assert snap(env, "provider-alpha")["failure_count"] == 0


@pytest.mark.parametrize("status", [401, 403])
def test_a_rejected_key_is_never_used_again(env: Env, status: int) -> None:
    out = env.run(Script({"provider-alpha": [http(status)], "provider-beta": [ok()]}))
    assert out.provider is BETA
    assert snap(env, "provider-alpha")["key_rejected"] == f"HTTP {status} upstream said {status}"
    assert not env.breakers.is_available("provider-alpha") and env.breakers.acquire("provider-alpha") is None
    script = Script({"provider-beta": [ok()]})
    assert env.run(script).provider is BETA and script.order() == ["provider-beta"]


def test_when_every_balance_ran_out_the_error_says_so(env: Env) -> None:
    out = env.run(Script({"provider-alpha": [http(402)], "provider-beta": [http(402)], "provider-gamma": [http(402)]}))
    assert out.error.status == 502 and out.error.code == "insufficient_balance"
    assert "balance ran out" in out.error.message
    for name in ("provider-alpha", "provider-beta", "provider-gamma"):
        assert f"{name}: insufficient_balance HTTP 402" in out.error.message


def test_the_final_error_names_each_providers_complaint(env: Env) -> None:
    out = env.run(Script({"provider-alpha": [http(500), http(500), http(500)], "provider-beta": [http(402)],
                          "provider-gamma": [read_timeout()]}))
    assert out.error.code == "upstream_failed"
    assert out.error.message == ("All providers failed. provider-alpha: server_error HTTP 500 upstream said 500; "
                                 "provider-beta: insufficient_balance HTTP 402 upstream said 402; "
                                 "provider-gamma: read_failed read timeout")


@pytest.mark.parametrize("status", [400, 409, 413, 422])
def test_client_fault_is_returned_without_retry_or_fallback(env: Env, status: int) -> None:
    result = client_fault(status)
    script = Script({"provider-alpha": [result]})
    out = env.run(script)
    assert script.order() == ["provider-alpha"]
    assert out.error is result.payload
    assert out.error.status == status
    assert out.provider is ALPHA
    assert snap(env, "provider-alpha")["failure_count"] == 0
    assert env.cancel.waits == []


def not_found() -> AttemptResult:
    error = ArbstrError(404, "The model `gpt-4o` does not exist", code="model_not_found")
    return AttemptResult(MODEL_NOT_FOUND, 404, error.message, payload=error)


def test_404_falls_back_once_without_blaming_the_provider(env: Env) -> None:
    script = Script({"provider-alpha": [not_found()], "provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA and out.error is None
    assert out.attempts.header() == "1/provider-alpha"
    assert snap(env, "provider-alpha")["failure_count"] == 0


def test_when_every_provider_answers_404_the_last_404_is_returned(env: Env) -> None:
    last = not_found()
    script = Script({"provider-alpha": [not_found()], "provider-beta": [not_found()], "provider-gamma": [last]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-beta", "provider-gamma"]
    assert out.error is last.payload and out.error.status == 404
    assert out.provider is GAMMA


def test_a_404_among_other_failures_is_an_upstream_failure(env: Env) -> None:
    script = Script({"provider-alpha": [not_found()], "provider-beta": [http(500)], "provider-gamma": [refused()]})
    out = env.run(script)
    assert out.error is not None and out.error.status == 502


def test_client_fault_from_a_fallback_candidate(env: Env) -> None:
    result = client_fault(422)
    script = Script({"provider-alpha": [read_timeout()], "provider-beta": [result]})
    out = env.run(script)
    assert out.error is result.payload and out.provider is BETA
    assert script.order() == ["provider-alpha", "provider-beta"]


def test_5xx_and_connect_failures_count_against_the_breaker(env: Env) -> None:
    script = Script({"provider-alpha": [http(500), refused(), http(503)], "provider-beta": [ok()]})
    env.run(script)
    alpha = snap(env, "provider-alpha")
    assert alpha["failure_count"] == 3
    assert alpha["last_error"].startswith("server_error") and "503" in alpha["last_error"]


def test_a_held_success_is_left_for_the_caller_to_record(env: Env) -> None:
    """A stream's success is known only at its end: the chain hands its permit over."""
    script = Script({"provider-alpha": [http(500), ok()]})
    out = env.run(script, hold=True)
    assert snap(env, "provider-alpha")["failure_count"] == 1
    env.breakers.record(out.permit, "success")
    assert snap(env, "provider-alpha")["failure_count"] == 0


def test_without_hold_the_chain_records_the_success_itself(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)
    out = env.run(Script({"provider-alpha": [ok()]}), hold=False)
    assert out.permit is None and out.provider is ALPHA
    assert snap(env, "provider-alpha") | {"last_error": None} == {
        "state": "closed", "failure_count": 0, "opened_at": None, "last_error": None, "key_rejected": None}


# --- Retry-After ----------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [0.0, 3.0, MAX_RETRY_AFTER])
def test_retry_after_within_the_cap_is_honoured_exactly(env: Env, retry_after: float) -> None:
    script = Script({"provider-alpha": [http(429, retry_after), ok()]})
    out = env.run(script, rand=lambda: 0.0)
    assert env.cancel.waits == [retry_after], "Retry-After replaces the jittered backoff"
    assert out.provider is ALPHA
    assert snap(env, "provider-alpha")["failure_count"] == 0, "429 is neutral"


def test_429_without_retry_after_uses_backoff(env: Env) -> None:
    script = Script({"provider-alpha": [http(429), ok()]})
    env.run(script, rand=lambda: 0.5)
    assert env.cancel.waits == pytest.approx([1.0])


def test_retry_after_above_the_cap_is_not_waited_for(env: Env) -> None:
    script = Script({"provider-alpha": [http(429, MAX_RETRY_AFTER + 1)], "provider-beta": [ok()]})
    out = env.run(script)
    assert env.cancel.waits == []
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA


def test_5xx_retry_after_within_the_cap_is_honoured(env: Env) -> None:
    script = Script({"provider-alpha": [http(503, 4.0), ok()]})
    env.run(script)
    assert env.cancel.waits == [4.0]


def test_5xx_retry_after_above_the_cap_falls_back_instead_of_waiting(env: Env) -> None:
    # Without a deadline (streams) a 503 asking for an hour must not hold the request for an hour.
    script = Script({"provider-alpha": [http(503, 3600.0)], "provider-beta": [ok()]})
    out = env.run(script)
    assert env.cancel.waits == []
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA


def test_every_candidate_429_is_429_with_retry_after(env: Env) -> None:
    script = Script({
        "provider-alpha": [http(429, 5.0), http(429, 7.0), http(429, 6.0)],
        "provider-beta": [http(429, 3.4)],
        "provider-gamma": [http(429, 20.0)],
    })
    out = env.run(script)
    assert out.error.status == 429
    assert out.error.type == "rate_limit_error"
    # The shortest wait any candidate asked for, in whole seconds rounded up (never earlier than asked).
    assert out.error.headers["Retry-After"] == str(math.ceil(min(5.0, 7.0, 6.0, 3.4, 20.0))) == "4"
    assert out.attempts.header() == "3/provider-alpha, 1/provider-beta, 1/provider-gamma"


@pytest.mark.parametrize(
    ("retry_afters", "header"),
    [
        ((None, None, None), "1"),
        ((0.0, 0.0, 0.0), "1"),
        ((0.2, 0.5, 0.9), "1"),
        ((2.5, 9.0, 9.0), "3"),
        ((120.0, 300.0, 3600.0), "60"),
        ((59.6, 70.0, 80.0), "60"),
    ],
)
def test_429_retry_after_is_whole_seconds_between_1_and_60(
    env: Env, retry_afters: tuple[float | None, ...], header: str
) -> None:
    script = Script({name: [http(429, ra)] for name, ra in zip(
        ("provider-alpha", "provider-beta", "provider-gamma"), retry_afters, strict=True)})
    out = env.run(script, retry=RetryConfig(max_retries=0))
    assert out.error.status == 429
    assert out.error.headers["Retry-After"] == header


def test_429_mixed_with_other_failures_is_502(env: Env) -> None:
    script = Script({"provider-alpha": [http(429, 1.0), http(429, 1.0), http(429, 1.0)],
                     "provider-beta": [http(500)], "provider-gamma": [http(429, 1.0)]})
    out = env.run(script)
    assert out.error.status == 502


# --- circuits -------------------------------------------------------------------------------------


def open_circuit(env: Env, name: str) -> None:
    for _ in range(100):
        permit = env.breakers.acquire(name)
        assert permit is not None
        env.breakers.record(permit, FAILURE, "boom")
    assert snap(env, name)["state"] == "open"


def test_open_circuits_are_skipped(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    script = Script({"provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-beta"]
    assert out.provider is BETA and out.attempts.header() is None


def test_a_provider_whose_probe_is_taken_is_skipped(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)
    taken = env.breakers.acquire("provider-alpha")
    assert taken is not None and taken.probe
    script = Script({"provider-beta": [ok()]})
    assert env.run(script).provider is BETA


def test_a_half_open_provider_gets_a_probe_permit(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)
    out = env.run(Script({"provider-alpha": [ok()]}))
    assert out.permit == Permit("provider-alpha", probe=True)


def test_all_circuits_open_is_503_with_retry_after(env: Env) -> None:
    for p in CANDIDATES:
        open_circuit(env, p.name)
    script = Script({})
    out = env.run(script)
    assert script.calls == []
    assert out.error.status == 503
    assert out.error.code == "all_circuits_open"
    assert out.error.type == "upstream_error"
    assert 1 <= int(out.error.headers["Retry-After"]) <= 60


def test_circuit_opening_mid_chain_stops_retries_on_that_provider(env: Env) -> None:
    clock = env.clock
    breakers = BreakerRegistry([p.name for p in CANDIDATES], failure_threshold=2, open_secs=30, clock=clock)
    env = Env(clock, env.cancel, breakers)
    script = Script({"provider-alpha": [http(500), http(500)], "provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-alpha", "provider-beta"]
    assert out.attempts.header() == "2/provider-alpha"
    assert breakers.snapshot()["provider-alpha"]["state"] == "open"


def test_a_failed_probe_reopens_and_the_chain_moves_on(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)
    script = Script({"provider-alpha": [http(500)], "provider-beta": [ok()]})
    out = env.run(script)
    assert script.order() == ["provider-alpha", "provider-beta"]
    assert out.provider is BETA
    assert snap(env, "provider-alpha")["state"] == "open"


# --- the deadline -------------------------------------------------------------------------------


def test_attempts_get_the_time_left(env: Env) -> None:
    script = Script({"provider-alpha": [http(500), ok()]}, clock=env.clock, cost_secs=2.0)
    deadline = env.clock.now + 30
    env.run(script, deadline=deadline, rand=lambda: 0.5)
    # First attempt: 30 s left. It takes 2 s, then a 1 s backoff: 27 s left for the second.
    assert [left for _, left in script.calls] == pytest.approx([30.0, 27.0])


def test_deadline_already_passed_is_504(env: Env) -> None:
    script = Script({})
    out = env.run(script, deadline=env.clock.now)
    assert script.calls == []
    assert out.error.status == 504 and out.error.code == "deadline_exceeded"


def test_backoff_is_capped_by_the_deadline_then_504(env: Env) -> None:
    script = Script({"provider-alpha": [http(500)]}, clock=env.clock, cost_secs=0.4)
    deadline = env.clock.now + 1.0
    out = env.run(script, deadline=deadline, rand=lambda: 0.5)
    assert env.cancel.waits == pytest.approx([0.6]), "waits only the time left, not the 1 s backoff"
    assert out.error.status == 504
    assert out.attempts.header() == "1/provider-alpha"
    assert script.order() == ["provider-alpha"]


def test_retry_after_is_capped_by_the_deadline(env: Env) -> None:
    script = Script({"provider-alpha": [http(429, 8.0)]})
    out = env.run(script, deadline=env.clock.now + 5)
    assert env.cancel.waits == pytest.approx([5.0])
    assert out.error.status == 504


def test_deadline_during_fallback_is_504(env: Env) -> None:
    script = Script({"provider-alpha": [read_timeout()], "provider-beta": [ok()]}, clock=env.clock, cost_secs=10)
    out = env.run(script, deadline=env.clock.now + 10)
    assert script.order() == ["provider-alpha"]
    assert out.error.status == 504


# --- cancellation ---------------------------------------------------------------------------------


def test_cancelled_before_the_first_attempt(env: Env) -> None:
    env.cancel.set()
    script = Script({})
    with pytest.raises(Abandoned):
        env.run(script)
    assert script.calls == []


def test_cancelled_during_a_successful_attempt_releases_the_probe_and_closes(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)
    closed: list[bool] = []

    def attempt(p: Provider, left: float | None) -> AttemptResult:
        env.cancel.set()  # the deadline fired while the provider was answering
        return ok(close=lambda: closed.append(True))

    with pytest.raises(Abandoned):
        run_chain(CANDIDATES, attempt, retry=RetryConfig(), breakers=env.breakers, cancel=env.cancel,
                  clock=env.clock)
    assert closed == [True], "the abandoned answer's connection is closed"
    assert snap(env, "provider-alpha")["state"] == "half_open"
    assert env.breakers.acquire("provider-alpha") == Permit("provider-alpha", probe=True), "permit was released"
    assert snap(env, "provider-alpha")["failure_count"] == 100, "no outcome was recorded"


def test_an_attempt_cut_off_by_the_deadline_counts_as_a_failure(env: Env) -> None:
    """SPEC §5.2: a provider that hangs until the deadline must trip its breaker, not stay closed."""
    def attempt(p: Provider, left: float | None) -> AttemptResult:
        env.cancel.set()  # the deadline fired; the cut-off attempt comes back as a read failure
        return read_timeout()

    for n in (1, 2):
        env.cancel.clear()
        with pytest.raises(Abandoned):
            run_chain(CANDIDATES, attempt, retry=RetryConfig(), breakers=env.breakers, cancel=env.cancel,
                      clock=env.clock)
        assert snap(env, "provider-alpha")["failure_count"] == n
        assert snap(env, "provider-beta")["failure_count"] == 0, "never sent, never blamed"


def test_a_probe_cut_off_by_the_deadline_reopens_the_circuit(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)

    def attempt(p: Provider, left: float | None) -> AttemptResult:
        env.cancel.set()
        return read_timeout()

    with pytest.raises(Abandoned):
        run_chain(CANDIDATES, attempt, retry=RetryConfig(), breakers=env.breakers, cancel=env.cancel,
                  clock=env.clock)
    assert snap(env, "provider-alpha")["state"] == "open"
    assert env.breakers.acquire("provider-alpha") is None, "a fresh open timer, no second probe"


def test_cancelled_during_backoff(env: Env) -> None:
    cancel = FakeCancel(env.clock, cancel_on_wait=1)
    env = Env(env.clock, cancel, env.breakers)
    script = Script({"provider-alpha": [http(500), ok()]})
    with pytest.raises(Abandoned):
        env.run(script)
    assert script.order() == ["provider-alpha"]


def test_attempt_exception_releases_the_probe_permit(env: Env) -> None:
    open_circuit(env, "provider-alpha")
    env.clock.advance(30)

    def attempt(p: Provider, left: float | None) -> AttemptResult:
        raise RuntimeError("bug in the attempt function")

    with pytest.raises(RuntimeError):
        run_chain(CANDIDATES, attempt, retry=RetryConfig(), breakers=env.breakers, cancel=env.cancel,
                  clock=env.clock)
    assert env.breakers.acquire("provider-alpha") == Permit("provider-alpha", probe=True)


def test_real_event_cancellation_from_another_thread() -> None:
    """With a real Event and real time: a cancel set during a long backoff ends the chain promptly."""
    breakers = BreakerRegistry(["provider-alpha"], failure_threshold=10, open_secs=30)
    cancel = threading.Event()
    attempted = threading.Event()

    def attempt(p: Provider, left: float | None) -> AttemptResult:
        attempted.set()
        return http(500)

    outcome: list[BaseException] = []

    def chain() -> None:
        try:
            run_chain([ALPHA], attempt, retry=RetryConfig(backoff_base_ms=600_000), breakers=breakers,
                      cancel=cancel)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome.append(e)

    t = threading.Thread(target=chain)
    t.start()
    assert attempted.wait(5)
    cancel.set()
    t.join(5)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Abandoned)


def test_abandon_counts_the_pending_attempt_once(env: Env) -> None:
    attempts = Attempts()
    pending: list[str | None] = []

    def attempt(p: Provider, left: float | None) -> AttemptResult:
        pending.append(attempts.pending)
        if len(pending) == 1:
            return http(503)
        attempts.abandon()  # the request thread, when the deadline passes during this attempt
        env.cancel.set()
        return read_timeout()

    with pytest.raises(Abandoned):
        run_chain(CANDIDATES, attempt, retry=RetryConfig(), breakers=env.breakers, cancel=env.cancel,
                  attempts=attempts, clock=env.clock)
    assert pending == ["provider-alpha", "provider-alpha"]
    assert attempts.header() == "2/provider-alpha"


def test_abandon_after_the_chain_counted_the_failure_adds_nothing_more() -> None:
    attempts = Attempts()
    attempts.start("a")
    attempts.add("a")  # the chain thread recorded the failure first
    attempts.abandon()
    attempts.start("b")
    attempts.add("b")  # ... and anything after the abandon is not counted
    assert attempts.header() == "1/a"


def test_abandon_counts_an_answer_the_client_will_not_get() -> None:
    attempts = Attempts()
    attempts.start("a")  # it succeeded, but the deadline passed before the request thread saw it
    attempts.abandon()
    assert attempts.header() == "1/a"


# --- the x-arbstr-retries string ----------------------------------------------------------------


def test_attempts_header_format() -> None:
    a = Attempts()
    assert a.header() is None
    for name in ("provider-alpha", "provider-alpha", "provider-beta"):
        a.add(name)
    assert a.header() == "2/provider-alpha, 1/provider-beta"


def test_attempts_header_keeps_first_failure_order() -> None:
    a = Attempts()
    for name in ("b", "a", "b", "c", "a", "b"):
        a.add(name)
    assert a.header() == "3/b, 2/a, 1/c"
