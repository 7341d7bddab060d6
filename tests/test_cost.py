"""Cost in satoshis (SPEC §2.3) and the /v1/cost estimate (§4.4)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from arbstr_core.config import Provider
from arbstr_core.request.cost import (
    DEFAULT_OUTPUT_ESTIMATE,
    cost_sats,
    estimate_tokens,
    header_value,
    tokens,
    usage_cost,
)


def provider(input_rate: float, output_rate: float, base_fee: float) -> Provider:
    return Provider("p", "http://p.example/v1", ("m",), input_rate=input_rate, output_rate=output_rate,
                    base_fee=base_fee)


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
    assert cost_sats(provider(*rates), input_tokens, output_tokens) == expected


def test_cost_is_never_rounded() -> None:
    # 1 input token at 1 sat/1k and 1 output token at 3 sats/1k: 0.004 sats, plus no fee.
    c = cost_sats(provider(1, 3, 0), 1, 1)
    assert c == pytest.approx(0.004)
    assert isinstance(c, float)
    assert cost_sats(provider(10, 30, 1), 123, 456) == pytest.approx(1 + 1.23 + 13.68)


@pytest.mark.parametrize(
    ("cost", "header"),
    [(0.004, "0.00"), (15.91, "15.91"), (1.0, "1.00"), (2.345678, "2.35"), (1234.5, "1234.50"), (0.0, "0.00")],
)
def test_header_value_has_two_decimals(cost: float, header: str) -> None:
    assert header_value(cost) == header


def test_tokens_from_usage() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}
    assert tokens(usage) == (12, 34)
    assert tokens({"prompt_tokens": 0, "completion_tokens": 0}) == (0, 0)


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
        {"input_tokens": 1, "output_tokens": 1},  # Anthropic names are not OpenAI usage
    ],
)
def test_missing_or_malformed_usage_is_unknown(usage: Any) -> None:
    assert tokens(usage) is None
    assert usage_cost(provider(10, 30, 1), usage) == (None, None, None)


def test_usage_cost_with_usage() -> None:
    p = provider(10, 30, 1)
    usage = {"prompt_tokens": 200, "completion_tokens": 50}
    assert usage_cost(p, usage) == (200, 50, (200 * 10 + 50 * 30) / 1000 + 1)


def test_zero_tokens_cost_the_base_fee_not_nothing() -> None:
    assert usage_cost(provider(10, 30, 2.5), {"prompt_tokens": 0, "completion_tokens": 0}) == (0, 0, 2.5)


def test_unknown_usage_is_none_never_zero() -> None:
    _, _, c = usage_cost(provider(0, 0, 0), None)
    assert c is None


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
    assert cost_sats(p, input_tokens, output_tokens) == (input_tokens * 10 + 300 * 30) / 1000 + 1
