"""The arithmetic of /v1/stats on plain values: totals, savings, percentile ranks, time buckets.

Kept apart from the SQL in :mod:`arbstr_core.reads.queries` so the definitions (nearest rank, what savings
means, which buckets a range has) are stated, and tested, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..errors import bad_request

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


@dataclass
class Totals:
    """Sums over a set of rows; ``add`` takes one row of the SUM columns of either queries.py source."""

    label: str = ""
    total: int = 0
    success: int = 0
    streaming: int = 0
    ok_streaming: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_sats: float = 0.0
    latency_sum: float = 0.0
    latency_n: int = 0
    ttft_sum: float = 0.0
    ttft_n: int = 0
    # model (case-folded) → [rows with a known cost, their input tokens, their output tokens, their cost]
    costed: dict[str, list[float]] = field(default_factory=dict)
    # latency band (its lower edge, schema.sql latency_bands) → successful latencies in it
    bands: dict[int, int] = field(default_factory=dict)
    percentiles: list[Any] = field(default_factory=lambda: [None, None, None])

    def add(self, model: str | None, sums: Sequence[Any]) -> None:
        total, success, streaming, ok_streaming, tin, tout, cost, costed, cin, cout, lat, lat_n, ttft, ttft_n = (
            0 if v is None else v for v in sums
        )
        self.total += int(total)
        self.success += int(success)
        self.streaming += int(streaming)
        self.ok_streaming += int(ok_streaming)
        self.input_tokens += int(tin)
        self.output_tokens += int(tout)
        self.cost_sats += float(cost)
        self.latency_sum += float(lat)
        self.latency_n += int(lat_n)
        self.ttft_sum += float(ttft)
        self.ttft_n += int(ttft_n)
        if costed:
            acc = self.costed.setdefault((model or "").casefold(), [0, 0, 0, 0.0])
            for i, v in enumerate((costed, cin, cout, cost)):
                acc[i] += v

    def add_band(self, lo: int, n: int) -> None:
        self.bands[lo] = self.bands.get(lo, 0) + n

    @classmethod
    def merge(cls, parts: Iterable[Totals]) -> Totals:
        out = cls()
        for p in parts:
            out.total += p.total
            out.success += p.success
            out.streaming += p.streaming
            out.ok_streaming += p.ok_streaming
            out.input_tokens += p.input_tokens
            out.output_tokens += p.output_tokens
            out.cost_sats += p.cost_sats
            out.latency_sum += p.latency_sum
            out.latency_n += p.latency_n
            out.ttft_sum += p.ttft_sum
            out.ttft_n += p.ttft_n
            for model, (n, cin, cout, cost) in p.costed.items():
                acc = out.costed.setdefault(model, [0, 0, 0, 0.0])
                acc[0] += n
                acc[1] += cin
                acc[2] += cout
                acc[3] += cost
            for lo, n in p.bands.items():
                out.add_band(lo, n)
        return out

    def count(self, success: bool | None = None, streaming: bool | None = None) -> int:
        """Rows with the given success/streaming flags (None = either), by inclusion–exclusion."""
        if success is None:
            return self.total if streaming is None else self.streaming if streaming else self.total - self.streaming
        ok = self.success if success else self.total - self.success
        if streaming is None:
            return ok
        both = self.ok_streaming if success else self.streaming - self.ok_streaming  # streams that are (not) ok
        return both if streaming else ok - both

    def savings(self, rates: Rates) -> float:
        """Per model: what its costed requests would have cost at the provider that charges most for them,
        minus what they cost. Models no configured provider serves any more are left out."""
        saved = 0.0
        for model, (n, cin, cout, cost) in self.costed.items():
            serving = rates.get(model)
            if serving and n:
                saved += max((cin * i + cout * o) / 1000 + n * fee for i, o, fee in serving) - cost
        return saved

    def document(self, rates: Rates) -> dict[str, Any]:
        """The ``counts``/``costs``/``performance`` part of SPEC §4.7."""
        p50, p95, p99 = self.percentiles
        return {
            "counts": {
                "total": self.total,
                "success": self.success,
                "error": self.total - self.success,
                "streaming": self.streaming,
            },
            "costs": {
                "total_cost_sats": float(self.cost_sats),
                "total_input_tokens": self.input_tokens,
                "total_output_tokens": self.output_tokens,
                "savings_sats": float(self.savings(rates)),
            },
            "performance": {
                "avg_latency_ms": self.latency_sum / self.latency_n if self.latency_n else None,
                "p50_latency_ms": p50,
                "p95_latency_ms": p95,
                "p99_latency_ms": p99,
                "avg_ttft_ms": self.ttft_sum / self.ttft_n if self.ttft_n else None,
            },
        }
