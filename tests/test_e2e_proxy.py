"""End to end: `gunicorn arbstr:app` in a subprocess, fake providers on loopback, the openai SDK as client.

Covers the foundation (SPEC §2–§4): cheapest routing, policies, forwarding, headers, errors, auth.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import time

import openai
import pytest
import requests
from conftest import provider
from fakes import Raw, completion_body, error, head, reply, sse_event, stream_chunks

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def three(fake_upstream, make_config, gunicorn_server):
    """Three providers of gpt-4o; `cheap` is cheapest by output_rate + base_fee despite config order."""
    pricey, cheap, middle = fake_upstream(3)
    config = make_config([
        provider(pricey, "pricey", output_rate=90, base_fee=1, input_rate=5),
        provider(cheap, "cheap", output_rate=10, base_fee=2, input_rate=4),
        provider(middle, "middle", output_rate=20, base_fee=0, input_rate=3),
    ], rules=[
        {"name": "code_generation", "keywords": ["implement", "debug"], "max_sats_per_1k_output": 25,
         "strategy": "cheapest"},
        {"name": "premium", "allowed_models": ["gpt-4o"]},
    ])
    server = gunicorn_server(config)
    return server, {"pricey": pricey, "cheap": cheap, "middle": middle}


def test_cheapest_provider_answers_with_headers_and_cost(three) -> None:
    server, ups = three
    raw = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    completion = raw.parse()
    assert ups["cheap"].name in completion.choices[0].message.content
    h = raw.headers
    assert h["x-arbstr-provider"] == "cheap"
    assert raw.request_id == h["x-arbstr-request-id"] == h["x-request-id"]
    assert int(h["x-arbstr-latency-ms"]) >= 0
    usage = completion.usage
    expected = (usage.prompt_tokens * 4 + usage.completion_tokens * 10) / 1000 + 2
    assert h["x-arbstr-cost-sats"] == f"{expected:.3f}"  # msat precision
    assert "x-arbstr-policy" not in h and "x-arbstr-retries" not in h
    assert len(ups["cheap"].requests) == 1 and not ups["pricey"].requests and not ups["middle"].requests
    sent = ups["cheap"].requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["Idempotency-Key"] == h["x-arbstr-request-id"]
    # The client's bearer token is never forwarded; cheap has no key, so no Authorization at all.
    assert "authorization" not in {k.lower() for k in sent.headers}
    assert sent.headers["Accept-Encoding"] == "identity" and sent.headers["User-Agent"].startswith("arbstr/")
    # A non-streaming answer's speed: its output tokens over its whole latency.
    timing = server.settled_row(raw.request_id)["timing"]
    assert timing["output_tokens_per_sec"] == pytest.approx(
        usage.completion_tokens * 1000 / timing["latency_ms"], abs=0.001)


def test_a_compressed_answer_reaches_the_client_decoded(three) -> None:
    """arbstr asks for identity; a provider that gzips anyway is decoded, streamed or not, and its usage counted."""
    server, ups = three
    client = server.openai_client()
    body = gzip.compress(json.dumps(completion_body("gpt-4o", "squeezed hello")).encode())
    ups["cheap"].script(reply(body=body, headers={"Content-Encoding": "gzip"}))
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.parse().choices[0].message.content == "squeezed hello"
    assert float(raw.headers["x-arbstr-cost-sats"]) > 0 and "content-encoding" not in raw.headers

    events = b"".join(sse_event(c) for c in stream_chunks("gpt-4o", "squeezed stream")) + b"data: [DONE]\n\n"
    packed = gzip.compress(events)
    ups["cheap"].script(Raw(head(200, {"Content-Type": "text/event-stream", "Content-Encoding": "gzip",
                                       "Content-Length": str(len(packed))}) + packed))
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "squeezed stream"


def test_body_fields_forwarded_untouched(three) -> None:
    server, ups = three
    body = {
        "model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_object"}, "seed": 7, "x_custom_field": {"nested": [1, "é"]},
    }
    r = server.post("/v1/chat/completions", data=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    assert ups["cheap"].requests[0].json == body


def test_policy_by_header_and_by_keyword(three) -> None:
    server, _ups = three
    client = server.openai_client()
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, extra_headers={"X-Arbstr-Policy": "premium"})
    assert raw.headers["x-arbstr-policy"] == "premium"
    # Keyword in the last user message (case-insensitive, array content) selects code_generation;
    # its price cap (25) leaves cheap (10) and middle (20); cheap wins.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[
        {"role": "user", "content": "unrelated"}, {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "Please IMPLEMENT a parser"}]}])
    assert raw.headers["x-arbstr-policy"] == "code_generation"
    assert raw.headers["x-arbstr-provider"] == "cheap"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG, extra_headers={"X-Arbstr-Policy": "nope"})
    assert e.value.code == "unknown_policy"
    assert "code_generation" in e.value.message and "premium" in e.value.message


def test_errors_are_openai_json(three, make_config) -> None:
    server, ups = three
    client = server.openai_client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert e.value.code == "model_not_found" and e.value.type == "invalid_request_error"
    assert e.value.response.headers["x-arbstr-request-id"]
    for body, code in [(b"{not json", "invalid_json"), (b"[1, 2]", "invalid_body"),
                       (b'{"messages": []}', "invalid_model"), (b'{"model": "gpt-4o"}', "invalid_messages")]:
        r = server.post("/v1/chat/completions", data=body)
        assert r.status_code == 400, body
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.json()["error"]["code"] == code
        assert r.headers["x-arbstr-request-id"]
    for method, path, status in [("GET", "/nope", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405), ("GET", "/v1/models/", 404)]:
        r = requests.request(method, server.url(path), allow_redirects=False, timeout=10)
        assert r.status_code == status, path
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert not any(u.requests for u in ups.values())


def test_oversized_body_is_413(fake_upstream, make_config, gunicorn_server) -> None:
    up = fake_upstream()
    server = gunicorn_server(make_config([up], server={"max_body_bytes": 2048}))
    big = [{"role": "user", "content": "x" * 4096}]
    with pytest.raises(openai.APIStatusError) as e:
        server.openai_client().chat.completions.create(model="gpt-4o", messages=big)
    assert e.value.status_code == 413
    assert e.value.code == "request_too_large"
    assert not up.requests
    ok = server.openai_client().chat.completions.create(model="gpt-4o", messages=MSG)
    assert ok.choices[0].message.content


def test_upstream_client_error_passed_through_without_retry(fake_upstream, make_config, gunicorn_server) -> None:
    first, second = fake_upstream(2)
    first.script(error(422, "messages[0].content is too long", code="context_length_exceeded"))
    server = gunicorn_server(make_config([first, second]))
    with pytest.raises(openai.UnprocessableEntityError) as e:
        server.openai_client().chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.code == "context_length_exceeded"
    assert "too long" in e.value.message
    assert e.value.response.headers["x-arbstr-provider"] == first.name
    assert len(first.requests) == 1 and not second.requests


def test_models_providers_and_cost(three) -> None:
    server, ups = three
    models = server.openai_client().models.list()
    assert [m.id for m in models.data] == ["gpt-4o", "gpt-4o-mini"]
    providers = server.get("/providers").json()["providers"]
    assert [p["name"] for p in providers] == ["pricey", "cheap", "middle"]
    assert providers[1]["circuit"] == {"state": "closed", "failure_count": 0}
    assert providers[1]["key_source"] == "none" and providers[1]["api_key"] is None
    assert providers[1]["cached_input_rate"] == providers[1]["input_rate"]  # none configured: the input rate
    assert providers[1]["key_rejected"] is False and providers[1]["balance_sats"] is None
    assert providers[1]["prices"] == {"source": "config", "updated_at": None, "age_secs": None, "error": None,
                                      "models": None}
    text = "héllo wörld " * 10
    r = server.post("/v1/cost", json={"model": "gpt-4o", "max_tokens": 100,
                                      "messages": [{"role": "user", "content": text}]})
    est = r.json()
    expected_in = -(-len(text.encode()) // 4)
    assert est["provider"] == "cheap" and est["policy"] is None
    assert est["estimated_input_tokens"] == expected_in and est["estimated_output_tokens"] == 100
    assert est["estimated_cost_sats"] == pytest.approx((expected_in * 4 + 100 * 10) / 1000 + 2)
    assert est["rates"] == {"input_rate": 4, "output_rate": 10, "base_fee": 2, "cached_input_rate": 4}
    assert not any(u.requests for u in ups.values())


def test_auth_token_required_when_configured(fake_upstream, make_config, gunicorn_server) -> None:
    up = fake_upstream()
    token = "arbstr-test-token-0123456789"
    server = gunicorn_server(make_config([up], server={"auth_token": "${ARBSTR_AUTH_TOKEN}"}),
                             env={"ARBSTR_AUTH_TOKEN": token})
    assert server.get("/health").status_code == 200
    with pytest.raises(openai.AuthenticationError) as e:
        server.openai_client(api_key="wrong").chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.code == "invalid_api_key"
    for path in ("/v1/models", "/providers", "/v1/stats", "/v1/requests"):
        assert server.get(path).status_code == 401, path
    assert not up.requests
    ok = server.openai_client(api_key=token).chat.completions.create(model="gpt-4o", messages=MSG)
    assert ok.choices[0].message.content
    assert "authorization" not in {k.lower() for k in up.requests[0].headers}
    assert server.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    server.stop()
    assert token not in server.log_text()


def test_streaming_relay_with_sdk(three) -> None:
    server, ups = three
    client = server.openai_client()
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}) as raw:
        assert raw.headers["x-arbstr-streaming"] == "true"
        assert raw.headers["x-arbstr-provider"] == "cheap"
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["cache-control"] == "no-cache"
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert ups["cheap"].name in text
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    extra = last.model_extra["arbstr"]
    expected = (last.usage.prompt_tokens * 4 + last.usage.completion_tokens * 10) / 1000 + 2
    assert extra["cost_sats"] == pytest.approx(expected)
    assert extra["provider"] == "cheap" and extra["request_id"] == raw.headers["x-arbstr-request-id"]
    assert ups["cheap"].requests[0].json["stream_options"] == {"include_usage": True}

    # Without include_usage the client never sees a chunk with empty choices, but arbstr asked for usage.
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert ups["cheap"].requests[1].json["stream_options"] == {"include_usage": True}

    # The raw bytes: the `: arbstr` comment precedes [DONE].
    r = server.chat(stream=True)
    body = r.content.decode()
    tail = body.rstrip().splitlines()
    assert tail[-1] == "data: [DONE]"
    comment = next(line for line in tail if line.startswith(": arbstr "))
    info = json.loads(comment[len(": arbstr "):])
    assert info["provider"] == "cheap" and info["request_id"] == r.headers["x-arbstr-request-id"]
    assert info["cost_sats"] > 0


def test_mock_mode_serves_sdk_and_stream(gunicorn_server) -> None:
    server = gunicorn_server(mock=True)
    client = server.openai_client()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
    assert raw.headers["x-arbstr-provider"] == "mock-budget"
    assert float(raw.headers["x-arbstr-cost-sats"]) > 0
    assert "mock-budget" in raw.parse().choices[0].message.content
    final = None
    with client.chat.completions.stream(model="gpt-4o-mini", messages=MSG) as stream:
        final = stream.get_final_completion()
    assert "mock-budget" in final.choices[0].message.content
    assert final.choices[0].message.role == "assistant"
    health = server.get("/health").json()
    assert health["status"] == "ok" and set(health["providers"]) == {"mock-budget", "mock-standard", "mock-premium"}


def test_reply_without_usage_has_no_cost(fake_upstream, make_config, gunicorn_server, tmp_path) -> None:
    """No usage in the answer: the cost is unknown (NULL), not 0 — a free request would skew every sum."""
    up = fake_upstream()
    up.default = reply(usage=False)
    server = gunicorn_server(make_config([up]))
    r = server.chat()
    assert r.status_code == 200
    assert "x-arbstr-cost-sats" not in r.headers
    rid = r.headers["x-arbstr-request-id"]
    # The row, as the API shows it (written by a background thread: wait for it) ...
    deadline = time.monotonic() + 10
    while (row := server.get(f"/v1/requests/{rid}")).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert row.status_code == 200, row.text
    row = row.json()
    assert row["status"] == "ok" and row["success"] is True and row["provider"] == up.name
    assert row["cost_sats"] is None
    assert row["tokens"] == {"input": None, "output": None, "cached": None, "reasoning": None}
    # ... and as stored: NULL, not 0.
    assert server.stop() == 0
    with sqlite3.connect(tmp_path / "arbstr.db") as db:
        stored = db.execute("SELECT cost_sats, input_tokens, output_tokens FROM requests WHERE request_id = ?",
                            (rid,)).fetchall()
    assert stored == [(None, None, None)]
