"""The one timestamp form arbstr writes: ISO 8601 UTC with milliseconds and ``Z`` ("2026-05-01T12:34:56.789Z").

Kept at the top of the package, below request/, log/ and reads/, so the request log, its readers and
``/health`` all spell times the same way. Text order is time order, which the log's indexes rely on.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime


def format_utc(dt: datetime) -> str:
    """``dt`` in the form above; a naive datetime is taken as UTC. Milliseconds are truncated, not rounded."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    d = dt.astimezone(UTC)
    return (
        f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
        f".{d.microsecond // 1000:03d}Z"
    )


def utc_timestamp(t: float | None = None) -> str:
    """A Unix time (now by default) in the form above."""
    return format_utc(datetime.fromtimestamp(time.time() if t is None else t, UTC))
