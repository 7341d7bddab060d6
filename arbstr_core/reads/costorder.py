"""A page of /v1/requests sorted by cost, read from ``idx_requests_hour_cost`` (SPEC §4.8).

A global index on ``cost_sats`` puts each new row's entry in a random place of a big B-tree: about one
more 4 KiB WAL frame per row for the writer. Indexed hour by hour, new entries land in the current
hour's few pages, and a page merges the hours' cost-ordered ranges, reading offset + per_page entries
plus one per hour. Unknown costs sort last in either order, newest or oldest first like the rest.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Sequence
from itertools import islice

from .args import Where


def page_ids(
    conn: sqlite3.Connection, hours: Sequence[str], where: Where, desc: bool, offset: int, limit: int
) -> list[int]:
    """Ids of rows ``offset`` to ``offset + limit`` matching ``where``, by cost, then time, then id.

    ``hours`` (``'2026-05-01T13'``, ascending) must hold every hour a matching row can be in.
    """
    cond, params = where
    d = "DESC" if desc else "ASC"
    sql = (
        "SELECT cost_sats, timestamp, id FROM requests INDEXED BY idx_requests_hour_cost "
        f"WHERE substr(timestamp, 1, 13) = ? AND cost_sats IS NOT NULL AND {cond} "
        f"ORDER BY cost_sats {d}, timestamp {d}, id {d}"
    )
    merged = heapq.merge(*[conn.execute(sql, [hour, *params]) for hour in hours], reverse=desc)
    skipped = sum(1 for _ in islice(merged, offset))
    ids = [r[2] for r in islice(merged, limit)]
    if len(ids) < limit:  # the known costs ran out
        sql = f"SELECT id FROM requests WHERE {cond} AND cost_sats IS NULL ORDER BY timestamp {d}, id {d} LIMIT ? OFFSET ?"
        ids += [r[0] for r in conn.execute(sql, [*params, limit - len(ids), offset - skipped])]
    return ids
