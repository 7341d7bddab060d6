"""End to end: routing by measured speed (``fastest_first_token``) under real gunicorn, through the
openai SDK, against fake providers on loopback.

A stream's measurement is recorded when it ends, which may be just after the client read ``[DONE]``;
each request waits for its stream's end line in arbstr's log before the next is sent, so the order
under test never depends on a race.
"""

from __future__ import annotations

import sqlite3

from conftest import provider
from fakes import error, sse

from arbstr_core.config import load

SLOW_FIRST_TOKEN = 1.0  # seconds the slow provider waits before its first event
MSG = [{"role": "user", "content": "hello there"}]


def test_fastest_first_token_streams_go_to_the_faster_provider(fake_upstream, make_config, gunicorn_server) -> None:
    slow, fast = fake_upstream(2)
    slow.default = sse(first_delay=SLOW_FIRST_TOKEN)
    # slow is cheaper, so cold start tries it first; explore_share 0 keeps the order deterministic.
    config = make_config([provider(slow, "slow", output_rate=10), provider(fast, "fast", output_rate=20)],
                         policies={"default_strategy": "fastest_first_token", "explore_share": 0})
    # Exploration off, or 5 % of requests would try slow on purpose (which, at random, is not testable here).
    assert load(str(config)).policies.explore_share == 0
    server = gunicorn_server(config)
    client = server.openai_client()

    def stream() -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        provider_name, request_id = raw.headers["x-arbstr-provider"], raw.headers["x-arbstr-request-id"]
        assert text == f"Hello from {slow.name if provider_name == 'slow' else fast.name}!"
        log = server.wait_for_log(f"request_id={request_id} ")  # the stream's end line: measured by then
        assert "stream=complete" in next(line for line in log.splitlines() if f"request_id={request_id} " in line)
        return provider_name, request_id

    # Cold start: each unmeasured provider is tried once, cheapest first; then the faster first token wins.
    served = [stream() for _ in range(6)]
    assert [name for name, _ in served] == ["slow", "fast", "fast", "fast", "fast", "fast"]
    assert len(slow.requests) == 1 and len(fast.requests) == 5

    # The log rows say why: slow's first token took the fake's delay, fast's far less.
    server.stop()  # drains the log queue
    with sqlite3.connect(config.parent / "arbstr.db") as db:
        rows = dict(db.execute("SELECT request_id, ttft_ms FROM requests WHERE provider = 'slow'").fetchall())
        fast_ttfts = [t for (t,) in db.execute("SELECT ttft_ms FROM requests WHERE provider = 'fast'")]
    assert list(rows) == [served[0][1]] and rows[served[0][1]] >= SLOW_FIRST_TOKEN * 1000
    assert len(fast_ttfts) == 5 and max(fast_ttfts) < rows[served[0][1]]


def test_a_provider_answering_after_a_retry_is_measured_from_its_own_attempt(
        fake_upstream, make_config, gunicorn_server) -> None:
    """The row times the request from its receipt (SPEC §6.2), backoff included; the measurement routing
    uses (shown in /providers ``recent``) starts at the attempt that answered, so a retry or a failover
    elsewhere does not make the answering provider look slow."""
    up = fake_upstream()
    up.script(error(503))  # the first attempt fails; the retry, about a second later, streams at once
    up.default = sse()
    config = make_config([provider(up, "p")], retry={"backoff_base_ms": 1000, "max_retries": 1},
                         policies={"default_strategy": "fastest_first_token", "explore_share": 0})
    server = gunicorn_server(config)
    assert server.get("/providers").json()["providers"][0]["recent"] is None  # nothing measured yet
    raw = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG,
                                                                          stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-arbstr-retries"] == "1/p" and len(up.requests) == 2
    row = server.settled_row(raw.headers["x-arbstr-request-id"])
    assert row["timing"]["ttft_ms"] >= 700  # the backoff: 1 s ± 25 %
    recent = server.get("/providers").json()["providers"][0]["recent"]
    assert recent["samples"] == 1
    assert recent["ttft_ms"] < row["timing"]["ttft_ms"] - 500
    assert recent["latency_ms"] < row["timing"]["latency_ms"] - 500
