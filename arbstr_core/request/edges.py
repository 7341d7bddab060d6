"""The two APIs a client can speak, as adapters at the edges of one request lifecycle (SPEC §4.2, §12).

Providers speak OpenAI chat completions. :class:`ChatEdge` (``/v1/chat/completions``) passes bodies
through untouched; :class:`MessagesEdge` (``/v1/messages``) translates an Anthropic Messages request into
a chat request, and the provider's answer, stream and arbstr's errors back. Everything in between
(policies, aliases, routing, retries, breaker, deadline, cost, the row) is the same code for both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from ..errors import ArbstrError
from . import anthropic, sse
from .body import encode, parse_body

Meta = dict[str, Any]  # what a request's way back needs of its way in


class ChatEdge:
    """OpenAI chat completions: what the client sends is what providers get."""

    api = "chat"
    wants_usage = False  # the relay strips the usage chunk unless the client asked for it

    def parse(self, raw: bytes) -> tuple[dict[str, Any], bytes, Meta]:
        """The chat body, the bytes to forward (the client's own), and what the way back needs (nothing)."""
        return parse_body(raw), raw, {}

    def answer(self, body: bytes, parsed: dict[str, Any], model: str, meta: Meta) -> bytes:
        return body

    def stream(self, events: Iterator[bytes], model: str, meta: Meta) -> Iterator[bytes]:
        return events

    def error_body(self, error: ArbstrError, scrubbed: dict[str, Any]) -> dict[str, Any]:
        return scrubbed


class MessagesEdge:
    """Anthropic Messages: translated to a chat request going out, and back coming in."""

    api = "messages"
    wants_usage = True  # message_delta carries output_tokens, from the stream's usage chunk

    def parse(self, raw: bytes) -> tuple[dict[str, Any], bytes, Meta]:
        """The chat request a Messages request becomes, its bytes, and what the answer's translation needs:
        the input estimate for ``message_start`` and the stop sequences a provider may say it matched."""
        try:
            message = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ArbstrError(400, "Request body is not valid JSON", code="invalid_json") from None
        try:
            body, _dropped = anthropic.to_openai(message)
        except anthropic.InvalidRequest as e:
            raise ArbstrError(400, str(e), code="invalid_request") from None
        body = parse_body(encode(body))  # the same checks as a chat body gets
        meta = {"input_tokens": anthropic.count_tokens(message), "stop_sequences": body.get("stop") or ()}
        return body, encode(body), meta

    @staticmethod
    def count_tokens(raw: bytes) -> int:
        """``/v1/messages/count_tokens``: arbstr's estimate of the input tokens of a Messages request."""
        try:
            message = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ArbstrError(400, "Request body is not valid JSON", code="invalid_json") from None
        if not isinstance(message, dict):
            raise ArbstrError(400, "Request body must be a JSON object", code="invalid_body")
        return anthropic.count_tokens(message)

    def answer(self, body: bytes, parsed: dict[str, Any], model: str, meta: Meta) -> bytes:
        message = anthropic.to_anthropic(parsed, model, stop_sequences=meta["stop_sequences"])
        return json.dumps(message).encode("utf-8")

    def stream(self, events: Iterator[bytes], model: str, meta: Meta) -> Iterator[bytes]:
        """The relay's chat events (each yielded as it came) as Anthropic's named events, one for one."""
        coder = anthropic.StreamTranscoder(model, input_tokens=meta["input_tokens"],
                                           stop_sequences=meta["stop_sequences"])
        splitter = sse.EventSplitter()
        finished = False
        for out in events:
            for event in splitter.feed(out):
                data = sse.event_data(event)
                if finished:
                    continue
                if data is None:
                    # A provider's keep-alive comment is Anthropic's ping; arbstr's `: arbstr` trailer has no form.
                    if event.strip() and not event.startswith(b": arbstr"):
                        yield anthropic.ping()
                    continue
                if data == sse.DONE:
                    finished = True
                    yield b"".join(coder.finish(None))
                    continue
                chunk = sse.parse_json(data)
                if chunk is None:
                    continue
                if "error" in chunk and "choices" not in chunk:
                    err = chunk["error"]
                    finished = True
                    yield coder.error(str(err.get("message") if isinstance(err, dict) else err))
                    continue
                produced = coder.feed(chunk)
                if produced:
                    yield b"".join(produced)
        if not finished:
            yield coder.error("the stream ended early")

    def error_body(self, error: ArbstrError, scrubbed: dict[str, Any]) -> dict[str, Any]:
        return anthropic.error_body(error.status, scrubbed["error"]["message"])


EDGES: dict[str, ChatEdge | MessagesEdge] = {"chat": ChatEdge(), "messages": MessagesEdge()}
