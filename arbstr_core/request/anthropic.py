"""Anthropic Messages ⇄ OpenAI chat completions (SPEC §12). Pure: plain values in, plain values out.

Claude clients (the ``anthropic`` SDK, Claude Code) speak the Messages API; providers speak chat
completions. This module is the translation at the edges and nothing else (no Flask, no requests, no
I/O), so every rule below is testable on recorded bodies:

    to_openai(body)                 Messages request → (chat request, dropped fields); InvalidRequest if unusable
    to_anthropic(chat, model)       chat.completion → Message (usage always present)
    StreamTranscoder                chat.completion.chunk stream → Messages SSE events, as each chunk arrives
    anthropic_usage(usage)          an OpenAI usage object → Anthropic usage (cached tokens split out)
    error_body(status, message)     an error in Anthropic's shape; error_type(status) its ``type``
    ping()                          the keep-alive event
    count_tokens(body)              arbstr's estimate of a request's input tokens (no tokenizer)

Nothing the client sent is copied through wholesale: the chat request is built from the fields this
module understands, so ``metadata`` (Claude Code puts device and account ids in ``user_id``),
``cache_control``, ``thinking``, ``context_management``, ``output_config`` and anything unknown can never
reach a provider.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .cost import read_usage

RAW_ARGUMENTS_KEY = "_raw_arguments"  # a tool call's arguments that were not a JSON object, kept verbatim
ERROR_PREFIX = "Error: "  # what a tool message starts with when its tool_result had is_error
_TOOL_TYPES = (None, "custom")  # client tools; any other ``type`` is an Anthropic server tool
_FORWARDED = frozenset(
    {"model", "messages", "system", "max_tokens", "temperature", "top_p", "stop_sequences", "stream", "tools",
     "tool_choice"}
)
_HISTORY_ONLY = frozenset({"thinking", "redacted_thinking"})  # Anthropic-signed; no provider can use them
# JSON-Schema keywords providers reject in function parameters (OpenAI, Gemini behind compat layers).
_SCHEMA_DROP = frozenset({"$schema"})
_SCHEMA_NAME_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_DATA = frozenset({"enum", "const", "default", "examples"})  # values, not schemas: copied verbatim


class InvalidRequest(ValueError):
    """A Messages request that cannot be translated; ``str(e)`` is meant for the client (Anthropic's 400
    ``invalid_request_error``), worded like Anthropic's own: ``path: what is wrong``."""


# ---------------------------------------------------------------- request: Anthropic → OpenAI


def to_openai(body: Any) -> tuple[dict[str, Any], list[str]]:
    """The chat request for a Messages request, and what was not forwarded (for a debug log line).

    ``dropped`` names top-level fields (never their values), ``tools:<type>`` for server tools and
    ``content:<type>`` for content blocks with no chat form; thinking blocks and ``cache_control`` are
    expected on every Claude Code request and not listed.
    """
    try:
        return _to_openai(body)
    except RecursionError:  # a hostile schema or content nested thousands deep
        raise InvalidRequest("Request body is nested too deeply") from None


def _to_openai(body: Any) -> tuple[dict[str, Any], list[str]]:
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required" if model is None else "model: Input should be a non-empty string")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Field required" if messages is None else "messages: Input should be a valid list")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be a positive integer")

    dropped = [key for key in body if key not in _FORWARDED]
    out: dict[str, Any] = {"model": model, "messages": _messages(body.get("system"), messages, dropped),
                           "max_tokens": max_tokens}
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequest(f"{key}: Input should be a valid number")
            out[key] = value
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequest("stop_sequences: Input should be a valid list of strings")
        if stop:
            out["stop"] = list(stop)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a valid boolean")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # message_delta's output_tokens come from it
    tools = _tools(body.get("tools"), dropped)
    if tools:
        out["tools"] = tools
        choice, parallel = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            out["tool_choice"] = choice
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    elif body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"])  # still checked; but a chat request may not name tools it lacks
    return out, dropped


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(system: Any, messages: list[Any], dropped: list[str]) -> list[dict[str, Any]]:
    """The chat messages, tool results moved to right after the assistant message that called them.

    OpenAI wants each ``tool`` message directly after the assistant's ``tool_calls`` (a system or user
    message in between is a 400), Anthropic wants results in the next user turn: results are inserted
    after that assistant message and its earlier results, and the rest of the user turn follows in place.
    A result for no call of the latest assistant message would be a 400 too: it becomes user text.
    """
    out: list[dict[str, Any]] = []
    text = _system_text(system, "system")
    if text:
        out.append({"role": "system", "content": text})
    open_calls: set[str] = set()  # the latest assistant message's calls with no result yet
    insert_at = 0  # where its next result goes
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where}: Input should be a valid dictionary")
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant", "system"):
            raise InvalidRequest(f"{where}.role: Input should be 'user', 'assistant' or 'system'")
        blocks = _blocks(content, f"{where}.content")
        if role == "system":  # Claude Code's mid-conversation system message: kept where it stands
            if text := _system_text(blocks, f"{where}.content"):
                out.append({"role": "system", "content": text})
            continue
        if role == "assistant":
            assistant = _assistant(blocks, where, dropped)
            if assistant is not None:
                out.append(assistant)
                open_calls = {call["id"] for call in assistant.get("tool_calls", ())}
                insert_at = len(out)
            continue
        results, parts = _user(blocks, where, open_calls, dropped)
        for result in results:
            out.insert(insert_at, result)
            insert_at += 1
        content = _user_content(parts)
        if content or not results:  # no empty user message after tool results
            out.append({"role": "user", "content": content})
    return out


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}: Input should be a valid string or list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise InvalidRequest(f"{where}.{j}: Input should be a content block with a 'type'")
    return content


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text: Input should be a valid string")
    return text


def _system_text(system: Any, where: str) -> str:
    """A system prompt (a string or text blocks) as one string: many providers take no array here."""
    if system is None:
        return ""
    blocks = _blocks(system, where)
    for j, block in enumerate(blocks):
        if block["type"] != "text":
            raise InvalidRequest(f"{where}.{j}.type: Input should be 'text'")
    return "\n\n".join(t for j, block in enumerate(blocks) if (t := _text(block, f"{where}.{j}")))


def _assistant(blocks: list[dict[str, Any]], where: str, dropped: list[str]) -> dict[str, Any] | None:
    """An assistant turn: text joined, ``tool_use`` → ``tool_calls``; None when nothing is left of it
    (only thinking), since an empty assistant message is a 400 at some providers."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind, at = block["type"], f"{where}.content.{j}"
        if kind == "text":
            if text := _text(block, at):
                texts.append(text)
        elif kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"{at}.id: Field required")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"{at}.name: Field required")
            arguments = block.get("input")
            calls.append({"id": call_id, "type": "function", "function": {
                "name": name, "arguments": json.dumps({} if arguments is None else arguments, ensure_ascii=False)}})
        elif kind not in _HISTORY_ONLY:
            _drop(dropped, f"content:{kind}")
    if not texts and not calls:
        return None
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(
    blocks: list[dict[str, Any]], where: str, open_calls: set[str], dropped: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A user turn as ``tool`` messages and the content parts of the user message after them.

    A chat ``tool`` message holds text only, so images and documents a tool returned (Claude Code's Read
    on a screenshot or PDF) move to the user message that follows, ahead of the user's own content.
    """
    results: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if block["type"] != "tool_result":
            if (part := _part(block, at, dropped)) is not None:
                parts.append(part)
            continue
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidRequest(f"{at}.tool_use_id: Field required")
        text, media = _result_content(block.get("content"), f"{at}.content", dropped)
        if block.get("is_error") is True:
            text = ERROR_PREFIX + text  # a chat tool message has no error flag: the model reads it here
        if call_id in open_calls:
            open_calls.discard(call_id)
            if media:
                text += f"{chr(10) if text else ''}[{len(media)} attachment(s) in the next user message]"
            results.append({"role": "tool", "tool_call_id": call_id, "content": text})
            moved.extend(media)
        else:
            parts.append({"type": "text", "text": f"[Result of tool call {call_id}]\n{text}"})
            parts.extend(media)
    return results, moved + parts


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A plain string when the turn is all text: some providers (DeepSeek) take no arrays of parts."""
    if all(part["type"] == "text" for part in parts):
        return "\n\n".join(part["text"] for part in parts if part["text"])
    return parts


def _result_content(content: Any, where: str, dropped: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """A tool_result's content as text (text blocks joined by lines) and its media parts."""
    if content is None:
        return "", []
    texts: list[str] = []
    media: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        part = _part(block, f"{where}.{j}", dropped)
        if part is None:
            continue
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            media.append(part)
    return "\n".join(texts), media


def _part(block: dict[str, Any], where: str, dropped: list[str]) -> dict[str, Any] | None:
    """One user content block as a chat content part, or None when it has no chat form."""
    kind = block["type"]
    if kind == "text":
        return {"type": "text", "text": _text(block, where)}
    source = block.get("source") if isinstance(block.get("source"), dict) else {}
    source_type = source.get("type")
    if kind == "image":
        if source_type == "base64" and isinstance(source.get("data"), str):
            media_type = source.get("media_type") if isinstance(source.get("media_type"), str) else "image/png"
            return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{source['data']}"}}
        if source_type == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
    elif kind == "document":
        title = block.get("title") if isinstance(block.get("title"), str) else None
        if source_type == "base64" and isinstance(source.get("data"), str):
            media_type = source.get("media_type") if isinstance(source.get("media_type"), str) else "application/pdf"
            return {"type": "file", "file": {"filename": title or "document.pdf",
                                             "file_data": f"data:{media_type};base64,{source['data']}"}}
        if source_type == "text" and isinstance(source.get("data"), str):
            return {"type": "text", "text": f"{title}\n\n{source['data']}" if title else source["data"]}
        if source_type == "content" and isinstance(source.get("content"), list | str):
            text, _ = _result_content(source["content"], f"{where}.source.content", dropped)
            return {"type": "text", "text": text}
    elif kind in _HISTORY_ONLY:
        return None
    _drop(dropped, f"content:{kind}" if kind not in ("image", "document") else f"content:{kind}:{source_type}")
    return None


def _drop(dropped: list[str], name: str) -> None:
    if name not in dropped:
        dropped.append(name)


def _tools(tools: Any, dropped: list[str]) -> list[dict[str, Any]]:
    """Client tools as chat functions; server tools (``web_search_…``, ``bash_…``) run at Anthropic and
    have no schema a provider could call, so they are dropped."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools.{i}: Input should be a valid dictionary")
        if tool.get("type") not in _TOOL_TYPES:
            _drop(dropped, f"tools:{tool.get('type')}")
            continue
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools.{i}.name: Field required")
        schema = tool.get("input_schema")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise InvalidRequest(f"tools.{i}.input_schema: Input should be a valid dictionary")
        function: dict[str, Any] = {"name": name}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = clean_schema(schema)
        out.append({"type": "function", "function": function})
    return out


def clean_schema(schema: Any) -> Any:
    """A JSON Schema without the keywords providers reject (``$schema``), at every depth.

    Names under ``properties`` (and the like) are names, not keywords: a parameter called ``$schema``
    stays. ``enum``/``const``/``default``/``examples`` hold data and are copied as they are.
    """
    if isinstance(schema, list):
        return [clean_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_DROP:
            continue
        if key in _SCHEMA_DATA:
            out[key] = value
        elif key in _SCHEMA_NAME_MAPS and isinstance(value, dict):
            out[key] = {name: clean_schema(sub) for name, sub in value.items()}
        else:
            out[key] = clean_schema(value)
    return out


def _tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """``tool_choice`` and ``parallel_tool_calls`` (False for ``disable_parallel_tool_use``)."""
    if choice is None:
        return None, None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
    parallel = False if choice.get("disable_parallel_tool_use") is True and kind != "none" else None
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("tool_choice.name: Field required")
        return {"type": "function", "function": {"name": name}}, parallel
    return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel


# ---------------------------------------------------------------- answer: OpenAI → Anthropic


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_id() -> str:
    """For a provider's tool call with no id: the client must echo some id back in its tool_result."""
    return f"toolu_{uuid.uuid4().hex[:24]}"


def anthropic_usage(usage: Any) -> dict[str, int]:
    """Anthropic usage for an OpenAI ``usage`` (read as the cost code reads it); zeros when absent.

    Anthropic's ``input_tokens`` excludes cache reads, OpenAI's ``prompt_tokens`` includes them. No chat
    provider reports cache writes, so ``cache_creation_input_tokens`` is 0. Zeros are for the client
    only: arbstr's row keeps the usage unknown, and the cost with it.
    """
    counts = read_usage(usage)
    if counts is None:
        return {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0}
    return {"input_tokens": counts.input - counts.cached, "output_tokens": counts.output,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": counts.cached}


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """A tool call's ``input`` from its arguments string. An empty string is ``{}`` (a tool without
    parameters); JSON that is not an object, or no JSON at all, is kept under ``RAW_ARGUMENTS_KEY`` so the
    client's schema check names the problem and the log shows what the model sent, instead of a silent
    ``{}`` that runs the tool with no arguments."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
        if isinstance(value, str):  # some providers encode the object twice
            value = json.loads(value)
    except (ValueError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {RAW_ARGUMENTS_KEY: arguments}


def stop_reason(finish_reason: Any, *, tool_use: bool, matched: Any = None,
                stop_sequences: Sequence[str] = ()) -> tuple[str, str | None]:
    """Anthropic ``stop_reason`` and ``stop_sequence`` for a chat ``finish_reason``.

    Tool calls make ``tool_use`` whatever the finish reason says (some providers say ``stop``), except a
    cut answer (``length``: its last call may be truncated, as Anthropic reports it too). OpenAI does
    not say which stop sequence matched; ``matched`` is the choice's ``stop_reason`` that vLLM and
    SGLang send, believed only when it is one of the request's ``stop_sequences``.
    """
    if finish_reason == "length":
        return "max_tokens", None
    if tool_use:
        return "tool_use", None
    if finish_reason == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def to_anthropic(chat: Any, model: str, *, message_id: str | None = None,
                 stop_sequences: Sequence[str] = ()) -> dict[str, Any]:
    """The Message for a chat.completion (the first choice; Messages has no ``n``). Never raises.

    ``model`` is the name the client asked for. Reasoning (``reasoning_content``) is not returned: a
    thinking block needs Anthropic's signature, and a client sends it back only to have it dropped.
    """
    choices = chat.get("choices") if isinstance(chat, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    for text in (_content_text(message.get("content")), message.get("refusal")):
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        call_id, name = call.get("id"), function.get("name")
        content.append({"type": "tool_use", "id": call_id if isinstance(call_id, str) and call_id else new_tool_id(),
                        "name": name if isinstance(name, str) else "",
                        "input": parse_arguments(function.get("arguments"))})
    reason, sequence = stop_reason(choice.get("finish_reason"), tool_use=any(b["type"] == "tool_use" for b in content),
                                   matched=choice.get("stop_reason"), stop_sequences=stop_sequences)
    return {"id": message_id or new_message_id(), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": anthropic_usage(chat.get("usage") if isinstance(chat, dict) else None)}


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # a few providers answer with parts
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


# ---------------------------------------------------------------- stream: chunks → events


def event(name: str, data: dict[str, Any]) -> bytes:
    """One named SSE event. A lone surrogate a provider escaped into a string goes back out as the same
    escape (see sse.data_event)."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"event: " + name.encode() + b"\ndata: " + text.encode("utf-8", "backslashreplace") + b"\n\n"


def ping() -> bytes:
    """Keep-alive for a quiet stretch (a reasoning model thinking): clients ignore it."""
    return event("ping", {"type": "ping"})


@dataclass
class _Call:
    """One chat tool call (by its ``index``) on its way to becoming a ``tool_use`` block."""

    id: str | None
    name: str | None
    block: int | None = None  # the Anthropic block index, once started
    pending: str = ""  # arguments that came before the name (a block cannot start without one)


class StreamTranscoder:
    """Chat chunks in, Anthropic stream events out, each as soon as the chunk that causes it arrives.

    ``message_start`` goes out with the first chunk (or :meth:`start`), with ``input_tokens`` as given:
    the provider's count only comes in the usage chunk at the end, so the caller may pass an estimate
    (:func:`count_tokens`), which the real count then replaces in ``message_delta``. Text is one block
    until a tool call starts; each tool call index is its own ``tool_use`` block from its first piece,
    arguments relayed as ``input_json_delta`` verbatim (invalid JSON from the provider reaches the client
    as is). Tool blocks stay open until ``finish_reason``, because chat streams may interleave calls and
    a call is complete only then; clients address deltas and stops by ``index``. ``message_delta``
    (stop reason, usage) waits for :meth:`finish`, because the usage chunk follows ``finish_reason``.
    Only choice 0 is read. Reasoning deltas are not relayed (see :func:`to_anthropic`).
    """

    def __init__(self, model: str, message_id: str | None = None, *, input_tokens: int = 0,
                 stop_sequences: Sequence[str] = ()) -> None:
        self.model = model
        self.message_id = message_id or new_message_id()
        self.input_tokens = input_tokens
        self.stop_sequences = tuple(stop_sequences)
        self.started = False
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Any = None  # the provider's last usage object
        self._matched: Any = None  # the choice's ``stop_reason`` (vLLM: the stop string that matched)
        self._blocks = 0  # blocks started so far: the next one's index
        self._open: list[int] = []
        self._text: int | None = None  # the open text block
        self._calls: dict[int, _Call] = {}
        self._tool_use = False

    def start(self) -> list[bytes]:
        """``message_start``, once: before any chunk if the caller wants the client to see life early."""
        if self.started:
            return []
        self.started = True
        usage = {"input_tokens": self.input_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        message = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}
        return [event("message_start", {"type": "message_start", "message": message})]

    def feed(self, chunk: Any) -> list[bytes]:
        """The events one parsed chat.completion.chunk causes now (often none: role-only, usage)."""
        if self.done or not isinstance(chunk, dict):
            return []
        events = self.start()
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for text in (_content_text(delta.get("content")), delta.get("refusal")):
                    if isinstance(text, str) and text:
                        events += self._text_delta(text)
                calls = delta.get("tool_calls")
                for position, call in enumerate(calls if isinstance(calls, list) else ()):
                    events += self._call_delta(call, position)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and finish:
                self.finish_reason, self._matched = finish, choice.get("stop_reason")
                events += self._close_all()
        return events

    def finish(self, stop_reason_override: str | None = None) -> list[bytes]:
        """The end (``[DONE]`` or the body ended after a finish): open blocks closed, ``message_delta``
        with the stop reason and usage, ``message_stop``. ``stop_reason_override`` replaces the one read
        from ``finish_reason`` (``end_turn`` when there was none). Once; [] after an end."""
        if self.done:
            return []
        events = self.start() + self._close_all()
        self.done = True
        reason, sequence = stop_reason(self.finish_reason, tool_use=self._tool_use, matched=self._matched,
                                       stop_sequences=self.stop_sequences)
        if stop_reason_override is not None:
            reason, sequence = stop_reason_override, None
        usage: dict[str, int] = {"output_tokens": 0}
        if read_usage(self.usage) is not None:  # else message_start's input_tokens stand
            usage = anthropic_usage(self.usage)
        events.append(event("message_delta", {"type": "message_delta",
                                              "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                              "usage": usage}))
        events.append(event("message_stop", {"type": "message_stop"}))
        return events

    def error(self, message: str, type: str = "api_error") -> bytes:
        """An ``error`` event for a failure after the first byte (the SDK raises, Claude Code retries);
        nothing else is sent after it."""
        self.done = True
        return event("error", {"type": "error", "error": {"type": type, "message": message}})

    def _start_block(self, block: dict[str, Any]) -> tuple[int, bytes]:
        index = self._blocks
        self._blocks += 1
        self._open.append(index)
        return index, event("content_block_start", {"type": "content_block_start", "index": index,
                                                    "content_block": block})

    def _stop_block(self, index: int) -> bytes:
        self._open.remove(index)
        return event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _text_delta(self, text: str) -> list[bytes]:
        events: list[bytes] = []
        if self._text is None:
            self._text, start = self._start_block({"type": "text", "text": ""})
            events.append(start)
        events.append(event("content_block_delta", {"type": "content_block_delta", "index": self._text,
                                                    "delta": {"type": "text_delta", "text": text}}))
        return events

    def _call_delta(self, piece: Any, position: int) -> list[bytes]:
        """One piece of a chat tool call. A piece with a new id at a known index is a new call: some
        providers send every call whole at index 0."""
        if not isinstance(piece, dict):
            return []
        key = piece["index"] if _is_int(piece.get("index")) else position
        function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
        call_id = piece.get("id") if isinstance(piece.get("id"), str) and piece.get("id") else None
        name = function.get("name") if isinstance(function.get("name"), str) and function.get("name") else None
        arguments = function.get("arguments") if isinstance(function.get("arguments"), str) else ""
        call = self._calls.get(key)
        if call is None or (call_id and call.id and call_id != call.id):
            call = self._calls[key] = _Call(call_id, name)
        elif call.block is None:
            call.id, call.name = call.id or call_id, call.name or name
        if call.block is None and call.name is None:
            call.pending += arguments
            return []
        events: list[bytes] = []
        if call.block is None:
            events += self._start_call(call)
            arguments, call.pending = call.pending + arguments, ""
        if arguments:
            events.append(event("content_block_delta", {"type": "content_block_delta", "index": call.block,
                                                        "delta": {"type": "input_json_delta",
                                                                  "partial_json": arguments}}))
        return events

    def _start_call(self, call: _Call) -> list[bytes]:
        events = [self._stop_block(self._text)] if self._text is not None else []
        self._text = None
        call.block, start = self._start_block({"type": "tool_use", "id": call.id or new_tool_id(),
                                               "name": call.name or "", "input": {}})
        self._tool_use = True
        return events + [start]

    def _close_all(self) -> list[bytes]:
        """Every open block stopped, in index order; a call whose name never came is started first (with
        no name, so the client reports it rather than losing it)."""
        events: list[bytes] = []
        for call in self._calls.values():
            if call.block is None:
                events += self._start_call(call)
                if call.pending:
                    events.append(event("content_block_delta", {
                        "type": "content_block_delta", "index": call.block,
                        "delta": {"type": "input_json_delta", "partial_json": call.pending}}))
        events += [self._stop_block(index) for index in sorted(self._open)]
        self._text = None
        self._calls = {}
        return events


# ---------------------------------------------------------------- errors and counting

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
                504: "api_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status; other 4xx are invalid requests, other 5xx api errors.
    402 (a Routstr balance ran out) is Anthropic's ``billing_error``; 503 is ``overloaded_error`` (Anthropic
    says overloaded with 529)."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """An error response body in Anthropic's shape (the SDK reads ``error.message`` and ``error.type``)."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def count_tokens(body: Any) -> int:
    """An estimate of a Messages request's input tokens: ⌈UTF-8 bytes / 4⌉ of the text a provider would be
    sent (system, messages, tool calls and results, tool names, descriptions and schemas).

    Not a tokenizer: real counts differ by model, often by 10–30 %. Images and documents count nothing,
    nor do thinking blocks (never forwarded). Never raises: what cannot be read is not counted.
    """
    if not isinstance(body, dict):
        return 0
    texts: list[str] = []
    try:
        _collect(body.get("system"), texts)
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, dict):
                _collect(message.get("content"), texts)
        tools = body.get("tools")
        for tool in tools if isinstance(tools, list) else ():
            if isinstance(tool, dict) and tool.get("type") in _TOOL_TYPES:
                texts += [v for v in (tool.get("name"), tool.get("description")) if isinstance(v, str)]
                texts.append(json.dumps(clean_schema(tool.get("input_schema")), ensure_ascii=False))
    except RecursionError:
        pass
    return math.ceil(sum(len(text.encode("utf-8", "surrogatepass")) for text in texts) / 4)


def _collect(content: Any, texts: list[str]) -> None:
    if isinstance(content, str):
        texts.append(content)
        return
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            texts += [block["name"]] if isinstance(block.get("name"), str) else []
            texts.append(json.dumps(block.get("input"), ensure_ascii=False))
        elif kind == "tool_result":
            _collect(block.get("content"), texts)
        elif kind == "document" and isinstance(block.get("source"), dict):
            source = block["source"]
            if source.get("type") == "text" and isinstance(source.get("data"), str):
                texts.append(source["data"])
            elif source.get("type") == "content":
                _collect(source.get("content"), texts)
