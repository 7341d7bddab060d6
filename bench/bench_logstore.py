"""Request log benchmark: writer throughput, then /v1/stats and /v1/requests latency over 1,000,000 rows.

    .venv/bin/python bench/bench_logstore.py [--rows 1000000] [--writes 50000] [--db PATH] [--migration]

Targets (printed, not asserted): writer ≥ 5,000 rows/s; each query < 300 ms (p50 and max of 5 runs
are printed). The big database is bulk-loaded with executemany into a table without indexes, then
schema.sql adds indexes and triggers and the hourly tables are rebuilt, as a long-lived arbstr would
have them. Rows arrive in time order, like real traffic, spread over the last 7 days, so the default
last_7d range covers every row. With --migration, the same rows are first loaded under schema version 2
(tests/schema_v2.sql) and the time arbstr takes to bring that database to the current version at its
first start is printed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arbstr_core.config import Provider
from arbstr_core.log import db as logdb
from arbstr_core.log.writer import LogStore
from arbstr_core.reads import queries
from arbstr_core.timefmt import utc_timestamp

PROVIDERS = (
    Provider("provider-alpha", "http://a.test/v1", ("gpt-4o", "gpt-4o-mini"), 10, 30, 1),
    Provider("provider-beta", "http://b.test/v1", ("gpt-4o", "llama-3-70b"), 5, 15, 0.5),
    Provider("provider-gamma", "http://c.test/v1", ("gpt-4o-mini", "llama-3-70b"), 2, 6, 0),
)
POLICIES = (None, None, "code_generation", "cheap_chat")
V2_SCHEMA = Path(__file__).resolve().parent.parent / "tests" / "schema_v2.sql"


def _rates(p: Provider, tin: int, tout: int) -> float:
    return (tin * p.input_rate + tout * p.output_rate) / 1000 + p.base_fee


def fake_rows(n: int, span_secs: float, rnd: random.Random) -> Iterator[tuple[Any, ...]]:
    """``n`` rows in time order over the last ``span_secs``, in logdb.COLUMNS order.

    A quarter came through /v1/messages, whatever their model, provider and policy: the most hourly keys
    the API can add (each splits in two). Half of those named an alias (``gpt-4o`` routed to
    ``gpt-4o-2025``); ``model`` keeps the same names as before, so the hourly keys differ only by the
    API. These come from their own random stream: every other value is as before rows had an API.
    """
    start = time.time() - span_secs
    apis = random.Random(3)
    for i in range(n):
        p = rnd.choice(PROVIDERS)
        model = rnd.choice(p.models)
        ok, stream = rnd.random() < 0.95, rnd.random() < 0.4
        tin, tout = rnd.randint(10, 4000), rnd.randint(1, 1500)
        known = ok and rnd.random() > 0.02
        rates = _rates(p, tin, tout) if known else None
        dearest = max(_rates(q, tin, tout) for q in PROVIDERS if model in q.models) if known else None
        reported = known and rnd.random() < 0.3
        cost = round(rates * rnd.uniform(0.9, 1.1), 3) if reported else rates
        latency = int(rnd.lognormvariate(6.5, 0.6))
        messages = apis.random() < 0.25
        alias = messages and apis.random() < 0.5
        yield (
            str(uuid.UUID(int=rnd.getrandbits(128), version=4)), utc_timestamp(start + i * span_secs / n),
            model, p.name, rnd.choice(POLICIES), int(stream),
            ("complete" if stream else "ok") if ok else "error", int(ok), 200 if ok else 502,
            tin if ok else None, tout if ok else None, cost, latency, latency // 5 if stream else None,
            latency if stream else None, None, None if ok else "upstream_error", None if ok else "bench", 0,
            rnd.randint(0, tin) if known and rnd.random() < 0.3 else 0 if known else None,
            rnd.randint(0, tout) if known and rnd.random() < 0.2 else 0 if known else None,
            ("provider" if reported else "rates") if known else None, rates, dearest,
            "messages" if messages else "chat", f"{model}-2025" if alias else None,
            round(tout * 1000 / (latency - latency // 5 if stream else latency), 3) if ok and latency >= 2 else None,
        )


def bulk_load(path: Path, n: int, script: str | None = None) -> float:
    """``n`` rows under ``script`` (the current schema.sql if None; an older one keeps the columns it has
    and its hourly tables empty, for the migration to fill)."""
    started = time.perf_counter()
    current = script is None
    script = script or logdb.schema_path().read_text(encoding="utf-8")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    for stmt in logdb.statements(script):
        if "CREATE INDEX" not in stmt and "CREATE TRIGGER" not in stmt:
            conn.execute(stmt)
    has = {r[1] for r in conn.execute("PRAGMA table_info(requests)")}
    cols = [c for c in logdb.COLUMNS if c in has]
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO requests ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
        _pick(fake_rows(n, 7 * 86400, random.Random(1)), [logdb.COLUMNS.index(c) for c in cols]),
    )
    conn.execute("COMMIT")
    logdb.apply_schema(conn, script)  # indexes and triggers, built once over the loaded rows
    if current:
        logdb.rebuild_rollup(conn)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return time.perf_counter() - started


def _pick(rows: Iterator[tuple[Any, ...]], at: Sequence[int]) -> Iterator[tuple[Any, ...]]:
    for r in rows:
        yield tuple(r[i] for i in at)


def bench_migration(tmp: Path, n: int) -> None:
    """The first start of this arbstr on a version 2 database of ``n`` rows: columns added, the hourly
    tables made again (log/db.py MIGRATIONS), in one transaction."""
    path = tmp / "v2.db"
    seconds = bulk_load(path, n, V2_SCHEMA.read_text(encoding="utf-8"))
    print(f"bulk load under schema version 2: {n:,} rows in {seconds:.1f} s")
    for attempt in ("first start", "a second start (nothing to migrate)"):
        t0 = time.perf_counter()
        logdb.open_writer(str(path)).close()
        print(f"migration, {attempt}: {time.perf_counter() - t0:.2f} s")
    path.unlink()


def bench_writer(path: Path, n: int, label: str) -> None:
    store = LogStore(str(path), queue_size=n + 1)
    store.start()
    assert store.flush(), "writer did not come up"
    rows = [dict(zip(logdb.COLUMNS, r, strict=True)) for r in fake_rows(n, 3600, random.Random(2))]
    put_times = []
    started = time.perf_counter()
    for r in rows:
        t0 = time.perf_counter()
        store.insert(r)
        put_times.append(time.perf_counter() - t0)
    store.close(timeout=300)
    elapsed = time.perf_counter() - started
    health = store.health()
    put_times.sort()
    print(f"writer, {label}: {health['written']:,} rows in {elapsed:.2f} s = {health['written'] / elapsed:,.0f} rows/s "
          f"(target ≥ 5,000; dropped {health['dropped']}, write errors {health['write_errors']})")
    print(f"insert() call: median {put_times[len(put_times) // 2] * 1e6:.1f} µs, "
          f"p99 {put_times[int(len(put_times) * 0.99)] * 1e6:.1f} µs, max {put_times[-1] * 1e3:.2f} ms")


def timed(fn: Callable[[], Any], repeat: int = 5) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(runs), max(runs)


def bench_queries(path: Path) -> None:
    db = str(path)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("stats (default last_7d)", lambda: queries.stats(db, {})),
        ("stats range=last_24h", lambda: queries.stats(db, {"range": "last_24h"})),
        ("stats range=last_1h", lambda: queries.stats(db, {"range": "last_1h"})),
        ("stats model=gpt-4o", lambda: queries.stats(db, {"model": "gpt-4o"})),
        ("stats group_by=model", lambda: queries.stats(db, {"group_by": "model"})),
        ("stats group_by=provider", lambda: queries.stats(db, {"group_by": "provider"})),
        ("stats group_by=policy", lambda: queries.stats(db, {"group_by": "policy"})),
        ("stats group_by=api", lambda: queries.stats(db, {"group_by": "api"})),
        ("stats api=messages", lambda: queries.stats(db, {"api": "messages"})),
        ("stats api=chat group_by=model", lambda: queries.stats(db, {"api": "chat", "group_by": "model"})),
        ("stats group_by=day", lambda: queries.stats(db, {"group_by": "day"})),
        ("stats group_by=hour", lambda: queries.stats(db, {"group_by": "hour"})),
        ("stats last_24h group_by=hour", lambda: queries.stats(db, {"range": "last_24h", "group_by": "hour"})),
        ("stats last_30d group_by=day model=gpt-4o",
         lambda: queries.stats(db, {"range": "last_30d", "group_by": "day", "model": "gpt-4o"})),
        ("requests (default)", lambda: queries.list_requests(db, {})),
        ("requests sort=cost_sats", lambda: queries.list_requests(db, {"sort": "cost_sats"})),
        ("requests sort=cost_sats asc per_page=100 page=50", lambda: queries.list_requests(
            db, {"sort": "cost_sats", "order": "asc", "per_page": "100", "page": "50"})),
        ("requests sort=cost_sats policy=cheap_chat success=false", lambda: queries.list_requests(
            db, {"sort": "cost_sats", "policy": "cheap_chat", "success": "false"})),
        ("requests sort=cost_sats page=5000", lambda: queries.list_requests(db, {"sort": "cost_sats", "page": "5000"})),
        ("requests sort=latency_ms asc page=100", lambda: queries.list_requests(
            db, {"sort": "latency_ms", "order": "asc", "page": "100"})),
        ("requests success=false", lambda: queries.list_requests(db, {"success": "false"})),
        ("requests api=messages", lambda: queries.list_requests(db, {"api": "messages"})),
        ("requests api=messages sort=cost_sats", lambda: queries.list_requests(db, {"api": "messages", "sort": "cost_sats"})),
        ("requests api=messages sort=latency_ms page=100", lambda: queries.list_requests(
            db, {"api": "messages", "sort": "latency_ms", "page": "100"})),
        ("requests model+streaming", lambda: queries.list_requests(db, {"model": "gpt-4o", "streaming": "true"})),
        ("requests success+streaming", lambda: queries.list_requests(db, {"success": "true", "streaming": "true"})),
        ("requests page=5000", lambda: queries.list_requests(db, {"page": "5000"})),
        ("request by id", lambda: queries.get_request(db, "no-such-id")),
    ]
    print(f"{'query (5 runs each)':56} {'p50 ms':>8} {'max ms':>8}")
    for label, fn in cases:
        median, worst = timed(fn)
        flag = "" if median < 300 else "   (over 300 ms)"
        print(f"{label:56} {median:8.1f} {worst:8.1f}{flag}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--writes", type=int, default=50_000)
    ap.add_argument("--db", type=Path, help="reuse (or create and keep) this database for the query bench")
    ap.add_argument("--migration", action="store_true", help="also time the upgrade of a version 2 database")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.migration:
            bench_migration(Path(tmp), args.rows)
        bench_writer(Path(tmp) / "writer.db", args.writes, "new database")
        path = args.db or Path(tmp) / "big.db"
        if not path.exists():
            seconds = bulk_load(path, args.rows)
            print(f"bulk load: {args.rows:,} rows in {seconds:.1f} s ({path.stat().st_size / 1e6:,.0f} MB)")
        bench_queries(path)
        copy = Path(tmp) / "big-copy.db"
        shutil.copyfile(path, copy)
        bench_writer(copy, args.writes // 2, f"into a copy of the {args.rows:,}-row database")


if __name__ == "__main__":
    main()
