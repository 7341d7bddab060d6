"""The test infrastructure tested on its own: fake providers over real sockets, config writing, and a
smoke run of the gunicorn fixture. If these fail, every end-to-end test built on them is suspect."""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import ROOT, provider, run_cli, toml_dumps, write_config
from fakes import (
    FakeUpstream,
    disconnect,
    error,
    hang,
    pause,
    raw,
    refused_url,
    reply,
    reset,
    slow_headers,
    splits_at,
    sse,
    status_then,
    stream_chunks,
)

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def post(fake: FakeUpstream, body: Any = CHAT, **kw: Any) -> requests.Response:
    kw.setdefault("timeout", 10)
    return requests.post(fake.url + "/chat/completions", json=body, **kw)


def read_events(resp: requests.Response, t0: float) -> list[tuple[float, bytes]]:
    """(arrival time, event) for each SSE event, read with read1 so nothing waits for more bytes."""
    buf, out = b"", []
    while data := resp.raw.read1(65536):
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            out.append((time.monotonic() - t0, event))
    return out


def socket_reads(fake: FakeUpstream, body: dict[str, Any] = CHAT) -> list[bytes]:
    """Send a request over a raw socket and return every recv() result: the write pattern made visible."""
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        reads = []
        while data := s.recv(65536):
            reads.append(data)
    return reads


@pytest.fixture
def fake() -> Any:
    with FakeUpstream("fake-x") as up:
        yield up


# ---------------------------------------------------------------------------------------------------
# Replies and recording


def test_reply_echoes_model_names_the_fake_and_records_the_request(fake: FakeUpstream) -> None:
    resp = post(fake, {**CHAT, "model": "gpt-4o-mini"}, headers={"Authorization": "Bearer sk-test"})
    assert resp.status_code == 200
    assert resp.headers["Connection"] == "close"
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert "fake-x" in body["choices"][0]["message"]["content"]
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}

    (req,) = fake.wait_for_requests(1)
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer sk-test"  # case-insensitive
    assert req.json["model"] == "gpt-4o-mini"
    assert req is fake.last_request and req.connection.request is req


def test_script_runs_in_order_then_falls_back_to_the_default(fake: FakeUpstream) -> None:
    fake.script(status_then(503, times=2), reply(201, json={"ok": True}))
    assert fake.pending == 4
    statuses = [post(fake).status_code for _ in range(5)]
    assert statuses == [503, 503, 200, 201, 200]
    assert fake.pending == 0
    assert len(fake.requests) == 5


def test_error_reply_is_openai_shaped_with_retry_after(fake: FakeUpstream) -> None:
    fake.script(error(429, "slow down", code="rate_limited", retry_after=2))
    resp = post(fake)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "2"
    assert resp.json() == {"error": {"message": "slow down", "type": "upstream_error", "param": None,
                                      "code": "rate_limited"}}


def test_reply_options_exact_body_and_no_usage(fake: FakeUpstream) -> None:
    fake.script(reply(body=b"not json"), reply(usage=False, content="custom"))
    assert post(fake).content == b"not json"
    body = post(fake).json()
    assert "usage" not in body and body["choices"][0]["message"]["content"] == "custom"


def test_raw_writes_exact_bytes(fake: FakeUpstream) -> None:
    fake.script(raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Odd: yes\r\n\r\nhi"))
    resp = post(fake)
    assert (resp.content, resp.headers["X-Odd"]) == (b"hi", "yes")


def test_chunked_request_bodies_are_read(fake: FakeUpstream) -> None:
    parts = [b'{"model": "gpt-4o", ', b'"messages": []}']
    resp = requests.post(fake.url + "/chat/completions", data=iter(parts), timeout=10)
    assert resp.status_code == 200
    assert fake.last_request.headers["Transfer-Encoding"] == "chunked"
    assert fake.last_request.json == {"model": "gpt-4o", "messages": []}


def test_wait_for_requests_fails_clearly_when_nothing_arrives(fake: FakeUpstream) -> None:
    with pytest.raises(AssertionError, match="expected 1 request"):
        fake.wait_for_requests(1, timeout=0.1)


# ---------------------------------------------------------------------------------------------------
# Streaming


def test_auto_streams_like_a_provider_with_usage_only_when_asked(fake: FakeUpstream) -> None:
    with_usage = post(fake, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, stream=True)
    assert with_usage.headers["Content-Type"] == "text/event-stream"
    events = [e for _, e in read_events(with_usage, time.monotonic())]
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "fake-x" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"

    plain = post(fake, {**CHAT, "stream": True}, stream=True)
    chunks = [json.loads(e.removeprefix(b"data: ")) for _, e in read_events(plain, time.monotonic())[:-1]]
    assert all(c["choices"] for c in chunks) and all("usage" not in c for c in chunks)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_sse_events_arrive_as_they_are_written(fake: FakeUpstream, chunked: bool) -> None:
    fake.script(sse([{"n": i} for i in range(4)], interval=0.2, chunked=chunked))
    t0 = time.monotonic()
    resp = post(fake, stream=True)
    assert (resp.headers.get("Transfer-Encoding") == "chunked") is chunked
    assert "Content-Length" not in resp.headers
    arrivals = read_events(resp, t0)
    assert [e for _, e in arrivals] == [b'data: {"n": 0}', b'data: {"n": 1}', b'data: {"n": 2}',
                                        b'data: {"n": 3}', b"data: [DONE]"]
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last >= 0.75  # four intervals of 0.2 s
    assert first < last - 0.5  # the first event did not wait for the end of the stream


def test_write_splits_inside_crlf_and_inside_a_multibyte_character(fake: FakeUpstream) -> None:
    event = {"text": "café"}
    fake.script(sse([event], eol=b"\r\n", chunked=False, done=False, split_delay=0.1,
                    write_splits=lambda p: splits_at(b"\r\n")(p) + splits_at("é")(p)))
    reads = socket_reads(fake)
    body = b"".join(reads).split(b"\r\n\r\n", 1)[1]
    assert body == 'data: {"text": "café"}\r\n\r\n'.encode()
    assert any(r.endswith(b"\xc3") for r in reads)  # first byte of é alone
    assert any(r.endswith(b"\r") for r in reads)  # CR without its LF
    assert fake.connections[0].events_sent == 1


def test_coalesce_puts_several_events_in_one_chunk(fake: FakeUpstream) -> None:
    fake.script(sse(["a", "b"], coalesce=True, done=False))
    data = b"".join(socket_reads(fake))
    assert data.endswith(b"\r\n\r\n12\r\ndata: a\n\ndata: b\n\n\r\n0\r\n\r\n")  # one 18-byte chunk, then the end


def test_cut_after_leaves_a_chunked_body_incomplete(fake: FakeUpstream) -> None:
    fake.script(sse([{"n": i} for i in range(5)], cut_after=2))
    resp = post(fake, stream=True)
    got = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for data in resp.iter_content(None):
            got.append(data)  # noqa: PERF402 - the partial body is the point
    assert b"".join(got) == b'data: {"n": 0}\n\ndata: {"n": 1}\n\n'
    assert fake.connections[0].events_sent == 2


def test_cut_after_with_rst_is_a_connection_error(fake: FakeUpstream) -> None:
    fake.script(sse([{"n": i} for i in range(5)], cut_after=1, cut="rst", chunked=False))
    resp = post(fake, stream=True)
    with pytest.raises(requests.RequestException):
        for _ in resp.iter_content(None):
            pass


def test_cut_close_delimited_stream_ends_cleanly_without_done(fake: FakeUpstream) -> None:
    fake.script(sse([{"n": 0}, {"n": 1}], cut_after=1, chunked=False))
    resp = post(fake, stream=True)
    assert resp.content == b'data: {"n": 0}\n\n'  # indistinguishable from an end: only [DONE] is missing


def test_pause_stalls_a_stream_until_released(fake: FakeUpstream) -> None:
    stall = pause(30)
    fake.script(sse([{"n": 0}, stall, {"n": 1}]))
    resp = post(fake, stream=True)
    assert resp.raw.read1(65536).endswith(b'data: {"n": 0}\n\n')
    threading.Timer(0.2, stall.release).start()
    t0 = time.monotonic()
    assert b'data: {"n": 1}' in resp.raw.read()
    assert time.monotonic() - t0 < 5


def test_client_closing_mid_stream_is_detected_at_once(fake: FakeUpstream) -> None:
    fake.script(sse([{"n": i} for i in range(50)], interval=0.2))
    resp = post(fake, stream=True)
    assert b'"n": 0' in resp.raw.read1(65536)
    left = time.monotonic()
    resp.close()
    conn = fake.connections[0]
    closed_at = conn.wait_closed_by_client(5)
    assert closed_at - left < 0.2  # within one event interval
    assert conn.events_sent < 5
    assert conn.finished.wait(5)


def test_stream_ending_normally_is_not_a_client_close(fake: FakeUpstream) -> None:
    resp = post(fake, {**CHAT, "stream": True}, stream=True)
    resp.content  # noqa: B018 - read to the end
    conn = fake.connections[0]
    assert conn.finished.wait(5)
    assert not conn.closed_by_client.is_set() and conn.closed_by_client_at is None


def test_stream_chunks_helper_shape() -> None:
    chunks = stream_chunks("m", "one two three", usage={"prompt_tokens": 1, "completion_tokens": 2,
                                                        "total_tokens": 3})
    assert [c["choices"][0]["delta"] for c in chunks[:5]] == [
        {"role": "assistant", "content": ""}, {"content": "one"}, {"content": " two"}, {"content": " three"}, {}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 3
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in stream_chunks(include_usage=False))


# ---------------------------------------------------------------------------------------------------
# Connection-level failures


def test_reset_after_the_request_is_a_connection_error(fake: FakeUpstream) -> None:
    fake.script(reset())
    with pytest.raises(requests.ConnectionError):
        post(fake)
    assert len(fake.requests) == 1  # the request was read: "sent", in SPEC §5.1 terms


def test_disconnect_without_response_is_a_connection_error(fake: FakeUpstream) -> None:
    fake.script(disconnect())
    with pytest.raises(requests.ConnectionError):
        post(fake)


def test_refused_url_refuses() -> None:
    with pytest.raises(requests.ConnectionError):
        requests.post(refused_url() + "/chat/completions", json=CHAT, timeout=5)


def test_hang_returns_as_soon_as_released(fake: FakeUpstream) -> None:
    stuck = hang(30, then=reply())
    fake.script(stuck)
    result: dict[str, Any] = {}
    client = threading.Thread(target=lambda: result.update(resp=post(fake)))
    client.start()
    fake.wait_for_requests(1)
    t0 = time.monotonic()
    stuck.release()
    client.join(5)
    assert result["resp"].status_code == 200
    assert time.monotonic() - t0 < 2


def test_hang_that_times_out_closes_without_a_response(fake: FakeUpstream) -> None:
    fake.script(hang(0.2))
    with pytest.raises(requests.ConnectionError):
        post(fake)


def test_hang_notices_a_client_that_gives_up(fake: FakeUpstream) -> None:
    fake.script(hang(30))
    with pytest.raises(requests.ReadTimeout):
        post(fake, timeout=(5, 0.3))
    fake.connections[0].wait_closed_by_client(5)
    assert fake.connections[0].finished.wait(5)


def test_release_all_frees_every_waiting_connection(fake: FakeUpstream) -> None:
    fake.default = hang(30, then=reply())
    results: list[int] = []
    clients = [threading.Thread(target=lambda: results.append(post(fake).status_code)) for _ in range(3)]
    for c in clients:
        c.start()
    fake.wait_for_requests(3)
    fake.release_all()
    for c in clients:
        c.join(5)
    assert results == [200, 200, 200]


def test_stop_ends_a_hanging_connection_promptly() -> None:
    up = FakeUpstream("stopper").start()
    up.script(hang(60))
    errors: list[Exception] = []

    def call() -> None:
        try:
            post(up)
        except requests.RequestException as e:
            errors.append(e)

    client = threading.Thread(target=call)
    client.start()
    up.wait_for_requests(1)
    t0 = time.monotonic()
    up.stop()
    client.join(5)
    assert time.monotonic() - t0 < 2
    assert len(errors) == 1
    assert not up.connections[0].closed_by_client.is_set()  # stopping is not the client leaving


def test_slow_headers_delays_the_response(fake: FakeUpstream) -> None:
    fake.script(slow_headers(0.3))
    t0 = time.monotonic()
    assert post(fake).status_code == 200
    assert time.monotonic() - t0 >= 0.3


def test_trickled_headers_outlast_a_per_read_timeout(fake: FakeUpstream) -> None:
    fake.script(slow_headers(0.8, trickle=True, trickle_every=0.1))
    t0 = time.monotonic()
    resp = post(fake, timeout=(5, 0.4))  # no gap reaches 0.4 s, so only a total deadline would stop this
    assert resp.status_code == 200 and "X-Fake-Trickle" in resp.headers
    assert time.monotonic() - t0 >= 0.8


# ---------------------------------------------------------------------------------------------------
# Config writing (conftest helpers)


def test_toml_dumps_round_trips_through_tomllib() -> None:
    data = {
        "top": 1,
        "server": {"listen": "127.0.0.1:0", "auth_token": None, "rate": 1.5, "flag": False},
        "providers": [{"name": 'q"uote\\back', "models": ["a", "b"], "odd key": "tab\there\nnl é"}],
        "policies": {"default_strategy": "cheapest", "rules": [{"name": "r", "keywords": []}]},
        "empty": [],
    }
    loaded = tomllib.loads(toml_dumps(data))
    del data["server"]["auth_token"]  # None means "leave the key out"
    assert loaded == data


def test_write_config_is_private_and_keeps_the_database_in_tmp(tmp_path: Path) -> None:
    up = FakeUpstream("alpha")
    try:
        path = write_config(tmp_path, [up, provider("http://127.0.0.1:9/v1", "beta", output_rate=5)],
                            server={"request_timeout_secs": 3}, rules=[{"name": "code", "keywords": ["code"]}])
    finally:
        up.stop()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = tomllib.loads(path.read_text())
    assert cfg["database"]["path"] == str(tmp_path / "arbstr.db")
    assert cfg["retry"]["backoff_base_ms"] == 10
    assert [p["name"] for p in cfg["providers"]] == ["alpha", "beta"]
    assert cfg["providers"][0]["url"] == up.url
    assert cfg["policies"]["rules"][0]["keywords"] == ["code"]


def test_written_config_is_accepted_by_arbstr(tmp_path: Path) -> None:
    config = pytest.importorskip("arbstr_core.config")
    path = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "alpha")],
                        server={"request_timeout_secs": 3}, circuit_breaker={"failure_threshold": 2},
                        logging={"level": "debug"}, policies={"default_strategy": "round_robin"},
                        rules=[{"name": "code", "allowed_models": ["gpt-4o"], "keywords": ["code"]}])
    loaded = config.load(str(path), env={})
    assert [p.name for p in loaded.providers] == ["alpha"]


# ---------------------------------------------------------------------------------------------------
# The gunicorn fixture, end to end (needs the app)

needs_app = pytest.mark.skipif(not (ROOT / "arbstr.py").exists(), reason="arbstr.py not written yet")


@needs_app
def test_gunicorn_server_proxies_to_a_fake(fake_upstream: Any, make_config: Any, gunicorn_server: Any) -> None:
    up = fake_upstream()
    server = gunicorn_server(make_config([up]), env={"ARBSTR_FAKE_1_API_KEY": "sk-fixture-secret-123"})
    completion = server.openai_client().chat.completions.create(**CHAT)
    assert up.name in completion.choices[0].message.content
    assert up.last_request.headers["Authorization"] == "Bearer sk-fixture-secret-123"
    assert server.stop() == 0
    assert "sk-fixture-secret-123" not in server.log_text()


@needs_app
def test_gunicorn_server_mock_mode(gunicorn_server: Any, tmp_path: Path) -> None:
    server = gunicorn_server(mock=True)
    assert server.get("/health").json()["status"] == "ok"
    assert server.chat().status_code == 200
    assert server.stop() == 0
    assert (tmp_path / "arbstr.db").exists()  # mock mode runs in tmp_path, not the repo


@needs_app
def test_run_cli_check(tmp_path: Path) -> None:
    path = write_config(tmp_path, [provider("http://127.0.0.1:9/v1", "alpha")])
    result = run_cli("check", "-c", path)
    assert result.returncode == 0, result.stderr
