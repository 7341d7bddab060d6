"""The request log writer (log/writer.py) and its SQL (log/db.py): durability, never blocking, failures (SPEC §7)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from arbstr_core.errors import ArbstrError
from arbstr_core.log import db as logdb
from arbstr_core.log import writer
from arbstr_core.log.writer import LogStore
from arbstr_core.reads import queries
from arbstr_core.timefmt import utc_timestamp

ROOT = Path(__file__).resolve().parent.parent
# schema.sql as it was at version 2 (before cached/reasoning tokens, cost_source, rates and max costs, the
# client's API and the routed model).
V2_SCHEMA = (ROOT / "tests" / "schema_v2.sql").read_text(encoding="utf-8")
NEW_IN_V3 = ("cached_tokens", "reasoning_tokens", "cost_source", "rates_cost_sats", "max_cost_sats", "api",
             "routed_model")
# schema.sql at version 3 (before output tokens a second, the first-token and speed band counts, captures).
V3_SCHEMA = (ROOT / "tests" / "schema_v3.sql").read_text(encoding="utf-8")
NEW_IN_V4 = ("output_tokens_per_sec",)


def row(i: int = 0, **over) -> dict:
    base = {
        "request_id": str(uuid.uuid4()),
        "timestamp": utc_timestamp(),
        "model": "gpt-4o",
        "provider": "provider-alpha",
        "policy": None,
        "streaming": False,
        "status": "ok",
        "success": True,
        "http_status": 200,
        "input_tokens": 100 + i,
        "output_tokens": 20 + i,
        "cost_sats": 1.0 + i / 8,
        "latency_ms": 300 + i,
        "ttft_ms": None,
        "stream_duration_ms": None,
        "retries": None,
        "error_type": None,
        "error_message": None,
        "client_retry_count": 0,
        "cached_tokens": 40 + i,
        "reasoning_tokens": 5 + i,
        "cost_source": "rates",
        "rates_cost_sats": 1.0 + i / 8,
        "max_cost_sats": 1.5 + i / 4,
        "api": "chat",
        "routed_model": None,
    }
    base.update(over)
    return base


def count(path: Path, where: str = "1") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM requests WHERE {where}").fetchone()[0]


def fetch(path: Path, request_id: str) -> dict:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone())
    finally:
        conn.close()


def wait_for(condition, timeout: float = 10.0) -> None:
    """Poll a condition the writer thread exposes only through health(); fail loudly on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def rollup_is_consistent(path: Path) -> bool:
    """The hourly tables, kept by the writer and triggers, equal a recomputation from the rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    tables = ("requests_hourly", *(m.table for m in logdb.METRICS), "rollup_state")
    try:
        kept = [sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables]
        logdb.rebuild_rollup(conn)
        rebuilt = [sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables]
    finally:
        conn.close()
    return kept == rebuilt


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "arbstr.db"  # the directory does not exist yet: start() creates it


def test_row_round_trip_keeps_tokens_cost_and_flags(db: Path) -> None:
    store = LogStore(str(db))
    store.start()
    known = row(3, cost_sats=12.345678901234, retries="2/provider-alpha, 1/provider-beta", client_retry_count=2,
                cost_source="provider", rates_cost_sats=11.5, max_cost_sats=20.25, cached_tokens=64, reasoning_tokens=8,
                api="messages", model="claude-sonnet-4-5", routed_model="gpt-4o")
    unknown = row(4, cost_sats=None, input_tokens=None, output_tokens=None, success=False, status="error",
                  http_status=502, error_type="upstream_error", error_message="boom", cached_tokens=None,
                  reasoning_tokens=None, cost_source=None, rates_cost_sats=None, max_cost_sats=None, api=None)
    stream = row(5, streaming=True, status="streaming", success=False, cost_sats=None, cost_source=None,
                 rates_cost_sats=None, max_cost_sats=None)
    # A row as the request path wrote them before these keys: accepted, the new columns NULL.
    older = {k: v for k, v in row(8).items() if k not in NEW_IN_V3}
    for r in (known, unknown, stream, older):
        store.insert(r)
    store.update(stream["request_id"], {"status": "complete", "success": True, "input_tokens": 7, "output_tokens": 9,
                                        "cost_sats": 2.5, "ttft_ms": 40, "stream_duration_ms": 900, "latency_ms": 900,
                                        "cached_tokens": 3, "reasoning_tokens": 2, "cost_source": "rates",
                                        "rates_cost_sats": 2.5, "max_cost_sats": 3.0})
    when = datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    as_datetime, as_unix = row(6, timestamp=when), row(7, timestamp=when.timestamp())
    store.insert(as_datetime)
    store.insert(as_unix)
    store.close()

    for r in (as_datetime, as_unix):
        assert fetch(db, r["request_id"])["timestamp"] == "2026-05-01T12:00:00.123Z"
    got = fetch(db, known["request_id"])
    for key in ("timestamp", "model", "provider", "input_tokens", "output_tokens", "cost_sats", "latency_ms",
                "retries", "client_retry_count", "http_status", *NEW_IN_V3):
        assert got[key] == known[key], key
    assert (got["streaming"], got["success"]) == (0, 1)
    got = fetch(db, unknown["request_id"])
    assert got["cost_sats"] is None and got["input_tokens"] is None  # unknown stays unknown, never 0
    assert all(got[key] is None for key in NEW_IN_V3)  # api: None as given, routed_model: no alias
    assert (got["success"], got["error_type"], got["error_message"]) == (0, "upstream_error", "boom")
    got = fetch(db, stream["request_id"])
    assert (got["status"], got["success"], got["streaming"], got["cost_sats"]) == ("complete", 1, 1, 2.5)
    assert (got["input_tokens"], got["output_tokens"], got["ttft_ms"], got["stream_duration_ms"]) == (7, 9, 40, 900)
    assert [got[key] for key in NEW_IN_V3] == [3, 2, "rates", 2.5, 3.0, "chat", None]
    got = fetch(db, older["request_id"])
    assert got["cost_sats"] == older["cost_sats"] and all(got[key] is None for key in NEW_IN_V3)
    # What /v1/requests shows: the API and the model sent to providers, a NULL API as chat, no alias as the model.
    shown = {r["request_id"]: (r["api"], r["model"], r["routed_model"]) for r in (
        queries.get_request(str(db), x["request_id"]) for x in (known, unknown, stream, older))}
    assert shown == {known["request_id"]: ("messages", "claude-sonnet-4-5", "gpt-4o"),
                     unknown["request_id"]: ("chat", "gpt-4o", "gpt-4o"),
                     stream["request_id"]: ("chat", "gpt-4o", "gpt-4o"),
                     older["request_id"]: ("chat", "gpt-4o", "gpt-4o")}
    assert store.health() == {"queued": 0, "written": 6, "dropped": 0, "db_ok": True, "write_errors": 0}
    assert rollup_is_consistent(db)


def test_pragmas_and_schema_version(db: Path) -> None:
    store = LogStore(str(db))
    store.start()
    assert store.flush()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == logdb.schema_version(logdb.schema_path().read_text())
    conn.close()
    store.close()


def test_concurrent_inserts_all_land(db: Path) -> None:
    store = LogStore(str(db), batch_size=64)
    store.start()
    threads, per_thread = 8, 400

    def work(t: int) -> None:
        for i in range(per_thread):
            store.insert(row(i, request_id=f"t{t}-{i}"))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    store.close()
    assert count(db) == threads * per_thread
    assert store.health()["written"] == threads * per_thread
    assert store.health()["dropped"] == 0


def test_close_drains_everything_queued(db: Path) -> None:
    store = LogStore(str(db))
    for i in range(3000):  # queued before the writer even exists
        store.insert(row(i))
    assert store.health()["queued"] == 3000
    store.start()
    store.close()
    assert count(db) == 3000
    assert store.health()["queued"] == 0
    store.close()  # idempotent
    store.insert(row())  # after close: dropped and counted, never written, never raises
    assert store.health()["dropped"] == 1 and count(db) == 3000


def test_locked_database_delays_rows_but_loses_none(db: Path) -> None:
    store = LogStore(str(db), busy_timeout_ms=20, retry_secs=0.02)
    store.start()
    assert store.flush()
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(200):
            store.insert(row(i))
        wait_for(lambda: store.health()["write_errors"] >= 2)
        assert store.health()["db_ok"] is False and store.degraded()
        assert store.health()["queued"] == 200
        assert count(db) == 0  # WAL readers still read while the lock is held
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert store.flush()
    assert store.health()["db_ok"] is True and not store.degraded()
    store.close()
    assert count(db) == 200
    assert store.health()["dropped"] == 0


def test_unwritable_path_keeps_serving(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where the directory should be")  # root ignores chmod; this works
    store = LogStore(str(tmp_path / "not-a-dir" / "arbstr.db"), queue_size=50, batch_size=20, retry_secs=0.01)
    store.start()  # must not raise
    wait_for(lambda: store.health()["write_errors"] >= 1)
    started = time.perf_counter()
    for i in range(500):
        store.insert(row(i))
    assert time.perf_counter() - started < 1.0  # 500 puts; a blocking put would wait for ever here
    health = store.health()
    assert health["db_ok"] is False and store.degraded()
    assert health["dropped"] + health["queued"] == 500
    assert health["queued"] <= 50 + 20  # the queue's bound plus one batch in the writer's hands
    store.close(timeout=0.2)
    assert store.health()["dropped"] == 500  # at the shutdown deadline the rest is counted as lost


def test_failing_connection_recovers_and_writes_the_queue(db: Path) -> None:
    healthy = threading.Event()
    attempts = []

    def connect(path: str) -> sqlite3.Connection:
        attempts.append(path)
        if not healthy.is_set():
            raise sqlite3.OperationalError("disk I/O error")
        return logdb.default_connect(path)

    store = LogStore(str(db), connect=connect, retry_secs=0.01)
    store.start()
    for i in range(20):
        store.insert(row(i))
    wait_for(lambda: len(attempts) >= 3)
    assert store.health()["db_ok"] is False and store.health()["write_errors"] >= 3
    healthy.set()
    wait_for(lambda: store.health()["written"] == 20)
    assert store.health()["db_ok"] is True
    store.close()
    assert count(db) == 20


def test_full_queue_drops_and_counts_without_blocking(db: Path) -> None:
    now = [1_000_000.0]
    store = LogStore(str(db), queue_size=10, clock=lambda: now[0])  # not started: nothing drains the queue
    for i in range(25):
        store.insert(row(i))
    assert store.health() == {"queued": 10, "written": 0, "dropped": 15, "db_ok": True, "write_errors": 0}
    assert store.degraded()
    now[0] += writer.DROP_WINDOW_SECS + 1  # drops older than 10 minutes no longer degrade /health
    assert not store.degraded()


def test_bad_row_is_rejected_alone(db: Path) -> None:
    store = LogStore(str(db))
    store.start()
    good = [row(i) for i in range(5)]
    store.insert(good[0])
    store.insert(good[1])
    store.insert({"request_id": None, "status": "ok"})  # NOT NULL request_id: cannot ever be written
    store.insert({**good[2], "bogus_column": 1})  # unknown keys are ignored, the row is kept
    store.insert(good[1])  # duplicate request_id
    store.insert({**row(10), "model": "gpt-4o\ud800"})  # a lone surrogate: no UTF-8 for SQLite
    store.insert({**row(11), "client_retry_count": 10**30})  # past SQLite's 64-bit integers
    for r in good[3:]:
        store.insert(r)
    store.close()
    assert count(db) == 5
    health = store.health()
    assert (health["written"], health["dropped"], health["write_errors"]) == (5, 4, 4)


def test_retention_deletes_old_rows_at_start_and_daily(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    day = 86400
    conn = logdb.open_writer(str(db))
    with logdb.transaction(conn):
        for i, age in enumerate((40, 31, 29, 1, 0.1)):
            logdb.apply_op(conn, ("insert", row(i, timestamp=utc_timestamp(now - age * day))), "old-process")
    conn.close()
    clock = [now]
    monkeypatch.setattr(writer, "RETENTION_EVERY_SECS", 0.05)
    store = LogStore(str(db), retention_days=30, clock=lambda: clock[0])
    store.start()
    assert store.flush()
    assert count(db) == 3  # the 40- and 31-day-old rows went at start
    clock[0] += 2 * day  # two days later the 29-day-old row is past 30 days
    wait_for(lambda: count(db) == 2)
    store.close()
    assert rollup_is_consistent(db)


def test_leftover_streaming_rows_become_interrupted(db: Path) -> None:
    live = LogStore(str(db))
    live.start()
    live_stream = row(1, streaming=True, status="streaming", success=False)
    live.insert(live_stream)
    assert live.flush()
    conn = logdb.open_writer(str(db))
    orphan, no_writer = row(2, status="streaming", streaming=True), row(3, status="streaming", streaming=True)
    with logdb.transaction(conn):
        conn.execute("INSERT INTO writers VALUES ('dead', 1, '2020-01-01T00:00:00.000Z', '2020-01-01T00:00:00.000Z')")
        logdb.apply_op(conn, ("insert", orphan), "dead")
        conn.execute(
            "INSERT INTO requests (request_id, timestamp, status, streaming, success) VALUES (?, ?, 'streaming', 1, 1)",
            (no_writer["request_id"], no_writer["timestamp"]),
        )
    conn.close()

    restarted = LogStore(str(db))  # a new worker while `live` still serves its stream
    restarted.start()
    assert restarted.flush()
    for r in (orphan, no_writer):
        got = fetch(db, r["request_id"])
        assert (got["status"], got["success"]) == ("interrupted", 0)
        assert got["error_message"] == "arbstr stopped before the stream ended"
    assert fetch(db, live_stream["request_id"])["status"] == "streaming"  # a live writer's stream is left alone

    live.close()  # its process ends with the stream unfinished
    assert fetch(db, live_stream["request_id"])["status"] == "interrupted"
    restarted.close()
    assert rollup_is_consistent(db)


def test_streams_of_a_killed_process_on_this_host_are_interrupted_at_once(db: Path) -> None:
    """A worker killed mid-stream (at graceful_timeout, by the OOM killer) left a fresh heartbeat."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(gone.stdout)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # it has exited, and stays unreaped for now
    fresh = utc_timestamp(time.time())
    here = logdb.writer_token()
    elsewhere = "another-host:" + here.partition(":")[2]
    killed, unreaped, remote = (row(i, status="streaming", streaming=True) for i in (1, 2, 3))
    LogStore(str(db)).close()  # the schema
    conn = logdb.open_writer(str(db))
    with logdb.transaction(conn):
        for token, pid, r in ((here, dead_pid, killed), (logdb.writer_token(), zombie.pid, unreaped),
                              (elsewhere, dead_pid, remote)):
            conn.execute("INSERT INTO writers VALUES (?, ?, ?, ?)", (token, pid, fresh, fresh))
            logdb.apply_op(conn, ("insert", r), token)
    conn.close()

    restarted = LogStore(str(db))
    restarted.start()
    assert restarted.flush()
    zombie.wait()
    assert fetch(db, killed["request_id"])["status"] == "interrupted"
    assert fetch(db, unreaped["request_id"])["status"] == "interrupted"
    # Another host's process cannot be checked from here: its row waits for the heartbeat to go stale.
    assert fetch(db, remote["request_id"])["status"] == "streaming"
    restarted.close()


def test_disabled_store_writes_nothing(db: Path) -> None:
    store = LogStore(str(db), enabled=False)
    store.start()
    store.insert(row())
    store.update("x", {"status": "complete"})
    store.close()
    assert not db.exists() and not db.parent.exists()
    assert store.health()["queued"] == 0 and not store.degraded()


@pytest.mark.parametrize("ending", ["return", "KeyboardInterrupt"])
def test_process_exit_drains_the_queue(tmp_path: Path, ending: str) -> None:
    db = tmp_path / "exit.db"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from arbstr_core.log.writer import LogStore
        store = LogStore({str(db)!r})
        store.start()
        for i in range(2000):
            store.insert({{"request_id": str(i), "status": "ok", "success": True}})
        if {ending!r} == "KeyboardInterrupt":
            raise KeyboardInterrupt
    """)
    subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, timeout=60)
    assert count(db) == 2000


def test_schema_is_idempotent_and_respects_newer_versions(tmp_path: Path) -> None:
    script = logdb.schema_path().read_text()
    conn = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    assert logdb.apply_schema(conn, script) == logdb.schema_version(script)
    assert logdb.apply_schema(conn, script) == logdb.schema_version(script)
    conn.execute("PRAGMA user_version = 99")
    assert logdb.apply_schema(conn, script) == 99
    conn.close()


def test_there_is_one_schema_file() -> None:
    """The package's schema.sql (shipped by `pip install .`) is a link to the top-level one, not a copy."""
    packaged = ROOT / "arbstr_core" / "log" / "schema.sql"
    assert packaged.is_symlink() and packaged.resolve() == (ROOT / "schema.sql").resolve()
    assert logdb.schema_path().resolve() == (ROOT / "schema.sql").resolve()


def _terms(text: str) -> list[str]:
    """``text`` split at the commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            terms.append(text[start:i].strip())
            start = i + 1
    return [*terms, text[start:].strip()]


def _hourly_inserts(trigger: str) -> list[tuple[list[str], list[str]]]:
    """Each ``INSERT INTO requests_hourly VALUES (...) ON CONFLICT DO UPDATE SET ...`` of a trigger: the
    VALUES terms, and the columns the SET list adds up, in their order."""
    head, out = "INSERT INTO requests_hourly VALUES (", []
    pos = trigger.find(head)
    while pos >= 0:
        i = start = pos + len(head)
        depth = 1
        while depth:
            depth += {"(": 1, ")": -1}.get(trigger[i], 0)
            i += 1
        values = _terms(trigger[start:i - 1])
        upsert = " ".join(trigger[i:trigger.index(";", i)].split())
        assert upsert.startswith("ON CONFLICT DO UPDATE SET "), upsert
        added = []
        for assignment in _terms(upsert.removeprefix("ON CONFLICT DO UPDATE SET ")):
            column, _, rest = assignment.partition(" = ")
            assert rest == f"{column} + excluded.{column}", assignment
            added.append(column)
        out.append((values, added))
        pos = trigger.find(head, i)
    return out


def test_schema_triggers_keep_the_sums_log_db_declares() -> None:
    """schema.sql spells the sums of log/db.py SUMS again, per row and by position, in requests_hourly's
    columns and in the update and delete triggers (the schema is fixed; Python declares the sums once).
    A sum added, removed or reordered on one side only fails here."""
    script = logdb.schema_path().read_text(encoding="utf-8")
    conn = sqlite3.connect(":memory:", isolation_level=None)
    logdb.apply_schema(conn, script)
    columns = [s.column for s in logdb.SUMS]
    keys = len(logdb.KEY_OF_ROW)
    table = [(name, kind) for _, name, kind, *_ in conn.execute("PRAGMA table_info(requests_hourly)")]
    assert table[:keys] == [(key, "TEXT") for key in logdb.KEY_OF_ROW]
    assert table[keys:] == [(s.column, {int: "INTEGER", float: "REAL"}[s.kind]) for s in logdb.SUMS]
    for m in logdb.METRICS:
        bands = [name for _, name, *_ in conn.execute(f"PRAGMA table_info({m.table})")]
        assert bands == [*logdb.KEY_OF_ROW, "band", "n"]

    # Rows on which every two sums differ somewhere, so that two sums swapped cannot go unnoticed; the
    # key's names in every form (NULL, '', another case; a NULL api counts as 'chat').
    names = ("success", "streaming", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens",
             "cost_sats", "cost_source", "rates_cost_sats", "max_cost_sats", "latency_ms", "ttft_ms")
    key_names = [("Gpt-4o", None, "code", "messages"), (None, "p", "", "chat"), ("gpt-4o", "", None, None)]
    rows = [
        (1, 1, 7, 11, 3, 5, 2.5, "provider", 2.25, 4.0, 300, 40),
        (1, 0, 13, 17, 0, 2, None, None, None, None, 250, None),
        (0, 1, None, None, None, None, None, None, None, None, 5000, None),
        (0, 0, 3, 5, 1, None, 0.75, "rates", 0.75, 0.5, None, None),  # dearest below the cost: saves 0, not -0.25
        (1, 0, 19, 23, None, 6, 4.25, "rates", 4.25, 9.5, None, 33),
        (0, 0, 2, 3, None, None, 1.5, "provider", 1.0, None, None, None),
        (1, 1, 2, 2, None, None, 0.5, None, None, None, 10, 1),  # as a row written before version 3
    ]
    for i, r in enumerate(rows):
        conn.execute(
            f"INSERT INTO requests (request_id, timestamp, model, provider, policy, api, status, {', '.join(names)}) "
            f"VALUES (?, '2026-05-01T12:00:00.000Z', ?, ?, ?, ?, 'ok', {', '.join('?' * len(names))})",
            (f"r{i}", *key_names[i % len(key_names)], *r),
        )
    ids = [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")]

    def declared(row_id: int) -> tuple:
        return conn.execute(f"SELECT {logdb.HOURLY_KEY}, {logdb.ROW_SUMS} FROM requests WHERE id = ?",
                            (row_id,)).fetchone()

    for a in range(len(columns)):
        for b in range(a + 1, len(columns)):
            assert any(declared(i)[keys + a] != declared(i)[keys + b] for i in ids), (columns[a], columns[b])
    assert {declared(i)[keys - 1] for i in ids} == {"chat", "messages"}

    triggers = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
    checked = []
    for name in ("requests_hourly_delete", "requests_hourly_update"):
        for values, added in _hourly_inserts(triggers[name]):
            assert added == columns, name
            alias = "NEW" if "NEW." in values[0] else "OLD"  # NEW adds a row's sums, OLD takes them away
            sign = 1 if alias == "NEW" else -1
            terms = ", ".join(v.replace(f"{alias}.", "") for v in values)
            for i in ids:
                got = conn.execute(f"SELECT {terms} FROM requests WHERE id = ?", (i,)).fetchone()
                want = declared(i)
                assert len(got) == len(want), name
                assert got[:keys] == want[:keys], (name, alias)
                for column, g, w in zip(columns, got[keys:], want[keys:], strict=True):
                    assert g == sign * w, (name, alias, column, i)
            checked.append((name, alias))
    conn.close()
    assert checked == [("requests_hourly_delete", "OLD"), ("requests_hourly_update", "OLD"),
                       ("requests_hourly_update", "NEW")]


def test_rollup_keeps_up_when_the_newest_rows_go(db: Path) -> None:
    """Deleting the newest rows lets SQLite reuse their ids; the rollup must count the new rows anyway."""
    conn = logdb.open_writer(str(db))
    logdb.write(conn, [("insert", row(i, latency_ms=3 * i, success=i % 3 > 0)) for i in range(50)], "w")
    conn.execute("DELETE FROM requests WHERE id > 40")
    logdb.write(conn, [("insert", row(i, latency_ms=0.5 * i)) for i in range(100, 120)], "w")
    assert conn.execute("SELECT MIN(id) FROM requests WHERE id > 40").fetchone()[0] == 41  # reused
    conn.execute("DELETE FROM requests")
    logdb.write(conn, [("insert", row(i)) for i in range(200, 205)], "w")
    conn.close()
    assert count(db) == 5
    assert rollup_is_consistent(db)


def test_rollup_follows_the_api_of_folded_rows(db: Path) -> None:
    """The API is part of the hourly key: updates that change it and deletes of folded rows move their
    totals between keys (the triggers), and NULL and 'chat' are one key."""
    conn = logdb.open_writer(str(db))
    apis = ("chat", "messages", None)
    logdb.write(conn, [("insert", row(i, api=apis[i % 3])) for i in range(30)], "w")
    assert conn.execute("SELECT upto FROM rollup_state").fetchone()[0] == 30
    conn.execute("UPDATE requests SET api = 'messages' WHERE id % 5 = 0")
    conn.execute("UPDATE requests SET api = NULL, routed_model = 'gpt-4o-2025' WHERE id % 7 = 0")
    conn.execute("DELETE FROM requests WHERE id % 4 = 0")
    kept = dict(conn.execute("SELECT api, SUM(total) FROM requests_hourly GROUP BY api").fetchall())
    conn.close()
    final = {}
    for i in range(1, 31):  # ids 1 to 30, as inserted
        final[i] = None if i % 7 == 0 else "messages" if i % 5 == 0 else apis[(i - 1) % 3]
    alive = [api or "chat" for i, api in final.items() if i % 4]
    assert kept == {"chat": alive.count("chat"), "messages": alive.count("messages")}
    assert rollup_is_consistent(db)
    assert queries.stats(str(db), {"group_by": "api"})["groups"].keys() == {"chat", "messages"}


# Version 2's roll-up (its hourly key and log/db.py SUMS, then its latency bands), to leave a database as
# arbstr at version 2 did: folded rows, the newer ones not yet.
V2_KEY = "substr(timestamp, 1, 13), COALESCE(model, ''), COALESCE(provider, ''), COALESCE(policy, '')"
V2_FOLD = (
    (f"INSERT INTO requests_hourly SELECT {V2_KEY}, COUNT(*), TOTAL(success = 1), TOTAL(streaming = 1), "
     "TOTAL(success = 1 AND streaming = 1), TOTAL(input_tokens), TOTAL(output_tokens), TOTAL(cost_sats), "
     "COUNT(cost_sats), TOTAL(IIF(cost_sats IS NULL, 0, input_tokens)), TOTAL(IIF(cost_sats IS NULL, 0, output_tokens)), "
     "TOTAL(IIF(success = 1, latency_ms, 0)), COUNT(IIF(success = 1, latency_ms, NULL)), "
     "TOTAL(IIF(success = 1, ttft_ms, 0)), COUNT(IIF(success = 1, ttft_ms, NULL)) FROM requests GROUP BY 1, 2, 3, 4"),
    (f"INSERT INTO requests_latency_hourly SELECT {V2_KEY}, {logdb.LATENCY.band_of_row}, COUNT(*) "
     f"FROM requests WHERE {logdb.LATENCY.ok} GROUP BY 1, 2, 3, 4, 5"),
    "UPDATE rollup_state SET upto = (SELECT MAX(id) FROM requests)",
)


def v2_rows(n: int) -> list[dict]:
    """Rows as the request path wrote them at version 2 (none of the version 3 keys), over the last hours."""
    now = time.time()
    out = []
    for i in range(n):
        r = {k: v for k, v in row(i).items() if k not in NEW_IN_V3}
        r.update(timestamp=utc_timestamp(now - 600 * i), model=("gpt-4o", "GPT-4o-mini", None)[i % 3],
                 policy=(None, "code")[i % 2], streaming=i % 4 == 0)
        if i % 5 == 1:  # failed: no usage, no cost
            r.update(status="error", success=False, http_status=502, input_tokens=None, output_tokens=None,
                     cost_sats=None, error_type="upstream_error", error_message="boom")
        out.append(r)
    return out


def make_v2_database(path: Path, rows: list[dict], folded: int) -> list[tuple]:
    """A log as arbstr at version 2 left it, with its schema (tests/schema_v2.sql): the first ``folded``
    rows in the hourly tables, their streams ended after the fold (v2's update trigger moved them), one
    folded row deleted (v2's delete trigger), the rest newer than the fold. Returns every row as stored."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    assert logdb.apply_schema(conn, V2_SCHEMA) == 2
    with logdb.transaction(conn):
        for part, fold in ((rows[:folded], True), (rows[folded:], False)):
            for r in part:
                first = {**r, "status": "streaming", "success": False, "cost_sats": None} if r["streaming"] else r
                logdb.apply_op(conn, ("insert", first), "v2")
            for stmt in V2_FOLD if fold else ():
                conn.execute(stmt)
            for r in part:
                if r["streaming"]:
                    logdb.apply_op(conn, ("update", r["request_id"], r), "v2")
        conn.execute("DELETE FROM requests WHERE request_id = ?", (rows[1]["request_id"],))
    stored = conn.execute("SELECT * FROM requests ORDER BY id").fetchall()
    conn.close()
    return stored


def schema_of(path: Path) -> tuple[dict, dict]:
    """Every table's columns (name, type, order) and every index's and trigger's SQL."""
    conn = sqlite3.connect(path)
    try:
        objects = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
        tables = {name: conn.execute(f"PRAGMA table_info({name})").fetchall() for kind, name, _ in objects
                  if kind == "table"}
        return tables, {name: sql for kind, name, sql in objects if kind != "table"}
    finally:
        conn.close()


def test_version_2_database_is_migrated_losing_nothing(db: Path, tmp_path: Path) -> None:
    """Every old row kept as it was, the seven new columns NULL in them, the hourly totals made again with
    the new sums and the API (NULL: chat), the same layout as a new database; stats and listings read it,
    new rows add to it."""
    rows = v2_rows(40)
    before = make_v2_database(db, rows, folded=30)
    with pytest.raises(ArbstrError) as err:  # readers do not guess at an old layout
        queries.stats(str(db), {})
    assert (err.value.status, err.value.code) == (503, "log_outdated")

    store = LogStore(str(db))
    store.start()
    assert store.flush()
    new = row(99, cost_source="provider", cost_sats=2.125, rates_cost_sats=2.0, max_cost_sats=3.5, cached_tokens=30,
              reasoning_tokens=12, api="messages", model="claude-haiku", routed_model="gpt-4o-mini")
    store.insert(new)
    store.close()

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == logdb.expected_version() == 4
    old_columns = len(before[0])
    after = conn.execute("SELECT * FROM requests ORDER BY id").fetchall()
    conn.close()
    assert [r[:old_columns] for r in after[:-1]] == before  # every old row, every value, the same id
    assert all(r[old_columns:] == (None,) * len(NEW_IN_V3 + NEW_IN_V4) for r in after[:-1])
    assert len(after) == len(rows) and fetch(db, new["request_id"])["max_cost_sats"] == 3.5
    assert rollup_is_consistent(db)
    fresh = tmp_path / "fresh.db"
    logdb.open_writer(str(fresh)).close()
    assert schema_of(db)[0] == schema_of(fresh)[0]  # tables: the same columns in the same order
    assert schema_of(db)[1] == schema_of(fresh)[1]  # indexes and triggers: schema.sql's

    kept = [r for r in rows if r["request_id"] != rows[1]["request_id"]] + [new]
    doc = queries.stats(str(db), {"range": "last_24h"})
    assert doc["counts"] == {"total": len(kept), "success": sum(r["success"] for r in kept),
                             "error": sum(not r["success"] for r in kept),
                             "streaming": sum(bool(r["streaming"]) for r in kept)}
    assert doc["costs"] == {
        "total_cost_sats": round(sum(r["cost_sats"] or 0 for r in kept), 3),
        "total_input_tokens": sum(r["input_tokens"] or 0 for r in kept),
        "total_output_tokens": sum(r["output_tokens"] or 0 for r in kept),
        # Only the new row knows these: the migrated rows' reported cost, rates and savings are unknown.
        "total_cached_tokens": 30, "total_reasoning_tokens": 12, "reported_cost_sats": 2.125,
        "rates_cost_sats": 2.0, "savings_sats": 1.375,
    }
    old = queries.get_request(str(db), rows[0]["request_id"])
    assert old["tokens"] == {"input": rows[0]["input_tokens"], "output": rows[0]["output_tokens"], "cached": None,
                             "reasoning": None}
    assert (old["cost_sats"], old["cost_source"], old["rates_cost_sats"], old["max_cost_sats"]) == (
        rows[0]["cost_sats"], None, None, None)
    # Every row before the upgrade came through chat completions, under the model it named.
    assert (old["api"], old["model"], old["routed_model"]) == ("chat", rows[0]["model"], rows[0]["model"])
    listed = queries.list_requests(str(db), {"range": "last_24h", "per_page": "100"})["data"]
    assert [r["request_id"] for r in listed if r["api"] == "messages"] == [new["request_id"]]
    assert {r["api"] for r in listed} == {"chat", "messages"}
    grouped = queries.stats(str(db), {"range": "last_24h", "group_by": "api"})["groups"]
    assert {k: g["counts"]["total"] for k, g in grouped.items()} == {"chat": len(kept) - 1, "messages": 1}
    assert grouped["messages"]["costs"]["savings_sats"] == 1.375 and grouped["chat"]["costs"]["savings_sats"] == 0
    for api, n in (("chat", len(kept) - 1), ("messages", 1)):
        assert queries.stats(str(db), {"range": "last_24h", "api": api})["counts"]["total"] == n
        assert queries.list_requests(str(db), {"range": "last_24h", "api": api})["total"] == n


def test_version_3_database_is_migrated_with_first_token_percentiles(db: Path, tmp_path: Path) -> None:
    """Old rows keep every value (no speed: NULL); their first-token times are counted in the new bands, so
    TTFT percentiles cover them at once; new rows bring their speed; the layout is a new database's."""
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    assert logdb.apply_schema(conn, V3_SCHEMA) == 3
    old = [row(i, streaming=True, status="complete", ttft_ms=10 * (i + 1)) for i in range(9)]
    with logdb.transaction(conn):
        for r in old:
            logdb.apply_op(conn, ("insert", {k: v for k, v in r.items() if k not in NEW_IN_V4}), "v3")
    before = conn.execute("SELECT * FROM requests ORDER BY id").fetchall()
    conn.close()

    store = LogStore(str(db))
    store.start()
    new = row(50, streaming=True, status="complete", ttft_ms=1000, output_tokens_per_sec=42.5)
    store.insert(new)
    store.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == logdb.expected_version() == 4
    after = conn.execute("SELECT * FROM requests ORDER BY id").fetchall()
    conn.close()
    assert [r[:-1] for r in after[:-1]] == before and all(r[-1] is None for r in after[:-1])
    assert rollup_is_consistent(db)
    fresh = tmp_path / "fresh.db"
    logdb.open_writer(str(fresh)).close()
    assert schema_of(db) == schema_of(fresh)
    perf = queries.stats(str(db), {"range": "last_24h"})["performance"]
    ttfts = sorted([r["ttft_ms"] for r in old] + [1000])  # ten: nearest rank p50 is the 5th, p95 the 10th
    assert (perf["p50_ttft_ms"], perf["p95_ttft_ms"], perf["p50_output_tokens_per_sec"]) == (ttfts[4], 1000, 42.5)


def test_migration_is_one_transaction(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration that fails part way leaves the version 2 database as it was, to be tried again."""
    before = make_v2_database(db, v2_rows(12), folded=6)
    broken = (*logdb.MIGRATIONS[3], "SELECT no_such_column FROM requests")
    monkeypatch.setitem(logdb.MIGRATIONS, 3, broken)
    with pytest.raises(sqlite3.OperationalError):
        logdb.open_writer(str(db))
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT * FROM requests ORDER BY id").fetchall() == before
    conn.close()
    monkeypatch.undo()
    logdb.open_writer(str(db)).close()
    assert rollup_is_consistent(db)


def test_version_1_database_is_upgraded(db: Path) -> None:
    """A log written two schemas ago opens: new tables, columns and indexes, totals recomputed, reads work."""
    make_v2_database(db, v2_rows(30), folded=20)
    conn = sqlite3.connect(db, isolation_level=None)
    for stmt in (  # what version 1 had instead
        "DROP TABLE rollup_state", "DROP TABLE requests_latency_hourly", "DROP TABLE latency_bands",
        "DROP INDEX idx_requests_hour_cost", "DROP INDEX idx_requests_hour_latency",
        "CREATE INDEX idx_requests_cost ON requests (cost_sats, timestamp)",
        "CREATE TRIGGER requests_hourly_insert AFTER INSERT ON requests BEGIN SELECT 1; END",
        "PRAGMA user_version = 1",
    ):
        conn.execute(stmt)
    conn.close()
    with pytest.raises(ArbstrError) as err:  # readers do not guess at an old layout
        queries.list_requests(str(db), {})
    assert (err.value.status, err.value.code) == (503, "log_outdated")

    store = LogStore(str(db))
    store.start()
    store.insert(row(99))
    store.close()
    conn = sqlite3.connect(db)
    objects = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == logdb.expected_version() == 4
    conn.close()
    assert {"rollup_state", "requests_latency_hourly", "idx_requests_hour_cost"} <= objects
    assert not {"idx_requests_cost", "requests_hourly_insert"} & objects
    assert queries.list_requests(str(db), {"per_page": "100"})["total"] == 30
    assert rollup_is_consistent(db)
