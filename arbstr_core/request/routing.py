"""Which providers to try, in which order (SPEC §2). Pure: plain values in, plain values out.

Circuit state and the measurement window are passed in as callables, and the exploration draw as a
number, so this module holds no state, reads no clock, draws no random number and touches no I/O; the
caller owns the breaker registry, the window and the random source.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from ..config import PolicyRule, Provider
from ..errors import ArbstrError, bad_request
from .body import last_user_text
from .perf import Recent

Measurements = Callable[[str], Recent | None]  # a provider's medians over the window, None if unmeasured

MIN_TTFT_SECS = 0.001  # TTFT is measured in whole ms: a 0 ms median counts as 1 ms, not as a division by 0
MIN_PRICE_SATS = 0.001  # 1 msat, the smallest cost arbstr counts: a free provider's price in the composite


def match_policy(rules: Sequence[PolicyRule], header: str | None, messages: Sequence[Any]) -> PolicyRule | None:
    """Header first (exact name), else the first rule with a keyword in the last user message."""
    if header is not None:
        for rule in rules:
            if rule.name == header:
                return rule
        names = ", ".join(r.name for r in rules) or "(none configured)"
        raise bad_request(
            f"X-Arbstr-Policy '{header}' names no policy; valid policies: {names}", code="unknown_policy"
        )
    text = last_user_text(messages).lower()
    if text:
        for rule in rules:
            if any(k.lower() in text for k in rule.keywords if k):
                return rule
    return None


def resolve_alias(aliases: Sequence[tuple[str, str]], model: str) -> str:
    """The model id to route for a name a client sent (SPEC §1 ``[aliases]``): an exact name first, then
    the first glob pattern (``claude-*``) that matches, else the name itself."""
    for name, target in aliases:
        if name == model:
            return target
    for pattern, target in aliases:
        if fnmatch.fnmatchcase(model, pattern):
            return target
    return model


def price_key(provider: Provider) -> float:
    """Token counts are unknown before the call, so `cheapest` orders by output rate plus fee."""
    return provider.output_rate + provider.base_fee


def select_candidates(
    model: str,
    policy: PolicyRule | None,
    providers: Sequence[Provider],
    default_strategy: str,
    *,
    is_available: Callable[[str], bool] = lambda name: True,
    recent: Measurements = lambda name: None,
    rotation: int = 0,
    explore: float = 1.0,
    explore_share: float = 0.0,
) -> list[Provider]:
    """The ordered providers to try for ``model`` under ``policy`` (SPEC §2.2). ``explore`` is a random
    draw in [0, 1): below ``explore_share`` the speed strategies explore (see :func:`by_speed`)."""
    serving = eligible(model, policy, providers)
    strategy = policy.strategy if policy is not None else default_strategy
    ordered = order(serving, strategy, recent, rotation, explore < explore_share)
    usable = [p for p in ordered if is_available(p.name)]
    if not usable:
        raise ArbstrError(
            503,
            f"No provider of '{model}' can take requests now: each has an open circuit, a rejected key or a "
            "balance below [market] min_balance_sats (GET /health says which); open circuits let a probe "
            "through shortly",
            type="upstream_error",
            code="all_circuits_open",
        )
    return usable


def eligible(model: str, policy: PolicyRule | None, providers: Sequence[Provider]) -> list[Provider]:
    """The providers that may serve ``model`` under ``policy``, in config order, whatever their circuits:
    the candidates before ordering, and the field a request's savings are measured against (SPEC §2.3)."""
    serving = [p for p in providers if model in p.models]
    if not serving:
        raise ArbstrError(
            404, f"The model '{model}' is not served by any configured provider", code="model_not_found", param="model"
        )
    if policy is not None and policy.allowed_models and model not in policy.allowed_models:
        allowed = ", ".join(policy.allowed_models)
        raise bad_request(
            f"Policy '{policy.name}' does not allow model '{model}'; allowed: {allowed}",
            code="model_not_allowed",
            param="model",
        )
    if policy is not None and policy.max_sats_per_1k_output is not None:
        limit = policy.max_sats_per_1k_output
        serving = [p for p in serving if p.output_rate <= limit]
        if not serving:
            raise bad_request(
                f"No provider of '{model}' charges at most {limit:g} sats per 1k output tokens "
                f"(policy '{policy.name}')",
                code="no_provider_within_policy",
            )
    return serving


def order(providers: Sequence[Provider], strategy: str, recent: Measurements, rotation: int = 0,
          explore: bool = False) -> list[Provider]:
    cheapest = sorted(providers, key=price_key)  # stable: ties keep config order
    if strategy == "lowest_latency":  # SPEC §2.2: unmeasured providers after the measured ones
        unmeasured, ranked = by_speed(cheapest, latency_key, recent)
        return ranked + unmeasured
    if strategy in ("fastest_first_token", "performance"):
        key = ttft_key if strategy == "fastest_first_token" else performance_key
        unmeasured, ranked = by_speed(cheapest, key, recent, explore)
        return unmeasured + ranked  # cold start: each unmeasured provider is tried, so it gets measured
    if strategy == "round_robin" and cheapest:
        k = rotation % len(cheapest)
        return cheapest[k:] + cheapest[:k]
    return cheapest


SpeedKey = Callable[[Provider, Recent], tuple[float, ...] | None]  # ascending = better; None = unmeasured


def by_speed(cheapest: Sequence[Provider], key: SpeedKey, recent: Measurements,
             explore: bool = False) -> tuple[list[Provider], list[Provider]]:
    """The unmeasured providers (in cheapest order) and the measured ones ranked by ``key`` (ties in
    cheapest order). ``fastest_first_token`` and ``performance`` try the unmeasured first, so each gets
    measured. Exploring, when every provider is measured, puts the least recently measured first: one
    whose newest sample is the oldest gets a new one, so a provider that recovered is seen to."""
    unmeasured: list[Provider] = []
    measured: list[tuple[tuple[float, ...], float, Provider]] = []
    for provider in cheapest:
        r = recent(provider.name)
        k = key(provider, r) if r is not None else None
        if r is None or k is None:
            unmeasured.append(provider)
        else:
            measured.append((k, r.last_at, provider))
    ranked = [p for _, _, p in sorted(measured, key=lambda m: m[0])]
    if explore and not unmeasured and measured:
        stale = min(measured, key=lambda m: m[1])[2]  # the first of equally old ones, in cheapest order
        ranked.remove(stale)
        ranked.insert(0, stale)
    return unmeasured, ranked


def latency_key(provider: Provider, r: Recent) -> tuple[float, ...] | None:
    """``lowest_latency``: the median latency of successful requests, streamed or not."""
    return None if r.latency_ms is None else (r.latency_ms,)


def ttft_key(provider: Provider, r: Recent) -> tuple[float, ...] | None:
    """``fastest_first_token``: the median TTFT. Only streams measure one; a provider that only answered
    non-streaming requests in the window is unmeasured (its latency includes the whole answer)."""
    return None if r.ttft_ms is None else (r.ttft_ms,)


def performance_score(provider: Provider, r: Recent) -> float | None:
    """Plexus' composite: tokens/s ÷ (TTFT in seconds × sats per 1k output tokens), higher is better.
    The price is ``price_key`` (the one ``cheapest`` orders by), at least 1 msat so a free provider
    scores high rather than infinite; TTFT at least 1 ms. None without both medians."""
    if r.ttft_ms is None or r.tokens_per_sec is None:
        return None
    ttft = max(r.ttft_ms / 1000, MIN_TTFT_SECS)
    return r.tokens_per_sec / (ttft * max(price_key(provider), MIN_PRICE_SATS))


def performance_key(provider: Provider, r: Recent) -> tuple[float, ...] | None:
    """``performance``: by score; a provider with a TTFT but no throughput (its streams report no usage,
    so their tokens are unknown) after every scored one, by TTFT. Without a TTFT it is unmeasured, as
    under ``fastest_first_token``: a provider that cannot report usage must not lead for ever."""
    score = performance_score(provider, r)
    if score is not None:
        return (0, -score)
    return None if r.ttft_ms is None else (1, r.ttft_ms)
