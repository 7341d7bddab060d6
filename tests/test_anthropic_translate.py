"""``request/anthropic``: Anthropic Messages ⇄ OpenAI chat completions, both ways, on recorded bodies.

The contract is the real SDKs' own types: requests out must validate as OpenAI chat requests, answers and
every streamed event must validate as the ``anthropic`` SDK's ``Message`` / ``RawMessageStreamEvent``, and
the SDK itself (over an in-memory transport) must assemble our streams into the message we meant.
Fixtures under tests/data/anthropic/ are hand-made in the shapes CLAUDE-CODE.md records on the wire.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import ContentBlockParam, Message, MessageParam, RawMessageStreamEvent, TextBlockParam, ToolParam
from anthropic.types.shared import ErrorResponse
from openai.types.chat import completion_create_params

from arbstr_core.request import anthropic as t
from arbstr_core.request import sse

DATA = Path(__file__).parent / "data" / "anthropic"
EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
OPENAI_STREAMING = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsStreaming)
OPENAI_PLAIN = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def chunks(name: str) -> list[dict[str, Any]]:
    """A recorded provider stream as its parsed chunks, split the way the relay splits it; ends in [DONE]."""
    out: list[dict[str, Any]] = []
    events = sse.EventSplitter().feed((DATA / name).read_bytes())
    assert sse.event_data(events[-1]) == sse.DONE
    for event in events[:-1]:
        data = sse.event_data(event)
        assert data is not None
        chunk = sse.parse_json(data)
        assert chunk is not None
        out.append(chunk)
    return out


def parse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Named SSE events as (event name, data); each must be exactly ``event: NAME\\ndata: JSON\\n\\n``."""
    out = []
    for text in raw.decode("utf-8").split("\n\n")[:-1]:
        name_line, data_line = text.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        out.append((name_line[7:], json.loads(data_line[6:])))
    assert raw.endswith(b"\n\n")
    return out


def validated(events: list[bytes]) -> list[dict[str, Any]]:
    """Each event's data, checked against the SDK's stream event union and its own event name."""
    out = []
    for name, data in parse(b"".join(events)):
        assert data["type"] == name
        if name != "ping":
            EVENT.validate_python(data)
        out.append(data)
    return out


def assemble(events: list[dict[str, Any]]) -> Message:
    """The message the SDK's own stream accumulator builds from our events."""
    snapshot, json_bufs = None, {}
    for event in events:
        snapshot = accumulate_event(event=EVENT.validate_python(event), current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return Message.model_validate(snapshot.to_dict())


def transcode(name: str, **kwargs: Any) -> tuple[list[list[bytes]], list[bytes]]:
    coder = t.StreamTranscoder("gpt-4o", "msg_test", **kwargs)
    per_chunk = [coder.feed(chunk) for chunk in chunks(name)]
    return per_chunk, coder.finish(None)


def sdk_client(body: bytes, *, stream: bool, status: int = 200) -> anthropic.Anthropic:
    """The real SDK, answered in memory by ``body``."""
    def answer(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/messages"
        kind = "text/event-stream" if stream else "application/json"
        return httpx2.Response(status, headers={"content-type": kind}, content=body)

    return anthropic.Anthropic(api_key="sk-test", base_url="http://arbstr.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def request(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "max_tokens": 1024, "messages": messages, **fields}


# ---------------------------------------------------------------- request: Anthropic → OpenAI


def test_claude_code_fixture_is_a_messages_request() -> None:
    body = load("claude_code_request.json")
    for message in body["messages"]:
        pydantic.TypeAdapter(MessageParam).validate_python(message)
        for block in message["content"] if isinstance(message["content"], list) else ():
            pydantic.TypeAdapter(ContentBlockParam).validate_python(block)  # Iterable fields validate lazily
    for tool in body["tools"]:
        pydantic.TypeAdapter(ToolParam).validate_python(tool)
    for block in body["system"]:
        pydantic.TypeAdapter(TextBlockParam).validate_python(block)


def test_claude_code_request_to_openai() -> None:
    body = load("claude_code_request.json")
    out, dropped = t.to_openai(body)
    OPENAI_STREAMING.validate_python(out)
    assert dropped == ["metadata", "thinking", "context_management", "output_config"]
    assert [m["role"] for m in out["messages"]] == ["system", "user", "system", "assistant", "tool", "user"]
    system, first, mid_system, assistant, result, reminder = out["messages"]
    assert system["content"] == "\n\n".join(block["text"] for block in body["system"])
    assert first["content"].endswith("</system-reminder>\n\n\nrun the tests and fix what fails")
    assert mid_system["content"] == body["messages"][1]["content"]  # kept where it stands
    assert assistant["content"] == "I'll run the test suite first."  # the thinking block is gone
    (call,) = assistant["tool_calls"]
    assert call["id"] == result["tool_call_id"] == "toolu_01A09q90qw90lq917835lq9"
    assert json.loads(call["function"]["arguments"]) == {"command": "pytest -q", "description": "Run the test suite"}
    assert result["content"].startswith(t.ERROR_PREFIX + "Exit code 1\n")  # is_error reaches the model
    assert reminder == {"role": "user", "content": body["messages"][3]["content"][1]["text"]}
    assert out["max_tokens"] == 32000
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert [tool["function"]["name"] for tool in out["tools"]] == ["Bash", "Read", "TodoWrite"]
    assert out["tools"][0]["function"]["parameters"]["required"] == ["command"]
    assert "tool_choice" not in out
    wire = json.dumps(out)
    for never in ("$schema", "cache_control", "signature", "device_id", "session_id", "2d1c7f0e", "adaptive",
                  "clear_thinking", "effort"):
        assert never not in wire, never


def test_tool_results_go_right_after_the_assistant_message_that_called_them() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    messages = [
        user("compare the screenshots"),
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_a", "name": "Read", "input": {"file_path": "/a.png"}},
            {"type": "tool_use", "id": "toolu_b", "name": "Read", "input": {"file_path": "/b.txt"}}]},
        {"role": "system", "content": [{"type": "text", "text": "mode changed"}]},
        user([{"type": "text", "text": "also this"},
              {"type": "tool_result", "tool_use_id": "toolu_b", "content": [{"type": "text", "text": "line 1"},
                                                                          {"type": "text", "text": "line 2"}]},
              {"type": "tool_result", "tool_use_id": "toolu_a", "content": [image]},
              {"type": "tool_result", "tool_use_id": "toolu_gone", "content": "stale"}]),
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_c", "name": "Bash", "input": {}}]},
        user([{"type": "tool_result", "tool_use_id": "toolu_c"}, {"type": "text", "text": ""}]),
    ]
    out, _ = t.to_openai(request(messages))
    OPENAI_PLAIN.validate_python(out)
    assert [m["role"] for m in out["messages"]] == [
        "user", "assistant", "tool", "tool", "system", "user", "assistant", "tool"]  # no empty user message
    assert out["messages"][7] == {"role": "tool", "tool_call_id": "toolu_c", "content": ""}
    assert out["messages"][2] == {"role": "tool", "tool_call_id": "toolu_b", "content": "line 1\nline 2"}
    assert out["messages"][3] == {"role": "tool", "tool_call_id": "toolu_a",
                                  "content": "[1 attachment(s) in the next user message]"}
    assert out["messages"][1]["content"] is None
    # the tool's image first, then the user's own text, then a result for no open call, as text
    assert out["messages"][5]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "text", "text": "also this"},
        {"type": "text", "text": "[Result of tool call toolu_gone]\nstale"},
    ]


def test_images_documents_and_multi_block_content() -> None:
    messages = [
        user([{"type": "text", "text": "what is in these?"},
              {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
              {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
              {"type": "document", "title": "spec.pdf",
               "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0x"}},
              {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain doc"}},
              {"type": "image", "source": {"type": "file", "file_id": "file_011"}},
              {"type": "search_result", "source": "s", "title": "t", "content": []}]),
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "EmwKAhgB"},
                                          {"type": "text", "text": "A cat"}, {"type": "text", "text": "and a spec."}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "sig"}]},
        user([{"type": "text", "text": "thanks", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "bye"}]),
    ]
    out, dropped = t.to_openai(request(messages))
    OPENAI_PLAIN.validate_python(out)
    first, assistant, last = out["messages"]  # the thinking-only assistant turn is gone
    assert first["content"] == [
        {"type": "text", "text": "what is in these?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "file", "file": {"filename": "spec.pdf", "file_data": "data:application/pdf;base64,JVBERi0x"}},
        {"type": "text", "text": "plain doc"},
    ]
    assert assistant == {"role": "assistant", "content": "A cat\n\nand a spec."}
    assert last == {"role": "user", "content": "thanks\n\nbye"}
    assert dropped == ["content:image:file", "content:search_result"]


def test_schema_keywords_removed_at_every_depth_but_not_names_or_data() -> None:
    schema = {"$schema": "x", "type": "object", "properties": {
        "$schema": {"type": "string", "default": {"$schema": "kept"}},
        "nested": {"type": "array", "items": {"$schema": "y", "anyOf": [{"$schema": "z", "type": "string"}]}},
        "mode": {"enum": [{"$schema": "data"}]}}}
    assert t.clean_schema(schema) == {"type": "object", "properties": {
        "$schema": {"type": "string", "default": {"$schema": "kept"}},
        "nested": {"type": "array", "items": {"anyOf": [{"type": "string"}]}},
        "mode": {"enum": [{"$schema": "data"}]}}}
    assert schema["$schema"] == "x"  # the client's body is not modified


@pytest.mark.parametrize(("choice", "expected", "parallel"), [
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "Bash"}, {"type": "function", "function": {"name": "Bash"}}, None),
    ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
])
def test_tool_choice(choice: dict[str, Any], expected: Any, parallel: bool | None) -> None:
    tools = [{"name": "Bash", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
             {"type": "custom", "name": "Noop", "description": "does nothing"}]
    out, _ = t.to_openai(request([user("hi")], tools=tools, tool_choice=choice))
    OPENAI_PLAIN.validate_python(out)
    assert out["tool_choice"] == expected
    assert out.get("parallel_tool_calls") == parallel
    assert out["tools"][1] == {"type": "function", "function": {
        "name": "Noop", "description": "does nothing", "parameters": {"type": "object", "properties": {}}}}


def test_server_tools_and_a_choice_without_tools_are_not_forwarded() -> None:
    body = request([user("hi")], tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
                   tool_choice={"type": "any"})
    out, dropped = t.to_openai(body)
    assert "tools" not in out and "tool_choice" not in out
    assert dropped == ["tools:web_search_20250305"]


def test_sampling_fields_and_what_is_dropped() -> None:
    body = request("not yet", temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:", "END"],
                   service_tier="auto", metadata={"user_id": "u-123"}, stream=False, surprise={"a": 1})
    body["messages"] = [user("hi")]
    out, dropped = t.to_openai(body)
    OPENAI_PLAIN.validate_python(out)
    assert out == {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1024,
                   "temperature": 0.2, "top_p": 0.9, "stop": ["\n\nHuman:", "END"]}
    assert dropped == ["top_k", "service_tier", "metadata", "surprise"]


@pytest.mark.parametrize(("body", "message"), [
    ([], "Request body must be a JSON object"),
    ({"messages": [], "max_tokens": 1}, "model: Field required"),
    ({"model": "", "messages": [], "max_tokens": 1}, "model: Input should be a non-empty string"),
    ({"model": "m", "max_tokens": 1}, "messages: Field required"),
    ({"model": "m", "messages": {"role": "user"}, "max_tokens": 1}, "messages: Input should be a valid list"),
    ({"model": "m", "messages": []}, "max_tokens: Field required"),
    ({"model": "m", "messages": [], "max_tokens": 0}, "max_tokens: Input should be a positive integer"),
    ({"model": "m", "messages": [], "max_tokens": -5}, "max_tokens: Input should be a positive integer"),
    ({"model": "m", "messages": [], "max_tokens": "100"}, "max_tokens: Input should be a positive integer"),
    ({"model": "m", "messages": [], "max_tokens": True}, "max_tokens: Input should be a positive integer"),
    ({"model": "m", "messages": [], "max_tokens": 1.5}, "max_tokens: Input should be a positive integer"),
    (request([{"role": "tool", "content": "x"}]), "messages.0.role: Input should be 'user', 'assistant' or 'system'"),
    (request([user(None)]), "messages.0.content: Input should be a valid string or list of content blocks"),
    (request([user(["hi"])]), "messages.0.content.0: Input should be a content block with a 'type'"),
    (request([{"role": "assistant", "content": [{"type": "tool_use", "name": "x", "input": {}}]}]),
     "messages.0.content.0.id: Field required"),
    (request([user([{"type": "tool_result", "content": "x"}])]), "messages.0.content.0.tool_use_id: Field required"),
    (request([user("hi")], system=[{"type": "image"}]), "system.0.type: Input should be 'text'"),
    (request([user("hi")], temperature="hot"), "temperature: Input should be a valid number"),
    (request([user("hi")], stop_sequences="END"), "stop_sequences: Input should be a valid list of strings"),
    (request([user("hi")], tools=[{"name": "x", "input_schema": "{}"}]),
     "tools.0.input_schema: Input should be a valid dictionary"),
    (request([user("hi")], tools=[{"name": "x"}], tool_choice={"type": "tool"}), "tool_choice.name: Field required"),
    (request([user("hi")], tool_choice="auto"), "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'"),
])
def test_invalid_requests_say_why_in_anthropics_error_shape(body: Any, message: str) -> None:
    with pytest.raises(t.InvalidRequest) as raised:
        t.to_openai(body)
    assert isinstance(raised.value, ValueError)
    assert str(raised.value) == message
    rendered = t.error_body(400, str(raised.value))
    ErrorResponse.model_validate(rendered)
    assert rendered == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def test_nesting_too_deep_is_an_invalid_request_not_a_crash() -> None:
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(t.InvalidRequest, match="nested too deeply"):
        t.to_openai(request([user("hi")], tools=[{"name": "deep", "input_schema": schema}]))
    assert t.count_tokens(request([user("hi")], tools=[{"name": "deep", "input_schema": schema}])) >= 1


# ---------------------------------------------------------------- answer: OpenAI → Anthropic


def test_parallel_tool_calls_answer_is_an_sdk_message() -> None:
    result = t.to_anthropic(load("openai_parallel_tools.json"), "gpt-4o", message_id="msg_test")
    message = Message.model_validate(result)
    assert message.id == "msg_test" and message.model == "gpt-4o" and message.role == "assistant"
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert [block.type for block in message.content] == ["text", "tool_use", "tool_use"]
    assert result["content"][1:] == [
        {"type": "tool_use", "id": "call_Yk3pV6d0mQ2nR8sT1uW4xZ7a", "name": "Read",
         "input": {"file_path": "/home/dev/proj/tests/test_calc.py"}},
        {"type": "tool_use", "id": "call_Bc9dE2fG5hJ8kL1mN4pQ7rS0", "name": "Read",
         "input": {"file_path": "/home/dev/proj/calc.py"}},
    ]
    # Anthropic's input_tokens leave the cache reads out: 2150 prompt tokens, 1920 of them cached
    assert result["usage"] == {"input_tokens": 230, "output_tokens": 61, "cache_creation_input_tokens": 0,
                               "cache_read_input_tokens": 1920}


def test_the_sdk_reads_the_answer() -> None:
    body = json.dumps(t.to_anthropic(load("openai_parallel_tools.json"), "gpt-4o")).encode()
    message = sdk_client(body, stream=False).messages.create(
        model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "go"}])
    assert message.id.startswith("msg_")
    assert [b.input for b in message.content if b.type == "tool_use"] == [
        {"file_path": "/home/dev/proj/tests/test_calc.py"}, {"file_path": "/home/dev/proj/calc.py"}]
    assert message.usage.cache_read_input_tokens == 1920


def completion(message: dict[str, Any], finish: Any = "stop", usage: Any = None, **choice: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}], "usage": usage}


def call(arguments: Any, call_id: str | None = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "Bash", "arguments": arguments}}


@pytest.mark.parametrize(("chat", "reason", "sequence"), [
    (completion({"content": "hi"}, "stop"), "end_turn", None),
    (completion({"content": "hi"}, None), "end_turn", None),
    (completion({"content": "hi"}, "length"), "max_tokens", None),
    (completion({"content": "hi"}, "content_filter"), "refusal", None),
    (completion({"content": None, "tool_calls": [call("{}")]}, "tool_calls"), "tool_use", None),
    (completion({"content": None, "tool_calls": [call("{}")]}, "stop"), "tool_use", None),  # some providers
    (completion({"content": None, "tool_calls": [call('{"comm')]}, "length"), "max_tokens", None),
    (completion({"content": "a"}, "stop", stop_reason="END"), "stop_sequence", "END"),  # vLLM says which
    (completion({"content": "a"}, "stop", stop_reason="NOT ASKED"), "end_turn", None),
    (completion({"content": "a"}, "stop", stop_reason=128009), "end_turn", None),  # vLLM: a stop token id
])
def test_stop_reasons(chat: dict[str, Any], reason: str, sequence: str | None) -> None:
    result = t.to_anthropic(chat, "m", stop_sequences=["END"])
    Message.model_validate(result)
    assert (result["stop_reason"], result["stop_sequence"]) == (reason, sequence)


@pytest.mark.parametrize(("arguments", "expected"), [
    ('{"command": "ls"}', {"command": "ls"}),
    ("", {}),
    (None, {}),
    ('"{\\"command\\": \\"ls\\"}"', {"command": "ls"}),  # encoded twice
    ('{"command": "ls"', {t.RAW_ARGUMENTS_KEY: '{"command": "ls"'}),
    ("[1, 2]", {t.RAW_ARGUMENTS_KEY: "[1, 2]"}),
])
def test_tool_arguments(arguments: Any, expected: dict[str, Any]) -> None:
    result = t.to_anthropic(completion({"content": None, "tool_calls": [call(arguments)]}, "tool_calls"), "m")
    Message.model_validate(result)
    assert result["content"][0]["input"] == expected


def test_usage_is_always_present_and_odd_answers_do_not_raise() -> None:
    for chat in ({}, {"choices": []}, {"choices": None}, [], completion({}, usage={"prompt_tokens": "x"})):
        result = t.to_anthropic(chat, "m")
        Message.model_validate(result)
        assert result["content"] == [] and result["stop_reason"] == "end_turn"
        assert result["usage"] == {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": 0}
    result = t.to_anthropic(completion({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                                        "refusal": "no", "tool_calls": [call("{}", None)]}), "m")
    Message.model_validate(result)
    assert [b.get("text") for b in result["content"][:2]] == ["ab", "no"]
    assert result["content"][2]["id"].startswith("toolu_")  # the client must have an id to answer


# ---------------------------------------------------------------- stream: chunks → events


def test_parallel_tool_stream_events_validate_and_assemble() -> None:
    per_chunk, end = transcode("stream_parallel_tools.sse")
    events = validated([e for produced in per_chunk for e in produced] + end)
    shape = [(e["type"], e.get("index"), (e.get("delta") or e.get("content_block") or {}).get("type")) for e in events]
    assert shape == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"), ("content_block_delta", 0, "text_delta"),
        ("content_block_delta", 0, "text_delta"),
        ("content_block_stop", 0, None), ("content_block_start", 1, "tool_use"),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 1, "input_json_delta"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 1, None), ("content_block_stop", 2, None),
        ("message_delta", None, None), ("message_stop", None, None),
    ]
    assert events[0]["message"]["usage"]["input_tokens"] == 0  # unknown until the usage chunk
    assert events[5]["content_block"] == {"type": "tool_use", "id": "call_Yk3pV6d0mQ2nR8sT1uW4xZ7a",
                                          "name": "Read", "input": {}}
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"] == {"input_tokens": 230, "output_tokens": 61, "cache_creation_input_tokens": 0,
                                   "cache_read_input_tokens": 1920}
    message = assemble(events)
    assert [getattr(b, "input", None) for b in message.content] == [
        None, {"file_path": "/home/dev/proj/tests/test_calc.py"}, {"file_path": "/home/dev/proj/calc.py"}]


def test_the_sdk_assembles_the_parallel_tool_stream() -> None:
    per_chunk, end = transcode("stream_parallel_tools.sse")
    client = sdk_client(b"".join(e for produced in per_chunk for e in produced) + b"".join(end), stream=True)
    with client.messages.stream(model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "go"}]) as s:
        message = s.get_final_message()
    assert message.id == "msg_test" and message.stop_reason == "tool_use"
    assert message.content[0].type == "text" and message.content[0].text == "Let me look at both files."
    assert [(b.id, b.input) for b in message.content if b.type == "tool_use"] == [
        ("call_Yk3pV6d0mQ2nR8sT1uW4xZ7a", {"file_path": "/home/dev/proj/tests/test_calc.py"}),
        ("call_Bc9dE2fG5hJ8kL1mN4pQ7rS0", {"file_path": "/home/dev/proj/calc.py"}),
    ]
    assert (message.usage.input_tokens, message.usage.output_tokens, message.usage.cache_read_input_tokens) == (
        230, 61, 1920)


def test_each_event_leaves_when_its_chunk_arrives() -> None:
    per_chunk, end = transcode("stream_parallel_tools.sse")
    kinds = [[e["type"] for e in validated(produced)] if produced else [] for produced in per_chunk]
    assert kinds == [
        ["message_start"],  # the role chunk
        ["content_block_start", "content_block_delta"],
        ["content_block_delta"],
        ["content_block_stop", "content_block_start"],  # the first tool call closes the text
        ["content_block_start"],  # the second starts with its first piece
        ["content_block_delta"], ["content_block_delta"], ["content_block_delta"], ["content_block_delta"],
        ["content_block_stop", "content_block_stop"],  # finish_reason: every call is complete
        [],  # usage: held for message_delta
    ]
    assert [e["type"] for e in validated(end)] == ["message_delta", "message_stop"]


def test_a_stream_cut_by_length_ends_with_max_tokens() -> None:
    per_chunk, end = transcode("stream_length.sse", input_tokens=700)
    raw = b"".join(e for produced in per_chunk for e in produced) + b"".join(end)
    events = validated([raw])
    assert events[0]["message"]["usage"]["input_tokens"] == 700  # the caller's estimate, until the real count
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2]["usage"]["output_tokens"] == 16
    with sdk_client(raw, stream=True).messages.stream(
            model="gpt-4o", max_tokens=16, messages=[{"role": "user", "content": "fix it"}]) as s:
        message = s.get_final_message()
    assert message.stop_reason == "max_tokens"
    assert message.content[0].text == "The fix is to change `a - b` to `a + b` in"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (812, 16)


def test_an_error_event_after_the_first_byte() -> None:
    coder = t.StreamTranscoder("gpt-4o", "msg_test")
    raw = b"".join(coder.feed(chunks("stream_length.sse")[1])) + coder.error("upstream reset the connection")
    name, data = parse(raw)[-1]
    assert name == "error"
    assert data == {"type": "error", "error": {"type": "api_error", "message": "upstream reset the connection"}}
    ErrorResponse.model_validate(data)
    assert coder.finish(None) == [] and coder.feed(chunks("stream_length.sse")[2]) == []
    client = sdk_client(raw, stream=True)
    with pytest.raises(anthropic.APIStatusError, match="upstream reset the connection"), client.messages.stream(
            model="gpt-4o", max_tokens=16, messages=[{"role": "user", "content": "x"}]) as s:
        s.get_final_message()


def test_start_early_ping_and_an_empty_stream() -> None:
    coder = t.StreamTranscoder("gpt-4o", input_tokens=12)
    first = coder.start()
    assert coder.start() == [] and coder.feed({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) == []
    events = validated(first + [t.ping()] + coder.finish(None))
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[0]["message"]["id"].startswith("msg_")
    assert events[2] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"output_tokens": 0}}  # no usage came: message_start's estimate stands
    assert coder.finish(None) == []


def test_stream_stop_sequence_override_and_other_choices() -> None:
    coder = t.StreamTranscoder("m", "msg_x", stop_sequences=["END"])
    out = coder.feed({"choices": [{"index": 1, "delta": {"content": "other choice"}},
                                  {"index": 0, "delta": {"content": "a"}, "finish_reason": "stop",
                                   "stop_reason": "END"}]})
    events = validated(out + coder.finish(None))
    assert [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"] == ["a"]
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    coder = t.StreamTranscoder("m", "msg_y")
    events = validated(coder.feed({"choices": [{"index": 0, "delta": {"content": "a"}}]}) + coder.finish("refusal"))
    assert events[-2]["delta"]["stop_reason"] == "refusal"


def test_stream_tool_calls_from_less_careful_providers() -> None:
    """Whole calls each at index 0 with a new id, a piece before the name, and a call with no name at all."""
    coder = t.StreamTranscoder("m", "msg_z")
    pieces = [
        {"index": 0, "id": "call_a", "function": {"name": "Read", "arguments": '{"file_path": "/a"}'}},
        {"index": 0, "id": "call_b", "function": {"name": "Read", "arguments": '{"file_path": "/b"}'}},
        {"index": 1, "function": {"arguments": '{"command"'}},
        {"index": 1, "id": "call_c", "function": {"name": "Bash", "arguments": ': "ls"}'}},
        {"index": 2, "function": {"arguments": "{}"}},
    ]
    out: list[bytes] = []
    for piece in pieces:
        out += coder.feed({"choices": [{"index": 0, "delta": {"tool_calls": [piece]}}]})
    out += coder.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    events = validated(out + coder.finish(None))
    message = assemble(events)
    assert [(b.name, b.input) for b in message.content if b.type == "tool_use"] == [
        ("Read", {"file_path": "/a"}), ("Read", {"file_path": "/b"}), ("Bash", {"command": "ls"}), ("", {})]
    assert [b.id for b in message.content][:3] == ["call_a", "call_b", "call_c"]


# ---------------------------------------------------------------- errors and counting


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (413, "request_too_large"), (422, "invalid_request_error"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "api_error"), (529, "overloaded_error"), (599, "api_error"),
])
def test_error_body(status: int, kind: str) -> None:
    body = t.error_body(status, "why")
    assert body == {"type": "error", "error": {"type": kind, "message": "why"}}
    if kind != "request_too_large":  # Anthropic's documented 413 type, absent from the SDK's union
        ErrorResponse.model_validate(body)


def test_count_tokens_is_a_bytes_over_four_estimate() -> None:
    body = {"model": "m", "system": [{"type": "text", "text": "abcd"}],
            "messages": [user("héllo"),
                         {"role": "assistant", "content": [
                             {"type": "thinking", "thinking": "not sent, not counted", "signature": "s"},
                             {"type": "tool_use", "id": "t1", "name": "T", "input": {}}]},
                         user([{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "ok"}]},
                               {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                            "data": "A" * 4000}}])],
            "tools": [{"name": "T", "description": "d", "input_schema": {"$schema": "s", "type": "object"}},
                      {"type": "web_search_20250305", "name": "web_search"}]}
    text_bytes = 4 + 6 + (1 + 2) + 2 + (1 + 1 + len('{"type": "object"}'))  # é is two bytes
    assert t.count_tokens(body) == math.ceil(text_bytes / 4) == 9
    fixture = load("claude_code_request.json")
    assert 500 < t.count_tokens(fixture) < 2000
    for junk in (None, [], {"messages": "x", "system": 5, "tools": [None, {"input_schema": [float("nan")], "name": 5}]}):
        t.count_tokens(junk)  # never raises on anything json.loads can produce


def test_events_are_utf8_and_keep_a_lone_surrogate_escaped() -> None:
    coder = t.StreamTranscoder("m", "msg_u")
    raw = b"".join(coder.feed({"choices": [{"index": 0, "delta": {"content": "héllo \ud800"}}]}))
    raw.decode("utf-8")
    assert "héllo".encode() in raw and b"\\ud800" in raw
