"""Routing (SPEC §2.1, §2.2): policy matching, candidate filtering and strategy ordering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from arbstr_core.config import PolicyRule, Provider
from arbstr_core.errors import ArbstrError
from arbstr_core.request.breaker import BreakerRegistry
from arbstr_core.request.failures import FAILURE
from arbstr_core.request.perf import MAX_SAMPLES, PerfWindow, Recent
from arbstr_core.request.routing import match_policy, performance_score, price_key, select_candidates


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


# --- strategies by measured speed ------------------------------------------------------------------
# Every test feeds a real PerfWindow on an injected clock (seconds): samples are placed in time, never
# slept for. gpt-4o's cheapest order is gamma (10), beta (25), alpha (31).

WINDOW_MINUTES = 15


class Clock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def window(clock: Clock, max_samples: int = 1000) -> PerfWindow:
    return PerfWindow(WINDOW_MINUTES, clock=clock, max_samples=max_samples)


def stream(perf: PerfWindow, name: str, ttft_ms: float, tokens_per_sec: float | None = 50.0, times: int = 1) -> None:
    for _ in range(times):
        perf.add(name, latency_ms=ttft_ms + 500, ttft_ms=ttft_ms, tokens_per_sec=tokens_per_sec)


def answer(perf: PerfWindow, name: str, latency_ms: float, tokens_per_sec: float | None = 50.0) -> None:
    """A non-streaming answer: a latency and a throughput, no TTFT."""
    perf.add(name, latency_ms=latency_ms, ttft_ms=None, tokens_per_sec=tokens_per_sec)


SPEED = ("fastest_first_token", "performance")


@pytest.mark.parametrize("strategy", SPEED)
def test_cold_start_without_measurements_is_cheapest(strategy: str) -> None:
    perf = window(Clock())
    assert select("gpt-4o", ALL, strategy=strategy, recent=perf.recent) == ["gamma", "beta", "alpha"]


@pytest.mark.parametrize("strategy", SPEED)
def test_cold_start_tries_unmeasured_providers_first_in_cheapest_order(strategy: str) -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5))]
    perf = window(Clock())
    stream(perf, "b", ttft_ms=100)  # b and d are measured and fast; a, c, e have never been tried
    stream(perf, "d", ttft_ms=200)
    assert select("gpt-4o", providers, strategy=strategy, recent=perf.recent) == ["a", "c", "e", "b", "d"]


def test_fastest_first_token_orders_by_median_ttft() -> None:
    perf = window(Clock())
    stream(perf, "gamma", ttft_ms=900, times=3)
    for ttft in (100, 120, 5000):  # p50 120: one slow first token does not demote it
        stream(perf, "alpha", ttft_ms=ttft)
    for ttft in (300, 300, 10, 10, 300):  # p50 300, though its best is the best of all
        stream(perf, "beta", ttft_ms=ttft)
    assert perf.recent("alpha").ttft_ms == 120 and perf.recent("beta").ttft_ms == 300  # type: ignore[union-attr]
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["alpha", "beta", "gamma"]


def test_fastest_first_token_ties_keep_cheapest_order() -> None:
    perf = window(Clock())
    for name in ("alpha", "beta", "gamma"):
        stream(perf, name, ttft_ms=250)
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["gamma", "beta", "alpha"]


def test_fastest_first_token_needs_a_stream_to_measure_a_provider() -> None:
    # beta only answered non-streaming requests: its latency is a whole answer, not a first token, so it
    # is unmeasured and tried first (its next stream measures it).
    perf = window(Clock())
    stream(perf, "alpha", ttft_ms=400)
    stream(perf, "gamma", ttft_ms=200)
    answer(perf, "beta", latency_ms=50)
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["beta", "gamma", "alpha"]
    stream(perf, "beta", ttft_ms=300)
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["gamma", "beta", "alpha"]


def expected_score(p: Provider, tokens_per_sec: float, ttft_ms: float) -> float:
    """The composite written out independently: tokens/s ÷ (TTFT s × sats per 1k output, fee included)."""
    return tokens_per_sec / ((ttft_ms / 1000) * (p.output_rate + p.base_fee))


def test_performance_orders_by_the_composite_score() -> None:
    figures = {"gamma": (40.0, 800.0), "beta": (120.0, 600.0), "alpha": (200.0, 250.0)}  # tokens/s, TTFT ms
    perf = window(Clock())
    for name, (tps, ttft) in figures.items():
        stream(perf, name, ttft_ms=ttft, tokens_per_sec=tps, times=3)
    by_name = {p.name: p for p in ALL}
    scores = {n: expected_score(by_name[n], *f) for n, f in figures.items()}
    # gamma 40/(0.8×10) = 5, beta 120/(0.6×25) = 8, alpha 200/(0.25×31) ≈ 25.8
    assert scores == pytest.approx({"gamma": 5.0, "beta": 8.0, "alpha": 200 / 7.75})
    for name in figures:
        assert performance_score(by_name[name], perf.recent(name)) == pytest.approx(scores[name])  # type: ignore[arg-type]
    expected = sorted(figures, key=lambda n: -scores[n])
    assert select("gpt-4o", ALL, strategy="performance", recent=perf.recent) == expected == ["alpha", "beta", "gamma"]


def test_performance_uses_the_medians() -> None:
    perf = window(Clock())
    for tps, ttft in ((100, 200), (10, 9000), (100, 200)):  # one bad stream: medians 100 tokens/s, 200 ms
        stream(perf, "alpha", ttft_ms=ttft, tokens_per_sec=tps)
    assert performance_score(ALPHA, perf.recent("alpha")) == pytest.approx(expected_score(ALPHA, 100, 200))  # type: ignore[arg-type]


def test_performance_of_a_free_provider_and_a_zero_ttft_is_finite() -> None:
    free = provider("free", output_rate=0)
    paid = provider("paid", output_rate=1)
    perf = window(Clock())
    stream(perf, "free", ttft_ms=2000, tokens_per_sec=10)
    stream(perf, "paid", ttft_ms=0, tokens_per_sec=10)
    # free: 1 msat per 1k instead of 0; paid: 1 ms instead of 0 ms.
    assert performance_score(free, perf.recent("free")) == pytest.approx(10 / (2.0 * 0.001))  # type: ignore[arg-type]
    assert performance_score(paid, perf.recent("paid")) == pytest.approx(10 / (0.001 * 1))  # type: ignore[arg-type]
    assert select("gpt-4o", [paid, free], strategy="performance", recent=perf.recent) == ["paid", "free"]


def test_performance_without_throughput_ranks_after_scored_providers_by_ttft() -> None:
    # Streams that report no usage give a TTFT but no tokens/s: alpha and beta rank after gamma (scored,
    # although its TTFT is the worst), between them by TTFT.
    perf = window(Clock())
    stream(perf, "gamma", ttft_ms=3000, tokens_per_sec=5)
    stream(perf, "beta", ttft_ms=500, tokens_per_sec=None)
    stream(perf, "alpha", ttft_ms=100, tokens_per_sec=None)
    assert performance_score(ALPHA, perf.recent("alpha")) is None  # type: ignore[arg-type]
    assert select("gpt-4o", ALL, strategy="performance", recent=perf.recent) == ["gamma", "alpha", "beta"]


def test_performance_without_ttft_is_unmeasured() -> None:
    perf = window(Clock())
    stream(perf, "gamma", ttft_ms=100, tokens_per_sec=100)
    stream(perf, "beta", ttft_ms=100, tokens_per_sec=100)
    answer(perf, "alpha", latency_ms=10, tokens_per_sec=1000)  # non-streaming only: no TTFT
    assert select("gpt-4o", ALL, strategy="performance", recent=perf.recent) == ["alpha", "gamma", "beta"]


def measured_at(perf: PerfWindow, clock: Clock, order: Sequence[tuple[str, float]]) -> None:
    """One stream per provider, a minute apart, in the order given: the first is the least recent."""
    for name, ttft in order:
        stream(perf, name, ttft_ms=ttft)
        clock.advance(60)


@pytest.mark.parametrize("strategy", SPEED)
def test_exploration_puts_the_least_recently_measured_first(strategy: str) -> None:
    clock = Clock()
    perf = window(clock)
    measured_at(perf, clock, [("beta", 900), ("alpha", 100), ("gamma", 500)])  # beta measured longest ago
    usual = select("gpt-4o", ALL, strategy=strategy, recent=perf.recent, explore=0.9, explore_share=0.05)
    assert usual == ["alpha", "gamma", "beta"]
    explored = select("gpt-4o", ALL, strategy=strategy, recent=perf.recent, explore=0.049, explore_share=0.05)
    assert explored == ["beta", "alpha", "gamma"]  # the rest keep their order


@pytest.mark.parametrize(("draw", "share"), [(0.05, 0.05), (0.5, 0.05), (0.999, 0.05), (0.0, 0.0)])
def test_no_exploration_at_or_above_the_share(draw: float, share: float) -> None:
    clock = Clock()
    perf = window(clock)
    measured_at(perf, clock, [("beta", 900), ("alpha", 100), ("gamma", 500)])
    order = select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent, explore=draw,
                   explore_share=share)
    assert order == ["alpha", "gamma", "beta"]


def test_exploration_with_an_unmeasured_provider_changes_nothing() -> None:
    # Never measured is the least recently measured: cold start already puts it first.
    clock = Clock()
    perf = window(clock)
    measured_at(perf, clock, [("beta", 900), ("alpha", 100)])
    order = select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent, explore=0.0, explore_share=1)
    assert order == ["gamma", "alpha", "beta"]


def test_explored_provider_with_an_open_circuit_is_dropped() -> None:
    clock = Clock()
    perf = window(clock)
    measured_at(perf, clock, [("beta", 900), ("alpha", 100), ("gamma", 500)])
    order = select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent, explore=0.0,
                   explore_share=0.05, is_available=lambda n: n != "beta")
    assert order == ["alpha", "gamma"]


def test_slow_provider_recovers_once_its_samples_age_out() -> None:
    clock = Clock()
    perf = window(clock)
    stream(perf, "gamma", ttft_ms=4000, times=5)  # gamma is slow now
    clock.advance(5 * 60)
    stream(perf, "beta", ttft_ms=300)
    stream(perf, "alpha", ttft_ms=400)
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["beta", "alpha", "gamma"]

    clock.advance(WINDOW_MINUTES * 60 - 5 * 60 + 1)  # gamma's samples are 15 min + 1 s old, the others' 10 min
    assert perf.recent("gamma") is None and perf.recent("beta") is not None
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["gamma", "beta", "alpha"]

    stream(perf, "gamma", ttft_ms=150)  # tried again, and it recovered: now it leads on merit
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["gamma", "beta", "alpha"]
    stream(perf, "beta", ttft_ms=100, times=3)
    assert select("gpt-4o", ALL, strategy="fastest_first_token", recent=perf.recent) == ["beta", "gamma", "alpha"]


# lowest_latency: the same window, its median latency; unmeasured providers after the measured (SPEC §2.2).


def test_lowest_latency_orders_by_median_then_unsampled_in_cheapest_order() -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 1), ("b", 2), ("c", 3), ("d", 4), ("e", 5))]
    perf = window(Clock())
    answer(perf, "c", latency_ms=120)
    perf.add("e", latency_ms=80, ttft_ms=30, tokens_per_sec=None)  # streams count by their whole duration
    answer(perf, "b", latency_ms=300)
    assert select("gpt-4o", providers, strategy="lowest_latency", recent=perf.recent) == ["e", "c", "b", "a", "d"]


def test_lowest_latency_ties_keep_cheapest_order() -> None:
    providers = [provider(n, output_rate=r) for n, r in (("a", 3), ("b", 1), ("c", 2))]
    perf = window(Clock())
    for name in ("a", "b", "c"):
        answer(perf, name, latency_ms=100)
    assert select("gpt-4o", providers, strategy="lowest_latency", recent=perf.recent) == ["b", "c", "a"]


def test_lowest_latency_without_any_samples_is_cheapest() -> None:
    assert select("gpt-4o", ALL, strategy="lowest_latency") == cheapest_names(ALL, "gpt-4o")


def test_lowest_latency_uses_the_median_of_the_window_and_does_not_explore() -> None:
    clock = Clock()
    perf = window(clock)
    for ms in (10, 10, 10, 5000, 5000):  # median 10: one slow request does not demote it
        answer(perf, "alpha", latency_ms=ms)
    clock.advance(60)
    for ms in (50, 50, 50):
        answer(perf, "gamma", latency_ms=ms)
    order = select("gpt-4o", ALL, strategy="lowest_latency", recent=perf.recent, explore=0.0, explore_share=1)
    assert order == ["alpha", "gamma", "beta"]


# --- the window ----------------------------------------------------------------------------------


def test_window_medians_of_each_figure() -> None:
    clock = Clock()
    perf = window(clock)
    assert perf.recent("p") is None
    perf.add("p", latency_ms=100, ttft_ms=None, tokens_per_sec=None)
    clock.advance(1)
    perf.add("p", latency_ms=300, ttft_ms=40, tokens_per_sec=10)
    clock.advance(1)
    perf.add("p", latency_ms=200, ttft_ms=20, tokens_per_sec=None)
    clock.advance(1)
    perf.add("p", latency_ms=400, ttft_ms=30, tokens_per_sec=30)
    clock.advance(1)  # last_at is the newest sample's time, not now
    # latency over all four (even count: mean of the middle two); the others over the samples that have them.
    assert perf.recent("p") == Recent(samples=4, latency_ms=250, ttft_ms=30, tokens_per_sec=20, last_at=clock.now - 1)
    assert perf.recent("other") is None


def test_window_forgets_samples_older_than_its_minutes() -> None:
    clock = Clock()
    perf = window(clock)
    answer(perf, "p", latency_ms=5000)
    clock.advance(60)
    answer(perf, "p", latency_ms=100)
    clock.advance(WINDOW_MINUTES * 60 - 60)  # the first sample is exactly window old: still in
    assert perf.recent("p").samples == 2  # type: ignore[union-attr]
    clock.advance(0.5)
    recent = perf.recent("p")
    assert recent is not None and recent.samples == 1 and recent.latency_ms == 100
    assert recent.last_at == clock.now - (WINDOW_MINUTES * 60 - 60 + 0.5)
    clock.advance(60)
    assert perf.recent("p") is None
    answer(perf, "p", latency_ms=7)  # a provider that comes back starts afresh
    assert perf.recent("p") == Recent(samples=1, latency_ms=7, ttft_ms=None, tokens_per_sec=50, last_at=clock.now)


def test_window_keeps_at_most_max_samples_per_provider() -> None:
    clock = Clock()
    perf = window(clock, max_samples=5)
    for ms in (1000, 1, 2, 3, 4, 5):  # 1000 is pushed out by the sixth sample
        answer(perf, "p", latency_ms=ms)
        clock.advance(1)
    recent = perf.recent("p")
    assert recent is not None and recent.samples == 5 and recent.latency_ms == 3
    answer(perf, "q", latency_ms=9)  # the bound is per provider
    assert perf.recent("q").samples == 1 and perf.recent("p").samples == 5  # type: ignore[union-attr]


def test_window_default_bound() -> None:
    perf = window(Clock())
    for _ in range(MAX_SAMPLES + 10):
        answer(perf, "p", latency_ms=1)
    assert perf.recent("p").samples == MAX_SAMPLES  # type: ignore[union-attr]
