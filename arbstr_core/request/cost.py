"""What a request costs in satoshis (SPEC §2.3, §4.4). Pure.

Unknown usage means unknown cost (``None``), never 0: a free-looking request hides spend.
"""

from __future__ import annotations

import math
from typing import Any

from ..config import Provider
from .body import message_text

DEFAULT_OUTPUT_ESTIMATE = 256
MAX_TOKENS = 2**53  # above this a count is no real usage (and no longer exact as a float): unknown


def tokens(usage: Any) -> tuple[int, int] | None:
    """(input, output) tokens from an OpenAI ``usage`` object, or None when absent or malformed.

    Absurd counts (``10**400``) are malformed too: they would overflow the cost arithmetic.
    """
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TOKENS for v in (prompt, completion)):
        return None
    return prompt, completion


def cost_sats(provider: Provider, input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * provider.input_rate + output_tokens * provider.output_rate) / 1000 + provider.base_fee


def usage_cost(provider: Provider, usage: Any) -> tuple[int | None, int | None, float | None]:
    counted = tokens(usage)
    if counted is None:
        return None, None, None
    cost = cost_sats(provider, *counted)
    return counted[0], counted[1], cost if math.isfinite(cost) else None


def header_value(cost: float) -> str:
    """The ``x-arbstr-cost-sats`` form: the only place cost is rounded."""
    return f"{cost:.2f}"


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
