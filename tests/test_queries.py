"""/v1/stats and /v1/requests against expectations computed here, in Python, from the inserted rows."""

from __future__ import annotations

import math
import random
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
# No longer configured: its rows keep what it charged, and its model, which no configured provider
# serves, counts toward no savings.
RETIRED = Provider("provider-retired", "http://r.test/v1", ("unknown-model",), 3, 9, 0.25)


def price(p: Provider, input_tokens: int, output_tokens: int) -> float:
    """What ``p`` charges for one request: its rates are sats per 1000 tokens, plus a fee per request."""
    return (input_tokens * p.input_rate + output_tokens * p.output_rate) / 1000 + p.base_fee


def make_rows(n: int = 1500, seed: int = 7) -> list[dict[str, Any]]:
    """Rows as the request path writes them: a known cost is what the serving provider's rates give."""
    rnd = random.Random(seed)
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
        latency = rnd.randint(20, 9000) if ok or rnd.random() < 0.5 else None
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
            "cost_sats": price(served_by, tin, tout) if known else None,
            "latency_ms": latency,
            "ttft_ms": rnd.randint(5, 500) if stream and ok else None,
            "stream_duration_ms": latency if stream else None,
            "retries": "1/provider-alpha" if rnd.random() < 0.1 else None,
            "error_type": None if ok else "upstream_error",
            "error_message": None if ok else "upstream said no",
            "client_retry_count": 0,
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
                         "output_tokens": None, "latency_ms": None, "ttft_ms": None, "stream_duration_ms": None}
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


@pytest.fixture(params=["merged-hours", "sorted-by-sqlite"])
def cost_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queries, "MERGE_SHARE", 10**9 if request.param == "merged-hours" else 0)


# ---- independent expectations --------------------------------------------------------------------


def ts(r: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(r["timestamp"])


def select(rows, since, until, model=None, provider=None, policy=None, success=None, streaming=None):
    def eq(value, wanted):
        return wanted is None or (value or "").casefold() == wanted.casefold()

    return [
        r for r in rows
        if since <= ts(r) < until and eq(r["model"], model) and eq(r["provider"], provider) and eq(r["policy"], policy)
        and (success is None or r["success"] == success) and (streaming is None or r["streaming"] == streaming)
    ]


def expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = sorted(r["latency_ms"] for r in rows if r["success"] and r["latency_ms"] is not None)
    ttft = [r["ttft_ms"] for r in rows if r["success"] and r["ttft_ms"] is not None]
    # Savings, row by row (test_savings_by_hand pins the definition with numbers): per model, what the
    # configured provider that would have charged most for its priced requests would have charged, less
    # what they cost.
    savings = 0.0
    for model in {(r["model"] or "").casefold() for r in rows}:
        costed = [r for r in rows if (r["model"] or "").casefold() == model and r["cost_sats"] is not None]
        charged = [sum(price(p, r["input_tokens"], r["output_tokens"]) for r in costed)
                   for p in PROVIDERS if model in p.models]
        if costed and charged:
            savings += max(charged) - sum(r["cost_sats"] for r in costed)

    def nearest_rank(p: int) -> Any:
        return lat[math.ceil(p / 100 * len(lat)) - 1] if lat else None

    return {
        "counts": {
            "total": len(rows),
            "success": sum(r["success"] for r in rows),
            "error": sum(not r["success"] for r in rows),
            "streaming": sum(r["streaming"] for r in rows),
        },
        "costs": {
            "total_cost_sats": pytest.approx(sum(r["cost_sats"] or 0 for r in rows), rel=1e-9, abs=1e-9),
            "total_input_tokens": sum(r["input_tokens"] or 0 for r in rows),
            "total_output_tokens": sum(r["output_tokens"] or 0 for r in rows),
            "savings_sats": pytest.approx(savings, rel=1e-9, abs=1e-9),
        },
        "performance": {
            "avg_latency_ms": pytest.approx(sum(lat) / len(lat)) if lat else None,
            "p50_latency_ms": nearest_rank(50),
            "p95_latency_ms": nearest_rank(95),
            "p99_latency_ms": nearest_rank(99),
            "avg_ttft_ms": pytest.approx(sum(ttft) / len(ttft)) if ttft else None,
        },
    }


def core(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc[k] for k in ("counts", "costs", "performance")}


# ---- stats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("range_", ["last_1h", "last_24h", "last_7d", "last_30d", None])
def test_stats_totals_per_range(dataset, percentile_path, range_) -> None:
    path, rows = dataset
    doc = queries.stats(path, {"range": range_} if range_ else {}, PROVIDERS, now=NOW)
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
    doc = queries.stats(path, args, PROVIDERS, now=NOW)
    since, until = datetime.fromisoformat(doc["since"]), datetime.fromisoformat(doc["until"])

    def given(name: str) -> datetime:
        dt = datetime.fromisoformat(args[name].replace(" ", "+"))
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt

    assert since == (given("since") if "since" in args else until - timedelta(days=7))
    assert until == (given("until") if "until" in args else NOW)
    assert core(doc) == expected(select(rows, since, until))


@pytest.mark.parametrize("filters", [{"model": "GPT-4O"}, {"provider": "provider-beta"}, {"policy": "Code"},
                                     {"model": "gpt-4o-mini", "provider": "provider-alpha", "policy": "chat"}])
def test_stats_filters_are_exact_and_case_insensitive(dataset, percentile_path, filters) -> None:
    path, rows = dataset
    doc = queries.stats(path, {**filters, "range": "last_30d"}, PROVIDERS, now=NOW)
    assert core(doc) == expected(select(rows, NOW - timedelta(days=30), NOW, **filters))


@pytest.mark.parametrize("group_by", ["model", "provider", "policy"])
def test_stats_group_by_name(dataset, percentile_path, group_by) -> None:
    path, rows = dataset
    doc = queries.stats(path, {"group_by": group_by, "range": "last_30d"}, PROVIDERS, now=NOW)
    chosen = select(rows, NOW - timedelta(days=30), NOW)
    assert core(doc) == expected(chosen)
    keys = {(r[group_by] or "").casefold() for r in chosen}
    got = {("" if k == "(none)" else k.casefold()): v for k, v in doc["groups"].items()}
    assert set(got) == keys
    for key in keys:
        assert got[key] == expected([r for r in chosen if (r[group_by] or "").casefold() == key]), key


@pytest.mark.parametrize(("group_by", "args"), [("hour", {"range": "last_24h"}), ("day", {"range": "last_30d"}),
                                                ("hour", {"since": "2026-05-10T12:00:00Z"})])
def test_stats_group_by_time(dataset, percentile_path, group_by, args) -> None:
    path, rows = dataset
    doc = queries.stats(path, {**args, "group_by": group_by}, PROVIDERS, now=NOW)
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


@pytest.mark.parametrize("group_by", [None, "hour", "day", "model"])
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
    doc = queries.stats(str(path), args, PROVIDERS, now=NOW)
    chosen = select(rows, NOW - timedelta(days=30), NOW)
    assert core(doc) == expected(chosen)
    if group_by in ("hour", "day"):
        width = 13 if group_by == "hour" else 10
        for g in doc["groups"]:
            assert core(g) == expected([r for r in chosen if r["timestamp"][:width] == g["start"][:width]]), g["start"]
    elif group_by:
        for key, g in doc["groups"].items():
            k = "" if key == "(none)" else key.casefold()
            assert core(g) == expected([r for r in chosen if (r["model"] or "").casefold() == k]), key


def hand_row(rid: str, at: str, model: str | None, provider: str | None, tokens: tuple[int, int] | None,
             cost: float | None, streaming: bool = False) -> dict[str, Any]:
    """A row of 2026-05-10 at ``at`` (HH:MM); no tokens means a failed request."""
    ok = tokens is not None
    return {
        "request_id": rid, "timestamp": f"2026-05-10T{at}:00.000Z", "model": model, "provider": provider,
        "policy": None, "streaming": streaming, "status": ("complete" if streaming else "ok") if ok else "error",
        "success": ok, "http_status": 200 if ok else 502, "input_tokens": tokens and tokens[0],
        "output_tokens": tokens and tokens[1], "cost_sats": cost, "latency_ms": 100, "ttft_ms": None,
        "stream_duration_ms": None, "retries": None, "error_type": None if ok else "upstream_error",
        "error_message": None, "client_retry_count": 0,
    }


# Each cost is what its provider's rates give: sats per 1000 input and output tokens, plus a fee per request.
# provider-alpha 10/30/1 (gpt-4o, gpt-4o-mini), provider-beta 5/15/0.5 (gpt-4o), provider-gamma 2/40/0
# (gpt-4o-mini); provider-retired, 1/2/0, is no longer configured. Asked: 09:30 to 12:30, so the hours
# 09 and 12 are partial (summed from the rows), 10 and 11 whole (from the hourly tables).
HAND_ROWS = [
    hand_row("before", "09:10", "gpt-4o", "provider-beta", (1000, 1000), 5 + 15 + 0.5),  # before since
    # A: gpt-4o at beta, 1000 in, 200 out: 1000*5/1000 + 200*15/1000 + 0.5 = 5 + 3 + 0.5 = 8.5
    hand_row("A", "09:45", "gpt-4o", "provider-beta", (1000, 200), 8.5),
    # B: gpt-4o (as the client spelled it) at alpha, 400 in, 100 out: 4 + 3 + 1 = 8
    hand_row("B", "10:20", "GPT-4o", "provider-alpha", (400, 100), 8.0, streaming=True),
    hand_row("failed", "10:30", "gpt-4o", "provider-beta", None, None),  # no usage, no cost
    # G: unknown-model at provider-retired, 2000 in, 500 out: 2000*1/1000 + 500*2/1000 = 2 + 1 = 3
    hand_row("G", "10:50", "unknown-model", "provider-retired", (2000, 500), 3.0),
    # C: gpt-4o-mini at gamma, 1000 in, 100 out: 1000*2/1000 + 100*40/1000 + 0 = 2 + 4 = 6
    hand_row("C", "11:05", "gpt-4o-mini", "provider-gamma", (1000, 100), 6.0),
    # D: gpt-4o-mini at alpha, 100 in, 1000 out: 100*10/1000 + 1000*30/1000 + 1 = 1 + 30 + 1 = 32
    hand_row("D", "12:10", "gpt-4o-mini", "provider-alpha", (100, 1000), 32.0, streaming=True),
    hand_row("after", "12:40", "gpt-4o-mini", "provider-gamma", (1000, 1000), 2 + 40),  # at until and after
]
HAND_RANGE = {"since": "2026-05-10T09:30:00Z", "until": "2026-05-10T12:30:00Z"}


@pytest.mark.parametrize("rolled_up", [len(HAND_ROWS), 4, 0])
def test_savings_by_hand(tmp_path, rolled_up) -> None:
    """Savings: per model, what its priced requests would have cost at the configured provider that would
    have charged most for all of them, less what they cost. Worked out here by hand, not by formula."""
    path = tmp_path / "hand.db"
    write(path, HAND_ROWS, rolled_up)
    doc = queries.stats(str(path), HAND_RANGE, PROVIDERS, now=NOW)
    # gpt-4o, A and B: 1400 in, 300 out, 2 requests; they cost 8.5 + 8 = 16.5.
    #   alpha: 1400*10/1000 + 300*30/1000 + 2*1   = 14 + 9 + 2   = 25    (the dearest)
    #   beta:  1400*5/1000  + 300*15/1000 + 2*0.5 = 7 + 4.5 + 1  = 12.5
    #   saved 25 - 16.5 = 8.5
    # gpt-4o-mini, C and D: 1100 in, 1100 out, 2 requests; they cost 6 + 32 = 38.
    #   alpha: 1100*10/1000 + 1100*30/1000 + 2*1 = 11 + 33 + 2  = 46
    #   gamma: 1100*2/1000  + 1100*40/1000 + 0   = 2.2 + 44     = 46.2  (the dearest)
    #   saved 46.2 - 38 = 8.2 (not the 14 + 40.2 - 38 = 16.2 of each request's own dearest provider)
    # unknown-model, G: no configured provider serves it, nothing saved.
    assert doc["costs"] == {
        "total_cost_sats": pytest.approx(8.5 + 8 + 3 + 6 + 32),
        "total_input_tokens": 1000 + 400 + 2000 + 1000 + 100,
        "total_output_tokens": 200 + 100 + 500 + 100 + 1000,
        "savings_sats": pytest.approx(8.5 + 8.2),
    }
    assert doc["counts"] == {"total": 6, "success": 5, "error": 1, "streaming": 2}

    by_model = queries.stats(str(path), {**HAND_RANGE, "group_by": "model"}, PROVIDERS, now=NOW)["groups"]
    assert {k.casefold(): g["costs"]["savings_sats"] for k, g in by_model.items()} == {
        "gpt-4o": pytest.approx(8.5), "gpt-4o-mini": pytest.approx(8.2), "unknown-model": 0}
    # By provider, each group's own requests are compared, so the groups do not add up to the whole:
    #   beta, A alone: at alpha 10 + 6 + 1 = 17, paid 8.5: saved 8.5
    #   alpha, B and D, one model each: B at alpha 8 (beta 2 + 1.5 + 0.5 = 4), paid 8: saved 0;
    #     D at gamma 0.2 + 40 = 40.2 (alpha 32), paid 32: saved 8.2
    #   gamma, C alone: at alpha 10 + 3 + 1 = 14 (gamma 6), paid 6: saved 8
    by_provider = queries.stats(str(path), {**HAND_RANGE, "group_by": "provider"}, PROVIDERS, now=NOW)["groups"]
    assert {k: g["costs"]["savings_sats"] for k, g in by_provider.items()} == {
        "provider-alpha": pytest.approx(0 + 8.2), "provider-beta": pytest.approx(8.5),
        "provider-gamma": pytest.approx(8), "provider-retired": 0}


def test_stats_of_nothing(dataset, tmp_path) -> None:
    path, _ = dataset
    empty = expected([])
    doc = queries.stats(path, {"since": "2001-01-01T00:00:00Z", "until": "2001-01-02T00:00:00Z"}, PROVIDERS)
    assert core(doc) == empty and doc["performance"]["p50_latency_ms"] is None
    missing = tmp_path / "none" / "arbstr.db"
    assert core(queries.stats(str(missing), {"group_by": "model"}, PROVIDERS)) == empty
    assert queries.stats(str(missing), {"group_by": "model"}, PROVIDERS)["groups"] == {}
    assert not missing.exists() and not missing.parent.exists()  # reading never creates the log
    blank = tmp_path / "blank.db"
    sqlite3.connect(blank).close()  # exists, but the writer has not applied the schema yet
    assert core(queries.stats(str(blank), {}, PROVIDERS)) == empty
    assert queries.list_requests(str(blank), {})["total"] == 0
    assert queries.get_request(str(blank), "x") is None


@pytest.mark.parametrize(("args", "param", "accepted"), [
    ({"range": "last_2d"}, "range", tuple(queryargs.RANGES)),
    ({"since": "yesterday"}, "since", ("ISO 8601",)),
    ({"until": "2026-13-01"}, "until", ("ISO 8601",)),
    ({"range": "last_1h", "since": "2026-05-01T00:00:00Z"}, "range", ()),
    ({"since": "2026-05-02T00:00:00Z", "until": "2026-05-01T00:00:00Z"}, "since", ()),
    ({"group_by": "week"}, "group_by", queryargs.GROUP_BY),
    ({"group_by": "hour", "since": "1900-01-01T00:00:00Z"}, "group_by", ()),
])
def test_stats_rejects_bad_parameters(dataset, args, param, accepted) -> None:
    with pytest.raises(ArbstrError) as err:
        queries.stats(dataset[0], args, PROVIDERS, now=NOW)
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
@pytest.mark.parametrize("filters", [{}, {"success": "true"}, {"model": "gpt-4o", "streaming": "false"}])
def test_list_by_cost_pages_into_unknown_costs(dataset, cost_path, order, filters) -> None:
    """Pages around the last known cost, where the merged hours give way to rows of unknown cost."""
    path, rows = dataset
    flags = {k: filters[k] == "true" for k in ("success", "streaming") if k in filters}
    keep = {r["request_id"] for r in select(rows, NOW - timedelta(days=30), NOW, model=filters.get("model"), **flags)}
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
                                     {"model": "gpt-4O", "success": "TRUE"}, {"provider": "provider-beta", "policy": "chat"}])
def test_list_filters(dataset, filters) -> None:
    path, rows = dataset
    doc = queries.list_requests(path, {**filters, "range": "last_7d", "per_page": "100"}, now=NOW)
    flags = {k: filters[k].lower() == "true" for k in ("success", "streaming") if k in filters}
    names = {k: v for k, v in filters.items() if k in ("model", "provider", "policy")}
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
        "request_id": err_row["request_id"], "timestamp": err_row["timestamp"], "model": err_row["model"],
        "provider": err_row["provider"], "policy": err_row["policy"], "streaming": err_row["streaming"],
        "status": "error", "success": False, "http_status": err_row["http_status"],
        "tokens": {"input": None, "output": None}, "cost_sats": None,
        "timing": {"latency_ms": err_row["latency_ms"], "ttft_ms": None,
                   "stream_duration_ms": err_row["stream_duration_ms"]},
        "retries": err_row["retries"], "error": {"type": "upstream_error", "message": "upstream said no"},
    }
    ok_row = next(r for r in rows if r["streaming"] and r["success"] and r["cost_sats"] is not None)
    got = queries.get_request(path, ok_row["request_id"])
    assert got["error"] is None and got["streaming"] is True and got["status"] == "complete"
    assert got["tokens"] == {"input": ok_row["input_tokens"], "output": ok_row["output_tokens"]}
    assert got["cost_sats"] == ok_row["cost_sats"] and got["timing"]["ttft_ms"] == ok_row["ttft_ms"]
    assert queries.get_request(path, "no-such-id") is None


@pytest.mark.parametrize(("args", "param"), [
    ({"success": "maybe"}, "success"), ({"streaming": "yes"}, "streaming"), ({"page": "0"}, "page"),
    ({"page": "two"}, "page"), ({"per_page": "101"}, "per_page"), ({"per_page": "0"}, "per_page"),
    ({"sort": "model"}, "sort"), ({"order": "up"}, "order"), ({"range": "today"}, "range"),
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
    assert client.get("/v1/stats/").status_code == 404  # no trailing-slash redirect
