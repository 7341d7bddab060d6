"""End to end: a provider's key and balance faults (SPEC §5.1, §11) through real gunicorn, fake providers
answering as a Routstr node does (error shapes from its source), the openai SDK as client.

The real node and mint are in test_routstr_lab.py; these pin arbstr's side of the same faults, cheaply.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from conftest import provider
from fakes import completion_body, error, reply

MSG = [{"role": "user", "content": "hello there"}]
SPENT = "cashuBspent0123456789abcdef"


def node_error(status: int, message: str, type: str, code: str) -> Any:
    """A Routstr node's error body: the error both under "detail" and at the top (core/exceptions.py)."""
    err = {"message": message, "type": type, "code": code}
    return reply(status, json={"detail": {"error": err}, "error": err, "request_id": "r-1"})


def health(server) -> dict[str, Any]:
    return server.get("/health").json()


@pytest.mark.parametrize(("answer", "complaint"), [
    (node_error(400, "Token already spent", "invalid_request_error", "cashu_token_already_spent"), "already spent"),
    (node_error(400, "Invalid Cashu token", "invalid_request_error", "invalid_cashu_token"), "Invalid Cashu"),
    (error(401, "Invalid API key", code="invalid_api_key"), "Invalid API key"),
    (error(403, "Forbidden"), "Forbidden"),
], ids=["spent", "invalid-token", "401", "403"])
def test_a_rejected_key_falls_back_and_is_never_used_again(fake_upstream, make_config, gunicorn_server,
                                                           answer: Any, complaint: str) -> None:
    spent, other = fake_upstream(2)
    spent.default = answer
    config = make_config([provider(spent, "spent", input_rate=1, output_rate=1, api_key=SPENT),
                          provider(other, "other", input_rate=5, output_rate=5)])
    server = gunicorn_server(config)
    client = server.openai_client()
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert first.headers["x-arbstr-provider"] == "other" and first.headers["x-arbstr-retries"] == "1/spent"
    state = health(server)
    assert state["status"] == "degraded"
    assert complaint in state["providers"]["spent"]["key_rejected"]
    assert state["providers"]["spent"]["state"] == "closed"  # not a breaker matter: skipped until restart
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        assert raw.headers["x-arbstr-provider"] == "other" and "x-arbstr-retries" not in raw.headers
    assert len(spent.requests) == 1 and len(other.requests) == 4
    listed = {p["name"]: p for p in server.get("/providers").json()["providers"]}
    assert listed["spent"]["key_rejected"] is True and listed["other"]["key_rejected"] is False
    assert SPENT not in server.log_text() and SPENT not in server.get("/health").text


def test_a_rejected_key_at_the_only_provider_is_a_502_then_503(fake_upstream, make_config, gunicorn_server) -> None:
    only = fake_upstream(name="only")
    only.default = error(401, "Invalid API key", code="invalid_api_key")
    server = gunicorn_server(make_config([provider(only, "only")]))
    client = server.openai_client(max_retries=2)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.status_code == 502 and "only: provider_auth HTTP 401 Invalid API key" in e.value.message
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.status_code == 503
    assert len(only.requests) == 1, "never asked again, and the SDK was told not to re-send"
    assert health(server)["status"] == "unhealthy"


def test_402_falls_back_and_alone_says_the_balance_ran_out(fake_upstream, make_config, gunicorn_server) -> None:
    broke, other = fake_upstream(2)
    broke.default = node_error(402, "Insufficient balance: 121.661 sats (121661 msats) required for this model; "
                               "0.5 sats (500 msats) available.", "insufficient_quota", "insufficient_balance")
    server = gunicorn_server(make_config([provider(broke, "broke", input_rate=1), provider(other, "other", input_rate=5)]))
    raw = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.headers["x-arbstr-provider"] == "other" and raw.headers["x-arbstr-retries"] == "1/broke"
    assert health(server)["providers"]["broke"]["key_rejected"] is None  # a balance is no key fault

    alone = gunicorn_server(make_config([provider(broke, "broke")]))
    with pytest.raises(openai.APIStatusError) as e:
        alone.openai_client(max_retries=2).chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.status_code == 502 and e.value.code == "insufficient_balance"
    assert "balance ran out" in e.value.message and "broke: insufficient_balance HTTP 402" in e.value.message
    assert "0.5 sats (500 msats) available" in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"


def test_a_balance_known_to_be_short_is_skipped(fake_upstream, make_config, gunicorn_server) -> None:
    """A Routstr answer says what is left (usage.remaining_balance_msats); below min_balance_sats the
    provider is skipped, and /health says so without the amount."""
    low, other = fake_upstream(2)
    body = completion_body("gpt-4o", "from low")
    body["usage"] |= {"remaining_balance_msats": 4_321, "cost": {"total_msats": 1_500}}
    low.default = reply(json=body)
    config = make_config([provider(low, "low", input_rate=1), provider(other, "other", input_rate=5)],
                         market={"min_balance_sats": 10})
    server = gunicorn_server(config)
    first = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert first.headers["x-arbstr-provider"] == "low" and first.headers["x-arbstr-cost-sats"] == "1.500"
    state = health(server)
    assert state["status"] == "degraded" and state["providers"]["low"]["balance_low"] is True
    assert "4.321" not in server.get("/health").text and "4321" not in server.get("/health").text
    listed = {p["name"]: p for p in server.get("/providers").json()["providers"]}
    assert listed["low"]["balance_sats"] == 4.321 and listed["low"]["balance_at"] is not None
    second = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert second.headers["x-arbstr-provider"] == "other" and "x-arbstr-retries" not in second.headers
    assert len(low.requests) == 1
