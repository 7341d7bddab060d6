"""The chat request body (SPEC §3): parsed and checked once, read by routing, cost and the relay. Pure.

The body is parsed whatever the Content-Type says; anything unusable is a 400 ``invalid_request_error``.
The upstream body of a stream is re-encoded with usage requested; a non-streaming body goes out as the
client sent it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from ..errors import bad_request


def parse_body(raw: bytes) -> dict[str, Any]:
    """The chat request, whatever the Content-Type said; anything unusable is a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"Request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # e.g. 100,000 '[': json's C scanner recurses per level
        raise bad_request("Request body is not valid JSON: nested too deeply", code="invalid_json") from None
    if _SURROGATE_ESCAPE.search(raw):
        encode(body)  # an unpaired surrogate is valid JSON grammar but no text: unloggable, unencodable
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object", code="invalid_body")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("'model' is required and must be a string", code="invalid_model", param="model")
    if not isinstance(body.get("messages"), list):
        raise bad_request("'messages' is required and must be an array", code="invalid_messages", param="messages")
    return body


# Cheap pre-check for a surrogate, escaped or as (CESU-8) bytes, which json.loads lets through; encode decides.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def encode(body: Any) -> bytes:
    """``body`` as compact UTF-8 JSON; a 400 if it holds an unpaired surrogate or is too deep to re-encode."""
    try:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("Request body is not valid JSON: it contains an unpaired UTF-16 surrogate escape "
                          "(\\ud800-\\udfff)", code="invalid_json") from None
    except RecursionError:
        raise bad_request("Request body is not valid JSON: nested too deeply", code="invalid_json") from None


def stream_body(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Upstream body for a stream (usage always requested) and whether the client asked for usage."""
    options = body.get("stream_options")
    options = dict(options) if isinstance(options, dict) else {}
    wants_usage = options.get("include_usage") is True
    options.setdefault("include_usage", True)
    return dict(body, stream_options=options), wants_usage


def capped(body: dict[str, Any], cap: int | None) -> dict[str, Any] | None:
    """``body`` with ``max_tokens`` / ``max_completion_tokens`` lowered to a provider's
    ``max_output_tokens``, or None when nothing is above it (the body then goes out as it came)."""
    if cap is None:
        return None
    over = {k: cap for k in ("max_tokens", "max_completion_tokens")
            if isinstance(v := body.get(k), int) and not isinstance(v, bool) and v > cap}
    return dict(body, **over) if over else None


def choices(body: dict[str, Any]) -> int:
    """How many choices the stream will finish (``n``): all finished and a clean end is complete."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1


def message_text(content: Any) -> str:
    """The text of one message's content: a string, or the text parts of an array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""
