"""Cost in satoshis (SPEC §2.3) and the /v1/cost estimate (§4.4)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from arbstr_core.config import Provider
from arbstr_core.request.cost import (
    DEFAULT_OUTPUT_ESTIMATE,
    PROVIDER,
    RATES,
    Usage,
    charge,
    estimate_sats,
    estimate_tokens,
    header_value,
    merge_usage,
    rates_sats,
    read_usage,
    reported_sats,
)


def provider(input_rate: float, output_rate: float, base_fee: float, cached_input_rate: float | None = None,
             name: str = "p") -> Provider:
    return Provider(name, f"http://{name}.example/v1", ("m",), input_rate=input_rate, output_rate=output_rate,
                    base_fee=base_fee, cached_input_rate=cached_input_rate)


@pytest.mark.parametrize(
    ("rates", "input_tokens", "output_tokens"),
    [
        ((10, 30, 1), 1000, 1000),
        ((10, 30, 1), 123, 456),
        ((0.5, 1.25, 0.1), 7, 3),
        ((0, 0, 0), 10_000, 10_000),
        ((10, 30, 2), 0, 0),
        ((3, 7, 0), 1, 1),
    ],
)
def test_cost_formula(rates: tuple[float, float, float], input_tokens: int, output_tokens: int) -> None:
    input_rate, output_rate, base_fee = rates
    expected = (input_tokens * input_rate + output_tokens * output_rate) / 1000 + base_fee
    assert rates_sats(provider(*rates), Usage(input_tokens, output_tokens)) == expected


def test_cost_is_never_rounded() -> None:
    # 1 input token at 1 sat/1k and 1 output token at 3 sats/1k: 0.004 sats, plus no fee.
    c = rates_sats(provider(1, 3, 0), Usage(1, 1))
    assert c == pytest.approx(0.004)
    assert isinstance(c, float)


def test_cached_and_reasoning_tokens() -> None:
    """The issue's example: 1000 prompt of which 800 cached, 100 completion of which 60 reasoning, rates
    5 / cached 1 / 20: (200 × 5 + 800 × 1 + 100 × 20) / 1000 = 3.8 sats; reasoning is billed as output."""
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
             "prompt_tokens_details": {"cached_tokens": 800}, "completion_tokens_details": {"reasoning_tokens": 60}}
    assert read_usage(usage) == Usage(1000, 100, cached=800, reasoning=60)
    c = charge(provider(5, 20, 0, cached_input_rate=1), usage)
    assert c.cost_sats == pytest.approx(3.8) and c.cost_source == RATES and c.rates_cost_sats == c.cost_sats
    assert header_value(c.cost_sats) == "3.800"
    assert c.row() == {"input_tokens": 1000, "output_tokens": 100, "cached_tokens": 800, "reasoning_tokens": 60,
                       "cost_sats": c.cost_sats, "cost_source": "rates", "rates_cost_sats": c.cost_sats,
                       "max_cost_sats": c.cost_sats}


def test_without_cached_input_rate_cached_tokens_cost_the_input_rate() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100, "prompt_tokens_details": {"cached_tokens": 800}}
    assert charge(provider(5, 20, 0), usage).cost_sats == pytest.approx((1000 * 5 + 100 * 20) / 1000)


@pytest.mark.parametrize("details", [{"cached_tokens": 2000}, {"cached_tokens": -1}, {"cached_tokens": "8"},
                                     {"cached_tokens": None}, "junk", None])
def test_implausible_cached_counts_count_as_none_cached(details: Any) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 0, "prompt_tokens_details": details}
    assert read_usage(usage) == Usage(1000, 0, cached=0)


@pytest.mark.parametrize(
    ("cost", "header"),
    [(0.004, "0.004"), (15.91, "15.910"), (1.0, "1.000"), (2.345678, "2.346"), (1234.5, "1234.500"),
     (0.0, "0.000"), (0.5680000000000001, "0.568")],
)
def test_header_value_has_msat_precision(cost: float, header: str) -> None:
    assert header_value(cost) == header


def test_tokens_from_usage() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}
    assert read_usage(usage) == Usage(12, 34)
    assert read_usage({"prompt_tokens": 0, "completion_tokens": 0}) == Usage(0, 0)


@pytest.mark.parametrize(
    "usage",
    [
        None,
        {},
        [],
        "usage",
        {"prompt_tokens": 12},
        {"completion_tokens": 12},
        {"prompt_tokens": None, "completion_tokens": 1},
        {"prompt_tokens": "12", "completion_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": 1},
        {"prompt_tokens": -1, "completion_tokens": 1},
        {"prompt_tokens": 1.5, "completion_tokens": 1},
        {"prompt_tokens": 10**400, "completion_tokens": 1},
        {"prompt_tokens": 2**53 + 1, "completion_tokens": 1},
        {"input_tokens": 1, "output_tokens": 1},  # Anthropic names are not OpenAI usage
    ],
)
def test_missing_or_malformed_usage_is_unknown(usage: Any) -> None:
    assert read_usage(usage) is None
    assert charge(provider(10, 30, 1), usage).row() == {
        "input_tokens": None, "output_tokens": None, "cached_tokens": None, "reasoning_tokens": None,
        "cost_sats": None, "cost_source": None, "rates_cost_sats": None, "max_cost_sats": None}


def test_zero_tokens_cost_the_base_fee_not_nothing() -> None:
    assert charge(provider(10, 30, 2.5), {"prompt_tokens": 0, "completion_tokens": 0}).cost_sats == 2.5


def test_rates_that_overflow_make_the_cost_unknown() -> None:
    assert charge(provider(1e308, 0, 0), {"prompt_tokens": 10**6, "completion_tokens": 0}).cost_sats is None


# --- reported cost (§11) -------------------------------------------------------------------------


USAGE = {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30}


def test_reported_cost_in_the_body_wins_over_rates() -> None:
    usage = {**USAGE, "cost": {"total_msats": 1568, "input_msats": 500}, "cost_sats": 1}  # cost_sats is rounded down
    c = charge(provider(10, 30, 1), usage)
    assert (c.cost_sats, c.cost_source) == (1.568, PROVIDER)
    assert c.rates_cost_sats == pytest.approx((20 * 10 + 10 * 30) / 1000 + 1)  # kept, so drift shows


def test_reported_cost_in_the_header() -> None:
    c = charge(provider(10, 30, 1), USAGE, header=" 2000 ")
    assert (c.cost_sats, c.cost_source) == (2.0, PROVIDER)


def test_the_body_wins_over_the_header() -> None:
    assert charge(provider(10, 30, 1), {**USAGE, "cost": {"total_msats": 500}}, header="2000").cost_sats == 0.5


@pytest.mark.parametrize("msats", [None, "1000", -5, True, float("nan"), float("inf"), 10**400, [1]])
def test_an_unusable_reported_cost_falls_back_to_rates(msats: Any) -> None:
    c = charge(provider(10, 30, 1), {**USAGE, "cost": {"total_msats": msats}})
    assert c.cost_source == RATES and c.cost_sats == c.rates_cost_sats
    assert reported_sats(USAGE, "not a number") is None and reported_sats(USAGE, "nan") is None


def test_a_reported_cost_without_usable_usage_is_still_the_cost() -> None:
    c = charge(provider(10, 30, 1), {"cost": {"total_msats": 700}})
    assert (c.cost_sats, c.cost_source, c.rates_cost_sats, c.max_cost_sats, c.usage) == (0.7, PROVIDER, None, None, None)


# --- savings: the dearest provider that could have served the request (§2.3) ------------------------


def test_max_cost_is_the_dearest_of_the_field_at_this_usage() -> None:
    cheap, dear = provider(1, 2, 0, name="cheap"), provider(10, 20, 1, name="dear")
    c = charge(cheap, USAGE, [cheap, dear])
    assert c.cost_sats == pytest.approx((20 * 1 + 10 * 2) / 1000)
    assert c.max_cost_sats == pytest.approx((20 * 10 + 10 * 20) / 1000 + 1)


def test_round_robin_between_opposite_rates_saves_nothing_and_never_less() -> None:
    """Rates 100/0 and 0/100: an input-heavy request sent to the first and an output-heavy one sent to the
    second each cost what the dearer of the two would have charged for it, so savings are 0, not negative."""
    a, b = provider(100, 0, 0, name="a"), provider(0, 100, 0, name="b")
    heavy_in = charge(a, {"prompt_tokens": 1000, "completion_tokens": 0}, [a, b])
    heavy_out = charge(b, {"prompt_tokens": 0, "completion_tokens": 1000}, [a, b])
    assert (heavy_in.cost_sats, heavy_in.max_cost_sats) == (100, 100)
    assert (heavy_out.cost_sats, heavy_out.max_cost_sats) == (100, 100)


def test_max_cost_without_a_field_is_the_providers_own() -> None:
    c = charge(provider(10, 30, 1), USAGE)
    assert c.max_cost_sats == c.rates_cost_sats


# --- usage across stream chunks (§6.2) -------------------------------------------------------------


def test_usage_split_over_two_chunks_is_merged() -> None:
    merged = merge_usage(None, {"prompt_tokens": 20, "completion_tokens": None})
    merged = merge_usage(merged, {"completion_tokens": 10, "prompt_tokens": None, "cost": {"total_msats": 90}})
    assert merged == {"prompt_tokens": 20, "completion_tokens": 10, "cost": {"total_msats": 90}}
    assert charge(provider(10, 30, 1), merged).cost_sats == 0.09
    assert merge_usage(merged, "junk") is merged


# --- the §4.4 estimate --------------------------------------------------------------------------


def expected_input(*texts: str) -> int:
    return math.ceil(len("".join(texts).encode("utf-8")) / 4)


@pytest.mark.parametrize(
    "text",
    ["", "a", "abcd", "abcde", "héllo", "€€€", "😀", "日本語のテキスト", "x" * 1001, "mixed ascii and ünïcødé 😀"],
)
def test_input_estimate_is_ceil_utf8_bytes_over_4(text: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    assert estimate_tokens(body) == (expected_input(text), DEFAULT_OUTPUT_ESTIMATE)


def test_input_estimate_counts_multibyte_characters_by_bytes() -> None:
    # 3 characters but 12 bytes (4 each): 3 tokens, not 1.
    body = {"messages": [{"role": "user", "content": "😀😀😀"}]}
    assert estimate_tokens(body)[0] == 3


def test_input_estimate_sums_every_message() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Explain SSE."},
    ]
    assert estimate_tokens({"messages": messages})[0] == expected_input(*(m["content"] for m in messages))


def test_input_estimate_ignores_non_text_parts_and_junk() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "describe"}]}, "junk", None]
    assert estimate_tokens({"messages": messages})[0] == expected_input("describe")


def test_input_estimate_with_no_messages() -> None:
    assert estimate_tokens({"messages": []}) == (0, DEFAULT_OUTPUT_ESTIMATE)
    assert estimate_tokens({}) == (0, DEFAULT_OUTPUT_ESTIMATE)


def test_output_estimate_is_max_tokens_or_256() -> None:
    assert DEFAULT_OUTPUT_ESTIMATE == 256
    assert estimate_tokens({"messages": [], "max_tokens": 1000})[1] == 1000
    assert estimate_tokens({"messages": [], "max_completion_tokens": 77})[1] == 77
    assert estimate_tokens({"messages": [], "max_tokens": 5, "max_completion_tokens": 77})[1] == 5


@pytest.mark.parametrize("value", [0, -5, None, "100", 12.5, True, False, [100]])
def test_unusable_max_tokens_falls_back_to_256(value: Any) -> None:
    assert estimate_tokens({"messages": [], "max_tokens": value})[1] == 256


def test_estimated_cost_uses_the_cost_formula() -> None:
    p = provider(10, 30, 1)
    body = {"messages": [{"role": "user", "content": "How much is this? " * 10}], "max_tokens": 300}
    input_tokens, output_tokens = estimate_tokens(body)
    assert (input_tokens, output_tokens) == (expected_input("How much is this? " * 10), 300)
    assert estimate_sats(p, input_tokens, output_tokens) == (input_tokens * 10 + 300 * 30) / 1000 + 1
