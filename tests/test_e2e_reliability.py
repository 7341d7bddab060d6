"""End to end: retry, fallback, deadline, circuit breaker and strategies (SPEC §2.2, §4.2, §4.6, §5).

Real `gunicorn arbstr:app`, fake providers on loopback that fail on script, the openai SDK (no SDK
retries) or `requests` as client. Upstream attempts are counted on the fakes, never inferred.
"""

from __future__ import annotations

import math
import sqlite3
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import openai
import pytest
import requests
from conftest import provider
from fakes import auto, disconnect, error, hang, refused_url, reset, slow_headers, sse, status_then

MSG = [{"role": "user", "content": "hello there"}]
NEVER_OPEN = {"failure_threshold": 1000, "open_secs": 60}  # breaker out of the way of retry tests


@pytest.fixture
def pair(fake_upstream, make_config, gunicorn_server):
    """`primary` then `fallback` (equal rates: config order decides), breaker out of the way."""
    primary, fallback = fake_upstream(2)

    def start(**tables):
        tables.setdefault("circuit_breaker", NEVER_OPEN)
        config = make_config([provider(primary, "primary"), provider(fallback, "fallback")], **tables)
        return gunicorn_server(config)

    return start, primary, fallback


def raw_create(server, **kw):
    kw.setdefault("model", "gpt-4o")
    kw.setdefault("messages", MSG)
    return server.openai_client().chat.completions.with_raw_response.create(**kw)


def stream_text(raw) -> str:
    return "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)


def db_rows(config_db: Path, request_id: str) -> list[tuple]:
    with sqlite3.connect(config_db) as db:
        return db.execute("SELECT request_id, http_status FROM requests WHERE request_id = ?",
                          (request_id,)).fetchall()


# ---------------------------------------------------------------------------------------------------
# Retry and fallback (§5.1, §5.2)


def test_503_twice_then_success_same_idempotency_key(pair) -> None:
    start, primary, fallback = pair
    primary.script(status_then(503, times=2))
    server = start()
    raw = raw_create(server)
    assert primary.name in raw.parse().choices[0].message.content
    assert raw.headers["x-arbstr-provider"] == "primary"
    assert raw.headers["x-arbstr-retries"] == "2/primary"
    attempts = primary.wait_for_requests(3)
    assert len(attempts) == 3 and not fallback.requests
    keys = {a.headers["Idempotency-Key"] for a in attempts}
    assert keys == {raw.headers["x-arbstr-request-id"]}


def test_primary_always_503_falls_back_once(pair) -> None:
    start, primary, fallback = pair
    primary.default = error(503)
    server = start()
    raw = raw_create(server)
    assert fallback.name in raw.parse().choices[0].message.content
    assert raw.headers["x-arbstr-provider"] == "fallback"
    assert raw.headers["x-arbstr-retries"] == "3/primary"
    assert len(primary.requests) == 3 and len(fallback.requests) == 1
    rid = raw.headers["x-arbstr-request-id"]
    assert {r.headers["Idempotency-Key"] for r in primary.requests + fallback.requests} == {rid}


def test_upstream_400_passed_through_without_retry_or_fallback(pair) -> None:
    start, primary, fallback = pair
    primary.script(error(400, "tools[0].function.name is invalid", type="invalid_request_error",
                         code="invalid_tool_name"))
    server = start()
    with pytest.raises(openai.BadRequestError) as e:
        raw_create(server)
    assert e.value.status_code == 400
    assert e.value.code == "invalid_tool_name" and e.value.type == "invalid_request_error"
    assert "tools[0].function.name is invalid" in e.value.message
    assert e.value.response.headers["x-arbstr-provider"] == "primary"
    assert e.value.response.headers["x-should-retry"] == "false"  # a provider was asked: SDKs must not re-send
    assert len(primary.requests) == 1 and not fallback.requests


def test_429_retry_after_is_honoured(pair) -> None:
    start, primary, fallback = pair
    primary.script(status_then(429, times=1, retry_after=1))
    server = start()
    raw = raw_create(server)
    assert raw.headers["x-arbstr-provider"] == "primary"
    assert raw.headers["x-arbstr-retries"] == "1/primary"
    first, second = primary.wait_for_requests(2)
    waited = second.received_at - first.received_at
    print(f"429 Retry-After: 1 -> second attempt {waited:.3f}s after the first")
    assert waited >= 0.95  # arbstr waited the 1 s asked for (not its 10 ms backoff)...
    # ...and not some other pause: the longest it could wrongly wait is max_retry_after_secs (10 s).
    assert waited < 5.0
    assert not fallback.requests


def test_429_retry_after_too_long_falls_back_at_once(pair) -> None:
    start, primary, fallback = pair
    primary.script(error(429, retry_after=30))
    server = start(retry={"max_retry_after_secs": 5})
    raw = raw_create(server)
    assert raw.headers["x-arbstr-provider"] == "fallback"
    assert raw.headers["x-arbstr-retries"] == "1/primary"
    assert len(primary.requests) == 1 and len(fallback.requests) == 1
    # At once: any wait would be at least the 5 s cap (or the 30 s asked); 4 s is margin on a loaded
    # machine. Measured between the two upstream arrivals, so client and startup time do not count.
    assert fallback.requests[0].received_at - primary.requests[0].received_at < 4.0


def test_every_candidate_429_gives_client_429_with_retry_after(pair) -> None:
    start, primary, fallback = pair
    primary.default = error(429, retry_after=30)
    fallback.default = error(429, retry_after=20)
    server = start(retry={"max_retry_after_secs": 5})
    r = server.chat()
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.json()["error"]["code"] == "upstream_rate_limited"
    # The shortest wait any provider asked for (30 s and 20 s): the first moment one will answer again.
    assert r.headers["Retry-After"] == "20"
    assert r.headers["x-arbstr-retries"] == "1/primary, 1/fallback"
    assert len(primary.requests) == 1 and len(fallback.requests) == 1
    # Nothing was waited for: both asked for more than max_retry_after_secs (5 s), so any wait would
    # be at least that long; 4 s is margin on a loaded machine.
    assert fallback.requests[0].received_at - primary.requests[0].received_at < 4.0
    # The SDK sees a RateLimitError (it would honour Retry-After itself; retries are off here).
    with pytest.raises(openai.RateLimitError):
        raw_create(server)


@pytest.mark.parametrize("action", [reset(), disconnect(), hang(0.3, then=disconnect())],
                         ids=["reset", "disconnect", "silence-then-close"])
def test_failure_after_send_is_never_retried_on_that_provider(pair, action) -> None:
    """The money rule: once the request may have reached the provider, only the fallback gets it."""
    start, primary, fallback = pair
    primary.default = action
    server = start()
    raw = raw_create(server)
    assert fallback.name in raw.parse().choices[0].message.content
    assert raw.headers["x-arbstr-retries"] == "1/primary"
    assert len(primary.requests) == 1 and len(fallback.requests) == 1


def test_connection_refused_is_retried_then_falls_back(fake_upstream, make_config, gunicorn_server) -> None:
    fallback = fake_upstream()
    config = make_config([provider(refused_url(), "primary"), provider(fallback, "fallback")],
                         circuit_breaker=NEVER_OPEN)
    server = gunicorn_server(config)
    raw = raw_create(server)
    assert fallback.name in raw.parse().choices[0].message.content
    assert raw.headers["x-arbstr-retries"] == "3/primary"  # nothing was sent: retrying is safe
    assert len(fallback.requests) == 1


# ---------------------------------------------------------------------------------------------------
# The deadline (§5.2)


TRICKLED_BODY = sse([{"n": i} for i in range(300)], interval=0.1)  # 200 at once, then a byte stream for 30 s


@pytest.mark.parametrize("action", [slow_headers(30, trickle=True), TRICKLED_BODY, hang(30)],
                         ids=["trickled-headers", "trickled-body", "hang"])
def test_deadline_gives_504_at_once_and_one_row(fake_upstream, make_config, gunicorn_server, tmp_path,
                                                action) -> None:
    slow, spare = fake_upstream(2)
    slow.default = action
    config = make_config([provider(slow, "slow"), provider(spare, "spare")], server={"request_timeout_secs": 2},
                         circuit_breaker=NEVER_OPEN)
    server = gunicorn_server(config)
    t0 = time.monotonic()
    r = server.chat(timeout=15)
    elapsed = time.monotonic() - t0
    print(f"deadline 2 s -> {r.status_code} after {elapsed:.3f}s")
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert r.headers["x-should-retry"] == "false"
    # Not before the 2 s deadline; and well before the upstream's 30 s (8 s of margin past the
    # deadline, for a loaded 2-core machine).
    assert 1.9 <= elapsed < 10.0
    # One attempt: a hung upstream may have been paid, so it is not asked again; the deadline left no
    # time for the spare.
    assert len(slow.requests) == 1 and not spare.requests
    # The abandoned attempt closes its upstream connection rather than reading on for 30 s (per-read
    # timeouts never fire on a trickle; only a total limit on the attempt does).
    closed_at = slow.connections[0].wait_closed_by_client(timeout=10)
    assert closed_at - t0 < 10.0
    rid = r.headers["x-arbstr-request-id"]
    assert server.stop() == 0
    assert db_rows(tmp_path / "arbstr.db", rid) == [(rid, 504)]


def test_deadline_answer_names_every_attempt(fake_upstream, make_config, gunicorn_server, tmp_path) -> None:
    slow, spare = fake_upstream(2)
    slow.script(error(503), hang(30))
    config = make_config([provider(slow, "slow"), provider(spare, "spare")], server={"request_timeout_secs": 2},
                         circuit_breaker=NEVER_OPEN)
    server = gunicorn_server(config)
    r = server.chat(timeout=15)
    assert r.status_code == 504 and len(slow.requests) == 2 and not spare.requests
    # The 503 and the attempt the deadline abandoned (its request was sent: it may have been paid).
    assert r.headers["x-arbstr-retries"] == "2/slow"
    assert r.headers["x-arbstr-provider"] == "slow"  # the provider that was sent the request and may charge
    assert r.headers["x-should-retry"] == "false"
    rid = r.headers["x-arbstr-request-id"]
    assert server.stop() == 0
    with sqlite3.connect(tmp_path / "arbstr.db") as db:
        assert db.execute("SELECT retries, provider FROM requests WHERE request_id = ?",
                          (rid,)).fetchall() == [("2/slow", "slow")]


# ---------------------------------------------------------------------------------------------------
# Circuit breaker (§5.3, §4.6)


def test_breaker_opens_then_admits_exactly_one_probe(fake_upstream, make_config, gunicorn_server) -> None:
    flaky, steady = fake_upstream(2)
    flaky.default = error(503)
    open_secs = 1.5
    config = make_config([provider(flaky, "flaky"), provider(steady, "steady")], retry={"max_retries": 0},
                         circuit_breaker={"failure_threshold": 3, "open_secs": open_secs})
    server = gunicorn_server(config)
    for n in range(3):
        r = server.chat()
        assert r.status_code == 200 and r.headers["x-arbstr-provider"] == "steady"
        assert r.headers["x-arbstr-retries"] == "1/flaky"
        assert len(flaky.requests) == n + 1
    # Open: the 4th request does not touch flaky at all.
    r = server.chat()
    assert r.status_code == 200 and r.headers["x-arbstr-provider"] == "steady"
    assert "x-arbstr-retries" not in r.headers
    assert len(flaky.requests) == 3
    health = server.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded"
    circuit = body["providers"]["flaky"]
    assert circuit["state"] == "open" and circuit["failure_count"] == 3
    assert circuit["opened_at"].endswith("Z")
    assert "503" in circuit["last_error"] or "server_error" in circuit["last_error"]
    assert body["providers"]["steady"]["state"] == "closed"
    providers = {p["name"]: p for p in server.get("/providers").json()["providers"]}
    assert providers["flaky"]["circuit"] == {"state": "open", "failure_count": 3}

    # After open_secs: half_open (waiting for the timer is the point here).
    deadline = time.monotonic() + open_secs + 5
    while (state := server.get("/health").json()["providers"]["flaky"]["state"]) != "half_open":
        assert state == "open" and time.monotonic() < deadline
        time.sleep(0.1)

    # 20 concurrent requests; the probe is held in flight until the other 19 have been answered.
    probe = hang(30, then=auto())
    flaky.script(probe)
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(server.chat, timeout=20) for _ in range(20)]
        try:
            flaky.wait_for_request(3)
            finished = []
            for future in as_completed(futures, timeout=15):
                finished.append(future)
                if len(finished) == 19:
                    break
            assert len(flaky.requests) == 4  # exactly one probe reached the provider
            done = [f.result() for f in finished]
            assert [r.status_code for r in done] == [200] * 19
            assert {r.headers["x-arbstr-provider"] for r in done} == {"steady"}
            assert server.get("/health").json()["providers"]["flaky"]["state"] == "half_open"
        finally:
            probe.release()
        (last,) = set(futures) - set(finished)
        answered = last.result(timeout=10)
    assert answered.status_code == 200 and answered.headers["x-arbstr-provider"] == "flaky"
    assert len(flaky.requests) == 4 and len(steady.requests) == 4 + 19
    health = server.get("/health").json()
    assert health["status"] == "ok"
    assert health["providers"]["flaky"]["state"] == "closed"
    assert health["providers"]["flaky"]["failure_count"] == 0


def probe_retry_after(opened: tuple[float, float], asked: tuple[float, float], open_secs: float) -> range:
    """The Retry-After values an all-circuits-open 503 can carry, given the test's own timeline.

    The rule (arbstr_core/request/chat.py ``fail``): ``ceil`` of the time until the earliest open circuit
    lets a probe through, at least 1 and at most 60. A circuit opened between ``opened`` = (request
    sent, its answer received) and the 503 was decided between ``asked`` = (sent, received); arbstr's
    breaker and this test read the same clock (CLOCK_MONOTONIC, system-wide), so the true value lies
    between the two extremes. Usually one value; two when the interval straddles a whole second.
    """
    def header(wait: float) -> int:
        return min(max(1, math.ceil(max(wait, 0.0))), 60)

    return range(header(opened[0] + open_secs - asked[1]), header(opened[1] + open_secs - asked[0]) + 1)


def test_all_circuits_open_is_a_fast_503(fake_upstream, make_config, gunicorn_server, tmp_path) -> None:
    alpha, beta = fake_upstream(2)
    alpha.default = beta.default = error(503)
    open_secs = 30
    config = make_config([alpha, beta], circuit_breaker={"failure_threshold": 1, "open_secs": open_secs})
    server = gunicorn_server(config)
    sent = time.monotonic()
    r = server.chat()
    opened = (sent, time.monotonic())  # both circuits opened while this request was being answered
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "upstream_failed"
    assert r.headers["x-arbstr-retries"] == f"1/{alpha.name}, 1/{beta.name}"
    health = server.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert {c["state"] for c in health.json()["providers"].values()} == {"open"}
    assert len(alpha.requests) + len(beta.requests) == 2
    # From now on a provider that was asked would not answer: failing fast can only mean not asking.
    alpha.default = beta.default = hang(60)

    def ask(session: requests.Session) -> tuple[requests.Response, float]:
        t0 = time.monotonic()
        r = session.post(server.url("/v1/chat/completions"), json={"model": "gpt-4o", "messages": MSG}, timeout=10)
        t1 = time.monotonic()
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "all_circuits_open"
        assert r.headers["x-should-retry"] == "false"
        expected = probe_retry_after(opened, (t0, t1), open_secs)
        assert int(r.headers["Retry-After"]) in expected, (r.headers["Retry-After"], expected)
        return r, t1 - t0

    times = []
    with requests.Session() as session:
        session.get(server.url("/health"), timeout=10)  # warm the keep-alive connection
        for _ in range(20):
            times.append(ask(session)[1])
        # 1.5 s after the circuits opened (a known moment on the test's clock), the wait is at least
        # 1.5 s shorter: Retry-After counts down to the probe, it is not simply open_secs.
        time.sleep(max(0.0, opened[1] + 1.5 - time.monotonic()))
        later, _ = ask(session)
        assert int(later.headers["Retry-After"]) <= open_secs - 1
    median_ms, max_ms = statistics.median(times) * 1000, max(times) * 1000
    print(f"all_circuits_open 503: median {median_ms:.1f} ms, max {max_ms:.1f} ms over {len(times)}")
    # Fast: no upstream call (a hanging one would hold the answer until the client gives up at 10 s); the
    # time bound only has to tell "no upstream" from "waited on one", so it is generous.
    assert len(alpha.requests) + len(beta.requests) == 2
    assert max(times) < 5.0
    # x-should-retry: false stops an SDK that would otherwise retry (after waiting out Retry-After):
    # exactly one more 503 reaches arbstr, counted in its request log after a clean stop.
    sdk = server.openai_client(max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(openai.InternalServerError) as e:
        sdk.chat.completions.create(model="gpt-4o", messages=MSG)
    took = time.monotonic() - t0
    # A retrying SDK would first sleep the ~28 s of Retry-After; 10 s is margin on a loaded machine.
    assert took < 10.0, f"{took:.1f} s: the SDK retried, waiting out Retry-After"
    assert e.value.status_code == 503 and e.value.code == "all_circuits_open"
    assert server.stop() == 0
    with sqlite3.connect(tmp_path / "arbstr.db") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM requests WHERE http_status = 503").fetchone()
    assert count == len(times) + 1 + 1  # the loop, the later one, the SDK's single attempt
    assert len(alpha.requests) + len(beta.requests) == 2


# ---------------------------------------------------------------------------------------------------
# Streaming fail-over before the first byte (§5.2)


def test_streaming_fails_over_before_first_byte(pair) -> None:
    start, primary, fallback = pair
    server = start(server={"stream_idle_timeout_secs": 1})

    primary.script(*[error(503)] * 3)
    raw = raw_create(server, stream=True)
    assert raw.headers["x-arbstr-provider"] == "fallback" and raw.headers["x-arbstr-streaming"] == "true"
    assert raw.headers["x-arbstr-retries"] == "3/primary"
    assert stream_text(raw) == f"Hello from {fallback.name}!"
    assert len(primary.requests) == 3 and len(fallback.requests) == 1

    # The first SSE event is an error: not retried on primary, the fallback streams.
    primary.script(sse([{"error": {"message": "model overloaded", "type": "server_error", "code": None}}]))
    raw = raw_create(server, stream=True)
    assert raw.headers["x-arbstr-provider"] == "fallback"
    assert raw.headers["x-arbstr-retries"] == "1/primary"
    assert stream_text(raw) == f"Hello from {fallback.name}!"
    assert len(primary.requests) == 4 and len(fallback.requests) == 2

    # Silence past stream_idle_timeout_secs before the first byte: a read timeout after sending, so
    # no second attempt on primary; the fallback streams.
    primary.script(hang(30))
    t0 = time.monotonic()
    raw = raw_create(server, stream=True)
    # Not before the 1 s idle timeout; well before the 30 s hang ends (generous for a loaded machine).
    assert 0.95 <= time.monotonic() - t0 < 10.0
    assert raw.headers["x-arbstr-provider"] == "fallback"
    assert raw.headers["x-arbstr-retries"] == "1/primary"
    assert stream_text(raw) == f"Hello from {fallback.name}!"
    assert len(primary.requests) == 5 and len(fallback.requests) == 3


# ---------------------------------------------------------------------------------------------------
# Strategies (§2.2)


def test_round_robin_rotates_across_requests(fake_upstream, make_config, gunicorn_server) -> None:
    ups = fake_upstream(3)
    server = gunicorn_server(make_config(ups, policies={"default_strategy": "round_robin"}))
    seen = [server.chat().headers["x-arbstr-provider"] for _ in range(6)]
    names = [u.name for u in ups]
    k = names.index(seen[0])
    assert seen == [names[(k + i) % 3] for i in range(6)]
    assert all(len(u.requests) == 2 for u in ups)


def test_lowest_latency_prefers_the_faster_provider(fake_upstream, make_config, gunicorn_server) -> None:
    slow, fast = fake_upstream(2)
    slow.default = slow_headers(0.3)
    # slow is cheaper, so it leads while nothing is measured; gpt-4o-mini is only served by fast, which
    # is how fast gets latency samples without a failure.
    config = make_config([provider(slow, "slow", output_rate=10, models=["gpt-4o"]),
                          provider(fast, "fast", output_rate=20, models=["gpt-4o", "gpt-4o-mini"])],
                         policies={"default_strategy": "lowest_latency"})
    server = gunicorn_server(config)
    assert [server.chat().headers["x-arbstr-provider"] for _ in range(3)] == ["slow"] * 3
    assert [server.chat(model="gpt-4o-mini").headers["x-arbstr-provider"] for _ in range(3)] == ["fast"] * 3
    assert [server.chat().headers["x-arbstr-provider"] for _ in range(3)] == ["fast"] * 3
    assert len(slow.requests) == 3 and len(fast.requests) == 6
