"""The request log's storage failing under a running arbstr (real gunicorn): disk full, database locked by
another process, read-only database (filesystem and file modes), database deleted.

In every case completions keep being served and the database fault shows as ``/health`` ``degraded``
(``log.db_ok`` false) while it lasts. Rows wait in the writer's queue (the log store retries every
5 s, after a 5 s busy timeout when locked) and are all written once the fault clears, exactly once.

Faults a kernel will not inflict on an open file are provoked at (re)open instead, and said so:
a filesystem cannot be remounted read-only while SQLite holds the database open for writing, and a
``chmod`` does not affect an already open descriptor (asserted: the writer keeps writing). A
deleted database is the one fault the log store does not notice (see that test).

Disk full and read-only filesystems use a small tmpfs (we run as root in CI); without the privilege
those tests skip and ``test_disk_full_at_unit_level`` still covers the disk-full path of the log
store by injecting ``sqlite3.OperationalError: database or disk is full``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ArbstrServer, write_config

from arbstr_core.log.writer import LogStore
from arbstr_core.timefmt import utc_timestamp

DEADLINE = 60.0  # generous: the machine is shared; recovery itself takes one 5 s retry (+5 s busy wait)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll ``condition`` (state another process owns: nothing to wait on but polls) until truthy."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)
    return value


def log_health(server: ArbstrServer) -> dict[str, Any]:
    r = server.get("/health")
    assert r.status_code == 200, r.text
    return r.json()


def degraded(server: ArbstrServer) -> bool:
    h = log_health(server)
    return h["status"] == "degraded" and h["log"]["db_ok"] is False


def healthy_with(server: ArbstrServer, written: int) -> bool:
    h = log_health(server)
    return h["status"] == "ok" and h["log"]["db_ok"] is True and h["log"]["written"] >= written \
        and h["log"]["queued"] == 0


def rows(db: Path) -> dict[str, sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: r for r in con.execute("SELECT * FROM requests")}
    finally:
        con.close()


def serve_some(server: ArbstrServer, n: int = 4) -> list[tuple[str, bool]]:
    """``n`` completions, every other one streamed; all must succeed. Returns (request id, streamed)."""
    out = []
    for i in range(n):
        stream = i % 2 == 1
        r = server.chat(stream=stream, content=f"during the fault {i}")
        assert r.status_code == 200, r.text[:300]
        if stream:
            assert r.content.rstrip().endswith(b"data: [DONE]")
        out.append((r.headers["x-arbstr-request-id"], stream))
    return out


def assert_rows(db: Path, answered: list[tuple[str, bool]]) -> None:
    """Every answered request has exactly its row, a stream's finished (its update applied after its insert)."""
    logged = rows(db)
    for rid, stream in answered:
        assert rid in logged, f"row of {rid} lost"
        row = logged[rid]
        assert row["http_status"] == 200 and row["success"] == 1
        assert row["status"] == ("complete" if stream else "ok"), dict(row)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("SELECT COUNT(*) - COUNT(DISTINCT request_id) FROM requests").fetchone()[0] == 0
    finally:
        con.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("2m")`` → a fresh tmpfs mount of that size under tmp_path (skips without the privilege)."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        target = tmp_path / f"tmpfs-{len(mounts)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(target)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); see test_disk_full_at_unit_level")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        # Lazy: a gunicorn the test's teardown has not reaped yet may still hold a file open.
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def remount(target: Path, mode: str) -> None:
    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(target)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------------
# Disk full


def test_disk_full_then_freed(fake_upstream, make_config, gunicorn_server, tmpfs) -> None:
    disk = tmpfs("2m")
    db = disk / "arbstr.db"
    server = gunicorn_server(make_config([fake_upstream()], database={"path": str(db)}))
    before = serve_some(server, 2)
    wait_until(lambda: healthy_with(server, 2), "the first rows written")

    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):  # ENOSPC: the point
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)

    during = serve_some(server)
    wait_until(lambda: degraded(server), "/health degraded while the disk is full")
    assert server.chat().status_code == 200  # still serving while degraded
    during += serve_some(server, 2)
    stats = server.get("/v1/stats")
    assert stats.status_code == 200 and stats.json()["counts"]["total"] >= 2  # reads still work
    assert log_health(server)["log"]["queued"] >= len(during)  # waiting, not dropped
    assert log_health(server)["log"]["dropped"] == 0

    filler.unlink()
    wait_until(lambda: healthy_with(server, 2 + len(during) + 1), "rows written once space is back")
    assert server.stop() == 0
    assert_rows(db, before + during)
    assert "database or disk is full" in server.log_text() and "writable again" in server.log_text()


def test_disk_full_at_unit_level(tmp_path: Path) -> None:
    """The same fault injected below the log store (runs without root): rows stay queued, the store is
    degraded, and everything is written exactly once when the disk has room again."""
    full = False

    class FullDisk(sqlite3.Connection):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            if full and sql.lstrip().upper().startswith(("INSERT", "UPDATE", "COMMIT")):
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)

        def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:  # type: ignore[override]
            if full:
                raise sqlite3.OperationalError("database or disk is full")
            return super().executemany(sql, *args)

    def connect(path: str) -> sqlite3.Connection:
        return sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=FullDisk)

    db = tmp_path / "log.db"
    store = LogStore(str(db), connect=connect, retry_secs=0.05)
    store.start()
    try:
        ids = [str(uuid.uuid4()) for _ in range(6)]
        store.insert(_row(ids[0]))
        assert store.flush(10) and store.health()["written"] == 1
        full = True
        for rid in ids[1:]:
            store.insert(_row(rid))
        wait_until(lambda: store.degraded() and store.health()["write_errors"] >= 2, "degraded while full", 10)
        assert store.health()["queued"] == 5 and store.health()["dropped"] == 0
        full = False
        assert store.flush(10)
        assert not store.degraded() and store.health()["written"] == 6
    finally:
        store.close()
    assert set(rows(db)) == set(ids)


def _row(request_id: str) -> dict[str, Any]:
    return {"request_id": request_id, "timestamp": utc_timestamp(), "model": "gpt-4o", "provider": "p",
            "policy": None, "streaming": False, "status": "ok", "success": True, "http_status": 200,
            "input_tokens": 1, "output_tokens": 2, "cost_sats": 0.5, "latency_ms": 3, "ttft_ms": None,
            "stream_duration_ms": None, "retries": None, "error_type": None, "error_message": None,
            "client_retry_count": None}


# ---------------------------------------------------------------------------------------------------
# Locked by another process


def test_locked_by_another_process(fake_upstream, make_config, gunicorn_server, tmp_path: Path) -> None:
    db = tmp_path / "arbstr.db"
    server = gunicorn_server(make_config([fake_upstream()]))
    before = serve_some(server, 2)
    wait_until(lambda: healthy_with(server, 2), "the first rows written")

    holder = subprocess.Popen(["sqlite3", str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write("BEGIN EXCLUSIVE;\nSELECT 'locked';\n")  # WAL: takes the write lock at BEGIN
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read() if holder.poll() else ""

        during = serve_some(server)
        # The writer waits out its busy timeout (5 s), then reports the lock and retries.
        wait_until(lambda: degraded(server), "/health degraded while another process holds the lock")
        during += serve_some(server, 2)
        # WAL: readers are not blocked by another writer, so the read API keeps answering.
        listing = server.get("/v1/requests", params={"per_page": 100})
        assert listing.status_code == 200 and {r["request_id"] for r in listing.json()["data"]} >= {
            rid for rid, _ in before}
        assert log_health(server)["log"]["dropped"] == 0

        holder.stdin.write("ROLLBACK;\n.quit\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    wait_until(lambda: healthy_with(server, 2 + len(during)), "rows written once the lock is released")
    assert server.stop() == 0
    assert_rows(db, before + during)
    assert "database is locked" in server.log_text()


# ---------------------------------------------------------------------------------------------------
# Read-only


def test_read_only_filesystem(fake_upstream, make_config, gunicorn_server, tmpfs) -> None:
    """Linux refuses to remount a filesystem read-only while a file on it is open for writing (EBUSY),
    so the database is made read-only between two runs: the second run starts on a read-only mount,
    serves, is degraded, and writes its queued rows when the mount is made writable again."""
    disk = tmpfs("4m")
    db = disk / "arbstr.db"
    config = make_config([fake_upstream()], database={"path": str(db)})
    first = gunicorn_server(config)
    before = serve_some(first, 2)
    assert first.stop() == 0
    remount(disk, "ro")  # nothing holds the database open now

    server = gunicorn_server(config)
    during = serve_some(server)
    wait_until(lambda: degraded(server), "/health degraded on a read-only filesystem")
    assert log_health(server)["log"]["queued"] >= len(during)
    # The read API opens the database itself: the old rows, or a clean 503, never a crash.
    listing = server.get("/v1/requests")
    if listing.status_code == 200:
        assert {r["request_id"] for r in listing.json()["data"]} == {rid for rid, _ in before}
    else:
        assert listing.status_code == 503 and listing.json()["error"]["code"] == "log_unavailable", listing.text

    remount(disk, "rw")
    wait_until(lambda: healthy_with(server, len(during)), "rows written once the filesystem is writable")
    assert server.stop() == 0
    assert_rows(db, before + during)
    assert "Traceback" not in server.log_text()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory an unprivileged worker can reach (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="arbstr-faults-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_read_only_database_file(fake_upstream, gunicorn_server, open_dir: Path) -> None:
    """File modes, with the worker as an unprivileged user (root ignores them). A chmod while running
    changes nothing: SQLite's descriptor was opened read-write and stays so (asserted). A database that
    is read-only when the writer opens it (next start) is the fault: degraded, serving, and written once
    the modes are back."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user to run the worker as")
    if os.geteuid() != 0:
        pytest.skip("gunicorn --user needs root")
    data = open_dir / "data"
    data.mkdir()
    os.chown(data, nobody.pw_uid, nobody.pw_gid)
    db = data / "arbstr.db"
    config = write_config(open_dir, [fake_upstream()], database={"path": str(db)})
    os.chown(config, nobody.pw_uid, nobody.pw_gid)  # the worker reads it; still mode 0600
    as_nobody = ["--user", str(nobody.pw_uid), "--group", str(nobody.pw_gid)]

    first = gunicorn_server(config, args=as_nobody)
    before = serve_some(first, 2)
    wait_until(lambda: healthy_with(first, 2), "the first rows written")
    files = list(data.glob("arbstr.db*"))
    for f in files:
        f.chmod(0o444)
    data.chmod(0o555)
    before += serve_some(first, 2)
    wait_until(lambda: healthy_with(first, 4), "an open descriptor keeps writing after chmod")
    assert first.stop() == 0

    server = gunicorn_server(config, args=as_nobody)
    during = serve_some(server)
    wait_until(lambda: degraded(server), "/health degraded with a read-only database file")
    stats = server.get("/v1/stats")
    assert stats.status_code == 200 and stats.json()["counts"]["total"] == 4  # reading is fine
    data.chmod(0o755)
    for f in data.glob("arbstr.db*"):
        f.chmod(0o644)
    wait_until(lambda: healthy_with(server, len(during)), "rows written once the file is writable")
    assert server.stop() == 0
    assert_rows(db, before + during)
    assert "attempt to write a readonly database" in server.log_text()


# ---------------------------------------------------------------------------------------------------
# Deleted


def test_database_deleted_while_running(fake_upstream, make_config, gunicorn_server, tmp_path: Path) -> None:
    db = tmp_path / "arbstr.db"
    server = gunicorn_server(make_config([fake_upstream()]))
    before = serve_some(server, 2)
    wait_until(lambda: healthy_with(server, 2), "the first rows written")
    for f in tmp_path.glob("arbstr.db*"):
        f.unlink()

    during = serve_some(server)
    for path in ("/v1/stats", "/v1/requests", f"/v1/requests/{before[0][0]}", "/health"):
        r = server.get(path)
        assert r.status_code in (200, 404, 503) and r.headers["Content-Type"] == "application/json", (path, r.text)
    # The old rows went with the file; the new file holds at most the rows answered since.
    assert server.get("/v1/stats").json()["counts"]["total"] <= len(during)
    assert server.stop() == 0  # drains the queue

    # The writer noticed its file was gone and started a new one at database.path: requests answered
    # after the deletion keep their rows.
    assert_rows(db, during)
    assert "the database file was deleted or replaced" in server.log_text()
