"""Routing (SPEC §2.1, §2.2): policy matching, candidate filtering and strategy ordering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from arbstr_core.config import PolicyRule, Provider
from arbstr_core.errors import ArbstrError
from arbstr_core.request.breaker import BreakerRegistry
from arbstr_core.request.failures import FAILURE
from arbstr_core.request.perf import PerfWindow
from arbstr_core.request.routing import match_policy, price_key, select_candidates


def provider(name: str, output_rate: float, base_fee: float = 0, models: Sequence[str] = ("gpt-4o",),
             input_rate: float = 0) -> Provider:
    return Provider(name, f"http://{name}.example/v1", tuple(models), input_rate=input_rate,
                    output_rate=output_rate, base_fee=base_fee)


def names(providers: Sequence[Provider]) -> list[str]:
    return [p.name for p in providers]


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def select(model: str, providers: Sequence[Provider], policy: PolicyRule | None = None,
           strategy: str = "cheapest", **kw: Any) -> list[str]:
    return names(select_candidates(model, policy, providers, strategy, **kw))


def error_of(fn: Any, *args: Any, **kw: Any) -> ArbstrError:
    with pytest.raises(ArbstrError) as e:
        fn(*args, **kw)
    return e.value


RULES = (
    PolicyRule("code_generation", keywords=("code", "function", "implement", "debug")),
    PolicyRule("summaries", keywords=("summarize", "TL;DR")),
    PolicyRule("catch_all_code", keywords=("code",)),
    PolicyRule("no_keywords"),
)


# --- policies (§2.1) ----------------------------------------------------------------------------


def test_header_names_a_rule_exactly() -> None:
    assert match_policy(RULES, "summaries", [user("please debug this code")]) is RULES[1]


def test_header_wins_over_keywords() -> None:
    assert match_policy(RULES, "no_keywords", [user("implement a function")]) is RULES[3]


@pytest.mark.parametrize("header", ["Summaries", "summaries ", "nope", ""])
def test_header_naming_no_rule_is_400_listing_valid_names(header: str) -> None:
    err = error_of(match_policy, RULES, header, [user("code")])
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.code == "unknown_policy"
    for rule in RULES:
        assert rule.name in err.message


def test_header_with_no_rules_configured() -> None:
    err = error_of(match_policy, (), "anything", [])
    assert err.code == "unknown_policy" and err.status == 400


@pytest.mark.parametrize(
    "text",
    ["Write some CODE", "can you Implement this", "DeBuG it", "decode this"],  # substring match, any case
)
def test_keyword_matches_case_insensitively(text: str) -> None:
    assert match_policy(RULES, None, [user(text)]) is RULES[0]


def test_mixed_case_keyword_in_config() -> None:
    assert match_policy(RULES, None, [user("tl;dr please")]) is RULES[1]


def test_first_rule_in_config_order_wins() -> None:
    # "code" is a keyword of both code_generation (first) and catch_all_code (third).
    assert match_policy(RULES, None, [user("code")]) is RULES[0]
    assert match_policy(tuple(reversed(RULES)), None, [user("code")]) is RULES[2]


def test_keywords_in_array_content_text_parts() -> None:
    content = [{"type": "image_url", "image_url": {"url": "http://x/summarize.png"}},
               {"type": "text", "text": "Summarize the picture"}]
    assert match_policy(RULES, None, [user(content)]) is RULES[1]


def test_keywords_in_image_urls_do_not_match() -> None:
    content = [{"type": "image_url", "image_url": {"url": "http://x/summarize.png"}}]
    assert match_policy(RULES, None, [user(content)]) is None


def test_only_the_last_user_message_counts() -> None:
    messages = [{"role": "system", "content": "You write code."}, user("debug this"),
                {"role": "assistant", "content": "implement"}, user("thanks, now a poem")]
    assert match_policy(RULES, None, messages) is None


def test_no_match_means_no_policy() -> None:
    assert match_policy(RULES, None, [user("hello there")]) is None
    assert match_policy(RULES, None, []) is None
    assert match_policy((), None, [user("code")]) is None


def test_empty_keyword_matches_nothing() -> None:
    rules = (PolicyRule("empty", keywords=("",)),)
    assert match_policy(rules, None, [user("anything")]) is None


# --- candidates (§2.2) --------------------------------------------------------------------------

ALPHA = provider("alpha", output_rate=30, base_fee=1, models=("gpt-4o", "gpt-4o-mini"))
BETA = provider("beta", output_rate=20, base_fee=5, models=("gpt-4o",))
GAMMA = provider("gamma", output_rate=10, base_fee=0, models=("gpt-4o", "gpt-4o-mini"))
DELTA = provider("delta", output_rate=60, base_fee=0, models=("claude",))
ALL = (ALPHA, BETA, GAMMA, DELTA)


def cheapest_names(providers: Sequence[Provider], model: str) -> list[str]:
    serving = [p for p in providers if model in p.models]
    return names(sorted(serving, key=lambda p: p.output_rate + p.base_fee))


def test_only_providers_serving_the_exact_model() -> None:
    assert select("gpt-4o-mini", ALL) == cheapest_names(ALL, "gpt-4o-mini") == ["gamma", "alpha"]
    assert select("claude", ALL) == ["delta"]


@pytest.mark.parametrize("model", ["GPT-4o", "gpt-4", "gpt-4o ", "unknown"])
def test_unknown_model_is_404(model: str) -> None:
    err = error_of(select_candidates, model, None, ALL, "cheapest")
    assert err.status == 404
    assert err.code == "model_not_found"
    assert err.param == "model"
    assert model in err.message


def test_cheapest_orders_by_output_rate_plus_base_fee() -> None:
    # alpha 31, beta 25, gamma 10 → gamma, beta, alpha; input_rate plays no part.
    assert select("gpt-4o", ALL) == cheapest_names(ALL, "gpt-4o") == ["gamma", "beta", "alpha"]
    pricey_input = provider("pricey-in", output_rate=1, input_rate=1000)
    assert select("gpt-4o", (*ALL, pricey_input))[0] == "pricey-in"
    assert price_key(ALPHA) == 31


def test_cheapest_ties_keep_config_order() -> None:
    tied = [provider(n, output_rate=10, base_fee=b) for n, b in (("t1", 2), ("t2", 0), ("t3", 2), ("t4", 1))]
    # t1 = 12, t2 = 10, t3 = 12, t4 = 11
    assert select("gpt-4o", tied) == ["t2", "t4", "t1", "t3"]
    same = [provider(f"s{i}", output_rate=5) for i in range(6)]
    assert select("gpt-4o", same) == names(same)
    assert select("gpt-4o", list(reversed(same))) == names(reversed(same))


def test_allowed_models_rejects_other_models() -> None:
    rule = PolicyRule("strict", allowed_models=("gpt-4o",))
    err = error_of(select_candidates, "gpt-4o-mini", rule, ALL, "cheapest")
    assert err.status == 400
    assert err.code == "model_not_allowed"
    assert "strict" in err.message and "gpt-4o-mini" in err.message
    assert select("gpt-4o", ALL, rule) == ["gamma", "beta", "alpha"]


def test_unknown_model_is_404_even_under_a_restrictive_policy() -> None:
    rule = PolicyRule("strict", allowed_models=("gpt-4o",))
    assert error_of(select_candidates, "nope", rule, ALL, "cheapest").code == "model_not_found"


def test_empty_allowed_models_allows_any_model() -> None:
    assert select("gpt-4o-mini", ALL, PolicyRule("any")) == ["gamma", "alpha"]


@pytest.mark.parametrize("limit", [0, 9.99, 10, 15, 20, 29.9, 30, 100])
def test_max_sats_per_1k_output_drops_dearer_providers(limit: float) -> None:
    rule = PolicyRule("budget", max_sats_per_1k_output=limit)
    expected = [n for n in cheapest_names(ALL, "gpt-4o") if next(p for p in ALL if p.name == n).output_rate <= limit]
    if expected:
        assert select("gpt-4o", ALL, rule) == expected
    else:
        err = error_of(select_candidates, "gpt-4o", rule, ALL, "cheapest")
        assert err.status == 400 and err.code == "no_provider_within_policy"
        assert "budget" in err.message


def test_max_sats_compares_output_rate_only_not_base_fee() -> None:
    rule = PolicyRule("budget", max_sats_per_1k_output=20)
    # beta's output_rate is 20 (fee 5): kept, although 20 + 5 > 20.
    assert "beta" in select("gpt-4o", ALL, rule)


def test_policy_strategy_overrides_default() -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 3), ("b", 1), ("c", 2))]
    rule = PolicyRule("rr", strategy="round_robin")
    assert select("gpt-4o", providers, rule, strategy="cheapest", rotation=1) == ["c", "a", "b"]
    assert select("gpt-4o", providers, None, strategy="round_robin", rotation=1) == ["c", "a", "b"]
    assert select("gpt-4o", providers, PolicyRule("cheap"), strategy="round_robin", rotation=1) == ["b", "c", "a"]


def test_round_robin_rotates_the_cheapest_order_by_one_per_request() -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 4), ("b", 1), ("c", 3), ("d", 2))]
    base = ["b", "d", "c", "a"]
    for rotation in range(10):
        k = rotation % len(base)
        assert select("gpt-4o", providers, strategy="round_robin", rotation=rotation) == base[k:] + base[:k]


def test_round_robin_rotates_after_model_and_policy_filtering() -> None:
    rule = PolicyRule("rr", strategy="round_robin", max_sats_per_1k_output=30)
    # gpt-4o-mini: gamma (10), alpha (31 → output 30 ≤ 30) → rotation 1 → alpha first.
    assert select("gpt-4o-mini", ALL, rule, rotation=1) == ["alpha", "gamma"]
    assert select("gpt-4o-mini", ALL, rule, rotation=2) == ["gamma", "alpha"]


def test_lowest_latency_orders_by_median_then_unsampled_in_cheapest_order() -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5))]
    medians = {"c": 120.0, "e": 80.0, "b": 300.0}
    order = select("gpt-4o", providers, strategy="lowest_latency", median_latency=medians.get)
    assert order == ["e", "c", "b", "a", "d"]


def test_lowest_latency_ties_keep_cheapest_order() -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 3), ("b", 1), ("c", 2))]
    order = select("gpt-4o", providers, strategy="lowest_latency", median_latency=lambda name: 100.0)
    assert order == ["b", "c", "a"]


def test_lowest_latency_without_any_samples_is_cheapest() -> None:
    assert select("gpt-4o", ALL, strategy="lowest_latency") == cheapest_names(ALL, "gpt-4o")


def test_lowest_latency_uses_the_median_of_the_window() -> None:
    window = LatencyWindow()
    for ms in (10, 10, 10, 5000, 5000):  # median 10: one slow request does not demote it
        window.add("alpha", ms)
    for ms in (50, 50, 50):
        window.add("gamma", ms)
    order = select("gpt-4o", ALL, strategy="lowest_latency", median_latency=window.median)
    assert order == ["alpha", "gamma", "beta"]


def test_open_circuits_are_dropped_and_order_is_kept() -> None:
    closed = {"gamma", "alpha"}
    assert select("gpt-4o", ALL, is_available=lambda n: n in closed) == ["gamma", "alpha"]


def test_all_circuits_open_is_503() -> None:
    err = error_of(select_candidates, "gpt-4o", None, ALL, "cheapest", is_available=lambda n: False)
    assert err.status == 503
    assert err.code == "all_circuits_open"
    assert err.type == "upstream_error"


def test_circuit_filter_comes_after_policy_checks() -> None:
    rule = PolicyRule("strict", allowed_models=("claude",))
    err = error_of(select_candidates, "gpt-4o", rule, ALL, "cheapest", is_available=lambda n: False)
    assert err.code == "model_not_allowed"


def test_with_a_real_breaker_registry() -> None:
    breakers = BreakerRegistry([p.name for p in ALL], failure_threshold=1, open_secs=30, clock=lambda: 0.0)
    permit = breakers.acquire("gamma")
    assert permit is not None
    breakers.record(permit, FAILURE, "boom")
    assert select("gpt-4o", ALL, is_available=breakers.is_available) == ["beta", "alpha"]


# --- latency window ---------------------------------------------------------------------------


def test_latency_window_median_and_bound() -> None:
    window = LatencyWindow(size=5)
    assert window.median("p") is None
    for ms in (100, 1, 2, 3, 4, 5):  # 100 falls out of the window of 5
        window.add("p", ms)
    assert window.median("p") == 3
    window.add("p", 6)
    assert window.median("p") == 4  # window 2..6
    assert window.median("other") is None


def test_latency_window_even_count_median() -> None:
    window = LatencyWindow()
    for ms in (10, 20, 30, 40):
        window.add("p", ms)
    assert window.median("p") == 25


def test_latency_window_default_size_is_50() -> None:
    window = LatencyWindow()
    for ms in range(1000, 1050):  # 50 slow samples
        window.add("p", ms)
    for _ in range(50):  # then 50 fast ones replace them entirely
        window.add("p", 1)
    assert window.median("p") == 1
    window2 = LatencyWindow()
    for ms in [1] * 26 + [1000] * 24:
        window2.add("p", ms)
    window2.add("p", 1000)  # 51st sample pushes out one 1: 25 × 1 and 25 × 1000
    assert window2.median("p") == (1 + 1000) / 2
