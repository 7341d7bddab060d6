"""End to end: availability under real conditions (SPEC §1 timeout_secs, §4.2, §5.1, §5.2, §6.2, §8).

Real `gunicorn arbstr:app` with its default settings, fake providers on loopback that hang, 404 or
send absurd numbers, and the openai SDK with its own retries switched on where they matter. Upstream
attempts are counted on the fakes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import responses
from conftest import provider
from fakes import Pause, error, hang, reply, sse, stream_chunks

from arbstr_core.app.factory import create_app
from arbstr_core.config import from_mapping
from arbstr_core.request import chat

MSG = [{"role": "user", "content": "hello there"}]
NEVER_OPEN = {"failure_threshold": 1000, "open_secs": 60}
ABSURD = {"prompt_tokens": 10**400, "completion_tokens": 5, "total_tokens": 10**400}


def health(server) -> dict[str, Any]:
    return server.get("/health").json()["providers"]


def row(server, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    """The request's log row once written and settled (the writer is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        r = server.get(f"/v1/requests/{request_id}")
        if r.status_code == 200 and r.json()["status"] != "streaming":
            return r.json()
        assert time.monotonic() < deadline, f"row {request_id}: {r.status_code} {r.text}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------
# A hung provider (§1 timeout_secs, §5.1 read timeout, §5.2 deadline)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_hung_cheapest_provider_with_timeout_secs_is_left_for_the_next(
        fake_upstream, make_config, gunicorn_server, stream: bool) -> None:
    hung, spare = fake_upstream(2)
    hung.default = hang(60)
    config = make_config([provider(hung, "hung", input_rate=1, output_rate=1, timeout_secs=1),
                          provider(spare, "spare", input_rate=5, output_rate=5)],
                         server={"request_timeout_secs": 20}, circuit_breaker=NEVER_OPEN)
    server = gunicorn_server(config)
    client = server.openai_client()
    started = time.monotonic()
    if stream:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o", messages=MSG, stream=True) as raw:
            headers = raw.headers
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        headers, text = raw.headers, raw.parse().choices[0].message.content
    took = time.monotonic() - started
    assert spare.name in text and headers["x-arbstr-provider"] == "spare"
    assert headers["x-arbstr-retries"] == "1/hung"
    assert took < 10, f"{took:.1f} s: the hung provider's 1 s timeout, not the 20 s deadline"
    assert len(hung.requests) == 1, "a read timeout is never retried on the same provider: it may charge"
    assert health(server)["hung"]["failure_count"] == 1


def test_a_hung_provider_with_default_timeouts_trips_its_breaker(fake_upstream, make_config, gunicorn_server,
                                                                 tmp_path) -> None:
    hung, spare = fake_upstream(2)
    hung.default = hang(60)
    config = make_config([provider(hung, "hung", input_rate=1, output_rate=1),
                          provider(spare, "spare", input_rate=5, output_rate=5)],
                         server={"request_timeout_secs": 1.5}, circuit_breaker={"failure_threshold": 2, "open_secs": 60})
    server = gunicorn_server(config)
    for n in (1, 2):
        r = server.chat(timeout=20)
        assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
        assert r.headers["x-arbstr-provider"] == "hung"
        assert row(server, r.headers["x-arbstr-request-id"])["provider"] == "hung"  # it may charge for it
        assert health(server)["hung"]["failure_count"] == n
    assert health(server)["hung"]["state"] == "open"
    r = server.chat(timeout=20)
    assert r.status_code == 200 and r.headers["x-arbstr-provider"] == "spare"
    assert len(hung.requests) == 2 and len(spare.requests) == 1
    by_provider = server.get("/v1/stats", params={"group_by": "provider"}).json()["groups"]
    assert by_provider["hung"]["counts"]["error"] == 2


# ---------------------------------------------------------------------------------------------------
# Errors the SDK would re-send (§4.2) and 404 fallback (§5.1)


def test_a_passed_through_409_reaches_the_provider_once_through_a_retrying_sdk(
        fake_upstream, make_config, gunicorn_server) -> None:
    up = fake_upstream(name="p")
    up.default = error(409, "conversation is locked", type="invalid_request_error", code="conflict")
    server = gunicorn_server(make_config([provider(up, "p")], circuit_breaker=NEVER_OPEN))
    client = server.openai_client(max_retries=2)
    with pytest.raises(openai.ConflictError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.response.headers["x-should-retry"] == "false"
    assert "conversation is locked" in e.value.message
    assert len(up.requests) == 1


def test_no_upstream_attempt_no_x_should_retry(fake_upstream, make_config, gunicorn_server) -> None:
    up = fake_upstream(name="p")
    server = gunicorn_server(make_config([provider(up, "p")]))
    r = server.chat(model="no-such-model")
    assert r.status_code == 404 and "x-should-retry" not in r.headers and not up.requests


def test_a_provider_404_falls_back_to_one_that_serves_the_model(fake_upstream, make_config, gunicorn_server) -> None:
    gone, spare = fake_upstream(2)
    gone.default = error(404, "The model `gpt-4o` does not exist", type="invalid_request_error",
                         code="model_not_found")
    config = make_config([provider(gone, "gone", input_rate=1, output_rate=1),
                          provider(spare, "spare", input_rate=5, output_rate=5)], circuit_breaker=NEVER_OPEN)
    server = gunicorn_server(config)
    for _ in range(2):  # neutral: the model keeps working, the provider stays closed
        raw = server.openai_client().chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        assert raw.headers["x-arbstr-provider"] == "spare" and raw.headers["x-arbstr-retries"] == "1/gone"
    assert len(gone.requests) == 2 and len(spare.requests) == 2
    assert health(server)["gone"] == {**health(server)["gone"], "state": "closed", "failure_count": 0}


def test_when_no_provider_serves_the_model_the_last_404_is_returned(fake_upstream, make_config,
                                                                    gunicorn_server) -> None:
    first, second = fake_upstream(2)
    first.default = error(404, "unknown model at first", code="model_not_found")
    second.default = error(404, "unknown model at second", code="model_not_found")
    config = make_config([provider(first, "first", input_rate=1), provider(second, "second", input_rate=5)])
    server = gunicorn_server(config)
    with pytest.raises(openai.NotFoundError) as e:
        server.openai_client(max_retries=2).chat.completions.create(model="gpt-4o", messages=MSG)
    assert "unknown model at second" in e.value.message and e.value.code == "model_not_found"
    assert e.value.response.headers["x-should-retry"] == "false"
    assert len(first.requests) == 1 and len(second.requests) == 1


UPSTREAM = "https://bug-upstream.test/v1"


def test_a_crash_in_arbstr_after_an_attempt_was_sent_says_do_not_retry(tmp_path, monkeypatch) -> None:
    """A 500 from a bug of ours after a provider was asked: SDKs re-send 5xx unless told not to."""
    config = from_mapping({
        "providers": [{"name": "p", "url": UPSTREAM, "models": ["gpt-4o"]}],
        "database": {"path": str(tmp_path / "arbstr.db")},
    }, env={})
    app = create_app(config)
    logging.getLogger("arbstr").disabled = True  # the crash's traceback is expected

    def bug(*args: Any) -> bytes:
        raise RuntimeError("a bug after the provider answered")

    monkeypatch.setattr(chat, "scrub_bytes", bug)
    try:
        with responses.RequestsMock() as mocked:
            mocked.add(responses.POST, UPSTREAM + "/chat/completions",
                       json={"id": "x", "object": "chat.completion", "choices": []})
            resp = app.test_client().post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG})
            assert len(mocked.calls) == 1
        assert resp.status_code == 500 and resp.headers["x-should-retry"] == "false"
        assert resp.get_json()["error"]["code"] == "internal_error"
    finally:
        logging.getLogger("arbstr").disabled = False
        app.extensions["arbstr"].logstore.close()


# ---------------------------------------------------------------------------------------------------
# Absurd numbers (§6.2 usage, §5.3 permits)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_absurd_usage_on_the_probe_leaves_the_provider_usable(fake_upstream, make_config, gunicorn_server,
                                                              stream: bool) -> None:
    up = fake_upstream(name="p")
    chunks = stream_chunks("gpt-4o", "Hello from p!", usage=ABSURD)
    up.script(error(503), sse(chunks) if stream else reply(json={
        "id": "x", "object": "chat.completion", "created": 0, "model": "gpt-4o",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from p!"},
                     "finish_reason": "stop"}], "usage": ABSURD}))
    config = make_config([provider(up, "p")], retry={"max_retries": 0},
                         circuit_breaker={"failure_threshold": 1, "open_secs": 0.5})
    server = gunicorn_server(config)
    assert server.chat().status_code == 502
    deadline = time.monotonic() + 10
    while health(server)["p"]["state"] != "half_open":  # the breaker's own timer: poll its state
        assert time.monotonic() < deadline
        time.sleep(0.05)

    client = server.openai_client()
    if stream:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}) as raw:
            request_id = raw.headers["x-arbstr-request-id"]
            got = list(raw.parse())
        assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello from p!"
        assert got[-1].usage.total_tokens == 10**400  # relayed untouched
    else:
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG)
        request_id = raw.headers["x-arbstr-request-id"]
        assert "x-arbstr-cost-sats" not in raw.headers
    logged = row(server, request_id)
    assert logged["success"] is True and logged["cost_sats"] is None  # unknown usage, unknown cost
    assert logged["tokens"] == {"input": None, "output": None, "cached": None, "reasoning": None}
    assert health(server)["p"]["state"] == "closed", "the probe's permit was resolved"
    assert server.chat().status_code == 200


# ---------------------------------------------------------------------------------------------------
# Many concurrent streams under the default settings (§8)


def test_48_concurrent_slow_streams_all_start_at_once(fake_upstream, make_config, gunicorn_server) -> None:
    """Each stream holds a worker thread for its life: the 17th must not wait for the first to end."""
    clients, interval, events = 48, 0.5, 5  # each stream lasts 2.5 s upstream
    up = fake_upstream(name="p")
    chunks = stream_chunks("gpt-4o", " ".join(["word"] * events))
    up.default = sse(chunks[:1] + [x for c in chunks[1:] for x in (Pause(interval), c)])
    server = gunicorn_server(make_config([provider(up, "p")]))  # the default threads
    barrier = threading.Barrier(clients)

    def one(_: int) -> tuple[float, float]:
        barrier.wait()
        start = time.monotonic()
        with server.post("/v1/chat/completions", stream=True, timeout=60, json={
                "model": "gpt-4o", "stream": True, "messages": MSG}) as r:
            assert r.status_code == 200
            first = None
            body = b""
            while data := r.raw.read1(65536):
                if first is None and b"data: {" in data:
                    first = time.monotonic() - start
                body += data
        assert b"data: [DONE]" in body and json.loads(body.split(b"\n\n")[0][6:])["choices"]
        assert first is not None
        return first, time.monotonic() - start

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    firsts = sorted(f for f, _ in results)
    # One stream is 2.5 s; a client queued behind a busy thread would wait at least that long.
    assert firsts[-1] < 2.0, f"first events: median {firsts[len(firsts) // 2]:.2f} s, last {firsts[-1]:.2f} s"
    assert max(total for _, total in results) < 2 * events * interval + 5
