"""Opt-in debug capture (README "Debug capture"): what is stored, when, scrubbed and cut, and for how long.

End to end through real gunicorn with fake providers on loopback and the ``openai`` / ``anthropic`` SDKs
as clients; the capture document (request/debug.py), the writer's queue and retention (log/writer.py,
log/captures.py) also on their own, without a server.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import provider
from fakes import SSE, Exchange, Reply, error, stream_chunks

from arbstr_core.log import captures
from arbstr_core.log import db as logdb
from arbstr_core.log.writer import LogStore
from arbstr_core.request.debug import Capture
from arbstr_core.secrets import Scrubber, Secret
from arbstr_core.timefmt import utc_timestamp

MSG = [{"role": "user", "content": "hello there"}]
KEY = "cashuA" + secrets.token_urlsafe(120)  # the provider's key
TOKEN = "arb_" + secrets.token_urlsafe(32)  # arbstr's auth token
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WINDOW = 12  # any run of this many characters of a secret counts as a leak (as in test_e2e_secrets)
DEBUG_ON = {"X-Arbstr-Debug": "true"}


def settled(server, request_id: str) -> dict[str, Any]:
    """The request's row once it is written and no longer streaming: the log writer is asynchronous, and
    it writes a capture before the rows of the same batch, so a settled row means its capture is there."""
    deadline = time.monotonic() + 10
    while True:
        r = server.get(f"/v1/requests/{request_id}", headers=AUTH)
        if r.status_code == 200 and r.json()["status"] != "streaming":
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def capture_of(server, request_id: str) -> dict[str, Any]:
    settled(server, request_id)
    r = server.get(f"/v1/requests/{request_id}/debug", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def stored(db: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT request_id, bytes, truncated FROM debug_captures").fetchall()


def leaks(data: bytes) -> list[str]:
    """Which secrets (or 12-character runs of them) are in ``data``."""
    return [name for name, secret in (("provider key", KEY), ("auth token", TOKEN))
            if any(secret[i:i + WINDOW].encode() in data for i in range(len(secret) - WINDOW + 1))]


def size(part: Any) -> int:
    text = part if isinstance(part, str) else json.dumps(part, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode())


@pytest.fixture
def start(fake_upstream, make_config, gunicorn_server):
    """``start(**debug)`` → (server, the one provider ``alpha`` with a key, the database path)."""
    alpha = fake_upstream(name="alpha")

    def run(**debug: Any):
        config = make_config([provider(alpha, "alpha", api_key=KEY)], server={"auth_token": TOKEN}, debug=debug)
        return gunicorn_server(config), alpha, config.parent / "arbstr.db"

    return run


def test_off_the_header_is_ignored_nothing_is_stored_and_the_route_says_so(start) -> None:
    server, _alpha, db = start()  # [debug] as shipped: off
    client = server.openai_client(api_key=TOKEN)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, extra_headers=DEBUG_ON)
    streamed = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, stream=True,
                                                                extra_headers=DEBUG_ON)
    assert "".join(c.choices[0].delta.content or "" for c in streamed.parse())
    for request_id in (raw.request_id, streamed.headers["x-arbstr-request-id"]):
        settled(server, request_id)
        r = server.get(f"/v1/requests/{request_id}/debug", headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "debug_capture_off" and "off" in r.json()["error"]["message"]
    assert stored(db) == []
    assert server.get(f"/v1/requests/{raw.request_id}/debug").status_code == 401  # behind the same auth


def test_header_mode_captures_only_the_requests_that_ask(start) -> None:
    server, _alpha, db = start(enabled=True, capture="header")
    client = server.openai_client(api_key=TOKEN)
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG).request_id
    asked = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG,
                                                             extra_headers=DEBUG_ON).request_id
    declined = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, extra_headers={"X-Arbstr-Debug": "false"}).request_id
    assert capture_of(server, asked)["request_id"] == asked
    for request_id in (plain, declined):
        settled(server, request_id)
        r = server.get(f"/v1/requests/{request_id}/debug", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["code"] == "capture_not_found"
        assert "X-Arbstr-Debug: true" in r.json()["error"]["message"]
    assert [row[0] for row in stored(db)] == [asked]


def test_a_capture_holds_the_request_each_attempt_with_the_key_masked_and_the_answer(start) -> None:
    server, alpha, db = start(enabled=True)
    alpha.script(error(503, "try again"))  # the first attempt fails, the retry answers
    client = server.openai_client(api_key=TOKEN)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, temperature=0.5)
    answer = raw.parse()
    got = capture_of(server, raw.request_id)
    assert (got["request_id"], got["truncated"]) == (raw.request_id, False)
    assert got["timestamp"] == settled(server, raw.request_id)["timestamp"]
    assert [(raw.request_id, got["bytes"], 0)] == stored(db)
    capture = got["capture"]
    assert capture["request"] == {"path": "/v1/chat/completions",
                                  "body": {"messages": MSG, "model": "gpt-4o", "temperature": 0.5}}
    failed, answered = capture["attempts"]
    sent = alpha.requests
    for attempt, received in zip((failed, answered), sent, strict=True):
        assert attempt["provider"] == "alpha" and attempt["url"] == alpha.url + "/chat/completions"
        assert attempt["request"]["body"] == received.json
        headers = attempt["request"]["headers"]
        assert headers["Authorization"] == f"Bearer {KEY[:6]}...***"  # masked as /providers shows it
        assert headers["Idempotency-Key"] == raw.request_id == received.headers["Idempotency-Key"]
    assert (failed["outcome"], failed["status"]) == ("server_error", 503) and "try again" in failed["error"]
    assert failed["answer"]["body"]["error"]["message"] == "try again"
    assert (answered["outcome"], answered["status"], "error" in answered) == ("ok", 200, False)
    assert answered["answer"]["status"] == 200
    assert answered["answer"]["headers"]["Content-Type"] == "application/json"
    assert answered["answer"]["body"]["id"] == answer.id
    assert answered["answer"]["body"]["choices"][0]["message"]["content"] == "Hello from alpha!"


def test_a_stream_is_captured_as_the_bytes_the_provider_sent(start) -> None:
    server, alpha, _db = start(enabled=True)
    client = server.openai_client(api_key=TOKEN)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse())
    assert text == "Hello from alpha!"
    capture = capture_of(server, raw.headers["x-arbstr-request-id"])["capture"]
    assert capture["request"]["body"] == {"messages": MSG, "model": "gpt-4o", "stream": True}
    (attempt,) = capture["attempts"]
    assert attempt["request"]["body"] == alpha.requests[0].json  # arbstr asked for usage
    assert attempt["request"]["body"]["stream_options"] == {"include_usage": True}
    body = attempt["answer"]["body"]
    # As the provider sent it: its usage chunk, which the client did not ask for, and no arbstr trailer.
    *chunks, done = [json.loads(e.removeprefix("data: ")) if e != "data: [DONE]" else e
                     for e in body.split("\n\n") if e]
    assert done == "data: [DONE]" and ": arbstr" not in body
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_messages_captures_the_anthropic_request_and_the_chat_request_sent(start) -> None:
    server, alpha, _db = start(enabled=True)
    client = server.anthropic_client(api_key=TOKEN)
    raw = client.messages.with_raw_response.create(model="gpt-4o", max_tokens=64, system="be brief", messages=MSG)
    capture = capture_of(server, raw.headers["request-id"])["capture"]
    assert capture["request"] == {"path": "/v1/messages", "body": {
        "max_tokens": 64, "messages": MSG, "model": "gpt-4o", "system": "be brief"}}
    (attempt,) = capture["attempts"]
    assert attempt["request"]["body"] == alpha.requests[0].json
    assert attempt["request"]["body"]["messages"][0] == {"role": "system", "content": "be brief"}
    assert attempt["answer"]["body"]["object"] == "chat.completion"


def echo_key(ex: Exchange) -> str:
    return f"your key is {ex.request.headers['Authorization']}"


def test_no_secret_in_the_database_or_the_route(start, tmp_path: Path) -> None:
    """A client that pastes both secrets into its prompt, a provider that quotes its key in an error,
    an answer, a stream and its headers: the captures hold [REDACTED] and the masked key, never the secrets."""
    server, alpha, db = start(enabled=True)
    alpha.script(
        lambda ex: Reply(503, json={"error": {"message": echo_key(ex), "code": ex.request.headers["Authorization"]}},
                         headers={"X-Echo": echo_key(ex)}).run(ex),
        lambda ex: Reply(200, content=echo_key(ex), headers={"X-Echo": echo_key(ex)}).run(ex),
        lambda ex: SSE(stream_chunks(pieces=["quoting ", echo_key(ex)])).run(ex),
    )
    pasted = [{"role": "user", "content": f"my token {TOKEN} and key {KEY} and its start {KEY[:40]}"}]
    client = server.openai_client(api_key=TOKEN)
    ids = [client.chat.completions.with_raw_response.create(model="gpt-4o", messages=pasted).request_id,
           client.chat.completions.with_raw_response.create(model="gpt-4o", messages=pasted, stream=True)
           .headers["x-arbstr-request-id"]]
    for request_id in ids:
        capture_of(server, request_id)
    answers = b"".join(server.get(f"/v1/requests/{i}/debug", headers=AUTH).content for i in ids)
    assert b"[REDACTED]" in answers and f"Bearer {KEY[:6]}...***".encode() in answers
    files = {f.name: f.read_bytes() for f in tmp_path.glob("arbstr.db*")}
    assert "arbstr.db-wal" in files and len(stored(db)) == 2
    assert server.stop() == 0
    files |= {f"{f.name} after shutdown": f.read_bytes() for f in tmp_path.glob("arbstr.db*")}
    found = {where: leaks(data) for where, data in [("route", answers), *files.items()] if leaks(data)}
    assert not found, found


def test_parts_are_cut_at_max_bytes_and_marked_truncated(start) -> None:
    server, alpha, db = start(enabled=True, max_bytes=1024)
    alpha.script(Reply(content="y" * 3000), SSE(stream_chunks(content="z" * 3000, pieces=["z" * 1500] * 2)))
    long = [{"role": "user", "content": "é" * 2000}]  # 2 bytes each: a cut may fall inside a character
    client = server.openai_client(api_key=TOKEN)
    plain = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=long)
    assert plain.parse().choices[0].message.content == "y" * 3000  # the client gets it all
    streamed = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=long, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed.parse()) == "z" * 3000
    short = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSG).request_id
    for request_id in (plain.request_id, streamed.headers["x-arbstr-request-id"]):
        got = capture_of(server, request_id)
        assert got["truncated"] is True
        capture = got["capture"]
        (attempt,) = capture["attempts"]
        parts = [capture["request"]["body"], attempt["request"]["body"], attempt["answer"]["body"]]
        assert all(isinstance(p, str) and 1000 <= size(p) <= 1024 for p in parts), [size(p) for p in parts]
        assert parts[0].startswith("{") and "gpt-4o" in parts[1]
    assert capture_of(server, short)["truncated"] is False
    assert sorted(t for _, _, t in stored(db)) == [0, 1, 1]


# ---- without a server ------------------------------------------------------------------------------


def test_the_document_masks_scrubs_and_keeps_json_as_json() -> None:
    scrub = Scrubber([Secret(KEY)])
    # The key with its first and last characters escaped: the text's scrub cannot recognise it.
    hidden = '{"note": "' + f"\\u{ord(KEY[0]):04x}{KEY[1:-1]}\\u{ord(KEY[-1]):04x}" + '"}'
    assert json.loads(hidden) == {"note": KEY}
    assert KEY[:WINDOW] not in hidden and KEY[-WINDOW:] not in hidden
    capture = Capture(4096, "/v1/chat/completions", b'{"model": "m", "messages": []}')
    attempt = capture.attempt("alpha", "https://alpha.example/v1/chat/completions", b"not json " + KEY.encode())
    attempt.response({"Authorization": f"Bearer {KEY}", "X-Api-Key": KEY, "Accept": "application/json"}, 200,
                     {"X-Echo": KEY})
    attempt.answer = hidden.encode()
    attempt.ended("ok", 200, "")
    row = capture.row("rid", "2026-01-01T00:00:00.000Z", scrub)
    assert leaks(row["capture"].encode()) == []
    document = json.loads(row["capture"])
    assert (row["bytes"], row["truncated"]) == (len(row["capture"].encode()), 0)
    assert document["request"] == {"path": "/v1/chat/completions", "body": {"model": "m", "messages": []}}
    (stored_attempt,) = document["attempts"]
    assert stored_attempt["request"] == {
        "headers": {"Authorization": f"Bearer {KEY[:6]}...***", "X-Api-Key": f"{KEY[:6]}...***",
                    "Accept": "application/json"},
        "body": "not json [REDACTED]"}
    assert stored_attempt["answer"] == {"status": 200, "headers": {"X-Echo": "[REDACTED]"},
                                        "body": {"note": "[REDACTED]"}}


def test_a_stream_keeps_max_bytes_and_knows_more_came() -> None:
    capture = Capture(10, "/v1/chat/completions", b"{}")
    attempt = capture.attempt("alpha", "http://a/v1/chat/completions", b"{}")
    attempt.response({}, 200, {})
    for piece in (b"data: 1\n\n", b"data: 2\n\n"):
        attempt.feed(piece)
    assert (bytes(attempt.stream or b""), attempt.more) == (b"data: 1\n\nd", True)
    document = json.loads(capture.row("rid", "2026-01-01T00:00:00.000Z", Scrubber([]))["capture"])
    assert document["attempts"][0]["answer"]["body"] == "data: 1\n\nd"


def test_the_writer_stores_captures_and_retention_deletes_old_ones(tmp_path: Path) -> None:
    """Captures go through the writer's queue; its retention pass (at start, then daily) deletes the ones
    older than [debug] retention_days even when [database] retention_days keeps rows forever."""
    db = tmp_path / "arbstr.db"
    now = time.time()
    day = 86400

    def row(age_days: float) -> dict[str, Any]:
        return {"request_id": f"r{age_days}", "timestamp": utc_timestamp(now - age_days * day),
                "capture": '{"request": {}}', "bytes": 15, "truncated": 0}

    first = LogStore(str(db), capture_retention_days=0)  # keeps captures: nothing is deleted
    first.start()
    for age in (9, 7.5, 6, 0.1):
        first.capture(row(age))
        first.insert({"request_id": f"r{age}", "timestamp": now - age * day, "status": "ok", "success": True})
    first.close()
    conn = logdb.open_writer(str(db))
    assert captures.get(conn, "r9") == {"request_id": "r9", "timestamp": row(9)["timestamp"], "truncated": False,
                                        "bytes": 15, "capture": {"request": {}}}
    conn.close()
    assert len(stored(db)) == 4

    store = LogStore(str(db), retention_days=0, capture_retention_days=7, clock=lambda: now)
    store.start()
    assert store.flush()  # the retention pass runs at start, before the writer takes from the queue
    store.close()
    assert sorted(r for r, _, _ in stored(db)) == ["r0.1", "r6"]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 4  # rows are kept

    conn = logdb.open_writer(str(db))
    with logdb.transaction(conn):
        assert captures.purge(conn, now, chunk=1) == 1  # in chunks: one of the two left
    conn.close()
    assert len(stored(db)) == 1
