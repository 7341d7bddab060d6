"""`arbstr stats` / `arbstr requests` output (SPEC §8)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from arbstr_core.config import Config, DatabaseConfig, Provider
from arbstr_core.log import db as logdb
from arbstr_core.reads import queries, report
from arbstr_core.timefmt import utc_timestamp

PROVIDERS = (Provider("provider-alpha", "http://a.test/v1", ("gpt-4o",), 10, 30, 1),
             Provider("provider-beta", "http://b.test/v1", ("gpt-4o",), 5, 15, 0.5))


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    path = tmp_path / "log.db"
    conn = logdb.open_writer(str(path))
    with logdb.transaction(conn):
        for i in range(150):
            ok = bool(i % 10)
            rates = (1000 * 5 + (100 + i) * 15) / 1000 + 0.5  # at provider-beta
            logdb.apply_op(conn, ("insert", {
                "request_id": f"req-{i:03d}", "timestamp": utc_timestamp() if i else "2001-01-01T00:00:00.000Z",
                "model": "gpt-4o", "provider": "provider-beta", "status": "ok" if ok else "error",
                "success": ok, "streaming": False, "input_tokens": 1000, "output_tokens": 100 + i,
                "cached_tokens": 250, "reasoning_tokens": 40, "cost_sats": rates + 0.0625 if i % 2 else rates,
                "cost_source": "provider" if i % 2 else "rates", "rates_cost_sats": rates,
                "max_cost_sats": (1000 * 10 + (100 + i) * 30) / 1000 + 1,  # at provider-alpha
                "latency_ms": 100 + i, "retries": None if ok else "1/provider-beta",
                "output_tokens_per_sec": 20.0 + i / 4 if ok else None,
                "error_type": None if ok else "upstream_error",
                # Every third through /v1/messages, naming an alias of gpt-4o; the others through chat,
                # some logged before the API was recorded (NULL: chat).
                **({"api": "messages", "routed_model": "gpt-4o-2024-08-06"} if i % 3 == 2
                   else {"api": None if i % 3 else "chat"}),
            }), "test")
    conn.close()
    return Config(providers=PROVIDERS, database=DatabaseConfig(path=str(path)))


def tables(text: str) -> list[list[str]]:
    """The group tables after the summary: blocks of lines separated by a blank line, headed by GROUP."""
    blocks = [b.splitlines() for b in text.split("\n\n")]
    return [b for b in blocks if b and b[0].startswith("GROUP")]


def test_stats_table_and_json_agree_with_the_api(cfg: Config) -> None:
    out = io.StringIO()
    assert report.run_stats(cfg, "last_24h", "model", out=out) == 0
    text = out.getvalue()
    doc = queries.stats(cfg.database.path, {"range": "last_24h", "group_by": "model"})
    errors = sum(1 for i in range(1, 150) if i % 10 == 0)  # row 0 is older than 24 h
    assert "149 total" in text and f"{149 - errors} ok" in text and f"{errors} errors" in text
    costs = doc["costs"]
    assert costs["reported_cost_sats"] and costs["reported_cost_sats"] < costs["total_cost_sats"]
    for key in ("total_cost_sats", "reported_cost_sats", "rates_cost_sats", "savings_sats"):
        assert f"{costs[key]:,.3f}" in text, key  # 3 decimals, like the API
    assert f"{149 * 250:,} cached" in text and f"{149 * 40:,} reasoning" in text
    (header, row), (perf_header, perf_row) = tables(text)
    assert header.split()[:3] == ["GROUP", "REQUESTS", "ERRORS"] and row.split()[:3] == ["gpt-4o", "149", str(errors)]
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert (cells["REPORTED"], cells["AT_RATES"], cells["SAVED_SATS"], cells["CACHED"], cells["REASONING"]) == (
        f"{costs['reported_cost_sats']:,.3f}", f"{costs['rates_cost_sats']:,.3f}", f"{costs['savings_sats']:,.3f}",
        f"{149 * 250:,}", f"{149 * 40:,}")
    assert len(header) == len(row)  # aligned columns
    perf = doc["performance"]
    assert dict(zip(perf_header.split(), perf_row.split(), strict=True)) == {
        "GROUP": "gpt-4o", "OK": f"{perf['success_rate']:.1%}", "P50_MS": str(perf["p50_latency_ms"]),
        "P95_MS": str(perf["p95_latency_ms"]), "P99_MS": str(perf["p99_latency_ms"]), "TTFT_P50": "-",
        "TTFT_P95": "-", "TOK/S_P50": f"{perf['p50_output_tokens_per_sec']:,.1f}",
        "SATS/1M_OUT": f"{perf['cost_per_1m_output_tokens_sats']:,.3f}",
    }
    assert perf["success_rate"] == round((149 - errors) / 149, 4) and perf["p50_output_tokens_per_sec"] is not None
    assert f"p50 {perf['p50_output_tokens_per_sec']:,.1f} output tokens/s" in text
    out = io.StringIO()
    assert report.run_stats(cfg, "last_24h", "model", as_json=True, out=out) == 0
    got = json.loads(out.getvalue())
    assert got["counts"] == doc["counts"] and got["groups"].keys() == doc["groups"].keys()


def test_stats_by_api(cfg: Config) -> None:
    out = io.StringIO()
    assert report.run_stats(cfg, "last_24h", "api", out=out) == 0
    doc = queries.stats(cfg.database.path, {"range": "last_24h", "group_by": "api"})
    messages = [i for i in range(1, 150) if i % 3 == 2]
    assert {k: g["counts"]["total"] for k, g in doc["groups"].items()} == {"chat": 149 - len(messages),
                                                                          "messages": len(messages)}
    header, *rows = tables(out.getvalue())[0]
    assert header.split()[:2] == ["GROUP", "REQUESTS"]
    assert [r.split()[:2] for r in rows] == [["chat", str(149 - len(messages))], ["messages", str(len(messages))]]


def test_requests_table_pages_past_the_api_limit(cfg: Config) -> None:
    out = io.StringIO()
    assert report.run_requests(cfg, limit=149, as_json=True, out=out) == 0
    got = json.loads(out.getvalue())
    assert got["total"] == 150 and len(got["data"]) == 149
    assert len({r["request_id"] for r in got["data"]}) == 149
    assert "req-000" not in {r["request_id"] for r in got["data"]}  # the oldest row is the one left out
    out = io.StringIO()
    assert report.run_requests(cfg, limit=3, out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:4] == ["TIME", "(UTC)", "API", "MODEL"] and len(lines) == 4
    assert len({line.index("req-") for line in lines[1:]}) == 1  # the id column lines up
    by_id = {r["request_id"]: r for r in got["data"]}
    header = lines[0].replace("TIME (UTC)", "TIME")
    assert header.split()[:3] == ["TIME", "API", "MODEL"]
    assert header.split()[-4:] == ["LATENCY_MS", "ERROR", "RETRIES", "REQUEST_ID"]
    for line in lines[1:]:
        cells = dict(zip(header.split(), line.split()[1:], strict=True))  # the time is two words
        r = by_id[cells["REQUEST_ID"]]
        assert cells["COST_SATS"] == f"{r['cost_sats']:,.3f}"
        assert (cells["ERROR"], cells["RETRIES"]) == ("-", "-")
        i = int(r["request_id"].removeprefix("req-"))  # an alias shows as the name asked for → the model sent
        assert (cells["API"], cells["MODEL"]) == (
            ("messages", "gpt-4o→gpt-4o-2024-08-06") if i % 3 == 2 else ("chat", "gpt-4o"))
    out = io.StringIO()
    assert report.run_requests(cfg, limit=10, out=out) == 0  # the newest error is req-140
    failed = next(line for line in out.getvalue().splitlines() if "req-140" in line)
    assert failed.split()[-3:] == ["upstream_error", "1/provider-beta", "req-140"]


def test_errors_go_to_stderr_with_exit_1(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.run_stats(cfg, "yesterday") == 1
    assert "range" in capsys.readouterr().err
    assert report.run_requests(cfg, limit=0) == 1
    assert "--limit" in capsys.readouterr().err


def test_missing_database_prints_zeros_and_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = Config(providers=PROVIDERS, database=DatabaseConfig(path=str(tmp_path / "nope.db")))
    assert report.run_stats(cfg) == 0
    captured = capsys.readouterr()
    assert "0 total" in captured.out and "no request log" in captured.err
    assert report.run_requests(cfg) == 0
    assert "no requests logged yet" in capsys.readouterr().out
