"""Live prices and balances (SPEC §11): the /models parser on recorded bodies, and the Market's refresh,
views and balances with the fetch and the wall clock injected (no network, no sleeping)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from arbstr_core.config import Provider
from arbstr_core.request.market import Market, parse_balance, parse_models
from arbstr_core.request.routing import select_candidates

# Recorded from a Routstr node (v0.4.5, BTC = $100k) in ../shared/routstr-lab, trimmed to the fields read.
NODE_MODELS = {"object": "list", "data": [
    {"id": "gpt-4o-mini", "name": "GPT-4o mini", "created": 0,
     "sats_pricing": {"prompt": 0.01, "completion": 0.03, "request": 0.001, "image": 0.0, "web_search": 0.0,
                      "internal_reasoning": 0.0, "input_cache_read": 0.0, "input_cache_write": 0.0,
                      "max_prompt_cost": 120.0, "max_completion_cost": 1.6, "max_cost": 121.6}},
    {"id": "cached-model", "sats_pricing": {"prompt": 0.02, "completion": 0.04, "input_cache_read": 0.005}},
    {"id": "no-pricing-yet", "sats_pricing": None},
    {"id": "garbage-pricing", "sats_pricing": {"prompt": "cheap", "completion": 0.1}},
    {"id": "negative", "sats_pricing": {"prompt": -1, "completion": 0.1}},
    {"id": "", "sats_pricing": {"prompt": 1, "completion": 1}},
    "not an entry",
]}


def test_parse_models_reads_sats_per_token_as_sats_per_1k() -> None:
    rates = parse_models(NODE_MODELS)
    assert list(rates) == ["gpt-4o-mini", "cached-model"]
    mini = rates["gpt-4o-mini"]
    assert mini.input_rate == pytest.approx(10) and mini.output_rate == pytest.approx(30)
    assert mini.base_fee == pytest.approx(0.001)
    assert mini.cached_input_rate is None  # the node lists 0 and then bills cache reads at the prompt price
    assert rates["cached-model"].cached_input_rate == pytest.approx(5)


@pytest.mark.parametrize("body", [None, [], "nope", {}, {"data": "x"}, {"error": {"message": "upstream down"}}])
def test_a_body_that_is_no_model_list_is_a_failed_refresh(body: Any) -> None:
    with pytest.raises(ValueError):
        parse_models(body)


def test_an_empty_list_is_a_good_answer_with_no_models() -> None:
    assert parse_models({"data": []}) == {}


@pytest.mark.parametrize(("body", "msats"), [({"balance": 999000, "reserved": 0}, 999000.0), ({"balance": -1}, None),
                                             ({"balance": "1"}, None), ({}, None), (None, None)])
def test_parse_balance(body: Any, msats: float | None) -> None:
    assert parse_balance(body) == msats


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """What the fetch function sees: scripted answers per path, or an exception."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {"models": NODE_MODELS, "balance/info": {"balance": 500_000}}
        self.calls: list[tuple[str, str]] = []

    def __call__(self, provider: Provider, path: str) -> Any:
        self.calls.append((provider.name, path))
        answer = self.answers[path]
        if isinstance(answer, Exception):
            raise answer
        return answer


NODE = Provider("node", "http://node.example/v1", (), discover=True)
STATIC = Provider("static", "http://static.example/v1", ("gpt-4o-mini",), input_rate=50, output_rate=50)


def market(node: Node, clock: Clock, min_balance_sats: float = 0) -> Market:
    return Market([NODE, STATIC], node, refresh_secs=60, min_balance_sats=min_balance_sats, wall=clock)


def test_before_discovery_the_static_config_applies() -> None:
    m = market(Node(), Clock())
    assert m.providers() == [NODE, STATIC]
    assert m.snapshot("node")["prices"] == {"source": "config", "updated_at": None, "age_secs": None, "error": None,
                                            "models": None}


def test_discovered_prices_route_per_model() -> None:
    node, clock = Node(), Clock()
    m = market(node, clock)
    m.refresh()
    assert node.calls == [("node", "models"), ("node", "balance/info")], "only discover providers are asked"
    views = m.providers()
    assert [(p.name, p.models) for p in views] == [("node", ("gpt-4o-mini",)), ("node", ("cached-model",)),
                                                    ("static", ("gpt-4o-mini",))]
    # The node's 30 sats/1k output beats the static 50: cheapest routing sees the live price.
    chosen = select_candidates("gpt-4o-mini", None, views, "cheapest")
    assert [p.name for p in chosen] == ["node", "static"]
    assert chosen[0].output_rate == pytest.approx(30)
    clock.now += 12.5
    snap = m.snapshot("node")
    assert snap["prices"]["source"] == "discovered" and snap["prices"]["age_secs"] == 12.5
    assert snap["prices"]["updated_at"] == "2023-11-14T22:13:20.000Z"
    assert snap["prices"]["models"]["cached-model"] == {"input_rate": 20.0, "output_rate": 40.0, "base_fee": 0.0,
                                                        "cached_input_rate": 5.0}
    assert snap["balance_sats"] == 500.0


def test_a_failed_refresh_keeps_the_last_good_prices_and_says_so() -> None:
    node, clock = Node(), Clock()
    m = market(node, clock)
    m.refresh()
    good = m.providers()
    node.answers["models"] = ConnectionError("node unreachable")
    clock.now += 300
    m.refresh()
    assert m.providers() == good
    snap = m.snapshot("node")["prices"]
    assert snap["source"] == "discovered" and snap["age_secs"] == 300 and "node unreachable" in snap["error"]
    node.answers["models"] = {"data": []}
    m.refresh()
    assert m.snapshot("node")["prices"]["error"] is None and [p.name for p in m.providers()] == ["static"]


def test_new_prices_take_effect_at_once() -> None:
    node, clock = Node(), Clock()
    m = market(node, clock)
    m.refresh()
    doubled = {"data": [{"id": "gpt-4o-mini", "sats_pricing": {"prompt": 0.02, "completion": 0.06}}]}
    node.answers["models"] = doubled
    m.refresh()
    (mini,) = [p for p in m.providers() if p.name == "node"]
    assert (mini.input_rate, mini.output_rate) == (pytest.approx(20), pytest.approx(60))


def test_a_short_balance_is_known_from_refreshes_and_from_answers() -> None:
    node, clock = Node(), Clock()
    m = market(node, clock, min_balance_sats=100)
    assert not m.balance_low("node"), "unknown is not short"
    m.refresh()
    assert not m.balance_low("node")  # 500 sats
    clock.now += 1
    m.note_balance("node", 99_999)  # usage.remaining_balance_msats of an answer
    assert m.balance_low("node") and m.snapshot("node")["balance_sats"] == 99.999
    assert m.snapshot("node")["balance_at"] == "2023-11-14T22:13:21.000Z"
    m.note_balance("node", "junk")
    m.note_balance("node", float("nan"))
    assert m.snapshot("node")["balance_sats"] == 99.999
    assert not m.balance_low("static")


def test_a_node_without_balances_is_not_an_error() -> None:
    node = Node()
    node.answers["balance/info"] = ValueError("HTTP 404")
    m = market(node, Clock())
    m.refresh()
    assert m.snapshot("node")["balance_sats"] is None and m.snapshot("node")["prices"]["error"] is None


def test_without_discover_providers_no_thread_is_started() -> None:
    m = Market([STATIC], Node(), refresh_secs=60, min_balance_sats=0)
    m.start()
    assert m._pid is None


def test_the_refresh_thread_runs_at_once_and_stops() -> None:
    node, refreshed = Node(), threading.Event()

    def fetch(provider: Provider, path: str) -> Any:
        answer = node(provider, path)
        if path == "balance/info":
            refreshed.set()  # the last fetch of a round
        return answer

    m = Market([NODE], fetch, refresh_secs=3600, min_balance_sats=0)
    m.start()
    m.start()  # idempotent in one process
    try:
        assert refreshed.wait(10), "the first round runs at start, not after refresh_secs"
        assert m.snapshot("node")["prices"]["source"] == "discovered"
        assert node.calls.count(("node", "models")) == 1
    finally:
        m.stop()
