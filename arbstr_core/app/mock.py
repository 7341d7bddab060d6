"""Built-in mock providers (SPEC §9), answered in-process through a ``requests`` transport adapter.

Because the adapter sits below ``requests``, mock mode runs the real forwarding, retry, streaming,
logging and breaker code; only the network is replaced. Answers are deterministic.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from ..config import Config, from_mapping
from ..request.body import last_user_text

# `.invalid` never resolves (RFC 6761), so a mock URL can never reach a real host by mistake.
MOCK_PROVIDERS = [
    {"name": "mock-budget", "input_rate": 2, "output_rate": 6, "base_fee": 0.5,
     "models": ["gpt-4o", "gpt-4o-mini"]},
    {"name": "mock-standard", "input_rate": 5, "output_rate": 15, "base_fee": 1,
     "models": ["gpt-4o", "gpt-4o-mini", "o3-mini"]},
    {"name": "mock-premium", "input_rate": 10, "output_rate": 30, "base_fee": 2,
     "models": ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]},
]


def mock_url(name: str) -> str:
    return f"http://{name}.invalid/v1"


def mock_config(overrides: dict[str, Any] | None = None) -> Config:
    """The embedded default: three mock providers, a code policy, the database in ./arbstr.db."""
    raw: dict[str, Any] = {
        "providers": [dict(p, url=mock_url(p["name"])) for p in MOCK_PROVIDERS],
        "policies": {"rules": [{"name": "code_generation", "max_sats_per_1k_output": 20,
                                "keywords": ["code", "function", "implement", "debug"]}]},
    }
    raw.update(overrides or {})
    return from_mapping(raw, env={}, path="<built-in mock config>", mock=True)


class _Events:
    """A raw body that hands out one SSE event per read, like a provider streaming in real time."""

    def __init__(self, events: list[bytes]) -> None:
        self._events = events

    def read1(self, amt: int = -1, decode_content: bool = True) -> bytes:
        return self._events.pop(0) if self._events else b""

    def read(self, amt: int | None = None) -> bytes:
        return self.read1()

    def close(self) -> None:
        self._events = []


class MockAdapter(BaseAdapter):
    """Answers `/chat/completions` for the mock providers with OpenAI-shaped JSON or SSE."""

    def send(self, request: requests.PreparedRequest, stream: bool = False, **kwargs: Any) -> requests.Response:
        name = (request.url or "").split("//", 1)[-1].split(".invalid", 1)[0]
        body = json.loads(request.body or b"{}")
        model = body.get("model", "")
        prompt = last_user_text(body.get("messages") or [])
        words = f"Mock answer from {name} ({model}): you said {prompt[:80]!r}.".split(" ")
        usage = {
            "prompt_tokens": math.ceil(len(json.dumps(body.get("messages", [])).encode()) / 4),
            "completion_tokens": len(words),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        ident, created = f"chatcmpl-mock-{name}", int(time.time())
        if body.get("stream") is True:
            payload = _stream_events(ident, created, model, words, usage, body)
            headers = {"Content-Type": "text/event-stream"}
        else:
            payload = [json.dumps({
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": " ".join(words)}}],
                "usage": usage,
            }).encode()]
            headers = {"Content-Type": "application/json"}
        resp = requests.Response()
        resp.status_code = 200
        resp.reason = "OK"
        resp.headers = CaseInsensitiveDict(headers)
        resp.raw = _Events(payload)
        resp.url = request.url or ""
        resp.request = request
        resp.encoding = "utf-8"
        return resp

    def close(self) -> None:
        pass


def _stream_events(ident: str, created: int, model: str, words: list[str], usage: dict, body: dict) -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None) -> bytes:
        obj = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": w if i == 0 else " " + w}) for i, w in enumerate(words)]
    events.append(chunk({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        tail = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage}
        events.append(b"data: " + json.dumps(tail).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def adapters() -> dict[str, BaseAdapter]:
    adapter = MockAdapter()
    return {mock_url(p["name"]).rsplit("/v1", 1)[0]: adapter for p in MOCK_PROVIDERS}
