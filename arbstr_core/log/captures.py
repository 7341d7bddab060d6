"""The SQL of debug captures (schema.sql ``debug_captures``; README "Debug capture").

Plain functions over one ``sqlite3.Connection``, like :mod:`.db`: the writer thread inserts and purges
on its own connection, the ``/v1/requests/<id>/debug`` route reads on a short-lived one. A capture
arrives already scrubbed and cut to size (:mod:`arbstr_core.request.debug`); nothing here looks inside it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from . import db as logdb

COLUMNS = ("request_id", "timestamp", "capture", "bytes", "truncated")
# OR REPLACE: a batch the writer retries after a database error may hold a capture it already wrote.
_INSERT = f"INSERT OR REPLACE INTO debug_captures ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def insert(conn: sqlite3.Connection, captures: Sequence[Mapping[str, Any]]) -> None:
    """Store ``captures`` (rows keyed by COLUMNS); call inside a write transaction."""
    conn.executemany(_INSERT, ([c[k] for k in COLUMNS] for c in captures))


def get(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    """One request's capture as the route shows it, or None."""
    found = conn.execute(
        "SELECT request_id, timestamp, truncated, bytes, capture FROM debug_captures WHERE request_id = ?",
        (request_id,),
    ).fetchone()
    if found is None:
        return None
    request_id, timestamp, truncated, size, capture = found
    return {"request_id": request_id, "timestamp": timestamp, "truncated": bool(truncated), "bytes": size,
            "capture": json.loads(capture)}


def purge(conn: sqlite3.Connection, before: float, chunk: int) -> int:
    """Delete up to ``chunk`` captures older than the Unix time ``before``; return how many went."""
    return logdb.purge(conn, before, chunk, "debug_captures", "request_id", "debug capture(s)")
