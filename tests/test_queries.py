"""/v1/stats and /v1/requests against expectations computed here, in Python, from the inserted rows."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask

from arbstr_core.app.logroutes import logapi
from arbstr_core.config import Config, DatabaseConfig, Provider
from arbstr_core.errors import ArbstrError
from arbstr_core.log import db as logdb
from arbstr_core.reads import args as queryargs
from arbstr_core.reads import queries
from arbstr_core.timefmt import format_utc

NOW = datetime(2026, 5, 10, 12, 34, 56, 789000, tzinfo=UTC)
PROVIDERS = (
    Provider("provider-alpha", "http://a.test/v1", ("gpt-4o", "gpt-4o-mini"), 10, 30, 1),
    Provider("provider-beta", "http://b.test/v1", ("gpt-4o",), 5, 15, 0.5),
    Provider("provider-gamma", "http://c.test/v1", ("gpt-4o-mini",), 2, 40, 0),  # dearest only for long answers
)
# No longer configured: its rows keep what they cost and what they saved, measured when they were written.
RETIRED = Provider("provider-retired", "http://r.test/v1", ("unknown-model",), 3, 9, 0.25)


def price(p: Provider, input_tokens: int, output_tokens: int) -> float:
    """What ``p`` charges for one request: its rates are sats per 1000 tokens, plus a fee per request."""
    return (input_tokens * p.input_rate + output_tokens * p.output_rate) / 1000 + p.base_fee


def msat(v: float) -> float:
    """A cost as the API shows it: 3 decimals."""
    return round(v, 3) + 0.0


def make_rows(n: int = 1500, seed: int = 7) -> list[dict[str, Any]]:
    """Rows as the request path writes them: the rates formula for the usage at the serving provider and at
    the dearest one that could have served it; the cost is the provider's report (sometimes above the
    dearest rates, so the row saves nothing) or the rates. Some rows predate version 3 (no rates, no
    source, no dearest cost, no API: chat). Some came through /v1/messages, some of those naming an alias
    (routed_model); their own random stream keeps the other values as they were before rows had an API."""
    rnd = random.Random(seed)
    via = random.Random(seed + 1)
    pace = random.Random(seed + 2)
    rows = []
    for i in range(n):
        ts = NOW - timedelta(seconds=rnd.uniform(-600, 40 * 86400))  # a few in the future, some past 30 days
        served_by = rnd.choice([*PROVIDERS, RETIRED, None])  # None: refused before any provider was tried
        model = rnd.choice(served_by.models) if served_by else rnd.choice(["gpt-4o", "unknown-model", None])
        if model and rnd.random() < 0.25:
            model = model.upper()  # as the client spelled it
        provider = served_by and (served_by.name if rnd.random() < 0.75 else served_by.name.title())
        ok = served_by is not None and rnd.random() < 0.85
        stream = rnd.random() < 0.4
        tin, tout = rnd.randint(1, 5000), rnd.randint(1, 2000)
        known = ok and rnd.random() < 0.9
        source = rnd.choice(["provider", "rates", "rates", None]) if known else None  # None: logged before v3
        rates = price(served_by, tin, tout) if known else None
        dearest = max(price(p, tin, tout) for p in (*PROVIDERS, RETIRED)
                      if model and model.casefold() in p.models) if known else None
        cost = round(rates * rnd.uniform(0.7, 1.6), 3) if source == "provider" else rates
        latency = rnd.randint(20, 9000) if ok or rnd.random() < 0.5 else None
        api = via.choice(["chat", "chat", "messages", None])
        routed = f"{model}-2025" if model and api == "messages" and via.random() < 0.5 else None
        rows.append({
            "request_id": f"req-{i:05d}",
            "timestamp": format_utc(ts),
            "model": model,
            "provider": provider,
            "policy": rnd.choice([None, "code", "chat"]),
            "streaming": stream,
            "status": ("complete" if stream else "ok") if ok else "error",
            "success": ok,
            "http_status": 200 if ok else rnd.choice([400, 502, 504]),
            "input_tokens": tin if known else None,
            "output_tokens": tout if known else None,
            "cost_sats": cost,
            "latency_ms": latency,
            "ttft_ms": rnd.randint(5, 500) if stream and ok else None,
            "stream_duration_ms": latency if stream else None,
            "retries": "1/provider-alpha" if rnd.random() < 0.1 else None,
            "error_type": None if ok else "upstream_error",
            "error_message": None if ok else "upstream said no",
            "client_retry_count": 0,
            "cached_tokens": rnd.choice([None, 0, rnd.randint(0, tin)]) if known and source else None,
            "reasoning_tokens": rnd.choice([None, rnd.randint(0, tout)]) if known and source else None,
            "cost_source": source,
            "rates_cost_sats": rates if source else None,
            "max_cost_sats": dearest if source else None,
            "api": api,
            "routed_model": routed,
            # Some successes know no speed; some failures do (a stream cut short): neither counts.
            "output_tokens_per_sec": round(pace.uniform(0.5, 300), 3) if pace.random() < 0.8 else None,
        })
    # Exact edges: since is inclusive, until exclusive.
    rows[0]["timestamp"] = format_utc(NOW - timedelta(hours=1))
    rows[1]["timestamp"] = format_utc(NOW)
    return rows


def write(path: Path, rows: list[dict[str, Any]], rolled_up: int) -> None:
    """Through the writer's SQL; streams go in as 'streaming' and are updated when they end.

    The first ``rolled_up`` rows are folded into the hourly tables before their streams end (so the
    update triggers move them); the others stay newer than the hourly tables, which readers then add.
    """
    conn = logdb.open_writer(str(path))
    with logdb.transaction(conn):
        for fold, part in ((True, rows[:rolled_up]), (False, rows[rolled_up:])):
            for r in part:
                start = {**r, "status": "streaming", "success": False, "cost_sats": None, "input_tokens": None,
                         "output_tokens": None, "latency_ms": None, "ttft_ms": None, "stream_duration_ms": None,
                         "cached_tokens": None, "reasoning_tokens": None, "cost_source": None,
                         "rates_cost_sats": None, "max_cost_sats": None, "output_tokens_per_sec": None}
                logdb.apply_op(conn, ("insert", start if r["streaming"] else r), "test")
            if fold:
                logdb.roll_up(conn)
            for r in part:
                if r["streaming"]:
                    logdb.apply_op(conn, ("update", r["request_id"], {k: r[k] for k in r if k != "request_id"}), "test")
        assert conn.execute("SELECT upto FROM rollup_state").fetchone()[0] == rolled_up
    conn.close()


@pytest.fixture(scope="module", params=["rolled-up", "half-rolled-up", "not-rolled-up"])
def dataset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict[str, Any]]]:
    path = tmp_path_factory.mktemp("q") / "log.db"
    rows = make_rows()
    write(path, rows, {"rolled-up": len(rows), "half-rolled-up": len(rows) // 2, "not-rolled-up": 0}[request.param])
    return str(path), rows


@pytest.fixture(params=["sorted-in-python", "index-walk"])
def percentile_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "SMALL_SET", 10**9 if request.param == "sorted-in-python" else 0)
    if request.param == "index-walk":
        monkeypatch.setattr(queries, "SORT_SHARE", 10**9)  # whatever the table's size, every set is walked


@pytest.fixture(params=["band-pass-per-name", "one-sorted-band-pass"])
def band_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped by provider, policy or api: the hourly band counts read one name at a time, or all at once."""
    monkeypatch.setattr(queries, "FEW_NAMES", 10**9 if request.param == "band-pass-per-name" else -1)


@pytest.fixture(params=["merged-hours", "sorted-by-sqlite"])
def cost_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "MERGE_SHARE", 10**9 if request.param == "merged-hours" else 0)


# ---- independent expectations --------------------------------------------------------------------


def ts(r: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(r["timestamp"])


def api_of(r: dict[str, Any]) -> str:
    """The API a row came through: one logged before version 3 (none recorded) came through chat."""
    return r.get("api") or "chat"


def select(rows, since, until, model=None, provider=None, policy=None, success=None, streaming=None, api=None):
    def eq(value, wanted):
        return wanted is None or (value or "").casefold() == wanted.casefold()

    return [
        r for r in rows
        if since <= ts(r) < until and eq(r["model"], model) and eq(r["provider"], provider) and eq(r["policy"], policy)
        and (success is None or r["success"] == success) and (streaming is None or r["streaming"] == streaming)
        and (api is None or api_of(r) == api)
    ]


def group_of(r: dict[str, Any], group_by: str) -> str:
    """The group key of a row: a name without case ('' for none), or its API."""
    return api_of(r) if group_by == "api" else (r[group_by] or "").casefold()


def expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(r["latency_ms"] for r in rows if r["success"] and r["latency_ms"] is not None)
    ttft = sorted(r["ttft_ms"] for r in rows if r["success"] and r["ttft_ms"] is not None)
    speed = sorted(r["output_tokens_per_sec"] for r in rows if r["success"] and r["output_tokens_per_sec"] is not None)
    # Savings, row by row (test_savings_by_hand pins the definition with numbers): what the dearest
    # provider would have charged for the row, less what it cost, never below 0; rows that do not know
    # both add nothing.
    savings = sum(max(r["max_cost_sats"] - r["cost_sats"], 0) for r in rows
                  if r["max_cost_sats"] is not None and r["cost_sats"] is not None)

    def total(key: str) -> Any:
        return sum(r[key] or 0 for r in rows)

    cost, out_tokens = total("cost_sats"), total("output_tokens")

    def nearest_rank(p: int, values: list[Any] = lat) -> Any:
        return values[math.ceil(p / 100 * len(values)) - 1] if values else None

    return {
        "counts": {
            "total": len(rows),
            "success": sum(r["success"] for r in rows),
            "error": sum(not r["success"] for r in rows),
            "streaming": sum(r["streaming"] for r in rows),
        },
        "costs": {
            "total_cost_sats": msat(total("cost_sats")),
            "total_input_tokens": total("input_tokens"),
            "total_output_tokens": total("output_tokens"),
            "total_cached_tokens": total("cached_tokens"),
            "total_reasoning_tokens": total("reasoning_tokens"),
            "reported_cost_sats": msat(sum(r["cost_sats"] for r in rows if r["cost_source"] == "provider")),
            "rates_cost_sats": msat(total("rates_cost_sats")),
            "savings_sats": msat(savings),
        },
        "performance": {
            "avg_latency_ms": pytest.approx(sum(lat) / len(lat)) if lat else None,
            "p50_latency_ms": nearest_rank(50),
            "p95_latency_ms": nearest_rank(95),
            "p99_latency_ms": nearest_rank(99),
            "avg_ttft_ms": pytest.approx(sum(ttft) / len(ttft)) if ttft else None,
            "p50_ttft_ms": nearest_rank(50, ttft),
            "p95_ttft_ms": nearest_rank(95, ttft),
            "p50_output_tokens_per_sec": nearest_rank(50, speed),
            "success_rate": round(sum(r["success"] for r in rows) / len(rows), 4) if rows else None,
            "cost_per_1m_output_tokens_sats": pytest.approx(cost / out_tokens * 1e6, abs=0.001) if out_tokens else None,
        },
    }


def core(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("counts", "costs", "performance")}


# ---- stats ---------------------------------------------------------------------------------------


def test_hourly_totals_and_band_counts_kept_by_triggers_equal_a_recount(dataset, tmp_path: Path) -> None:
    """Streams ended after their rows were folded: the update triggers moved them (sums, and the band of
    each figure, as schema.sql spells it) exactly where a fold from scratch (log/db.py) puts them."""
    path, _ = dataset
    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)
    conn = sqlite3.connect(copy, isolation_level=None)
    tables = ["requests_hourly", *(m.table for m in logdb.METRICS)]
    with logdb.transaction(conn):
        logdb.roll_up(conn)  # the rows newer than the fold, as the writer's next batch would
    kept = [sorted(conn.execute(f"SELECT * FROM {t}")) for t in tables]
    logdb.rebuild_rollup(conn)
    assert kept == [sorted(conn.execute(f"SELECT * FROM {t}")) for t in tables]
    assert all(kept)
    conn.close()


@pytest.mark.parametrize("range_", ["last_1h", "last_24h", "last_7d", "last_30d", None])
def test_stats_totals_per_range(dataset, percentile_path, range_) -> None:
    path, rows = dataset
    doc = queries.stats(path, {"range": range_} if range_ else {}, now=NOW)
    since = NOW - queryargs.RANGES[range_ or "last_7d"]
    assert doc["since"] == format_utc(since) and doc["until"] == format_utc(NOW)
    assert core(doc) == expected(select(rows, since, NOW))
    assert "groups" not in doc


@pytest.mark.parametrize("args", [
    {"since": "2026-05-01T00:00:00Z", "until": "2026-05-08T00:00:00Z"},  # whole hours: rollup only
    {"since": "2026-05-09T10:15:00+02:00", "until": "2026-05-09T08:40:00"},  # offset, naive = UTC; one hour
    {"since": "2026-05-02T03:04:05.678 00:00"},  # a '+' that URL decoding turned into a space
    {"until": "2026-05-05T05:05:05Z"},  # since defaults to a 7-day window before until
])
def test_stats_explicit_times(dataset, percentile_path, args) -> None:
    path, rows = dataset
    doc = queries.stats(path, args, now=NOW)
    since, until = datetime.fromisoformat(doc["since"]), datetime.fromisoformat(doc["until"])

    def given(name: str) -> datetime:
        dt = datetime.fromisoformat(args[name].replace(" ", "+"))
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt

    assert since == (given("since") if "since" in args else until - timedelta(days=7))
    assert until == (given("until") if "until" in args else NOW)
    assert core(doc) == expected(select(rows, since, until))


@pytest.mark.parametrize("filters", [{"model": "GPT-4O"}, {"provider": "provider-beta"}, {"policy": "Code"},
                                     {"model": "gpt-4o-mini", "provider": "provider-alpha", "policy": "chat"},
                                     {"api": "messages"}, {"api": "chat"}, {"api": "messages", "model": "gpt-4o"}])
def test_stats_filters_are_exact_and_case_insensitive(dataset, percentile_path, filters) -> None:
    path, rows = dataset
    doc = queries.stats(path, {**filters, "range": "last_30d"}, now=NOW)
    assert core(doc) == expected(select(rows, NOW - timedelta(days=30), NOW, **filters))


@pytest.mark.parametrize("group_by", ["model", "provider", "policy", "api"])
def test_stats_group_by_name(dataset, percentile_path, band_path, group_by) -> None:
    path, rows = dataset
    doc = queries.stats(path, {"group_by": group_by, "range": "last_30d"}, now=NOW)
    chosen = select(rows, NOW - timedelta(days=30), NOW)
    assert core(doc) == expected(chosen)
    keys = {group_of(r, group_by) for r in chosen}
    got = {("" if k == "(none)" else k.casefold()): v for k, v in doc["groups"].items()}
    assert set(got) == keys
    for key in keys:
        assert got[key] == expected([r for r in chosen if group_of(r, group_by) == key]), key
    if group_by == "api":  # NULL (before version 3) is chat, not a group of its own
        assert list(doc["groups"]) == ["chat", "messages"] and any(r["api"] is None for r in chosen)


@pytest.mark.parametrize(("args", "api"), [({"group_by": "model", "range": "last_30d"}, "messages"),
                                           ({"group_by": "hour", "range": "last_24h"}, "chat"),
                                           ({"group_by": "api", "since": "2026-05-09T10:15:00Z"}, "messages")])
def test_stats_api_filter_with_groups(dataset, percentile_path, band_path, args, api) -> None:
    path, rows = dataset
    doc = queries.stats(path, {**args, "api": api}, now=NOW)
    since, until = datetime.fromisoformat(doc["since"]), datetime.fromisoformat(doc["until"])
    chosen = select(rows, since, until, api=api)
    assert core(doc) == expected(chosen)
    if args["group_by"] == "hour":
        for g in doc["groups"]:
            start = datetime.fromisoformat(g["start"])
            assert core(g) == expected(select(chosen, max(start, since), min(start + timedelta(hours=1), until)))
    else:
        keys = {group_of(r, args["group_by"]) for r in chosen}
        assert {("" if k == "(none)" else k.casefold()) for k in doc["groups"]} == keys
        for key, g in doc["groups"].items():
            k = "" if key == "(none)" else key.casefold()
            assert core(g) == expected([r for r in chosen if group_of(r, args["group_by"]) == k]), key


@pytest.mark.parametrize(("group_by", "args"), [("hour", {"range": "last_24h"}), ("day", {"range": "last_30d"}),
                                                ("hour", {"since": "2026-05-10T12:00:00Z"})])
def test_stats_group_by_time(dataset, percentile_path, group_by, args) -> None:
    path, rows = dataset
    doc = queries.stats(path, {**args, "group_by": group_by}, now=NOW)
    since, until = datetime.fromisoformat(doc["since"]), datetime.fromisoformat(doc["until"])
    step = timedelta(hours=1) if group_by == "hour" else timedelta(days=1)
    start = since.replace(minute=0, second=0, microsecond=0)
    if group_by == "day":
        start = start.replace(hour=0)
    starts = []
    while start < until:
        starts.append(start)
        start += step
    assert [datetime.fromisoformat(g["start"]) for g in doc["groups"]] == starts
    for g, s in zip(doc["groups"], starts, strict=True):
        assert core(g) == expected(select(rows, max(s, since), min(s + step, until))), g["start"]


@pytest.mark.parametrize("group_by", [None, "hour", "day", "model", "api"])
def test_percentiles_of_awkward_latencies(tmp_path, percentile_path, group_by) -> None:
    """Ties, zero, fractions, a negative value and band edges: every way to a rank gives the same answer."""
    rnd = random.Random(3)
    latencies = [0, 0, 0.5, -3, 1, 2, 1023, 1024, 1024, 1025, 2**24, 2**24 + 0.25, 10**9] + [
        rnd.choice([7, 64, 65, 3000, 3000, 3001]) for _ in range(300)]
    rows = make_rows(len(latencies), seed=11)
    for r, latency in zip(rows, latencies, strict=True):
        r.update(latency_ms=latency, success=True, status="complete" if r["streaming"] else "ok")
    path = tmp_path / "awkward.db"
    write(path, rows, len(rows) // 3)
    args = {"range": "last_30d", **({"group_by": group_by} if group_by else {})}
    doc = queries.stats(str(path), args, now=NOW)
    chosen = select(rows, NOW - timedelta(days=30), NOW)
    assert core(doc) == expected(chosen)
    if group_by in ("hour", "day"):
        width = 13 if group_by == "hour" else 10
        for g in doc["groups"]:
            assert core(g) == expected([r for r in chosen if r["timestamp"][:width] == g["start"][:width]]), g["start"]
    elif group_by:
        for key, g in doc["groups"].items():
            k = "" if key == "(none)" else key.casefold()
            assert core(g) == expected([r for r in chosen if group_of(r, group_by) == k]), key


def hand_row(rid: str, at: str, model: str | None, provider: str | None, tokens: tuple[int, int] | None,
             cost: float | None, dearest: float | None = None, streaming: bool = False, **extra: Any) -> dict[str, Any]:
    """A row of 2026-05-10 at ``at`` (HH:MM); no tokens means a failed request. The cost is the rates
    formula's unless ``extra`` says otherwise; ``dearest`` is its ``max_cost_sats``."""
    ok = tokens is not None
    return {
        "request_id": rid, "timestamp": f"2026-05-10T{at}:00.000Z", "model": model, "provider": provider,
        "policy": None, "streaming": streaming, "status": ("complete" if streaming else "ok") if ok else "error",
        "success": ok, "http_status": 200 if ok else 502, "input_tokens": tokens and tokens[0],
        "output_tokens": tokens and tokens[1], "cost_sats": cost, "latency_ms": 100, "ttft_ms": None,
        "stream_duration_ms": None, "retries": None, "error_type": None if ok else "upstream_error",
        "error_message": None, "client_retry_count": 0, "cached_tokens": None, "reasoning_tokens": None,
        "cost_source": None if cost is None else "rates", "rates_cost_sats": cost, "max_cost_sats": dearest,
        **extra,
    }


# Each rates cost is what its provider's rates give: sats per 1000 input and output tokens, plus a fee per
# request. provider-alpha 10/30/1 (gpt-4o, gpt-4o-mini), provider-beta 5/15/0.5 (gpt-4o), provider-gamma
# 2/40/0 (gpt-4o-mini); provider-retired is no longer configured. Each row's dearest cost is what the
# provider of its model that charges most for its own tokens would have charged. Asked: 09:30 to 12:30,
# so the hours 09 and 12 are partial (summed from the rows), 10 and 11 whole (from the hourly tables).
HAND_ROWS = [
    hand_row("before", "09:10", "gpt-4o", "provider-beta", (1000, 1000), 5 + 15 + 0.5, 10 + 30 + 1),  # before since
    # A: gpt-4o at beta, 1000 in (600 of them cached), 200 out: 1000*5/1000 + 200*15/1000 + 0.5 = 5 + 3 + 0.5 = 8.5;
    #   at alpha 10 + 6 + 1 = 17, the dearest: saved 17 - 8.5 = 8.5
    hand_row("A", "09:45", "gpt-4o", "provider-beta", (1000, 200), 8.5, 17.0, cached_tokens=600),
    # B: gpt-4o (as the client spelled it) at alpha, 400 in, 100 out: 4 + 3 + 1 = 8, the dearest
    #   (beta 2 + 1.5 + 0.5 = 4): saved 0
    hand_row("B", "10:20", "GPT-4o", "provider-alpha", (400, 100), 8.0, 8.0, streaming=True),
    hand_row("failed", "10:30", "gpt-4o", "provider-beta", None, None),  # no usage, no cost
    # G: logged before schema version 3, 3 sats: no source, no rates, no dearest cost: saves nothing
    hand_row("G", "10:50", "unknown-model", "provider-retired", (2000, 500), 3.0, cost_source=None,
             rates_cost_sats=None),
    # C: gpt-4o-mini at gamma, 1000 in, 100 out (60 reasoning): 1000*2/1000 + 100*40/1000 + 0 = 2 + 4 = 6;
    #   at alpha 10 + 3 + 1 = 14, the dearest: saved 14 - 6 = 8
    hand_row("C", "11:05", "gpt-4o-mini", "provider-gamma", (1000, 100), 6.0, 14.0, reasoning_tokens=60,
             api="messages"),
    # E: gpt-4o at alpha, 1000 in, 1000 out: the rates say 10 + 30 + 1 = 41 (the dearest; beta 20.5), the
    #   provider reported 43.5: it cost 43.5, above the dearest rates, so it saved 0 (not -2.5)
    hand_row("E", "11:40", "gpt-4o", "provider-alpha", (1000, 1000), 43.5, 41.0, cost_source="provider",
             rates_cost_sats=41.0),
    # D: gpt-4o-mini at alpha, 100 in, 1000 out (400 reasoning): 100*10/1000 + 1000*30/1000 + 1 = 32;
    #   at gamma 0.2 + 40 = 40.2, the dearest: saved 40.2 - 32 = 8.2
    hand_row("D", "12:10", "gpt-4o-mini", "provider-alpha", (100, 1000), 32.0, 40.2, streaming=True,
             reasoning_tokens=400, api="messages", routed_model="gpt-4o-mini-2025"),
    hand_row("after", "12:40", "gpt-4o-mini", "provider-gamma", (1000, 1000), 2 + 40, 2 + 40),  # at until and after
]
HAND_RANGE = {"since": "2026-05-10T09:30:00Z", "until": "2026-05-10T12:30:00Z"}


@pytest.mark.parametrize("rolled_up", [len(HAND_ROWS), 4, 0])
def test_savings_by_hand(tmp_path, rolled_up) -> None:
    """Savings: each row's dearest cost less what it cost, never below 0, over the rows that know both;
    a group's savings are its rows'. Worked out here by hand, not by formula."""
    path = tmp_path / "hand.db"
    write(path, HAND_ROWS, rolled_up)
    doc = queries.stats(str(path), HAND_RANGE, now=NOW)
    assert doc["costs"] == {
        "total_cost_sats": 8.5 + 8 + 3 + 6 + 43.5 + 32,  # 101
        "total_input_tokens": 1000 + 400 + 2000 + 1000 + 1000 + 100,
        "total_output_tokens": 200 + 100 + 500 + 100 + 1000 + 1000,
        "total_cached_tokens": 600,
        "total_reasoning_tokens": 60 + 400,
        "reported_cost_sats": 43.5,  # E
        "rates_cost_sats": 8.5 + 8 + 6 + 41 + 32,  # all but G, which predates the column
        "savings_sats": 24.7,  # A 8.5 + B 0 + C 8 + E 0 + D 8.2; 24.700000000000003 before rounding
    }
    assert doc["counts"] == {"total": 7, "success": 6, "error": 1, "streaming": 2}

    def savings(group_by: str) -> dict[str, float]:
        groups = queries.stats(str(path), {**HAND_RANGE, "group_by": group_by}, now=NOW)["groups"]
        if group_by == "hour":
            return {g["start"][11:13]: g["costs"]["savings_sats"] for g in groups}
        return {k.casefold(): g["costs"]["savings_sats"] for k, g in groups.items()}

    assert savings("model") == {"gpt-4o": 8.5, "gpt-4o-mini": 16.2, "unknown-model": 0}  # A+B+E, C+D, G
    assert savings("provider") == {"provider-alpha": 8.2, "provider-beta": 8.5, "provider-gamma": 8,  # B+E+D, A, C
                                   "provider-retired": 0}
    assert savings("hour") == {"09": 8.5, "10": 0, "11": 8, "12": 8.2}  # A, B+G, C+E, D
    assert savings("api") == {"chat": 8.5, "messages": 16.2}  # A+B+G+E (no API given: chat), C+D
    messages = queries.stats(str(path), {**HAND_RANGE, "api": "messages"}, now=NOW)
    assert (messages["counts"]["total"], messages["costs"]["total_cost_sats"]) == (2, 6 + 32)  # C, D


def test_savings_never_negative_when_each_request_went_to_its_dearest(tmp_path) -> None:
    """Two providers of one model, one charging only for input, the other only for output: an input-heavy
    request served by the first and an output-heavy one by the second each paid the most that could have
    been charged, so nothing was saved. (Comparing the two requests' tokens together with either provider
    said -99: the 1,010 input and 1,010 output tokens would have cost 101 at either, against 200 paid.)"""
    inputs = Provider("inputs", "http://i.test/v1", ("m",), 100, 0, 0)
    outputs = Provider("outputs", "http://o.test/v1", ("m",), 0, 100, 0)

    def served(rid: str, at: str, by: Provider, tokens: tuple[int, int]) -> dict[str, Any]:
        # As the request path writes it: the rates formula at the provider, and at the dearest of the two.
        return hand_row(rid, at, "m", by.name, tokens, price(by, *tokens),
                        max(price(p, *tokens) for p in (inputs, outputs)))

    rows = [served("input-heavy", "10:10", inputs, (1000, 10)), served("output-heavy", "10:20", outputs, (10, 1000))]
    assert [(r["cost_sats"], r["max_cost_sats"]) for r in rows] == [(100, 100), (100, 100)]
    path = tmp_path / "two.db"
    write(path, rows, 1)
    args = {"since": "2026-05-10T10:00:00Z", "until": "2026-05-10T11:00:00Z"}
    assert queries.stats(str(path), args, now=NOW)["costs"]["savings_sats"] == 0
    for group_by in ("model", "provider", "hour"):
        groups = queries.stats(str(path), {**args, "group_by": group_by}, now=NOW)["groups"]
        for g in groups.values() if isinstance(groups, dict) else groups:
            assert g["costs"]["savings_sats"] == 0, group_by
    # And in the random rows: some reported costs are above their dearest rates, and their savings clamp.
    assert any(r["cost_sats"] > r["max_cost_sats"] for r in make_rows() if r["max_cost_sats"] is not None)


def test_costs_show_msat_precision(tmp_path) -> None:
    """Every cost in /v1/stats and /v1/requests has at most 3 decimals, as sums of floats do not."""
    rows = [hand_row(f"r{i}", f"10:{10 + i}", "gpt-4o", "provider-beta", (1, 1), cost, cost + 0.1234567,
                     rates_cost_sats=cost + 0.0004)
            for i, cost in enumerate((0.1, 0.2, 0.268))]
    assert 0.1 + 0.2 + 0.268 == 0.5680000000000001
    path = tmp_path / "round.db"
    write(path, rows, 1)
    args = {"since": "2026-05-10T10:00:00Z", "until": "2026-05-10T11:00:00Z"}
    costs = queries.stats(str(path), args, now=NOW)["costs"]
    assert (costs["total_cost_sats"], costs["rates_cost_sats"], costs["savings_sats"]) == (0.568, 0.569, 0.37)
    listed = queries.list_requests(str(path), {**args, "sort": "cost_sats", "order": "asc"}, now=NOW)["data"]
    assert [(r["cost_sats"], r["rates_cost_sats"], r["max_cost_sats"]) for r in listed] == [
        (0.1, 0.1, 0.223), (0.2, 0.2, 0.323), (0.268, 0.268, 0.391)]
    for doc in (queries.stats(str(path), {**args, "group_by": "hour"}, now=NOW), listed):
        for number in re.findall(r"\d+\.\d+", json.dumps(doc)):
            assert len(number.partition(".")[2]) <= 3, number


def test_stats_of_nothing(dataset, tmp_path) -> None:
    path, _ = dataset
    empty = expected([])
    doc = queries.stats(path, {"since": "2001-01-01T00:00:00Z", "until": "2001-01-02T00:00:00Z"})
    assert core(doc) == empty and doc["performance"]["p50_latency_ms"] is None
    missing = tmp_path / "none" / "arbstr.db"
    assert core(queries.stats(str(missing), {"group_by": "model"})) == empty
    assert queries.stats(str(missing), {"group_by": "model"})["groups"] == {}
    assert not missing.exists() and not missing.parent.exists()  # reading never creates the log
    blank = tmp_path / "blank.db"
    sqlite3.connect(blank).close()  # exists, but the writer has not applied the schema yet
    assert core(queries.stats(str(blank), {})) == empty
    assert queries.list_requests(str(blank), {})["total"] == 0
    assert queries.get_request(str(blank), "x") is None


@pytest.mark.parametrize(("args", "param", "accepted"), [
    ({"range": "last_2d"}, "range", tuple(queryargs.RANGES)),
    ({"since": "yesterday"}, "since", ("ISO 8601",)),
    ({"until": "2026-13-01"}, "until", ("ISO 8601",)),
    ({"range": "last_1h", "since": "2026-05-01T00:00:00Z"}, "range", ()),
    ({"since": "2026-05-02T00:00:00Z", "until": "2026-05-01T00:00:00Z"}, "since", ()),
    ({"group_by": "week"}, "group_by", queryargs.GROUP_BY),
    ({"api": "anthropic"}, "api", ("chat", "messages")),
    ({"api": "Messages", "group_by": "api"}, "api", ("chat", "messages")),
    ({"group_by": "hour", "since": "1900-01-01T00:00:00Z"}, "group_by", ()),
])
def test_stats_rejects_bad_parameters(dataset, args, param, accepted) -> None:
    with pytest.raises(ArbstrError) as err:
        queries.stats(dataset[0], args, now=NOW)
    assert (err.value.status, err.value.param, err.value.code) == (400, param, "invalid_parameter")
    assert param in err.value.message
    assert all(a in err.value.message for a in accepted)


# ---- listing -------------------------------------------------------------------------------------


def order_key(sort: str, order: str):
    desc = order == "desc"

    def key(item):
        i, r = item
        value = r[sort] if sort != "timestamp" else None
        missing = value is None and sort != "timestamp"
        v = value if value is not None else 0
        sign = -1 if desc else 1
        return (missing, sign * v, sign * ts(r).timestamp(), sign * i)

    return key


@pytest.mark.parametrize(("sort", "order"), [("timestamp", "desc"), ("timestamp", "asc"), ("cost_sats", "asc"),
                                             ("cost_sats", "desc"), ("latency_ms", "desc"), ("latency_ms", "asc")])
@pytest.mark.parametrize("page", [1, 3])
def test_list_sorts_and_pages(dataset, cost_path, sort, order, page) -> None:
    path, rows = dataset
    args = {"range": "last_30d", "sort": sort, "order": order, "page": str(page), "per_page": "25"}
    doc = queries.list_requests(path, args, now=NOW)
    chosen = [(i, r) for i, r in enumerate(rows) if NOW - timedelta(days=30) <= ts(r) < NOW]
    want = [r["request_id"] for _, r in sorted(chosen, key=order_key(sort, order))][(page - 1) * 25: page * 25]
    assert [r["request_id"] for r in doc["data"]] == want
    assert (doc["page"], doc["per_page"], doc["total"]) == (page, 25, len(chosen))
    assert doc["total_pages"] == math.ceil(len(chosen) / 25)


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("filters", [{}, {"success": "true"}, {"model": "gpt-4o", "streaming": "false"},
                                     {"api": "messages"}, {"api": "chat", "success": "true"}])
def test_list_by_cost_pages_into_unknown_costs(dataset, cost_path, order, filters) -> None:
    """Pages around the last known cost, where the merged hours give way to rows of unknown cost."""
    path, rows = dataset
    flags = {k: filters[k] == "true" for k in ("success", "streaming") if k in filters}
    keep = {r["request_id"] for r in select(rows, NOW - timedelta(days=30), NOW, model=filters.get("model"),
                                            api=filters.get("api"), **flags)}
    chosen = [(i, r) for i, r in enumerate(rows) if r["request_id"] in keep]
    want = [r["request_id"] for _, r in sorted(chosen, key=order_key("cost_sats", order))]
    known = sum(r["cost_sats"] is not None for _, r in chosen)
    assert 0 < known < len(chosen)
    per_page = 7
    for page in range(known // per_page, known // per_page + 3):
        args = {**filters, "range": "last_30d", "sort": "cost_sats", "order": order, "page": str(page + 1),
                "per_page": str(per_page)}
        doc = queries.list_requests(path, args, now=NOW)
        assert [r["request_id"] for r in doc["data"]] == want[page * per_page: (page + 1) * per_page], page


@pytest.mark.parametrize("filters", [{"success": "false"}, {"streaming": "true"}, {"success": "true", "streaming": "false"},
                                     {"model": "gpt-4O", "success": "TRUE"}, {"provider": "provider-beta", "policy": "chat"},
                                     {"api": "messages"}, {"api": "chat", "success": "true", "streaming": "false"}])
def test_list_filters(dataset, filters) -> None:
    path, rows = dataset
    doc = queries.list_requests(path, {**filters, "range": "last_7d", "per_page": "100"}, now=NOW)
    flags = {k: filters[k].lower() == "true" for k in ("success", "streaming") if k in filters}
    names = {k: v for k, v in filters.items() if k in ("model", "provider", "policy", "api")}
    chosen = select(rows, NOW - timedelta(days=7), NOW, **names, **flags)
    assert doc["total"] == len(chosen)
    newest = sorted(chosen, key=lambda r: (r["timestamp"], r["request_id"]), reverse=True)[:100]
    assert [r["request_id"] for r in doc["data"]] == [r["request_id"] for r in newest]


def test_list_past_the_end_and_row_shape(dataset) -> None:
    path, rows = dataset
    doc = queries.list_requests(path, {"page": "999"}, now=NOW)
    assert doc["data"] == [] and doc["page"] == 999 and doc["total"] > 0
    err_row = next(r for r in rows if not r["success"] and r["latency_ms"] is not None and ts(r) < NOW)
    got = queries.get_request(path, err_row["request_id"])
    assert got == {
        "request_id": err_row["request_id"], "timestamp": err_row["timestamp"], "api": api_of(err_row),
        "model": err_row["model"], "routed_model": err_row["routed_model"] or err_row["model"],
        "provider": err_row["provider"], "policy": err_row["policy"], "streaming": err_row["streaming"],
        "status": "error", "success": False, "http_status": err_row["http_status"],
        "tokens": {"input": None, "output": None, "cached": None, "reasoning": None}, "cost_sats": None,
        "cost_source": None, "rates_cost_sats": None, "max_cost_sats": None,
        "timing": {"latency_ms": err_row["latency_ms"], "ttft_ms": None,
                   "stream_duration_ms": err_row["stream_duration_ms"],
                   "output_tokens_per_sec": err_row["output_tokens_per_sec"]},
        "retries": err_row["retries"], "error": {"type": "upstream_error", "message": "upstream said no"},
    }
    ok_row = next(r for r in rows if r["streaming"] and r["success"] and r["cost_source"] == "provider"
                  and r["cached_tokens"] and r["reasoning_tokens"])
    got = queries.get_request(path, ok_row["request_id"])
    assert got["error"] is None and got["streaming"] is True and got["status"] == "complete"
    assert got["tokens"] == {"input": ok_row["input_tokens"], "output": ok_row["output_tokens"],
                             "cached": ok_row["cached_tokens"], "reasoning": ok_row["reasoning_tokens"]}
    assert got["timing"]["ttft_ms"] == ok_row["ttft_ms"]
    assert (got["cost_sats"], got["cost_source"], got["rates_cost_sats"], got["max_cost_sats"]) == (
        msat(ok_row["cost_sats"]), "provider", msat(ok_row["rates_cost_sats"]), msat(ok_row["max_cost_sats"]))
    assert queries.get_request(path, "no-such-id") is None
    # The API as recorded, NULL (before version 3) as chat; the model sent to providers, the model itself
    # when no alias applied.
    for want_api, stored in (("messages", "messages"), ("chat", "chat"), ("chat", None)):
        for aliased in (True, False) if want_api == "messages" else (False,):
            r = next(r for r in rows if r["api"] == stored and r["model"] and bool(r["routed_model"]) == aliased)
            got = queries.get_request(path, r["request_id"])
            assert (got["api"], got["model"], got["routed_model"]) == (
                want_api, r["model"], f"{r['model']}-2025" if aliased else r["model"])


@pytest.mark.parametrize(("args", "param"), [
    ({"success": "maybe"}, "success"), ({"streaming": "yes"}, "streaming"), ({"page": "0"}, "page"),
    ({"page": "two"}, "page"), ({"per_page": "101"}, "per_page"), ({"per_page": "0"}, "per_page"),
    ({"sort": "model"}, "sort"), ({"order": "up"}, "order"), ({"range": "today"}, "range"),
    ({"api": "completions"}, "api"), ({"sort": "api"}, "sort"),
])
def test_list_rejects_bad_parameters(dataset, args, param) -> None:
    with pytest.raises(ArbstrError) as err:
        queries.list_requests(dataset[0], args, now=NOW)
    assert (err.value.status, err.value.param) == (400, param)
    assert param in err.value.message


# ---- HTTP blueprint ------------------------------------------------------------------------------


@pytest.fixture
def client(dataset):
    app = Flask(__name__)
    cfg = Config(providers=PROVIDERS, database=DatabaseConfig(path=dataset[0]))
    app.extensions["arbstr"] = SimpleNamespace(config=cfg, logstore=None)
    app.register_blueprint(logapi)

    @app.errorhandler(ArbstrError)  # web.py renders errors app-wide; this stands in for it
    def render(e: ArbstrError):
        return e.body(), e.status

    return app.test_client()


def test_http_routes(client) -> None:
    stats = client.get("/v1/stats?range=last_30d&group_by=model")
    assert stats.status_code == 200 and set(stats.json) == {"since", "until", "counts", "costs", "performance", "groups"}
    listing = client.get("/v1/requests?per_page=5&sort=cost_sats&since=2026-01-01T00:00:00Z")
    assert listing.status_code == 200 and len(listing.json["data"]) == 5
    one = client.get(f"/v1/requests/{listing.json['data'][0]['request_id']}")
    assert one.status_code == 200 and one.json == listing.json["data"][0]
    missing = client.get("/v1/requests/nope")
    assert missing.status_code == 404 and missing.json["error"]["code"] == "request_not_found"
    bad = client.get("/v1/requests?per_page=500")
    assert bad.status_code == 400 and bad.json["error"]["param"] == "per_page"
    span = "since=2026-01-01T00:00:00Z&until=2026-06-01T00:00:00Z"
    by_api = client.get(f"/v1/stats?{span}&group_by=api&api=messages")
    assert by_api.status_code == 200 and list(by_api.json["groups"]) == ["messages"]
    assert by_api.json["counts"] == by_api.json["groups"]["messages"]["counts"]
    messages = client.get(f"/v1/requests?{span}&api=messages&per_page=100").json
    assert messages["total"] == by_api.json["counts"]["total"] and {r["api"] for r in messages["data"]} == {"messages"}
    for route in ("/v1/stats", "/v1/requests"):
        bad = client.get(f"{route}?api=openai")
        assert bad.status_code == 400 and bad.json["error"]["param"] == "api", route
        assert "chat, messages" in bad.json["error"]["message"]
    assert client.get("/v1/stats/").status_code == 404  # no trailing-slash redirect
