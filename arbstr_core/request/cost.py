"""What a request costs in satoshis (SPEC §2.3, §4.4, §11). Pure.

What the provider says it charged is the cost; the configured rates are only the fallback, and their
figure is kept beside it so drift shows. Unknown usage means unknown cost (``None``), never 0: a
free-looking request hides spend. Numbers a provider sends are read like a careful client reads them:
anything that is not a plausible count is unknown, never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Provider
from .body import message_text

DEFAULT_OUTPUT_ESTIMATE = 256
MAX_TOKENS = 2**53  # above this a count is no real usage (and no longer exact as a float): unknown
PROVIDER, RATES = "provider", "rates"  # cost_source
REPORTED_HEADER = "x-routstr-cost-msats"


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer. ``cached`` is part of ``input``, ``reasoning`` part of ``output``."""

    input: int
    output: int
    cached: int = 0
    reasoning: int | None = None


@dataclass(frozen=True)
class Charge:
    """What one request cost, as its log row records it."""

    usage: Usage | None = None
    cost_sats: float | None = None
    cost_source: str | None = None
    rates_cost_sats: float | None = None
    max_cost_sats: float | None = None

    def row(self) -> dict[str, Any]:
        u = self.usage
        return {
            "input_tokens": u.input if u else None, "output_tokens": u.output if u else None,
            "cached_tokens": u.cached if u else None, "reasoning_tokens": u.reasoning if u else None,
            "cost_sats": self.cost_sats, "cost_source": self.cost_source,
            "rates_cost_sats": self.rates_cost_sats, "max_cost_sats": self.max_cost_sats,
        }


def _count(value: Any) -> int | None:
    """A token count, or None for anything else (bool, float, negative, ``10**400``)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def _detail(usage: Mapping[str, Any], details: str, key: str) -> int | None:
    inner = usage.get(details)
    return _count(inner.get(key)) if isinstance(inner, dict) else None


def read_usage(usage: Any) -> Usage | None:
    """The counts of an OpenAI ``usage`` object, or None when absent or malformed."""
    if not isinstance(usage, dict):
        return None
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is None or completion is None:
        return None
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    return Usage(prompt, completion, cached if cached is not None and cached <= prompt else 0,
                 reasoning if reasoning is not None and reasoning <= completion else None)


def reported_sats(usage: Any, header: str | None = None) -> float | None:
    """What the provider says it charged (Routstr: ``usage.cost.total_msats``, or the
    ``x-routstr-cost-msats`` header), in sats; None when it does not say. Never Routstr's rounded-down
    ``usage.cost_sats``."""
    msats: Any = None
    cost = usage.get("cost") if isinstance(usage, dict) else None
    if isinstance(cost, dict):
        msats = cost.get("total_msats")
    if msats is None and header is not None:
        try:
            msats = float(header.strip())
        except ValueError:
            return None
    if isinstance(msats, bool) or not isinstance(msats, int | float) or not 0 <= msats <= MAX_TOKENS:
        return None  # also NaN and infinities
    return msats / 1000


def rates_sats(provider: Provider, usage: Usage) -> float | None:
    """The rates formula of SPEC §2.3; None if the configured rates make it overflow."""
    cost = ((usage.input - usage.cached) * provider.input_rate + usage.cached * provider.cached_rate
            + usage.output * provider.output_rate) / 1000 + provider.base_fee
    return cost if math.isfinite(cost) else None


def charge(provider: Provider, usage: Any, field: Sequence[Provider] = (), header: str | None = None) -> Charge:
    """The cost of an answer from ``provider``: reported if it says, else its rates. ``field`` is every
    provider that could have served the request; the dearest of them, at this usage, is what the
    request would have cost without arbstr (``max_cost_sats``, the measure of savings)."""
    counted = read_usage(usage)
    reported = reported_sats(usage, header)
    rates = rates_sats(provider, counted) if counted is not None else None
    dearest = None
    if counted is not None:
        prices = [c for c in (rates_sats(p, counted) for p in field or (provider,)) if c is not None]
        dearest = max(prices, default=None)
    if reported is not None:
        return Charge(counted, reported, PROVIDER, rates, dearest)
    return Charge(counted, rates, RATES if rates is not None else None, rates, dearest)


def merge_usage(merged: dict[str, Any] | None, usage: Any) -> dict[str, Any] | None:
    """Usage seen so far in a stream, with a chunk's ``usage`` folded in: the last non-null value of each
    field wins (SPEC §6.2), so usage split over several chunks is whole."""
    if not isinstance(usage, dict):
        return merged
    out = dict(merged or {})
    out.update((k, v) for k, v in usage.items() if v is not None)
    return out


def header_value(cost: float) -> str:
    """The ``x-arbstr-cost-sats`` form: msat precision."""
    return f"{cost:.3f}"


def estimate_sats(provider: Provider, input_tokens: int, output_tokens: int) -> float:
    """``/v1/cost``: the rates formula for estimated tokens (none cached)."""
    return (input_tokens * provider.input_rate + output_tokens * provider.output_rate) / 1000 + provider.base_fee


def estimate_tokens(body: dict[str, Any]) -> tuple[int, int]:
    """⌈UTF-8 bytes of message text / 4⌉ in, ``max_tokens`` (or 256) out."""
    text = "".join(
        message_text(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict)
    )
    input_tokens = math.ceil(len(text.encode("utf-8")) / 4)
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        max_tokens = DEFAULT_OUTPUT_ESTIMATE
    return input_tokens, max_tokens
