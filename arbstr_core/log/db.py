"""The request log's SQL on the write connection: schema, migrations, writes, sweep, retention, roll-up (SPEC §7).

Plain functions over one ``sqlite3.Connection`` in autocommit mode (``isolation_level=None``), each
owning its transaction, so :mod:`arbstr_core.log.writer` is only about the queue and the thread, and
tests drive the SQL without a thread. The few SQL fragments the readers (:mod:`arbstr_core.reads`)
must spell the same way, the hourly key and sums above all, are declared here once.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from ..timefmt import utc_timestamp

log = logging.getLogger("arbstr.logstore")

# Row keys accepted from the web layer: the columns of schema.sql less ``id`` and ``writer``.
COLUMNS = (
    "request_id", "timestamp", "model", "provider", "policy", "streaming", "status", "success",
    "http_status", "input_tokens", "output_tokens", "cost_sats", "latency_ms", "ttft_ms",
    "stream_duration_ms", "retries", "error_type", "error_message", "client_retry_count",
    "cached_tokens", "reasoning_tokens", "cost_source", "rates_cost_sats", "max_cost_sats", "api", "routed_model",
    "output_tokens_per_sec",
)
# A row's API (schema.sql requests.api): 'chat' for /v1/chat/completions, 'messages' for /v1/messages.
# Rows logged before version 3 have NULL, and every one of them came through chat completions.
APIS = ("chat", "messages")
API_OF_ROW = "COALESCE(api, 'chat')"
_COLSET = frozenset(COLUMNS)
_warned: set[str] = set()

# Statements that bring an existing database from version N-1 to N; they run before schema.sql, and
# after them (and schema.sql) the hourly tables are totalled from every row again, in the same
# transaction, so a migrated database is consistent the moment it commits.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: the insert trigger gives way to roll_up, the other triggers come back with a WHEN guard,
    # cost_sats is indexed hour by hour, latencies are counted in bands. schema.sql then creates the
    # new tables and indexes (a few seconds on a million rows), and every row is totalled again.
    2: (
        "DROP TRIGGER IF EXISTS requests_hourly_insert",
        "DROP TRIGGER IF EXISTS requests_hourly_update",
        "DROP TRIGGER IF EXISTS requests_hourly_delete",
        "DROP INDEX IF EXISTS idx_requests_cost",
        "DROP TABLE IF EXISTS requests_hourly",
    ),
    # 3: what providers charged, cached and reasoning tokens, savings per row, the client's API and the
    # model an alias routed to: seven columns (NULL in the rows written before; ADD COLUMN only rewrites
    # the schema, not the rows), new sums and the API in the hourly totals, so their tables and the
    # triggers that spell them are made again, and the totals with them; the indexes that readers filter
    # by the names without reading the table gain the API, so they are made again too.
    3: (
        "ALTER TABLE requests ADD COLUMN cached_tokens INTEGER",
        "ALTER TABLE requests ADD COLUMN reasoning_tokens INTEGER",
        "ALTER TABLE requests ADD COLUMN cost_source TEXT",
        "ALTER TABLE requests ADD COLUMN rates_cost_sats REAL",
        "ALTER TABLE requests ADD COLUMN max_cost_sats REAL",
        "ALTER TABLE requests ADD COLUMN api TEXT",
        "ALTER TABLE requests ADD COLUMN routed_model TEXT COLLATE NOCASE",
        "DROP INDEX IF EXISTS idx_requests_hour_cost",
        "DROP INDEX IF EXISTS idx_requests_latency",
        "DROP INDEX IF EXISTS idx_requests_hour_latency",
        "DROP TRIGGER IF EXISTS requests_hourly_update",
        "DROP TRIGGER IF EXISTS requests_hourly_delete",
        "DROP TABLE IF EXISTS requests_hourly",
        "DROP TABLE IF EXISTS requests_latency_hourly",
        "DROP TABLE IF EXISTS rollup_state",
    ),
    # 4: output tokens a second per row (NULL in the rows before), and band counts of first-token times and
    # of speeds (new tables and indexes in schema.sql, filled by the re-totalling), so the triggers that
    # keep them are made again; debug_captures is new.
    4: (
        "ALTER TABLE requests ADD COLUMN output_tokens_per_sec REAL",
        "DROP TRIGGER IF EXISTS requests_hourly_update",
        "DROP TRIGGER IF EXISTS requests_hourly_delete",
    ),
}

WRITER_CACHE_KIB = 4096  # the writer's page cache: it fills as the database grows and stays in RSS
WAL_CHECKPOINT_PAGES = 10000  # about 40 MB of WAL between automatic checkpoints


class Metric(NamedTuple):
    """A per-row measurement /v1/stats gives percentiles of, over the successful rows that have it.

    Each has its hourly band counts (``table``, filled like requests_latency_hourly: schema.sql) and two
    indexes the percentile walks use (reads/percentiles.py): one in value order, one hour by hour.
    """

    name: str
    column: str  # in requests
    table: str  # hourly band counts
    index: str  # (column, success, timestamp, names...)
    hour_index: str  # (hour, success, column, timestamp, names...)
    percentiles: tuple[int, ...]  # which ones /v1/stats shows
    octaves: bool = False  # one band an octave (of latency_bands' four): fewer band rows, longer walks

    @property
    def ok(self) -> str:
        """The rows it counts."""
        return f"success = 1 AND {self.column} IS NOT NULL"

    @property
    def ok_unindexed(self) -> str:
        """The same rows where another index should narrow the set: "+" keeps these columns out of the choice."""
        return f"+success = 1 AND +{self.column} IS NOT NULL"

    @property
    def band_of_row(self) -> str:
        """A row's band (schema.sql latency_bands, as the triggers there spell it)."""
        octave = f" AND {OCTAVE_EDGE}" if self.octaves else ""
        return f"(SELECT MAX(lo) FROM latency_bands WHERE lo <= {self.column}{octave})"


# The band edges that start an octave (1, 2, 4, 8, ...), and the one below 1.
OCTAVE_EDGE = "(lo < 1 OR (lo & (lo - 1)) = 0)"


LATENCY = Metric("latency", "latency_ms", "requests_latency_hourly", "idx_requests_latency",
                 "idx_requests_hour_latency", (50, 95, 99))
# First-token times and speeds are counted an octave a band: their band tables are read on every
# /v1/stats beside the latency's, and with a quarter of the rows each the three cost about what two did
# (a million rows: 115 ms for speeds in quarter-octave bands), while a walk through part of a wider band
# costs a few ms more.
TTFT = Metric("ttft", "ttft_ms", "requests_ttft_hourly", "idx_requests_ttft", "idx_requests_hour_ttft", (50, 95),
              octaves=True)
SPEED = Metric("speed", "output_tokens_per_sec", "requests_speed_hourly", "idx_requests_speed",
               "idx_requests_hour_speed", (50,), octaves=True)
METRICS = (LATENCY, TTFT, SPEED)

# What one bad row raises (a duplicate request_id, a NULL where none may be; ValueError: a str SQLite
# cannot encode; OverflowError: an int past 64 bits): retrying cannot fix it, so the row is dropped and
# counted, the others written, and the writer goes on.
ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, sqlite3.DataError,
              ValueError, OverflowError)

_INTERRUPTED = (
    "UPDATE requests SET status = 'interrupted', success = 0, "
    "error_type = COALESCE(error_type, 'server_error'), "
    "error_message = COALESCE(error_message, 'arbstr stopped before the stream ended') "
    "WHERE status = 'streaming' AND "
)


def schema_path() -> Path:
    """``schema.sql`` beside this module: a link to the top-level file in a checkout, a copy in a wheel."""
    return Path(__file__).resolve().parent / "schema.sql"


@functools.cache
def expected_version() -> int:
    """The version this arbstr's schema.sql brings a database to (readers refuse older ones)."""
    return schema_version(schema_path().read_text(encoding="utf-8"))


def schema_version(script: str) -> int:
    m = re.search(r"^PRAGMA user_version\s*=\s*(\d+)\s*;", script, re.MULTILINE)
    if not m:
        raise ValueError("schema.sql does not set PRAGMA user_version")
    return int(m.group(1))


def statements(script: str) -> Iterator[str]:
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: take the write lock up front so busy_timeout applies at BEGIN."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def apply_schema(conn: sqlite3.Connection, script: str) -> int:
    """Bring the database to the script's version; return the version it is at.

    Runs at every start in every worker: the script is idempotent and the version is read under the
    write lock, so concurrent starts migrate once. A newer database is left alone. A migration ends by
    totalling every row into the hourly tables again (MIGRATIONS), in its transaction.
    """
    target = schema_version(script)
    with transaction(conn):
        current = conn.execute("PRAGMA user_version").fetchone()[0]
        if current > target:
            log.warning("request log has schema version %d, newer than this arbstr's %d; left as is", current, target)
            return current
        migrating = 0 < current < target
        if migrating:
            log.info("request log: upgrading schema version %d to %d", current, target)
        for version in range(current + 1, target + 1) if migrating else ():
            for stmt in MIGRATIONS.get(version, ()):
                conn.execute(stmt)
        for stmt in statements(script):
            conn.execute(stmt)
        if migrating:
            _refold(conn)
    return target


def default_connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


def open_writer(
    path: str, connect: Callable[[str], sqlite3.Connection] = default_connect, busy_timeout_ms: int = 5000
) -> sqlite3.Connection:
    """Create the directory, open, set WAL + synchronous=NORMAL + busy_timeout, apply schema.sql."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    script = schema_path().read_text(encoding="utf-8")
    conn = connect(path)
    try:
        conn.isolation_level = None  # explicit transactions only
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("request log %s: journal_mode is %s, not wal; readers may wait for writes", path, mode)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA cache_size = {-WRITER_CACHE_KIB}")  # index pages stay hot: +10 % rows/s
        # Fewer, larger checkpoints (fewer fsyncs, kinder to SD cards): +40 % rows/s into a 1M-row log.
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_PAGES * 4096 * 2}")
        apply_schema(conn, script)
    except BaseException:
        conn.close()
        raise
    return conn


def _known(row: Mapping[str, Any]) -> list[str]:
    unknown = [str(k) for k in row if k not in _COLSET and k not in _warned]
    if unknown:
        _warned.update(unknown)
        log.warning("request log: ignoring unknown column(s) %s", ", ".join(unknown))
    return [c for c in row if c in _COLSET]


def _flags(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """``streaming``/``success`` arrive as bools (or None by mistake): store 0/1, never lose the row."""
    if "streaming" in row or "success" in row:
        row = dict(row)
        for key in ("streaming", "success"):
            if key in row:
                row[key] = int(bool(row[key]))
    return row


def _insert_sql(cols: Sequence[str]) -> str:
    return f"INSERT INTO requests ({', '.join(cols)}, writer) VALUES ({', '.join('?' * (len(cols) + 1))})"


def apply_ops(conn: sqlite3.Connection, ops: Sequence[tuple], writer: str) -> None:
    """Execute queued operations in order; runs of inserts with the same keys go through one executemany."""
    i = 0
    while i < len(ops):
        if ops[i][0] != "insert":
            apply_op(conn, ops[i], writer)
            i += 1
            continue
        rows = [_flags(ops[i][1])]
        cols = tuple(_known(rows[0]))
        i += 1
        while i < len(ops) and ops[i][0] == "insert" and tuple(ops[i][1]) == tuple(rows[0]):
            rows.append(_flags(ops[i][1]))
            i += 1
        conn.executemany(_insert_sql(cols), ([r[c] for c in cols] + [writer] for r in rows))


def apply_op(conn: sqlite3.Connection, op: tuple, writer: str) -> None:
    """Execute one queued operation: ``("insert", row)`` or ``("update", request_id, fields)``."""
    if op[0] == "insert":
        row = _flags(op[1])
        cols = _known(row)
        conn.execute(_insert_sql(cols), [row[c] for c in cols] + [writer])
        return
    _, request_id, fields = op
    fields = _flags(fields)
    cols = [c for c in _known(fields) if c != "request_id"]
    if cols:
        conn.execute(
            f"UPDATE requests SET {', '.join(f'{c} = ?' for c in cols)} WHERE request_id = ?",
            [fields[c] for c in cols] + [request_id],
        )


def write(conn: sqlite3.Connection, ops: Sequence[tuple], writer: str) -> None:
    """Apply queued operations and fold the rows they inserted into the hourly totals, in one transaction."""
    with transaction(conn):
        apply_ops(conn, ops, writer)
        roll_up(conn)


def writer_token() -> str:
    """A new writer's id: its host, so that a writer on the same host can tell when its process died."""
    return f"{socket.gethostname()}:{uuid.uuid4().hex}"


def _process_gone(pid: int) -> bool:
    """No such process, or only its zombie (a killed worker whose master exited is not reaped at once)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def heartbeat(conn: sqlite3.Connection, writer: str, now: float, stale_secs: float) -> int:
    """Prove ``writer`` alive; mark ``streaming`` rows of dead writers interrupted.

    A writer is dead when its heartbeat is older than ``stale_secs``, or at once when it ran on this
    host and its process is gone (a worker killed at ``graceful_timeout`` or by the OOM killer, whose
    heartbeat is still fresh). Returns how many rows were marked. Rows without a writer (older tools)
    count as orphans.
    """
    stale = utc_timestamp(now - stale_secs)
    local = writer.partition(":")[0] + ":"
    with transaction(conn):
        conn.execute(
            "INSERT INTO writers (token, pid, started, heartbeat) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (token) DO UPDATE SET heartbeat = excluded.heartbeat",
            (writer, os.getpid(), utc_timestamp(now), utc_timestamp(now)),
        )
        gone = [(token,) for token, pid in conn.execute("SELECT token, pid FROM writers WHERE token != ?", (writer,))
                if token.startswith(local) and _process_gone(pid)]
        conn.executemany("DELETE FROM writers WHERE token = ?", gone)
        swept = conn.execute(
            _INTERRUPTED + "(writer IS NULL OR writer NOT IN (SELECT token FROM writers WHERE heartbeat >= ?))",
            (stale,),
        ).rowcount
        conn.execute("DELETE FROM writers WHERE heartbeat < ?", (stale,))
        roll_up(conn)  # rows inserted by other tools are totalled within a heartbeat
    if swept:
        log.info("request log: %d stream row(s) of an ended process marked interrupted", swept)
    return swept


def retire(conn: sqlite3.Connection, writer: str) -> None:
    """At shutdown, after the drain: this writer's unfinished streams are interrupted."""
    with transaction(conn):
        conn.execute(_INTERRUPTED + "writer = ?", (writer,))
        conn.execute("DELETE FROM writers WHERE token = ?", (writer,))
        roll_up(conn)


def purge(conn: sqlite3.Connection, before: float, chunk: int, table: str = "requests", key: str = "id",
          what: str = "row(s)") -> int:
    """Delete up to ``chunk`` rows of ``table`` (rows, or debug captures: log/captures.py) older than the
    Unix time ``before``, by their ``timestamp``; return how many went."""
    cutoff = utc_timestamp(before)
    deleted = conn.execute(
        f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE timestamp < ? LIMIT ?)", (cutoff, chunk)
    ).rowcount
    if deleted:
        log.info("request log: retention deleted %d %s older than %s", deleted, what, cutoff)
    return deleted


# The rows' hourly key, column by column of requests_hourly and requests_latency_hourly, over rows of
# requests: NULL names are stored as '' and compared without case; a NULL API is stored as 'chat'.
KEY_OF_ROW = {
    "hour": "substr(timestamp, 1, 13)",
    "model": "COALESCE(model, '') COLLATE NOCASE",
    "provider": "COALESCE(provider, '') COLLATE NOCASE",
    "policy": "COALESCE(policy, '') COLLATE NOCASE",
    "api": API_OF_ROW,
}
HOURLY_KEY = ", ".join(KEY_OF_ROW.values())
_BY_KEY = ", ".join(str(i) for i in range(1, len(KEY_OF_ROW) + 1))  # GROUP BY the key's positions


class Sum(NamedTuple):
    """One of the sums requests_hourly keeps per hourly key."""

    column: str  # in requests_hourly
    of_rows: str  # the aggregate over rows of requests that fills it
    kind: type  # int for an INTEGER column, float for a REAL one


# Every sum, declared once: the roll-up below, the readers' SUM()s over the hourly table and their sums
# over the newest rows (reads/queries.py), and the totals they fill (reads/aggregate.py Totals) all
# follow this table. schema.sql's update and delete triggers spell the same sums per row, in this order
# (tests/test_logstore.py checks them against it); a new sum needs a column, trigger terms and a
# migration there too. Savings are each row's own (SPEC §2.3): what the dearest provider that could have
# served it would have charged for its usage, less what it cost, never below 0, over rows where both are
# known. Latency and ttft sums count successful rows only.
SUMS = (
    Sum("total", "COUNT(*)", int),
    Sum("success", "TOTAL(success = 1)", int),
    Sum("streaming", "TOTAL(streaming = 1)", int),
    Sum("ok_streaming", "TOTAL(success = 1 AND streaming = 1)", int),
    Sum("input_tokens", "TOTAL(input_tokens)", int),
    Sum("output_tokens", "TOTAL(output_tokens)", int),
    Sum("cached_tokens", "TOTAL(cached_tokens)", int),
    Sum("reasoning_tokens", "TOTAL(reasoning_tokens)", int),
    Sum("cost_sats", "TOTAL(cost_sats)", float),
    Sum("costed", "COUNT(cost_sats)", int),
    Sum("reported_cost_sats", "TOTAL(IIF(cost_source = 'provider', cost_sats, 0))", float),
    Sum("rates_cost_sats", "TOTAL(rates_cost_sats)", float),
    Sum("rates_n", "COUNT(rates_cost_sats)", int),
    Sum("savings_sats", "TOTAL(MAX(max_cost_sats - cost_sats, 0))", float),
    Sum("savings_n", "COUNT(max_cost_sats - cost_sats)", int),
    Sum("latency_sum", "TOTAL(IIF(success = 1, latency_ms, 0))", float),
    Sum("latency_n", "COUNT(IIF(success = 1, latency_ms, NULL))", int),
    Sum("ttft_sum", "TOTAL(IIF(success = 1, ttft_ms, 0))", float),
    Sum("ttft_n", "COUNT(IIF(success = 1, ttft_ms, NULL))", int),
)
ROW_SUMS = ", ".join(s.of_rows for s in SUMS)  # the sums over rows of requests, in SUMS order
# The rows with id > ? folded into the hourly tables. NOT INDEXED: the new rows are the last few ids,
# whatever an index on success might promise the planner.
_ROLL_UP = (
    (f"INSERT INTO requests_hourly ({', '.join([*KEY_OF_ROW, *(s.column for s in SUMS)])}) "
     f"SELECT {HOURLY_KEY}, {ROW_SUMS} FROM requests NOT INDEXED WHERE id > ? GROUP BY {_BY_KEY} "
     "ON CONFLICT DO UPDATE SET " + ", ".join(f"{s.column} = {s.column} + excluded.{s.column}" for s in SUMS)),
    *(f"INSERT INTO {m.table} SELECT {HOURLY_KEY}, {m.band_of_row}, COUNT(*) FROM requests "
      f"NOT INDEXED WHERE id > ? AND {m.ok} GROUP BY {_BY_KEY}, {len(KEY_OF_ROW) + 1} "
      "ON CONFLICT DO UPDATE SET n = n + excluded.n" for m in METRICS),
)


def roll_up(conn: sqlite3.Connection) -> None:
    """Fold the rows newer than ``rollup_state.upto`` into the hourly tables; call inside a write transaction.

    One GROUP BY over a batch's rows instead of a trigger per insert: the same totals for a fraction of
    the writer's time.
    """
    upto = conn.execute("SELECT upto FROM rollup_state").fetchone()[0]
    top = conn.execute("SELECT MAX(id) FROM requests").fetchone()[0]
    if top is not None and top > upto:
        for sql in _ROLL_UP:
            conn.execute(sql, (upto,))
        conn.execute("UPDATE rollup_state SET upto = ?", (top,))


def rebuild_rollup(conn: sqlite3.Connection) -> None:
    """Recompute the hourly tables from every row (after a bulk load, or to check the kept totals)."""
    with transaction(conn):
        _refold(conn)


def _refold(conn: sqlite3.Connection) -> None:
    """Empty the hourly tables and fold every row in again; call inside a write transaction."""
    conn.execute("DELETE FROM requests_hourly")
    for m in METRICS:
        conn.execute(f"DELETE FROM {m.table}")
    conn.execute("UPDATE rollup_state SET upto = 0")
    roll_up(conn)
