"""Which providers to try, in which order (SPEC §2). Pure: plain values in, plain values out.

Circuit state and latency history are passed in as callables so this module holds no state and
touches no I/O; the caller owns the breaker registry and the latency window.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

from ..config import PolicyRule, Provider
from ..errors import ArbstrError, bad_request
from .body import last_user_text


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
    median_latency: Callable[[str], float | None] = lambda name: None,
    rotation: int = 0,
) -> list[Provider]:
    """The ordered providers to try for ``model`` under ``policy`` (SPEC §2.2)."""
    serving = eligible(model, policy, providers)
    strategy = policy.strategy if policy is not None else default_strategy
    ordered = order(serving, strategy, median_latency, rotation)
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


def order(
    providers: Sequence[Provider], strategy: str, median_latency: Callable[[str], float | None], rotation: int
) -> list[Provider]:
    cheapest = sorted(providers, key=price_key)  # stable: ties keep config order
    if strategy == "lowest_latency":
        timed = [(median_latency(p.name), i, p) for i, p in enumerate(cheapest)]
        with_samples = sorted((t for t in timed if t[0] is not None), key=lambda t: (t[0], t[1]))
        return [p for _, _, p in with_samples] + [p for lat, _, p in timed if lat is None]
    if strategy == "round_robin" and cheapest:
        k = rotation % len(cheapest)
        return cheapest[k:] + cheapest[:k]
    return cheapest
