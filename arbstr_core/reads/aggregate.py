"""The arithmetic of /v1/stats on plain values: totals, savings, percentile ranks, time buckets.

Kept apart from the SQL in :mod:`arbstr_core.reads.queries` so the definitions (nearest rank, what savings
means, which buckets a range has) are stated in one place, whichever source the sums come from.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..errors import bad_request
from ..log.db import SUMS

PERCENTILES = (50, 95, 99)
NONE_KEY = "(none)"  # group key of rows without a model, provider or policy
MAX_BUCKETS = 10000  # a year of hours; more is a mistake, not a chart

Rates = Mapping[str, Sequence[tuple[float, float, float]]]  # model (case-folded) → (input, output, fee) each


def percentile_ranks(n: int) -> list[int]:
    """0-based nearest-rank positions of p50/p95/p99 among ``n`` sorted values (``n`` ≥ 1)."""
    return [max(0, math.ceil(p * n / 100) - 1) for p in PERCENTILES]


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


# The sums savings needs model by model (columns of log/db.py SUMS), in the order Totals.per_model keeps them,
# and where they stand in a row of SUMS.
_PER_MODEL = ("costed", "costed_input", "costed_output", "cost_sats")
_PER_MODEL_AT = tuple([s.column for s in SUMS].index(column) for column in _PER_MODEL)
_KINDS = tuple((s.column, s.kind) for s in SUMS)


def _zeros() -> dict[str, float]:
    return {column: kind() for column, kind in _KINDS}


@dataclass
class Totals:
    """Sums over a set of rows: ``sums`` holds log/db.py SUMS by column name, each of its column's type."""

    label: str = ""
    sums: dict[str, float] = field(default_factory=_zeros)
    # model (case-folded) → its rows' _PER_MODEL sums: rows with a known cost, their input and output tokens, cost
    per_model: dict[str, list[float]] = field(default_factory=dict)
    # latency band (its lower edge, schema.sql latency_bands) → successful latencies in it
    bands: dict[int, int] = field(default_factory=dict)
    percentiles: list[Any] = field(default_factory=lambda: [None, None, None])

    def add(self, model: str | None, values: Sequence[Any]) -> None:
        """Add sums over rows of ``model``, in SUMS order: a row of either source in queries.py."""
        sums = self.sums
        for (column, kind), v in zip(_KINDS, values, strict=True):
            if v is not None:
                sums[column] += kind(v)
        if values[_PER_MODEL_AT[0]]:  # rows with a known cost
            acc = self.per_model.setdefault((model or "").casefold(), [0, 0, 0, 0.0])
            for i, at in enumerate(_PER_MODEL_AT):
                acc[i] += values[at] or 0

    def add_band(self, lo: int, n: int) -> None:
        self.bands[lo] = self.bands.get(lo, 0) + n

    @classmethod
    def merge(cls, parts: Iterable[Totals]) -> Totals:
        out = cls()
        for p in parts:
            for column, v in p.sums.items():
                out.sums[column] += v
            for model, sums in p.per_model.items():
                acc = out.per_model.setdefault(model, [0, 0, 0, 0.0])
                for i, v in enumerate(sums):
                    acc[i] += v
            for lo, n in p.bands.items():
                out.add_band(lo, n)
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

    def savings(self, rates: Rates) -> float:
        """Per model: what its costed requests would have cost at the provider that charges most for them,
        minus what they cost. Models no configured provider serves any more are left out."""
        saved = 0.0
        for model, (n, cin, cout, cost) in self.per_model.items():
            serving = rates.get(model)
            if serving and n:
                saved += max((cin * i + cout * o) / 1000 + n * fee for i, o, fee in serving) - cost
        return saved

    def document(self, rates: Rates) -> dict[str, Any]:
        """The ``counts``/``costs``/``performance`` part of SPEC §4.7."""
        p50, p95, p99 = self.percentiles
        s = self.sums
        return {
            "counts": {
                "total": s["total"],
                "success": s["success"],
                "error": s["total"] - s["success"],
                "streaming": s["streaming"],
            },
            "costs": {
                "total_cost_sats": float(s["cost_sats"]),
                "total_input_tokens": s["input_tokens"],
                "total_output_tokens": s["output_tokens"],
                "savings_sats": float(self.savings(rates)),
            },
            "performance": {
                "avg_latency_ms": s["latency_sum"] / s["latency_n"] if s["latency_n"] else None,
                "p50_latency_ms": p50,
                "p95_latency_ms": p95,
                "p99_latency_ms": p99,
                "avg_ttft_ms": s["ttft_sum"] / s["ttft_n"] if s["ttft_n"] else None,
            },
        }
