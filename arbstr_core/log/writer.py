"""LogStore: the request log's queue and the one thread that owns its write connection (SPEC §7).

Requests never wait for SQLite. ``insert``/``update`` put an operation on a bounded ``queue.Queue``
and return; when the queue is full the operation is dropped and counted (``/health`` shows it). The
writer thread drains the queue in batched transactions, each of which also folds its rows into the
hourly totals (:func:`.db.roll_up`). If the database cannot be opened or written it keeps its
batch, reports ``db_ok = False`` and retries every ``retry_secs`` while the proxy keeps serving;
operations wait in the queue up to its bound. ``close()``, also registered with ``atexit``
(gunicorn worker exit, Ctrl-C), drains the queue before the process exits.

Nothing happens at construction: ``start()`` runs lazily in each gunicorn worker, because neither an
SQLite connection nor a thread may cross ``fork()``.

Streams are inserted as ``streaming`` and updated when they end. Each LogStore registers in the
``writers`` table and refreshes a heartbeat; ``streaming`` rows whose writer is gone (a previous
process, a killed worker) become ``interrupted`` at start and on every heartbeat, so workers sharing
one database never touch each other's live streams. The SQL itself lives in :mod:`.db`.

Debug captures (``capture``) travel the same queue and are written by the same thread into their own
table (:mod:`.captures`). Retention runs once at start and then daily, in chunks: rows older than
``retention_days`` (when set), captures older than ``capture_retention_days``, whether or not capture is
on now.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from ..timefmt import format_utc, utc_timestamp
from . import captures as logcaptures
from . import db as logdb

log = logging.getLogger("arbstr.logstore")

# Operations per transaction, at most. A burst into a log of a million rows: 500 → ~120 µs of CPU a
# row, 2000 → ~105, 5000 → ~90 (each transaction rewrites its hot pages and folds its rows once).
LINGER_SECS = 0.05            # a batch waits this long for more rows after its first (see _gather)
BATCH_SIZE = 5000
HEARTBEAT_SECS = 60.0         # how often a writer proves it is alive and sweeps orphaned streams
STALE_SECS = 3 * HEARTBEAT_SECS
RETENTION_EVERY_SECS = 86400.0
RETENTION_CHUNK = 5000        # rows deleted per transaction, so a big purge never starves the queue
DROP_WINDOW_SECS = 600.0      # drops this recent make the store (and /health) degraded

CAPTURE = "capture"  # the queued operation that stores a debug capture (the others: "insert", "update")
_WAKE = object()  # queue marker that only wakes the writer (close); a threading.Event marker is a flush


class LogStore:
    """Bounded, never-blocking request log; see the module docstring."""

    def __init__(
        self,
        path: str,
        queue_size: int = 10000,
        retention_days: float = 0,
        enabled: bool = True,
        *,
        capture_retention_days: float = 0,
        clock: Callable[[], float] = time.time,
        connect: Callable[[str], sqlite3.Connection] = logdb.default_connect,
        batch_size: int = BATCH_SIZE,
        retry_secs: float = 5.0,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.path = str(path)
        self.retention_days = retention_days
        self.capture_retention_days = capture_retention_days  # 0: captures are kept
        self.enabled = enabled
        self._clock = clock
        self._connect = connect
        self._batch_size = max(1, batch_size)
        self._retry_secs = retry_secs
        self._busy_ms = busy_timeout_ms
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._nudge = threading.Event()  # a flush or close is waiting: end a batch's linger now
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline = math.inf
        self._token = logdb.writer_token()  # this writer's id in the writers table and the rows' writer column
        self._written = 0
        self._dropped = 0
        self._write_errors = 0
        self._inflight = 0
        self._file: tuple[int, int] | None = None  # the database file the writer has open (see _file_id)
        self._last_drop: float | None = None
        self._db_ok = True

    # ---- request side: never blocks, never raises -------------------------------------------------

    def start(self) -> None:
        """Start the writer thread once (thread-safe, idempotent); all database work happens on it."""
        if not self.enabled or self._thread is not None:
            return  # the fast path: every request calls this
        with self._lock:
            if self._thread is not None or self._closed:
                return
            try:
                thread = threading.Thread(target=self._run, name="arbstr-logstore", daemon=True)
                thread.start()
            except Exception:  # a process out of threads still answers requests
                log.exception("request log: cannot start the writer thread")
                self._db_ok = False
                return
            self._thread = thread
        atexit.register(self.close)

    def insert(self, row: Mapping[str, Any]) -> None:
        """Queue a new row (keys are column names). ``timestamp`` may be missing (now), a Unix time, a
        datetime or the column's own text form; it is stored as the text form, which the indexes rely on."""
        if not self.enabled:
            return
        row = dict(row)
        ts = row.get("timestamp")
        if not ts:
            row["timestamp"] = utc_timestamp(self._clock())
        elif isinstance(ts, datetime):
            row["timestamp"] = format_utc(ts)
        elif isinstance(ts, int | float):
            row["timestamp"] = utc_timestamp(ts)
        self._put(("insert", row))

    def update(self, request_id: str, fields: Mapping[str, Any]) -> None:
        """Queue new values for an inserted row (a stream that ended); applied after its insert."""
        if not self.enabled:
            return
        self._put(("update", request_id, dict(fields)))

    def capture(self, row: Mapping[str, Any]) -> None:
        """Queue a debug capture (keys: :data:`.captures.COLUMNS`), already scrubbed and cut to size."""
        if not self.enabled:
            return
        self._put((CAPTURE, dict(row)))

    def _put(self, op: Any) -> None:
        if self._closed:
            self._drop(1)
            return
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._drop(1)

    def _drop(self, n: int) -> None:
        with self._lock:
            quiet = self._last_drop is None or self._clock() - self._last_drop > 60
            self._dropped += n
            self._last_drop = self._clock()
            total = self._dropped
        if quiet:  # one line per burst, not one per row
            log.warning("request log: queue full or closed, dropped %d row(s) (%d in total)", n, total)

    def health(self) -> dict[str, Any]:
        return {
            "queued": self._queue.qsize() + self._inflight,
            "written": self._written,
            "dropped": self._dropped,
            "db_ok": self._db_ok,
            "write_errors": self._write_errors,
        }

    def degraded(self) -> bool:
        """True while the database is failing or rows were dropped in the last 10 minutes (SPEC §4.6)."""
        if not self.enabled:
            return False
        last = self._last_drop
        return not self._db_ok or (last is not None and self._clock() - last < DROP_WINDOW_SECS)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued before this call is committed; False on timeout or not running."""
        if not self.enabled or self._thread is None or self._closed:
            return False
        marker = threading.Event()
        try:
            self._queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        self._nudge.set()
        return marker.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Drain everything queued, then stop the writer; idempotent. Later rows are dropped and counted."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        atexit.unregister(self.close)
        if thread is None:  # never started: what was queued can no longer be written
            if self._queue.qsize():
                self._drop(self._queue.qsize())
            return
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        try:
            self._queue.put_nowait(_WAKE)
        except queue.Full:
            pass  # the writer has work and checks _stopping after each batch
        self._nudge.set()
        thread.join(timeout + 1)
        if thread.is_alive():
            log.error("request log: writer still busy %.0f s after shutdown began", timeout)

    # ---- writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug must not pass silently: /health shows the store failing
            log.exception("request log: writer thread crashed; rows are no longer written")
            self._db_ok = False

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        pending: list[Any] = []  # taken from the queue, not yet committed
        due_beat = due_purge = time.monotonic()
        while True:
            stopping = self._stopping.is_set()
            if conn is None:
                conn = self._open()
            if conn is not None and not stopping:
                conn, due_beat, due_purge = self._housekeeping(conn, due_beat, due_purge)
            if not pending:
                due = min(due_beat, due_purge) if self._retains() else due_beat
                wait = self._retry_secs if conn is None else due - time.monotonic()
                try:
                    op = self._queue.get(timeout=wait) if wait > 0 and not stopping else self._queue.get_nowait()
                except queue.Empty:
                    if stopping:
                        break
                    continue
                pending.append(op)
            self._gather(pending, stopping)
            if conn is not None and _file_id(self.path) != self._file:
                # SQLite would go on writing into the unlinked file, and every row would be lost.
                log.warning("request log %s: the database file was deleted or replaced; starting a new one",
                            self.path)
                conn.close()
                conn = self._open()
                if conn is not None:  # register in the new file before writing rows into it
                    conn, due_beat, due_purge = self._housekeeping(conn, time.monotonic(), due_purge)
            if conn is not None:
                try:
                    self._commit(conn, pending)
                    self._inflight = 0
                    continue
                except (sqlite3.Error, OSError) as e:
                    self._failed(conn, e)
                    conn = None
            if stopping and time.monotonic() >= self._deadline:
                self._abandon(pending)
                break
            if stopping:
                time.sleep(0.05)
            else:
                self._stopping.wait(self._retry_secs)
        if conn is not None:
            try:
                logdb.retire(conn, self._token)
            except sqlite3.Error as e:
                log.warning("request log: could not deregister at shutdown: %s", e)
            conn.close()

    def _gather(self, pending: list[Any], stopping: bool) -> None:
        """Fill the batch: what is queued, then what arrived within LINGER_SECS of the first operation.

        At proxy rates the queue holds one or two rows at a time, and a transaction per row would
        cost the request threads more CPU (and the GIL) than the rows themselves. The linger is one
        sleep, not a ``get`` per row: a row put meanwhile does not wake this thread (a wake-up per
        request costs every request a context switch and a GIL hand-off). A flush or close sets
        ``_nudge`` and ends the sleep at once.
        """
        until = time.monotonic() + LINGER_SECS
        self._inflight = sum(isinstance(op, tuple) for op in pending)  # /health counts them as queued
        self._nudge.clear()  # before draining: a marker put after the drain sets it again
        if self._drain(pending) and not stopping:
            self._nudge.wait(max(0.0, until - time.monotonic()))
            self._drain(pending)

    def _drain(self, pending: list[Any]) -> bool:
        """Take what is queued, without waiting; False once the batch is full or ends with a marker."""
        while len(pending) < self._batch_size:
            if not isinstance(pending[-1], tuple):
                return False  # a marker: someone is waiting for this batch
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return True
            pending.append(op)
            self._inflight += isinstance(op, tuple)
        return False

    def _housekeeping(
        self, conn: sqlite3.Connection, due_beat: float, due_purge: float
    ) -> tuple[sqlite3.Connection | None, float, float]:
        """Heartbeat + orphan sweep each HEARTBEAT_SECS; retention once at start, then daily, in chunks."""
        now = time.monotonic()
        try:
            if now >= due_beat:
                logdb.heartbeat(conn, self._token, self._clock(), STALE_SECS)
                due_beat = now + HEARTBEAT_SECS
            if self._retains() and now >= due_purge:
                more = self._purge(conn, self._clock())
                due_purge = now if more else now + RETENTION_EVERY_SECS
        except sqlite3.Error as e:
            self._failed(conn, e)
            return None, due_beat, due_purge
        return conn, due_beat, due_purge

    def _retains(self) -> bool:
        return self.retention_days > 0 or self.capture_retention_days > 0

    def _purge(self, conn: sqlite3.Connection, now: float) -> bool:
        """One chunk of each retention that applies; True while either has more to delete."""
        more = False
        if self.retention_days > 0:
            more = logdb.purge(conn, now - self.retention_days * 86400, RETENTION_CHUNK) >= RETENTION_CHUNK
        if self.capture_retention_days > 0:
            before = now - self.capture_retention_days * 86400
            more = logcaptures.purge(conn, before, RETENTION_CHUNK) >= RETENTION_CHUNK or more
        return more

    def _open(self) -> sqlite3.Connection | None:
        try:
            conn = logdb.open_writer(self.path, self._connect, self._busy_ms)
        except (sqlite3.Error, OSError, ValueError) as e:
            self._failed(None, e)
            return None
        self._file = _file_id(self.path)
        self._ok()
        return conn

    def _ok(self) -> None:
        if not self._db_ok:
            log.info("request log %s: writable again", self.path)
        self._db_ok = True

    def _failed(self, conn: sqlite3.Connection | None, err: BaseException) -> None:
        """Count the error, mark the store unhealthy and drop the connection; the loop reopens later."""
        with self._lock:
            self._write_errors += 1
        if self._db_ok:
            log.warning(
                "request log %s: %s; retrying every %g s, rows stay queued (up to %d)",
                self.path, err, self._retry_secs, self._queue.maxsize,
            )
        self._db_ok = False
        if conn is not None:
            try:
                conn.close()  # also rolls back an open transaction
            except sqlite3.Error:
                pass

    def _commit(self, conn: sqlite3.Connection, ops: list[Any]) -> None:
        """Write ``ops`` (the rows in one transaction, see :func:`_write`); on a bad row fall back to one
        transaction per operation.

        On a database error ``ops`` keeps exactly what is still unwritten, so the retry writes no row twice.
        """
        data = [op for op in ops if isinstance(op, tuple)]
        if data:
            try:
                _write(conn, data, self._token)
            except logdb.ROW_ERRORS:
                self._one_by_one(conn, ops)
            else:
                with self._lock:
                    self._written += sum(op[0] == "insert" for op in data)
        self._ok()
        _release(ops)

    def _one_by_one(self, conn: sqlite3.Connection, ops: list[Any]) -> None:
        """A batch with a bad row: write the others, drop and count the bad ones (retrying cannot fix them)."""
        while ops:
            op = ops[0]
            if isinstance(op, tuple):
                try:
                    _write(conn, [op], self._token)
                    with self._lock:
                        self._written += op[0] == "insert"
                except logdb.ROW_ERRORS as e:
                    key = op[1] if op[0] == "update" else op[1].get("request_id")
                    log.error("request log: rejected %s of %s: %s", op[0], key, e)
                    with self._lock:
                        self._write_errors += 1
                    self._drop(1)
            elif isinstance(op, threading.Event):
                op.set()
            ops.pop(0)

    def _abandon(self, pending: list[Any]) -> None:
        """Shutdown deadline with the database still failing: count what is lost, release flush waiters."""
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        lost = sum(isinstance(op, tuple) for op in pending)
        if lost:
            self._drop(lost)
        self._inflight = 0
        _release(pending)


def _write(conn: sqlite3.Connection, ops: list[tuple], writer: str) -> None:
    """Write queued operations: captures in a transaction of their own, first (they are replaced when
    written again, so a batch retried after a database error may write them twice), then the rows."""
    captures = [op[1] for op in ops if op[0] == CAPTURE]
    if captures:
        with logdb.transaction(conn):
            logcaptures.insert(conn, captures)
    if len(captures) < len(ops):
        logdb.write(conn, [op for op in ops if op[0] != CAPTURE], writer)


def _release(ops: list[Any]) -> None:
    """Done with ``ops``: wake the flush() calls waiting on the markers among them, and empty the list."""
    for op in ops:
        if isinstance(op, threading.Event):
            op.set()
    ops.clear()


def _file_id(path: str) -> tuple[int, int] | None:
    """Which file ``path`` names now (device, inode), or None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
