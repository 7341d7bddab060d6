"""The arithmetic of /v1/stats on plain values: totals, percentile ranks, time buckets, costs as shown.

Kept apart from the SQL in :mod:`arbstr_core.reads.queries` so the definitions (nearest rank, which
buckets a range has, how a cost is rounded) are stated in one place, whichever source the sums come
from. What a sum adds up, savings included, is declared with the sums (log/db.py SUMS).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..errors import bad_request
from ..log.db import METRICS, SUMS, Sum

NONE_KEY = "(none)"  # group key of rows without a model, provider or policy
MAX_BUCKETS = 10000  # a year of hours; more is a mistake, not a chart


def percentile_ranks(n: int, percentiles: Sequence[int]) -> list[int]:
    """0-based nearest-rank positions of ``percentiles`` (50, 95, ...) among ``n`` sorted values (``n`` ≥ 1)."""
    return [max(0, math.ceil(p * n / 100) - 1) for p in percentiles]


def group_key(value: Any) -> str:
    return NONE_KEY if value is None or value == "" else str(value)


def bucket_starts(since: datetime, until: datetime, group_by: str) -> list[datetime]:
    """Every hour or UTC day that overlaps ``[since, until)``, in time order, empty ones included."""
    step = timedelta(hours=1) if group_by == "hour" else timedelta(days=1)
    start = since.replace(minute=0, second=0, microsecond=0)
    if group_by == "day":
        start = start.replace(hour=0)
    count = 0 if until <= since else math.ceil((until - start) / step)
    if count > MAX_BUCKETS:
        raise bad_request(
            f"group_by={group_by} over this range gives {count} buckets (at most {MAX_BUCKETS}); "
            "narrow the range or group by day",
            "invalid_parameter",
            "group_by",
        )
    return [start + i * step for i in range(count)]


_KINDS = tuple((s.column, s.kind) for s in SUMS)


def sats(v: float | None) -> float | None:
    """A cost as JSON shows it (SPEC §2.3): msat precision, 3 decimals (no 0.5680000000000001), never -0.0."""
    return None if v is None else round(v, 3) + 0.0


def _zeros() -> dict[str, float]:
    return {column: kind() for column, kind in _KINDS}


@dataclass
class Totals:
    """Sums over a set of rows: ``sums`` holds log/db.py SUMS by column name, each of its column's type."""

    label: str = ""
    sums: dict[str, float] = field(default_factory=_zeros)
    # metric name (log/db.py METRICS) → band (its lower edge, schema.sql latency_bands) → successful rows
    # whose value is in it
    bands: dict[str, dict[int, int]] = field(default_factory=lambda: {m.name: {} for m in METRICS})
    # metric name → its values at the metric's percentiles
    percentiles: dict[str, list[Any]] = field(
        default_factory=lambda: {m.name: [None] * len(m.percentiles) for m in METRICS})

    def add(self, values: Sequence[Any], sums: Sequence[Sum] = SUMS) -> None:
        """Add sums over rows, in the order of ``sums`` (all of SUMS unless told): a row of either source
        in queries.py."""
        own = self.sums
        for s, v in zip(sums, values, strict=True):
            if v is not None:
                own[s.column] += s.kind(v)

    def add_band(self, metric: str, lo: int, n: int) -> None:
        bands = self.bands[metric]
        bands[lo] = bands.get(lo, 0) + n

    def measured(self, metric: str) -> int:
        """How many rows the metric's percentiles rank."""
        return sum(self.bands[metric].values())

    @classmethod
    def merge(cls, parts: Iterable[Totals]) -> Totals:
        out = cls()
        for p in parts:
            for column, v in p.sums.items():
                out.sums[column] += v
            for metric, bands in p.bands.items():
                for lo, n in bands.items():
                    out.add_band(metric, lo, n)
        return out

    def count(self, success: bool | None = None, streaming: bool | None = None) -> int:
        """Rows with the given success/streaming flags (None = either), by inclusion–exclusion."""
        total, ok_rows, streams, ok_streams = (self.sums[c] for c in ("total", "success", "streaming", "ok_streaming"))
        if success is None:
            return total if streaming is None else streams if streaming else total - streams
        ok = ok_rows if success else total - ok_rows
        if streaming is None:
            return ok
        both = ok_streams if success else streams - ok_streams  # streams that are (not) ok
        return both if streaming else ok - both

    def document(self) -> dict[str, Any]:
        """The ``counts``/``costs``/``performance`` part of SPEC §4.7.

        ``savings_sats`` adds up each row's own savings (log/db.py SUMS): rows whose cost or
        ``max_cost_sats`` is unknown (rows logged before schema version 3 among them) add nothing.
        ``cost_per_1m_output_tokens_sats`` is the cost over the output tokens, whichever part of it paid
        for input (the figure Plexus ranks by): rows with unknown usage have unknown cost too.
        """
        p50, p95, p99 = self.percentiles["latency"]
        ttft50, ttft95 = self.percentiles["ttft"]
        (speed50,) = self.percentiles["speed"]
        s = self.sums
        return {
            "counts": {
                "total": s["total"],
                "success": s["success"],
                "error": s["total"] - s["success"],
                "streaming": s["streaming"],
            },
            "costs": {
                "total_cost_sats": sats(s["cost_sats"]),
                "total_input_tokens": s["input_tokens"],
                "total_output_tokens": s["output_tokens"],
                "total_cached_tokens": s["cached_tokens"],
                "total_reasoning_tokens": s["reasoning_tokens"],
                "reported_cost_sats": sats(s["reported_cost_sats"]),
                "rates_cost_sats": sats(s["rates_cost_sats"]),
                "savings_sats": sats(s["savings_sats"]),
            },
            "performance": {
                "avg_latency_ms": s["latency_sum"] / s["latency_n"] if s["latency_n"] else None,
                "p50_latency_ms": p50,
                "p95_latency_ms": p95,
                "p99_latency_ms": p99,
                "avg_ttft_ms": s["ttft_sum"] / s["ttft_n"] if s["ttft_n"] else None,
                "p50_ttft_ms": ttft50,
                "p95_ttft_ms": ttft95,
                "p50_output_tokens_per_sec": speed50,
                "success_rate": round(s["success"] / s["total"], 4) if s["total"] else None,
                "cost_per_1m_output_tokens_sats": (
                    sats(s["cost_sats"] * 1_000_000 / s["output_tokens"]) if s["output_tokens"] else None),
            },
        }
