"""The failure classes of SPEC §5.1: one table read by retry, fallback and the circuit breaker. Pure.

The money rule lives here: once a request may have reached a provider (read timeout, reset after
sending), the same provider is never asked again, because a paid token may already be spent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SUCCESS, FAILURE, NEUTRAL = "success", "failure", "neutral"


@dataclass(frozen=True)
class Verdict:
    kind: str  # stable name, used in logs and error messages
    retry_same: bool
    fallback: bool
    breaker: str  # SUCCESS | FAILURE | NEUTRAL


OK = Verdict("ok", retry_same=False, fallback=False, breaker=SUCCESS)
CONNECT_FAILED = Verdict("connect_failed", retry_same=True, fallback=True, breaker=FAILURE)
SERVER_ERROR = Verdict("server_error", retry_same=True, fallback=True, breaker=FAILURE)
RATE_LIMITED = Verdict("rate_limited", retry_same=True, fallback=True, breaker=NEUTRAL)
RATE_LIMITED_LONG = Verdict("rate_limited", retry_same=False, fallback=True, breaker=NEUTRAL)
SENT_FAILED = Verdict("read_failed", retry_same=False, fallback=True, breaker=FAILURE)
BAD_BODY = Verdict("invalid_body", retry_same=False, fallback=True, breaker=FAILURE)
# The provider refused its key (401, 403, a 400 naming a key fault): it is skipped until restart (§11).
KEY_REJECTED = Verdict("provider_auth", retry_same=False, fallback=True, breaker=NEUTRAL)
# 402: the provider's balance (the account the key pays from) ran out.
BALANCE = Verdict("insufficient_balance", retry_same=False, fallback=True, breaker=NEUTRAL)
# Another provider may serve the model; when none does, the last 404 goes back to the client.
MODEL_NOT_FOUND = Verdict("model_not_found", retry_same=False, fallback=True, breaker=NEUTRAL)
CLIENT_FAULT = Verdict("client_fault", retry_same=False, fallback=False, breaker=NEUTRAL)

CLIENT_FAULT_STATUSES = frozenset({400, 409, 413, 422})
# Error codes of a 400 that blame the provider's key, not the request (Routstr nodes).
KEY_FAULT_CODES = frozenset({"invalid_api_key", "invalid_cashu_token", "cashu_token_already_spent"})


def classify_status(status: int, retry_after: float | None = None, max_retry_after: float = 0,
                    code: str | None = None) -> Verdict:
    """Verdict for an upstream HTTP status; ``retry_after`` only matters for 429, the error ``code`` only
    for 400."""
    if 200 <= status < 300:
        return OK
    if status == 429:
        if retry_after is not None and retry_after > max_retry_after:
            return RATE_LIMITED_LONG
        return RATE_LIMITED
    if status in (401, 403) or (status == 400 and code in KEY_FAULT_CODES):
        return KEY_REJECTED
    if status == 402:
        return BALANCE
    if status == 404:
        return MODEL_NOT_FOUND
    if status in CLIENT_FAULT_STATUSES:
        return CLIENT_FAULT
    if status >= 500:
        return SERVER_ERROR
    # Other 4xx (405, 408, 410, …): the provider is not usable for this request; try another.
    return Verdict(f"http_{status}", retry_same=False, fallback=True, breaker=NEUTRAL)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form only; dates are treated as absent)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    # "inf" and "nan" parse as floats; an infinite wait is no wait we can honour (or round).
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@dataclass
class AttemptResult:
    """One upstream call's outcome. ``payload`` is what the attempt function hands back: on success a
    parsed body or an open stream, on a client fault the ArbstrError to return. ``close`` releases
    whatever is still open if nobody will use it."""

    verdict: Verdict
    status: int | None = None
    message: str = ""
    retry_after: float | None = None
    payload: Any = None
    close: Callable[[], None] = lambda: None
