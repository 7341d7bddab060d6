"""The request log end to end: real gunicorn, concurrent clients, SIGTERM, and a broken database."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import provider

MSG = [{"role": "user", "content": "count me"}]
RATES = {"input_rate": 3, "output_rate": 7, "base_fee": 0.25}


def rows(db: Path) -> dict[str, sqlite3.Row]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: r for r in con.execute("SELECT * FROM requests")}
    finally:
        con.close()


def test_concurrent_requests_each_get_exactly_one_correct_row(fake_upstream, make_config, gunicorn_server,
                                                              tmp_path: Path) -> None:
    up = fake_upstream()
    server = gunicorn_server(make_config([provider(up, "p", **RATES)]))
    n = 48

    def one(i: int) -> tuple[str, float, bool]:
        stream = i % 3 == 0
        t0 = time.perf_counter()
        body = {"model": "gpt-4o", "messages": MSG, "stream": stream}
        r = requests.post(server.url("/v1/chat/completions"), json=body, timeout=30,
                          headers={"x-stainless-retry-count": str(i % 2)})
        r.raise_for_status()
        r.content  # noqa: B018 - read the whole stream
        return r.headers["x-arbstr-request-id"], (time.perf_counter() - t0) * 1000, stream

    with ThreadPoolExecutor(16) as pool:
        answered = list(pool.map(one, range(n)))
    assert server.stop() == 0
    logged = rows(tmp_path / "arbstr.db")
    assert len(logged) == n
    sent = {r.json["messages"][0]["content"] for r in up.requests}
    assert sent == {"count me"} and len(up.requests) == n
    for i, (rid, wall_ms, stream) in enumerate(answered):
        row = logged[rid]
        # The fake's usage is 10 prompt / 20 completion tokens (fakes.DEFAULT_USAGE).
        assert (row["input_tokens"], row["output_tokens"]) == (10, 20)
        assert row["cost_sats"] == (10 * 3 + 20 * 7) / 1000 + 0.25
        assert row["provider"] == "p" and row["model"] == "gpt-4o" and row["success"] == 1
        assert row["streaming"] == int(stream)
        assert row["status"] == ("complete" if stream else "ok")
        assert row["client_retry_count"] == i % 2
        assert 0 <= row["latency_ms"] <= wall_ms + 1
        if stream:
            assert row["stream_duration_ms"] == row["latency_ms"]
            assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["stream_duration_ms"]


def test_sigterm_right_after_a_burst_loses_no_row(fake_upstream, make_config, gunicorn_server,
                                                  tmp_path: Path) -> None:
    up = fake_upstream()
    server = gunicorn_server(make_config([up]))
    answered: list[str] = []
    lock = threading.Lock()
    go = threading.Event()

    def hammer() -> None:
        with requests.Session() as s:
            go.wait()
            for _ in range(40):
                try:
                    r = s.post(server.url("/v1/chat/completions"), json={"model": "gpt-4o", "messages": MSG},
                               timeout=30)
                except requests.ConnectionError:
                    return  # the server is going away
                if r.status_code == 200:
                    with lock:
                        answered.append(r.headers["x-arbstr-request-id"])

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    go.set()
    up.wait_for_requests(60)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert server.proc.wait(60) == 0
    logged = rows(tmp_path / "arbstr.db")
    assert len(answered) >= 60
    missing = [rid for rid in answered if rid not in logged]
    assert missing == []


def test_unwritable_database_keeps_serving_and_reports_degraded(fake_upstream, make_config, gunicorn_server,
                                                               tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the database directory should be")
    up = fake_upstream()
    server = gunicorn_server(make_config([up], database={"path": str(blocker / "arbstr.db")}))
    for _ in range(3):
        r = server.chat()
        assert r.status_code == 200
    deadline = time.monotonic() + 10
    while True:  # the writer reports the failure from its own thread; poll /health briefly
        health = server.get("/health")
        if health.json()["log"]["db_ok"] is False or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["log"]["db_ok"] is False
    assert server.chat(stream=True).status_code == 200
    # The rows can never be written here, so a graceful stop would wait out the writer's 10 s drain
    # (test_storage_faults covers rows written once a fault clears).
    server.kill()


def test_stats_and_requests_api_reflect_traffic(fake_upstream, make_config, gunicorn_server, tmp_path: Path) -> None:
    cheap, dear = fake_upstream(2)
    server = gunicorn_server(make_config([provider(cheap, "cheap", **RATES),
                                          provider(dear, "dear", input_rate=10, output_rate=50, base_fee=1)]))
    ids = [server.chat().headers["x-arbstr-request-id"] for _ in range(3)]
    bad = server.chat(model="no-such-model")
    assert bad.status_code == 404
    deadline = time.monotonic() + 10
    while server.get("/health").json()["log"]["written"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # rows are written by the background thread; wait for it to catch up
    stats = server.get("/v1/stats", params={"range": "last_1h"}).json()
    assert stats["counts"] == {"total": 4, "success": 3, "error": 1, "streaming": 0}
    cost = (10 * 3 + 20 * 7) / 1000 + 0.25
    dear_cost = (10 * 10 + 20 * 50) / 1000 + 1
    costs = stats["costs"]
    assert costs["total_cost_sats"] == round(3 * cost, 3)
    assert costs["total_input_tokens"] == 30 and costs["total_output_tokens"] == 60
    # Savings are each row's max_cost_sats (the dearest provider's rates for its usage, written by the
    # request path) less its cost. Rows written without max_cost_sats (before the request path records
    # it) save nothing they can show.
    logged = rows(tmp_path / "arbstr.db")
    known = [r for r in logged.values() if r["max_cost_sats"] is not None]
    assert all(r["max_cost_sats"] == pytest.approx(dear_cost) for r in known)
    assert costs["savings_sats"] == round(len(known) * (dear_cost - cost), 3)
    assert costs["rates_cost_sats"] == round(sum(r["rates_cost_sats"] or 0 for r in logged.values()), 3)
    assert costs["reported_cost_sats"] == 0  # the fake providers report no cost
    listing = server.get("/v1/requests", params={"success": "true", "per_page": 2}).json()
    assert listing["total"] == 3 and listing["total_pages"] == 2 and len(listing["data"]) == 2
    one = server.get(f"/v1/requests/{ids[0]}").json()
    assert one["request_id"] == ids[0] and one["provider"] == "cheap"
    # Through /v1/chat/completions, with no alias: the model sent is the one asked for.
    assert (one["api"], one["model"], one["routed_model"]) == ("chat", "gpt-4o", "gpt-4o")
    assert logged[ids[0]]["api"] in (None, "chat") and logged[ids[0]]["routed_model"] is None
    by_api = server.get("/v1/stats", params={"range": "last_1h", "group_by": "api"}).json()
    assert {k: g["counts"] for k, g in by_api["groups"].items()} == {"chat": stats["counts"]}
    messages = server.get("/v1/requests", params={"range": "last_1h", "api": "messages"}).json()
    assert (messages["total"], messages["data"]) == (0, [])
    r = server.get("/v1/stats", params={"api": "anthropic"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "api"
    assert one["tokens"] == {"input": 10, "output": 20, "cached": logged[ids[0]]["cached_tokens"],
                             "reasoning": logged[ids[0]]["reasoning_tokens"]}
    assert one["cost_sats"] == round(cost, 3) and one["cost_source"] in (None, "rates")
    for key in ("rates_cost_sats", "max_cost_sats"):
        stored = logged[ids[0]][key]
        assert one[key] == (None if stored is None else round(stored, 3)), key
    assert server.get("/v1/requests/does-not-exist").status_code == 404
    r = server.get("/v1/stats", params={"range": "last_year"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "range"
