"""Query parameters of /v1/stats and /v1/requests, validated into :class:`Filters` (SPEC §4.7, §4.8).

Every bad value is a 400 that names the parameter and says what it accepts. Time ranges are
half-open, ``[since, until)``; a time without an offset is UTC.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import bad_request
from ..log.db import API_OF_ROW, APIS
from ..timefmt import format_utc

RANGES = {
    "last_1h": timedelta(hours=1),
    "last_24h": timedelta(hours=24),
    "last_7d": timedelta(days=7),
    "last_30d": timedelta(days=30),
}
DEFAULT_RANGE = "last_7d"
GROUP_BY = ("model", "provider", "policy", "api", "hour", "day")
SORTS = ("timestamp", "cost_sats", "latency_ms")
ORDERS = ("asc", "desc")
MAX_PER_PAGE = 100

Where = tuple[str, list[Any]]  # an SQL condition over requests, and its parameters


@dataclass(frozen=True)
class Filters:
    """Validated query filters; ``where()`` turns them into SQL over ``requests``."""

    since: datetime
    until: datetime
    model: str | None = None
    provider: str | None = None
    policy: str | None = None
    success: bool | None = None
    streaming: bool | None = None
    api: str | None = None  # one of log/db.py APIS

    def where(self, since: datetime | None = None, until: datetime | None = None) -> Where:
        """The filters over ``[since, until)`` (by default the filters' own range)."""
        clauses = ["timestamp >= ?", "timestamp < ?"]
        params: list[Any] = [format_utc(since or self.since), format_utc(until or self.until)]
        for col in ("model", "provider", "policy"):
            if getattr(self, col) is not None:
                clauses.append(f"{col} = ?")  # the columns are COLLATE NOCASE: case-insensitive, indexed
                params.append(getattr(self, col))
        for col in ("success", "streaming"):
            if getattr(self, col) is not None:
                clauses.append(f"{col} = ?")
                params.append(int(getattr(self, col)))
        if self.api is not None:
            clauses.append(f"{API_OF_ROW} = ?")  # a row logged before version 3 (NULL) came through chat
            params.append(self.api)
        return " AND ".join(clauses), params


def _arg(args: Mapping[str, str], name: str) -> str | None:
    value = args.get(name)
    return value.strip() or None if isinstance(value, str) else None


def _choice(args: Mapping[str, str], name: str, accepted: Sequence[str], default: str | None) -> str | None:
    value = _arg(args, name)
    if value is None:
        return default
    if value not in accepted:
        raise bad_request(
            f"invalid {name} '{value}': accepted values are {', '.join(accepted)}", "invalid_parameter", name
        )
    return value


_TOO_EARLY = datetime(1, 1, 8, tzinfo=UTC)
_TOO_LATE = datetime(9999, 12, 24, tzinfo=UTC)


def _time(name: str, value: str) -> datetime:
    # An unencoded '+' in a query string arrives as a space: "...T10:00:00 02:00".
    value = re.sub(r"(T[\d:.]+) (\d\d:?\d\d)$", r"\1+\2", value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(
            f"invalid {name} '{value}': expected an ISO 8601 time such as 2026-05-01T12:00:00Z "
            "(Z or an offset; no offset means UTC)", "invalid_parameter", name,
        ) from None
    try:
        dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except OverflowError:  # an offset pushes it past year 1 or 9999
        dt = _TOO_EARLY
    if not _TOO_EARLY < dt < _TOO_LATE:  # room for the 7-day default range and hour buckets around it
        raise bad_request(f"invalid {name} '{value}': out of range (years 1 to 9999, a week from either end)", "invalid_parameter", name)
    return dt


def _bool(args: Mapping[str, str], name: str) -> bool | None:
    value = _arg(args, name)
    if value is None:
        return None
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise bad_request(f"invalid {name} '{value}': accepted values are true, false", "invalid_parameter", name)


def _int(args: Mapping[str, str], name: str, default: int, low: int, high: int | None) -> int:
    value = _arg(args, name)
    if value is None:
        return default
    bounds = f"an integer from {low} to {high}" if high is not None else f"an integer ≥ {low}"
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low or (high is not None and number > high):
        raise bad_request(f"invalid {name} '{value}': expected {bounds}", "invalid_parameter", name)
    return number


def parse_filters(args: Mapping[str, str], now: datetime | None = None) -> Filters:
    """``range`` (default last_7d) or ``since``/``until``, exact case-insensitive name filters, and ``api``."""
    now = now or datetime.now(UTC)
    range_ = _choice(args, "range", tuple(RANGES), None)
    since, until = _arg(args, "since"), _arg(args, "until")
    if range_ and (since or until):
        raise bad_request("give either range or since/until, not both", "invalid_parameter", "range")
    end = _time("until", until) if until else now
    start = _time("since", since) if since else end - RANGES[range_ or DEFAULT_RANGE]
    if start > end:
        raise bad_request(f"since ({format_utc(start)}) is after until ({format_utc(end)})", "invalid_parameter", "since")
    return Filters(start, end, _arg(args, "model"), _arg(args, "provider"), _arg(args, "policy"),
                   api=_choice(args, "api", APIS, None))


def parse_stats_args(args: Mapping[str, str], now: datetime | None = None) -> tuple[Filters, str | None]:
    """The /v1/stats parameters: filters and group_by."""
    return parse_filters(args, now), _choice(args, "group_by", GROUP_BY, None)


def parse_list_args(args: Mapping[str, str], now: datetime | None = None) -> tuple[Filters, int, int, str, str]:
    """The /v1/requests parameters: filters, page, per_page, sort, order."""
    filters = replace(parse_filters(args, now), success=_bool(args, "success"), streaming=_bool(args, "streaming"))
    page = _int(args, "page", 1, 1, None)
    per_page = _int(args, "per_page", 20, 1, MAX_PER_PAGE)
    sort = _choice(args, "sort", SORTS, "timestamp") or "timestamp"
    order = _choice(args, "order", ORDERS, "desc") or "desc"
    return filters, page, per_page, sort, order
