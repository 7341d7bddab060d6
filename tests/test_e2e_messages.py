"""End to end: the Anthropic Messages API (SPEC §12) through real gunicorn, with the `anthropic` SDK as
the client and fake OpenAI-speaking providers on loopback: what the provider receives is checked on
the fake, what the client gets through the SDK's own parsing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import provider
from fakes import CREATED, error, reply, sse, stream_chunks

MODEL = "gpt-4o"
HI = [{"role": "user", "content": "hello there"}]
CLAUDE_CODE_BODY = Path(__file__).parent / "data" / "anthropic" / "claude_code_request.json"


def client(server, **kw: Any) -> anthropic.Anthropic:
    return server.anthropic_client(**kw)


def completion(message: dict[str, Any], finish: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": CREATED, "model": MODEL,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage or {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def settled(server, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        r = server.get(f"/v1/requests/{request_id}")
        if r.status_code == 200 and r.json()["status"] != "streaming":
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


@pytest.fixture
def pair(fake_upstream, make_config, gunicorn_server):
    """`cheap` then `spare` providers (cheap first), rates 4/10/2 and 8/20/4."""
    cheap, spare = fake_upstream(2)

    def start(**tables: Any):
        tables.setdefault("circuit_breaker", {"failure_threshold": 1000, "open_secs": 60})
        config = make_config([provider(cheap, "cheap", input_rate=4, output_rate=10, base_fee=2),
                              provider(spare, "spare", input_rate=8, output_rate=20, base_fee=4)], **tables)
        return gunicorn_server(config)

    return start, cheap, spare


def test_create_answers_a_message_with_usage_and_logs_its_cost(pair) -> None:
    start, cheap, _ = pair
    server = start()
    raw = client(server).messages.with_raw_response.create(model=MODEL, max_tokens=256, messages=HI,
                                                            system="Be brief.", extra_body={"temperature": 0.2})
    message = raw.parse()
    assert message.role == "assistant" and message.content[0].type == "text"
    assert cheap.name in message.content[0].text and message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 10 and message.usage.output_tokens == 20  # the fake's usage
    assert raw.headers["x-arbstr-provider"] == "cheap" and raw.headers["request-id"] == raw.headers["x-arbstr-request-id"]
    sent = cheap.last_request.json
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_tokens"] == 256 and sent["temperature"] == 0.2 and "system" not in sent
    row = settled(server, raw.headers["x-arbstr-request-id"])
    assert row["success"] is True and row["cost_sats"] == pytest.approx((10 * 4 + 20 * 10) / 1000 + 2)
    assert raw.headers["x-arbstr-cost-sats"] == f"{row['cost_sats']:.3f}"


def test_stream_text_and_final_message_with_usage(pair) -> None:
    start, cheap, _ = pair
    cheap.default = sse(usage={"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17})
    server = start()
    with client(server).messages.stream(model=MODEL, max_tokens=100, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == f"Hello from {cheap.name}!"
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5
    assert cheap.last_request.json["stream_options"] == {"include_usage": True}


def test_a_tool_use_round_trip(pair) -> None:
    start, cheap, _ = pair
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    cheap.script(reply(json=completion({"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls")),
                 reply(json=completion({"role": "assistant", "content": "It is 3 °C in Oslo."}, "stop")))
    server = start()
    tools = [{"name": "get_weather", "description": "Weather now",
              "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
                               "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    c = client(server)
    first = c.messages.create(model=MODEL, max_tokens=100, messages=HI, tools=tools)
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Oslo"}
    sent_tools = cheap.requests[0].json["tools"]
    assert sent_tools[0]["function"]["name"] == "get_weather"
    assert "$schema" not in json.dumps(sent_tools)  # providers reject it
    second = c.messages.create(model=MODEL, max_tokens=100, tools=tools, messages=[
        *HI, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 °C"}]}])
    assert second.content[0].text == "It is 3 °C in Oslo."
    history = cheap.requests[1].json["messages"]
    assert history[-2]["tool_calls"][0]["id"] == use.id
    assert history[-1]["role"] == "tool" and history[-1]["tool_call_id"] == use.id and "3 °C" in str(history[-1])


def test_system_blocks_mid_conversation_system_images_and_stop_sequences(pair) -> None:
    start, cheap, _ = pair
    server = start()
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    client(server).messages.create(
        model=MODEL, max_tokens=50, stop_sequences=["\n\nHuman:"],
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in English."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]},
                  {"role": "assistant", "content": "A pixel."},
                  {"role": "system", "content": "Now be verbose."},  # Claude Code sends these
                  {"role": "user", "content": "More?"}])
    sent = cheap.last_request.json
    roles = [m["role"] for m in sent["messages"]]
    assert roles == ["system", "user", "assistant", "system", "user"]
    assert "You are terse." in json.dumps(sent["messages"][0]) and "Answer in English." in json.dumps(sent["messages"][0])
    assert "cache_control" not in json.dumps(sent)
    parts = sent["messages"][1]["content"]
    assert {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}} in parts
    assert sent["stop"] == ["\n\nHuman:"]


def test_unknown_model_is_an_anthropic_not_found(pair) -> None:
    start, cheap, _ = pair
    server = start()
    with pytest.raises(anthropic.NotFoundError) as e:
        client(server).messages.create(model="no-such-model", max_tokens=10, messages=HI)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in e.value.message and not cheap.requests


def test_bad_request_is_an_anthropic_invalid_request(pair) -> None:
    start, _, _ = pair
    server = start()
    r = server.post("/v1/messages", json={"model": MODEL, "messages": HI})  # no max_tokens
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["type"] == "error"


def test_a_mid_stream_cut_makes_the_sdk_raise(pair) -> None:
    start, cheap, _ = pair
    cheap.default = sse(stream_chunks(MODEL, "one two three four"), cut_after=3)
    server = start(server={"stream_idle_timeout_secs": 5})
    with pytest.raises(anthropic.APIError), client(server).messages.stream(model=MODEL, max_tokens=10,
                                                                           messages=HI) as stream:
        "".join(stream.text_stream)


def test_fallback_and_breaker_as_for_chat_completions(pair) -> None:
    start, cheap, spare = pair
    cheap.default = error(503)
    server = start(retry={"max_retries": 0}, circuit_breaker={"failure_threshold": 1, "open_secs": 60})
    c = client(server, max_retries=2)
    for n in range(3):
        raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=10, messages=HI)
        assert raw.parse().content[0].text == f"Hello from {spare.name}!"
        assert raw.headers["x-arbstr-provider"] == "spare"
    assert len(cheap.requests) == 1, "open after the first failure"


def test_an_error_after_arbstr_asked_a_provider_says_do_not_retry(pair) -> None:
    start, cheap, spare = pair
    cheap.default = error(500)
    spare.default = error(500)
    server = start(retry={"max_retries": 0})
    with pytest.raises(anthropic.InternalServerError) as e:
        client(server, max_retries=3).messages.create(model=MODEL, max_tokens=10, messages=HI)
    assert e.value.status_code == 502 and e.value.response.headers["x-should-retry"] == "false"
    assert e.value.body["error"]["type"] == "api_error"
    assert len(cheap.requests) == 1 and len(spare.requests) == 1


def test_auth_token_as_x_api_key(fake_upstream, make_config, gunicorn_server) -> None:
    up = fake_upstream(name="p")
    server = gunicorn_server(make_config([provider(up, "p")], server={"auth_token": "tok-0123456789abcdef"}))
    assert client(server, api_key="tok-0123456789abcdef").messages.create(
        model=MODEL, max_tokens=5, messages=HI).content[0].text
    with pytest.raises(anthropic.AuthenticationError):
        client(server, api_key="wrong-key").messages.create(model=MODEL, max_tokens=5, messages=HI)


def test_count_tokens_is_arbstrs_estimate(pair) -> None:
    start, cheap, _ = pair
    server = start()
    counted = client(server).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "x" * 400}])
    assert counted.input_tokens >= 100 and not cheap.requests


def test_a_claude_code_body_through_an_alias_and_a_cap(fake_upstream, make_config, gunicorn_server) -> None:
    """A recorded Claude-Code-shaped request: Claude's model name, system blocks with cache_control, a
    system message in messages, tools with $schema, thinking, context_management, output_config and
    max_tokens 32000. An alias routes it, the provider's max_output_tokens lowers max_tokens."""
    up = fake_upstream(name="p")
    up.default = sse()
    config = make_config([provider(up, "p", max_output_tokens=4096)], aliases={"claude-*": MODEL})
    server = gunicorn_server(config)
    body = json.loads(CLAUDE_CODE_BODY.read_text()) | {"model": "claude-sonnet-5", "max_tokens": 32000}
    r = server.post("/v1/messages?beta=true", json=body, stream=True,
                    headers={"anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219"})
    text = r.content.decode()
    assert r.status_code == 200, text
    assert text.startswith("event: message_start") and "event: content_block_stop" in text
    assert "event: message_stop" in text
    sent = up.last_request.json
    assert sent["model"] == MODEL and sent["max_tokens"] == 4096
    for dropped in ("thinking", "context_management", "output_config", "metadata"):
        assert dropped not in sent
    assert "$schema" not in json.dumps(sent) and "cache_control" not in json.dumps(sent)
    row = settled(server, r.headers["x-arbstr-request-id"])
    assert row["model"] == body["model"] and row["status"] == "complete"


def test_mock_mode_answers_messages_through_the_same_translation(gunicorn_server) -> None:
    server = gunicorn_server(mock=True)
    c = client(server)
    message = c.messages.create(model="gpt-4o", max_tokens=50, messages=HI)
    assert message.content[0].type == "text" and message.content[0].text and message.usage.output_tokens > 0
    with c.messages.stream(model="gpt-4o", max_tokens=50, messages=HI) as stream:
        assert "".join(stream.text_stream) and stream.get_final_message().usage.output_tokens > 0


def test_rows_record_the_api_and_the_routed_model_and_stats_group_by_api(fake_upstream, make_config,
                                                                         gunicorn_server) -> None:
    up = fake_upstream(name="p")
    server = gunicorn_server(make_config([provider(up, "p")], aliases={"claude-sonnet-5": MODEL}))
    raw = client(server).messages.with_raw_response.create(model="claude-sonnet-5", max_tokens=5, messages=HI)
    chat = server.post("/v1/chat/completions", json={"model": MODEL, "messages": HI})
    messages_row = settled(server, raw.headers["x-arbstr-request-id"])
    chat_row = settled(server, chat.headers["x-arbstr-request-id"])
    assert (messages_row["api"], messages_row["model"], messages_row["routed_model"]) == (
        "messages", "claude-sonnet-5", MODEL)
    assert (chat_row["api"], chat_row["model"], chat_row["routed_model"]) == ("chat", MODEL, MODEL)
    assert up.requests[0].json["model"] == MODEL
    groups = server.get("/v1/stats", params={"group_by": "api"}).json()["groups"]
    assert groups["messages"]["counts"]["total"] == 1 and groups["chat"]["counts"]["total"] == 1
