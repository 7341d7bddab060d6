"""The routes: POST /v1/chat/completions (handed to its ChatRequest) and the small ones (SPEC §4.3-§4.6)."""

from __future__ import annotations

import math
from typing import Any

from flask import Flask, Response, g, jsonify, request

from ..errors import bad_request
from ..request import cost as costs
from ..request import perf
from ..request.body import parse_body
from ..request.chat import plan
from ..request.edges import MessagesEdge
from ..request.state import AppState

CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
API_OF_PATH = {CHAT_PATH: "chat", MESSAGES_PATH: "messages"}  # the routes a ChatRequest answers


def register(app: Flask, state: AppState) -> None:
    config = state.config

    @app.post(CHAT_PATH)
    def chat_completions() -> Response:
        return g.chat.handle(request)

    @app.post(MESSAGES_PATH)
    def messages() -> Response:
        """Anthropic's Messages API over the same lifecycle (Claude Code adds ``?beta=true``)."""
        return g.chat.handle(request)

    @app.post(MESSAGES_PATH + "/count_tokens")
    def count_tokens() -> Response:
        """arbstr's estimate (⌈UTF-8 bytes of all text / 4⌉), not a provider's tokenizer."""
        return jsonify({"input_tokens": MessagesEdge.count_tokens(request.get_data(cache=False))})

    @app.get("/v1/models")
    def models() -> Response:
        seen = dict.fromkeys(m for p in state.market.providers() for m in p.models)
        return jsonify({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "arbstr"} for m in seen]})

    @app.post("/v1/cost")
    def estimate() -> Response:
        body = parse_body(request.get_data(cache=False))
        policy, candidates, _ = plan(state, body, request.headers.get("X-Arbstr-Policy"))
        provider = candidates[0]
        input_tokens, output_tokens = costs.estimate_tokens(body)
        try:
            estimate = costs.estimate_sats(provider, input_tokens, output_tokens)
        except OverflowError:
            estimate = math.inf
        if not math.isfinite(estimate):  # would be a 500, or `Infinity`, which is not JSON
            raise bad_request("max_tokens is too large to estimate a cost", param="max_tokens")
        return jsonify({
            "model": body["model"],
            "provider": provider.name,
            "policy": policy.name if policy else None,
            "estimated_input_tokens": input_tokens,
            "estimated_output_tokens": output_tokens,
            "estimated_cost_sats": round(estimate, 3),
            "rates": {"input_rate": provider.input_rate, "output_rate": provider.output_rate,
                      "base_fee": provider.base_fee, "cached_input_rate": provider.cached_rate},
        })

    @app.get("/providers")
    def providers() -> Response:
        circuits = state.breakers.snapshot()
        return jsonify({"providers": [
            provider_info(p, circuits[p.name]) | state.market.snapshot(p.name)
            | {"recent": perf.snapshot(state.perf.recent(p.name))} for p in config.providers]})

    @app.get("/health")
    def health() -> tuple[Response, int]:
        circuits = state.breakers.snapshot()
        for name, circuit in circuits.items():
            circuit["balance_low"] = state.market.balance_low(name)  # never the amount: /health is open
        store = state.logstore.health()
        down = [c["state"] == "open" or c["key_rejected"] is not None for c in circuits.values()]
        if down and all(down):
            status = "unhealthy"
        elif any(c["state"] != "closed" or c["key_rejected"] or c["balance_low"] for c in circuits.values()) \
                or state.logstore.degraded():
            status = "degraded"
        else:
            status = "ok"
        body = {"status": status, "providers": circuits, "log": store}
        return jsonify(body), 503 if status == "unhealthy" else 200


def provider_info(p: Any, circuit: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": p.name,
        "url": p.url,
        "models": list(p.models),
        "input_rate": p.input_rate,
        "output_rate": p.output_rate,
        "base_fee": p.base_fee,
        "cached_input_rate": p.cached_rate,
        "key_source": p.key_source,
        "api_key": p.api_key.masked() if p.api_key is not None else None,
        "circuit": {"state": circuit["state"], "failure_count": circuit["failure_count"]},
        "key_rejected": circuit["key_rejected"] is not None,
    }
