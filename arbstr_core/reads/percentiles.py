"""Exact nearest-rank latency percentiles over a million rows, without sorting them in Python (SPEC §4.7).

Each function returns the latencies at the p50/p95/p99 ranks among the successful requests with a
latency that match ``where`` (an SQL condition over ``requests`` and its parameters). They differ in
how SQLite reaches a rank; every step runs in C inside SQLite, which skips index entries at several
million a second:

- ``by_sorting``: fetch the set and sort it; for small sets.
- ``in_hour``: walk ``idx_requests_hour_latency`` within one hour, ``LIMIT 1 OFFSET k`` from the nearer
  end; it visits only that hour's rows.
- ``in_bands``: the hourly band counts (schema.sql ``requests_latency_hourly``) say which power-of-two
  band holds rank k and how many of the set's latencies lie below it, so the walk in
  ``idx_requests_latency`` starts at that band's nearer edge: it visits the table's rows of part of
  one band, not half the table.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from ..log.db import TIMED_OK, TIMED_OK_UNINDEXED
from .aggregate import PERCENTILES, percentile_ranks
from .args import Where


def by_sorting(conn: sqlite3.Connection, where: Where) -> list[Any]:
    """Fetch and sort: cheapest for a few thousand rows."""
    cond, params = where
    sql = f"SELECT latency_ms FROM requests WHERE {cond} AND {TIMED_OK_UNINDEXED}"  # narrowed by time/name
    values = sorted(r[0] for r in conn.execute(sql, params))
    return [values[k] for k in percentile_ranks(len(values))] if values else [None] * len(PERCENTILES)


def in_hour(conn: sqlite3.Connection, hour: str, where: Where, n: int) -> list[Any]:
    """Walk one hour (``'2026-05-01T13'``) of the hourly latency index; ``n`` latencies match."""
    cond, params = where
    out = []
    for k in percentile_ranks(n):
        up = k <= n - 1 - k
        sql = (
            "SELECT latency_ms FROM requests INDEXED BY idx_requests_hour_latency WHERE substr(timestamp, 1, 13) = ? "
            f"AND {TIMED_OK} AND {cond} ORDER BY latency_ms {'ASC' if up else 'DESC'} LIMIT 1 OFFSET ?"
        )
        out.append(_first(conn, sql, [hour, *params, k if up else n - 1 - k]))
    return out


def in_bands(conn: sqlite3.Connection, where: Where, bands: Mapping[int, int]) -> list[Any]:
    """Walk from the edge of the band holding each rank; ``bands`` maps a band's lower edge to how many
    of the set's latencies it holds (they must add up to the set exactly)."""
    cond, params = where
    edges = [*sorted(lo for lo, count in bands.items() if count), math.inf]
    out = []
    i, below = 0, 0  # the band edges[i], and how many of the set's latencies lie below it
    for k in percentile_ranks(sum(bands.values())):
        while below + bands[edges[i]] <= k:
            below += bands[edges[i]]
            i += 1
        inside = bands[edges[i]]
        if k - below <= below + inside - 1 - k:
            bound, op, order, offset = edges[i], ">=", "ASC", k - below
        else:
            bound, op, order, offset = edges[i + 1], "<", "DESC", below + inside - 1 - k
        sql = (
            f"SELECT latency_ms FROM requests INDEXED BY idx_requests_latency WHERE {TIMED_OK} AND latency_ms {op} ? "
            f"AND {cond} ORDER BY latency_ms {order} LIMIT 1 OFFSET ?"
        )
        out.append(_first(conn, sql, [bound, *params, offset]))
    return out


def _first(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row else None
