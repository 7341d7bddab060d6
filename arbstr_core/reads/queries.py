"""The SQL reads of the request log behind /v1/stats and /v1/requests (SPEC §4.7, §4.8); parameters: :mod:`.args`.

Each call opens its own short-lived connection (never the writer's) and reads in one transaction, so
counts, sums and percentiles describe the same snapshot; in WAL mode that never blocks the writer.

Sized for a million rows: totals and latency band counts come from the hourly tables (only the
partial hours at the edges of the range, and rows newer than those tables, are summed from
``requests``); latency percentiles come from index walks that the band counts keep short
(:mod:`.percentiles`); a page sorted by cost merges the hours of ``idx_requests_hour_cost``
(:mod:`.costorder`). All results are exact.

Choices where SPEC is silent: latency averages and percentiles cover successful requests (an instant
400 or a 30 s timeout says nothing about speed); percentiles are nearest-rank; unknown costs and
latencies sort last in either order; grouped rows with no model/provider/policy are keyed
``"(none)"``; rows logged before the API was recorded (NULL) count as ``"chat"``, the only API there
was. Savings add up each row's own (log/db.py SUMS), so a group's savings are its rows', whatever the
providers configured now. Costs are shown with msat precision (:func:`.aggregate.sats`).
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from ..errors import ArbstrError
from ..log.db import API_OF_ROW, COLUMNS, KEY_OF_ROW, METRICS, SUMS, Metric, Sum, expected_version
from ..timefmt import format_utc
from . import costorder, percentiles
from .aggregate import NONE_KEY, Totals, bucket_starts, group_key, sats
from .args import Filters, Where, parse_list_args, parse_stats_args

# Percentiles of at most SMALL_SET latencies, or of 1/SORT_SHARE of the table, are sorted in Python
# (about 1 µs a row): cheaper than a walk through the table's rows in a latency band (about a tenth of
# the table, 0.1 µs a row).
SMALL_SET = 5000
SORT_SHARE = 100
# A page sorted by cost merges the hours when at least 1/MERGE_SHARE of the table matches (the merge
# may pass every known cost of the range, 0.1-0.2 µs each); fewer rows are sorted (a few µs each).
MERGE_SHARE = 20
# The band counts of a range are summed hour by hour in the order of the band tables' key (hour, band,
# model, ...), which SQLite does as it reads. Grouped by a later name (provider, policy, api), it would
# sort every band row of the range first; one pass per name costs a fifth of that sort or less (a
# provider's or a policy's pass reads only its own rows: schema.sql indexes them), so up to FEW_NAMES
# names are read one by one.
FEW_NAMES = 4
_FIRST_NAME = "model"
READER_MMAP_BYTES = 1 << 30  # readers map the file: no copy per page, and the OS cache is shared

# The columns a row of /v1/requests shows: all the web layer writes but client_retry_count.
_ROW_NAMES = tuple(c for c in COLUMNS if c != "client_retry_count")
_ROW_COLUMNS = ", ".join(_ROW_NAMES)
_COUNTS = tuple(s for s in SUMS if s.column in ("total", "success", "streaming", "ok_streaming"))  # Totals.count's
# Rows in the table, estimated from the rowids in O(log n) (retention deletes the oldest rows first).
_TABLE_ROWS = "SELECT COALESCE((SELECT MAX(id) FROM requests) - (SELECT MIN(id) FROM requests) + 1, 0)"
# group_by → (key over requests_hourly, key over requests)
_GROUP_SQL = {
    None: ("''", "''"),
    **{column: (column, of_row) for column, of_row in KEY_OF_ROW.items()},
    "day": ("substr(hour, 1, 10)", "substr(timestamp, 1, 10)"),
}


# ---- database ----------------------------------------------------------------------------------


@contextmanager
def reader(db_path: str) -> Iterator[sqlite3.Connection | None]:
    """A read connection holding one snapshot, or None while nothing is logged. Never creates the file."""
    if not os.path.exists(db_path):
        yield None
        return
    uri = "file:" + quote(os.path.abspath(db_path))
    try:
        try:
            conn = sqlite3.connect(uri + "?mode=rw", uri=True, isolation_level=None, timeout=5)
        except sqlite3.OperationalError:  # e.g. `arbstr stats` by a user who may only read the file
            conn = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None, timeout=5)
    except sqlite3.Error as e:
        raise _unavailable(e) from None
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute(f"PRAGMA mmap_size = {READER_MMAP_BYTES}")
        conn.execute("BEGIN")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if 0 < version < expected_version():
            raise ArbstrError(
                503, f"request log {db_path} has schema version {version}; start arbstr once to upgrade it",
                type="server_error", code="log_outdated",
            )
        yield conn if version else None  # no schema yet: the writer has not started
    except sqlite3.Error as e:
        raise _unavailable(e) from None
    finally:
        conn.close()


def _unavailable(err: sqlite3.Error) -> ArbstrError:
    return ArbstrError(503, f"request log unavailable: {err}", type="server_error", code="log_unavailable")


def _hour_floor(dt: datetime) -> datetime:
    return dt.replace(minute=0, second=0, microsecond=0)


# Per group (``key``): sums (log/db.py SUMS, or some of them), then each metric's band counts; from the
# hourly tables (the bands of each hour, which the groups add up: Totals.add_band; see _band_passes), and
# from the rows.
_SUMS_OF_HOURS = "SELECT {key}, {sums} FROM requests_hourly WHERE {cond} GROUP BY 1"
# The inner GROUP BY follows the table's order (hour, band, names: no sort); the outer one adds the hours
# up in C, so Python sees a row per group and band, not one per hour as well.
_BANDS_OF_HOURS = ("SELECT k, band, SUM(n) FROM (SELECT {key} AS k, band, SUM(n) AS n FROM {table} WHERE {cond} "
                   "GROUP BY {band_group}) GROUP BY 1, 2")
_SUMS_OF_ROWS = "SELECT {key}, {sums} FROM {source} WHERE {cond} GROUP BY 1"
_BANDS_OF_ROWS = "SELECT {key}, {band}, COUNT(*) FROM {source} WHERE {cond} AND {ok} GROUP BY 1, 2"


def _totals(
    conn: sqlite3.Connection, f: Filters, group_by: str | None, bands: bool = True, sums: Sequence[Sum] = SUMS
) -> dict[str, Totals]:
    """Sums (and band counts) per group: whole hours from the hourly tables, the rest from requests."""
    roll_key, raw_key = _GROUP_SQL[group_by]
    rollup, raw = _split(conn, f)

    def add_sums(t: Totals, row: Sequence[Any]) -> None:
        t.add(row[1:], sums)

    def add_band(m: Metric) -> Callable[[Totals, Sequence[Any]], None]:
        return lambda t, row: t.add_band(m.name, row[1], row[2])

    jobs = []
    passes = _band_passes(conn, rollup, group_by) if rollup and bands else []
    if rollup:
        cond, params = rollup
        hourly_sums = ", ".join(f"SUM({s.column})" for s in sums)
        jobs.append((_SUMS_OF_HOURS.format(key=roll_key, sums=hourly_sums, cond=cond), params, add_sums))
    for m in METRICS if bands else ():
        jobs += [(_BANDS_OF_HOURS.format(key=roll_key, table=m.table, cond=c, band_group=by), p, add_band(m))
                 for c, p, by in passes]
    row_sums = ", ".join(s.of_rows for s in sums)
    for source, cond, params in raw:
        jobs.append((_SUMS_OF_ROWS.format(key=raw_key, sums=row_sums, source=source, cond=cond), params, add_sums))
        for m in METRICS if bands else ():
            sql = _BANDS_OF_ROWS.format(key=raw_key, band=m.band_of_row, source=source, cond=cond, ok=m.ok_unindexed)
            jobs.append((sql, params, add_band(m)))
    out: dict[str, Totals] = {}
    for sql, params, add in jobs:
        for row in conn.execute(sql, params):
            key = group_key(row[0])
            t = out.get(folded := key.casefold())
            if t is None:  # a Totals is made once a group (thousands of band rows come per group)
                t = out[folded] = Totals(label=key)
            add(t, row)
    return out


def _band_passes(conn: sqlite3.Connection, rollup: Where, group_by: str | None) -> list[tuple[str, list[Any], str]]:
    """The passes that read the hourly band counts of ``rollup`` per group (FEW_NAMES): (condition,
    parameters, GROUP BY) each."""
    cond, params = rollup
    if group_by in (None, "hour", "day"):
        return [(cond, params, "hour, band")]
    if group_by != _FIRST_NAME:
        names = [r[0] for r in conn.execute(f"SELECT DISTINCT {group_by} FROM requests_hourly WHERE {cond}", params)]
        if len(names) <= FEW_NAMES:  # the hourly tables' names compare as the groups do (NOCASE; api exactly)
            return [(f"{cond} AND {group_by} = ?", [*params, name], "hour, band") for name in names]
    return [(cond, params, f"hour, band, {group_by}")]


def _split(conn: sqlite3.Connection, f: Filters) -> tuple[Where | None, list[tuple[str, str, list[Any]]]]:
    """Where the range's rows are: whole hours in the hourly tables (a condition over them), except the
    rows newer than those tables; these and the partial hours at both edges in requests (source,
    condition, parameters)."""
    first_full = _hour_floor(f.since) if f.since == _hour_floor(f.since) else _hour_floor(f.since) + timedelta(hours=1)
    last_full = _hour_floor(f.until)
    if first_full >= last_full:
        return None, [("requests", *f.where())]
    upto = conn.execute("SELECT upto FROM rollup_state").fetchone()[0]
    clauses, params = ["hour >= ?", "hour < ?"], [format_utc(first_full)[:13], format_utc(last_full)[:13]]
    for col in ("model", "provider", "policy", "api"):  # the hourly tables hold a NULL api as 'chat'
        if getattr(f, col) is not None:
            clauses.append(f"{col} = ?")
            params.append(getattr(f, col))
    cond, tail_params = f.where(first_full, last_full)
    # The rows newer than the hourly tables are the last few ids: NOT INDEXED keeps SQLite on the rowid.
    raw = [("requests NOT INDEXED", f"id > ? AND {cond}", [upto, *tail_params])]
    raw += [("requests", *f.where(start, end)) for start, end in ((f.since, first_full), (last_full, f.until)) if start < end]
    return (" AND ".join(clauses), params), raw


def _percentiles(conn: sqlite3.Connection, m: Metric, where: Where, t: Totals, table_rows: int) -> list[Any]:
    """The metric's nearest-rank percentiles over the successful rows matching ``where``, which ``t`` totals."""
    n = t.measured(m.name)
    if n <= 0:
        return [None] * len(m.percentiles)
    if n <= max(SMALL_SET, table_rows // SORT_SHARE):
        return percentiles.by_sorting(conn, m, where)
    return percentiles.in_bands(conn, m, where, t.bands[m.name])


def _bucket_percentiles(conn: sqlite3.Connection, m: Metric, f: Filters, group_by: str, t: Totals,
                        table_rows: int) -> list[Any]:
    """A group's percentiles; an hour walks its own rows in the metric's hourly index, from its bands."""
    where = _group_where(f, group_by, t.label)
    if group_by == "hour" and t.measured(m.name) > 0:
        return percentiles.in_bands(conn, m, where, t.bands[m.name], hour=t.label)
    return _percentiles(conn, m, where, t, table_rows)


def _group_where(f: Filters, group_by: str, key: str) -> Where:
    if group_by in ("hour", "day"):
        start = datetime.fromisoformat(key + (":00:00+00:00" if group_by == "hour" else "T00:00:00+00:00"))
        end = start + (timedelta(hours=1) if group_by == "hour" else timedelta(days=1))
        return f.where(max(start, f.since), min(end, f.until))
    where, params = f.where()
    if group_by == "api":
        return f"{where} AND {API_OF_ROW} = ?", [*params, "" if key == NONE_KEY else key]
    if key == NONE_KEY:
        return f"{where} AND ({group_by} IS NULL OR {group_by} = '')", params
    return f"{where} AND {group_by} = ?", [*params, key]


def stats(db_path: str, args: Mapping[str, str], now: datetime | None = None) -> dict[str, Any]:
    """The /v1/stats document (SPEC §4.7); zeros when nothing was logged yet. Savings come from the rows
    (each row's ``max_cost_sats``, set when it was written), not from the providers configured now."""
    f, group_by = parse_stats_args(args, now)
    starts = bucket_starts(f.since, f.until, group_by) if group_by in ("hour", "day") else []
    result: dict[str, Any] = {"since": format_utc(f.since), "until": format_utc(f.until)}
    totals: dict[str, Totals] = {}
    overall = Totals()
    with reader(db_path) as conn:
        if conn is not None:
            table_rows = conn.execute(_TABLE_ROWS).fetchone()[0]
            totals = _totals(conn, f, group_by)
            overall = Totals.merge(totals.values())
            for m in METRICS:
                overall.percentiles[m.name] = _percentiles(conn, m, f.where(), overall, table_rows)
                for t in totals.values() if group_by else ():
                    t.percentiles[m.name] = _bucket_percentiles(conn, m, f, group_by, t, table_rows)
    result.update(overall.document())
    if group_by in ("hour", "day"):
        result["groups"] = [
            {"start": format_utc(s), **totals.get(_bucket_label(s, group_by), Totals()).document()} for s in starts
        ]
    elif group_by:
        result["groups"] = {t.label: t.document() for t in sorted(totals.values(), key=lambda t: t.label)}
    return result


def _bucket_label(start: datetime, group_by: str) -> str:
    return format_utc(start)[: 13 if group_by == "hour" else 10].casefold()


# ---- listing -----------------------------------------------------------------------------------


def _row(values: Sequence[Any]) -> dict[str, Any]:
    """A row of /v1/requests from the _ROW_COLUMNS of requests (anything selected after them is ignored)."""
    r = dict(zip(_ROW_NAMES, values))
    error_type, message = r["error_type"], r["error_message"]
    return {
        "request_id": r["request_id"], "timestamp": r["timestamp"],
        "api": "chat" if r["api"] is None else r["api"],  # NULL: logged before version 3, through chat completions
        "model": r["model"],  # as the client named it
        "routed_model": r["model"] if r["routed_model"] is None else r["routed_model"],  # what providers were sent
        "provider": r["provider"], "policy": r["policy"], "streaming": bool(r["streaming"]), "status": r["status"],
        "success": bool(r["success"]), "http_status": r["http_status"],
        "tokens": {"input": r["input_tokens"], "output": r["output_tokens"], "cached": r["cached_tokens"],
                   "reasoning": r["reasoning_tokens"]},
        "cost_sats": sats(r["cost_sats"]), "cost_source": r["cost_source"],
        "rates_cost_sats": sats(r["rates_cost_sats"]), "max_cost_sats": sats(r["max_cost_sats"]),
        "timing": {
            "latency_ms": r["latency_ms"], "ttft_ms": r["ttft_ms"], "stream_duration_ms": r["stream_duration_ms"],
            "output_tokens_per_sec": r["output_tokens_per_sec"],
        },
        "retries": r["retries"],
        "error": {"type": error_type, "message": message} if error_type is not None or message is not None else None,
    }


def _count(conn: sqlite3.Connection, f: Filters) -> int:
    """Matching rows, from the rollup: it counts successes, streams and successful streams."""
    t = Totals.merge(_totals(conn, replace(f, success=None, streaming=None), None, False, _COUNTS).values())
    return t.count(f.success, f.streaming)


def list_requests(db_path: str, args: Mapping[str, str], now: datetime | None = None) -> dict[str, Any]:
    """One page of /v1/requests (SPEC §4.8)."""
    f, page, per_page, sort, order = parse_list_args(args, now)
    where, params = f.where()
    direction = order.upper()
    order_by = f"timestamp {direction}, id {direction}"
    if sort != "timestamp":
        order_by = f"{sort} {direction} NULLS LAST, {order_by}"
    offset = (page - 1) * per_page
    total, data = 0, []
    with reader(db_path) as conn:
        if conn is not None:
            total = _count(conn, f)
            table_rows = conn.execute(_TABLE_ROWS).fetchone()[0]
            if offset < total and sort == "cost_sats" and total * MERGE_SHARE > table_rows:
                ids = costorder.page_ids(conn, _hours(conn, f), (where, params), order == "desc", offset, per_page)
                data = _rows_by_id(conn, ids)
            elif offset < total:
                # Walking the latency index visits about (offset + per_page) * table / total entries; sorting
                # visits total rows. The planner cannot know which is cheaper, so say so.
                walk = sort == "latency_ms" and (offset + per_page) * table_rows < total * total
                index = "INDEXED BY idx_requests_latency" if walk else ""
                sql = f"SELECT {_ROW_COLUMNS} FROM requests {index} WHERE {where} ORDER BY {order_by} LIMIT ? OFFSET ?"
                data = [_row(r) for r in conn.execute(sql, [*params, per_page, offset])]
    return {"data": data, "page": page, "per_page": per_page, "total": total, "total_pages": math.ceil(total / per_page)}


def _hours(conn: sqlite3.Connection, f: Filters) -> list[str]:
    """The hours of [since, until) that hold rows: the rollup's, and those of rows newer than it."""
    upto = conn.execute("SELECT upto FROM rollup_state").fetchone()[0]
    since, until = format_utc(f.since), format_utc(f.until)
    sql = (
        "SELECT hour FROM requests_hourly WHERE hour >= ? AND hour <= ? UNION "
        "SELECT substr(timestamp, 1, 13) FROM requests NOT INDEXED WHERE id > ? AND timestamp >= ? AND timestamp < ?"
    )
    return [r[0] for r in conn.execute(sql, [since[:13], until[:13], upto, since, until])]


def _rows_by_id(conn: sqlite3.Connection, ids: Sequence[int]) -> list[dict[str, Any]]:
    sql = f"SELECT {_ROW_COLUMNS}, id FROM requests WHERE id IN ({', '.join('?' * len(ids))})"
    rows = {r[-1]: r for r in conn.execute(sql, ids)}
    return [_row(rows[i]) for i in ids]


def get_request(db_path: str, request_id: str) -> dict[str, Any] | None:
    """One row by its request id, or None."""
    with reader(db_path) as conn:
        if conn is None:
            return None
        r = conn.execute(f"SELECT {_ROW_COLUMNS} FROM requests WHERE request_id = ?", (request_id,)).fetchone()
    return _row(r) if r else None
