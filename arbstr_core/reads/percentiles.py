"""Exact nearest-rank percentiles over a million rows, without sorting them in Python (SPEC §4.7).

Each function returns a metric's values (log/db.py METRICS: latency, first-token time, speed) at its
percentile ranks, among the successful requests with that value that match ``where`` (an SQL condition
over ``requests`` and its parameters). They differ in how SQLite reaches a rank; every step runs in C
inside SQLite, which skips index entries at several million a second:

- ``by_sorting``: fetch the set and sort it; for small sets.
- ``in_bands``: the hourly band counts (schema.sql ``requests_latency_hourly``, ...) say which band holds
  rank k and how many of the set's values lie below it, so the walk in the metric's index
  (``idx_requests_latency``, ...) starts at that band's nearer edge, ``LIMIT 1 OFFSET`` the rest: it
  visits the table's rows of part of one band, not half the table. Within one hour it walks the
  metric's hourly index (``idx_requests_hour_latency``, ...): part of one band of that hour.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ..log.db import Metric
from .aggregate import percentile_ranks
from .args import Where


def by_sorting(conn: sqlite3.Connection, m: Metric, where: Where) -> list[Any]:
    """Fetch and sort: cheapest for a few thousand rows."""
    cond, params = where
    sql = f"SELECT {m.column} FROM requests WHERE {cond} AND {m.ok_unindexed}"  # narrowed by time/name
    values = sorted(r[0] for r in conn.execute(sql, params))
    return [values[k] for k in percentile_ranks(len(values), m.percentiles)] if values else [None] * len(m.percentiles)


def in_bands(conn: sqlite3.Connection, m: Metric, where: Where, bands: Mapping[int, int],
             hour: str | None = None) -> list[Any]:
    """Walk from the edge of the band holding each rank; ``bands`` maps a band's lower edge to how many
    of the set's values it holds (they must add up to the set exactly). Given an ``hour``
    (``'2026-05-01T13'``) that holds the whole set, the walk stays in that hour's part of the index."""
    cond, params = where
    index, within = (m.hour_index, "substr(timestamp, 1, 13) = ? AND ") if hour else (m.index, "")
    edges = [*sorted(lo for lo, count in bands.items() if count), math.inf]
    out = []
    i, below = 0, 0  # the band edges[i], and how many of the set's values lie below it
    for k in percentile_ranks(sum(bands.values()), m.percentiles):
        while below + bands[edges[i]] <= k:
            below += bands[edges[i]]
            i += 1
        inside = bands[edges[i]]
        if k - below <= below + inside - 1 - k:
            bound, op, order, offset = edges[i], ">=", "ASC", k - below
        else:
            bound, op, order, offset = edges[i + 1], "<", "DESC", below + inside - 1 - k
        sql = (
            f"SELECT {m.column} FROM requests INDEXED BY {index} WHERE {within}{m.ok} AND {m.column} {op} ? "
            f"AND {cond} ORDER BY {m.column} {order} LIMIT 1 OFFSET ?"
        )
        out.append(_first(conn, sql, [*([hour] if hour else []), bound, *params, offset]))
    return out


def _first(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None
