"""Hostile input on every route: arbstr answers in OpenAI's error shape, never a 500, HTML or a traceback.

The bulk of the examples (hypothesis, derandomized) go through Flask's test client on ``create_app``
in mock mode: the real parsing, routing, retry, relay and request-log code, with the network replaced
by the mock transport (or by ``responses`` for hostile upstream answers). Besides the answer itself,
every example checks that nothing was logged at ERROR (the unhandled-error handler and a crashed log
writer both log there) and that the request log still writes: one hostile row must not poison it.

A smaller set runs against real gunicorn over raw sockets, for what only a real server shows:
oversized and chunked bodies, 100,000 ``[``, invalid UTF-8 in bodies and header values, CR/LF and
folded headers, huge query strings, and a client that trickles its body and then goes silent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import responses
from conftest import ArbstrServer, write_config
from fakes import FakeUpstream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbstr_core.app import mock
from arbstr_core.app.factory import create_app
from arbstr_core.config import from_mapping
from arbstr_core.reads import queries

TOKEN = "hostile-suite-auth-token-7f3a9c"
MODELS = ("gpt-4o", "gpt-4o-mini", "o3-mini", "claude-sonnet-4")
ERROR_TYPES = {"invalid_request_error", "authentication_error", "rate_limit_error", "upstream_error", "server_error"}
SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW", "PROPFIND")
ROUTES = ("/v1/chat/completions", "/v1/cost", "/v1/models", "/providers", "/health", "/v1/stats", "/v1/requests",
          "/v1/requests/some-id")

# Deterministic for CI: the same examples every run, no example database, no per-example deadline
# (the machine is shared and busy). Example counts keep the Flask-client part around 10-20 s.
HOSTILE = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                          HealthCheck.filter_too_much])


def hostile(examples: int) -> settings:
    return settings(HOSTILE, max_examples=examples)


# ---------------------------------------------------------------------------------------------------
# What every answer must look like


def strict_json(data: bytes) -> Any:
    """JSON as any strict client parses it: no NaN/Infinity, valid UTF-8."""
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a JSON answer: not JSON")
    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def assert_error_shape(status: int, content_type: str, body: bytes, relayed: bool = False) -> dict[str, Any]:
    """An OpenAI error: JSON content type, exactly {"error": {message, type, param, code}}.

    ``relayed``: the message may quote a hostile upstream's words (HTML, "Traceback"), inside the JSON."""
    assert content_type.split(";")[0].strip() == "application/json", (status, content_type, body[:200])
    if not relayed:
        assert b"Traceback" not in body and b"<html" not in body.lower() and b"<!doctype" not in body.lower()
    data = strict_json(body)
    assert isinstance(data, dict) and set(data) == {"error"}, data
    err = data["error"]
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] in ERROR_TYPES, err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert isinstance(err["code"], str) and SNAKE.match(err["code"]), err
    return err


def assert_answer(resp: Any, method: str = "GET", relayed: bool = False) -> bytes:
    """Any answer of the test client: no 500, no redirect, the error shape on 4xx/5xx, JSON or SSE on 2xx.

    ``relayed``: the upstream is hostile too, and arbstr relays its events unchanged, so only arbstr's
    own parts of a stream are checked (its comment line, its error event, the final ``[DONE]``)."""
    body = resp.get_data()
    status = resp.status_code
    ctype = resp.headers.get("Content-Type", "")
    assert status != 500, body[:500]
    assert not 300 <= status < 400, (status, resp.headers)  # routes never redirect
    if method == "HEAD":
        assert body == b""
        return body
    if status >= 400:
        assert_error_shape(status, ctype, body, relayed)
    elif ctype.startswith("text/event-stream"):
        assert body.endswith(b"data: [DONE]\n\n"), body[-300:]  # every stream ends cleanly, even a broken one
        for line in body.split(b"\n"):
            if line.startswith(b": arbstr "):
                strict_json(line[9:])
            elif line.startswith(b"data: ") and line != b"data: [DONE]" and (not relayed or b"arbstr" in line):
                strict_json(line[6:])
    elif method != "OPTIONS" and status != 204:
        assert ctype.startswith("application/json"), (status, ctype)
        if not relayed:  # a relayed success is the provider's bytes, unchanged (checked by the caller)
            strict_json(body)
    return body


class ErrorRecords(logging.Handler):
    """Every record at ERROR or above from arbstr's loggers (unhandled errors, a crashed log writer)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [r.getMessage() for r in self.records]
        self.records.clear()
        return out


class Env:
    """An app on a mock config, its test client, its database and its ERROR records."""

    def __init__(self, db: Path, **server: Any) -> None:
        self.db = db
        config = mock.mock_config({"database": {"path": str(db)}, "server": server})
        self.app = create_app(config)
        self.state = self.app.extensions["arbstr"]
        self.client = self.app.test_client()
        self.errors = ErrorRecords()
        logging.getLogger("arbstr").addHandler(self.errors)

    def settle(self) -> None:
        """The request log took every row so far, and nothing was logged at ERROR."""
        deadline = time.monotonic() + 30  # generous: the machine is shared; short flushes fail fast on a crash
        while not self.state.logstore.flush(0.5):
            assert not self.errors.records, self.errors.take()
            assert time.monotonic() < deadline, self.state.logstore.health()
        health = self.state.logstore.health()
        assert health["db_ok"] and health["write_errors"] == 0 and health["dropped"] == 0, health
        assert self.errors.take() == []

    def close(self) -> None:
        logging.getLogger("arbstr").removeHandler(self.errors)
        self.state.logstore.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("hostile") / "arbstr.db", max_body_bytes=64 * 1024)
    for i in range(3):  # some rows, so the read routes run their queries, not the empty-log shortcut
        r = e.client.post("/v1/chat/completions", json={"model": MODELS[i], "messages": [
            {"role": "user", "content": f"seed {i}"}], "stream": i == 1})
        assert r.status_code == 200
        r.get_data()
    e.settle()
    yield e
    e.close()


@pytest.fixture(scope="module")
def auth_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("hostile-auth") / "arbstr.db", auth_token=TOKEN)
    yield e
    e.close()


# ---------------------------------------------------------------------------------------------------
# Strategies

SPECIALS = ["\x00", "\ud800", "\udfff", "\ud83d\ude00", "\u2028", "\ufeff", "\r", "\n", "\t", "é", "\\", '"', "'",
            "%", "[", "{", "\x7f", "\U0010ffff", "code", "gpt-4o", "code_generation"]
hostile_text = st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIALS)),
                        max_size=12).map("".join)
numbers = st.one_of(
    st.integers(), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**300, 10**400, 1e308, -1e308, 5e-324]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, hostile_text)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(hostile_text, c, max_size=4),
                           max_leaves=12)
content = st.one_of(
    hostile_text, json_values,
    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"])},
                                   optional={"text": st.one_of(hostile_text, json_values),
                                             "image_url": json_values}), max_size=3),
)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": content}),
    st.fixed_dictionaries({}, optional={"role": st.one_of(hostile_text, json_values), "content": content,
                                        "tool_calls": json_values, "name": hostile_text}),
    json_values,
)
chat_body = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(MODELS), hostile_text, json_values),
     "messages": st.one_of(st.lists(message, max_size=4), json_values)},
    optional={"stream": st.one_of(st.booleans(), json_values),
              "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": json_values}),
                                          json_values),
              "max_tokens": st.one_of(numbers, json_values), "max_completion_tokens": numbers,
              "tools": json_values, "response_format": json_values, "n": numbers, "x-unknown-field": json_values},
)


def encode(value: Any, how: str) -> bytes:
    """A JSON text the way some client might send it, including ways no client should."""
    if how == "ascii":
        return json.dumps(value).encode()
    if how == "utf8":  # raw surrogates become invalid UTF-8 (CESU-8 bytes)
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "latin1":
        return json.dumps(value, ensure_ascii=False).encode("latin-1", "replace")
    if how == "truncated":
        raw = json.dumps(value).encode()
        return raw[: len(raw) // 2]
    if how == "bom":
        return b"\xef\xbb\xbf" + json.dumps(value).encode()
    raise AssertionError(how)


bodies = st.one_of(
    st.builds(encode, chat_body, st.sampled_from(["ascii", "ascii", "utf8", "latin1", "truncated", "bom"])),
    st.builds(encode, json_values, st.just("ascii")),
    st.binary(max_size=200),
    st.sampled_from([b"", b"null", b"[]", b"{}", b"[" * 5000, b'{"a":' * 3000, b"\xff\xfe\x00", b"1e999999",
                     b'{"model": "gpt-4o", "messages": [], "model": 5}', b"\x00" * 50, b"-", b"0" * 5000,
                     b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\udead"}]}', b"x" * 70_000]),
)
latin1_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=40)
headers = st.fixed_dictionaries({}, optional={
    "Content-Type": st.one_of(st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                               "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                               "application/json; charset=utf-16"]), latin1_text),
    "X-Arbstr-Policy": st.one_of(st.just("code_generation"), latin1_text),
    "x-stainless-retry-count": st.one_of(st.integers().map(str), st.just("9" * 30), st.just("-1"), latin1_text),
    "Authorization": latin1_text,
    "Content-Encoding": st.sampled_from(["gzip", "br", "identity", "x"]),
    "Accept": latin1_text,
})
query_values = st.one_of(
    st.sampled_from(["last_1h", "last_24h", "last_7d", "last_30d", "model", "provider", "policy", "hour", "day", "true",
                     "false", "1", "0", "asc", "desc", "cost_sats", "latency_ms", "timestamp", "100", "101", "-5",
                     "99999999999999999999999", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00 02:00",
                     "2026-13-45", "0002-01-01T00:00:00Z", "9998-12-31T23:59:59Z", "", " "]),
    st.datetimes(min_value=dt.datetime(2, 1, 1), max_value=dt.datetime(9998, 12, 31)).map(lambda d: d.isoformat() + "Z"),
    hostile_text,
)
query_keys = st.one_of(st.sampled_from(["range", "since", "until", "model", "provider", "policy", "group_by", "success",
                                        "streaming", "page", "per_page", "sort", "order"]), hostile_text)


def query_string(pairs: list[tuple[str, str]]) -> bytes:
    return urlencode([(k.encode("utf-8", "surrogatepass"), v.encode("utf-8", "surrogatepass")) for k, v in pairs]).encode()


queries_ = st.one_of(
    st.lists(st.tuples(query_keys, query_values), max_size=6).map(query_string),
    st.binary(max_size=60).map(lambda b: quote(b, safe="=&").encode()),  # percent-encoded arbitrary bytes
    st.binary(max_size=60).filter(lambda b: b"#" not in b),  # raw bytes, as a broken client sends them
)
paths = st.one_of(st.sampled_from(ROUTES), st.sampled_from(ROUTES).map(lambda r: r + "/"),
                  st.builds(lambda r, t: r + "/" + quote(t.encode("utf-8", "surrogatepass")),
                            st.sampled_from(["/v1/requests", "/v1", "", "/v1/chat"]), hostile_text))


# ---------------------------------------------------------------------------------------------------
# Flask test client: many examples


@hostile(250)
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/cost"]), body=bodies, hdrs=headers)
def test_post_bodies_and_headers(env: Env, route: str, body: bytes, hdrs: dict[str, str]) -> None:
    resp = env.client.post(route, data=body, headers=hdrs)
    assert_answer(resp, "POST")
    if route == "/v1/chat/completions":
        rid = resp.headers.get("x-arbstr-request-id")
        assert rid and resp.headers.get("x-request-id") == rid  # on every answer of this route
        env.settle()
        row = queries.get_request(str(env.db), rid)
        assert row is not None, "every answered chat request has its row"
        assert row["http_status"] == resp.status_code
    else:
        assert resp.status_code in (200, 400, 404, 413), resp.get_data()[:300]
        env.settle()
    if len(body) > 64 * 1024:
        assert resp.status_code == 413


@hostile(200)
@given(path=st.sampled_from(["/v1/stats", "/v1/requests", "/v1/models", "/providers", "/health"]), query=queries_,
       hdrs=headers)
def test_get_routes_with_any_query_string(env: Env, path: str, query: bytes, hdrs: dict[str, str]) -> None:
    resp = env.client.get(path, query_string=query.decode("latin-1"), headers=hdrs)
    assert_answer(resp)
    assert resp.status_code in (200, 400), resp.get_data()[:300]
    if resp.status_code == 400:
        err = resp.get_json()["error"]
        assert err["code"] == "invalid_parameter" and err["param"], err  # names the parameter (SPEC §4.7)
    env.settle()


@hostile(200)
@given(method=st.sampled_from(METHODS), path=paths, query=queries_, body=st.binary(max_size=40))
def test_any_method_on_any_path(env: Env, method: str, path: str, query: bytes, body: bytes) -> None:
    resp = env.client.open(path, method=method, query_string=query.decode("latin-1"), data=body)
    assert_answer(resp, method)
    assert resp.status_code != 500
    env.settle()


@hostile(120)
@given(method=st.sampled_from(METHODS), path=paths, authorization=st.one_of(
    latin1_text,
    st.sampled_from([TOKEN, "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x",
                     f"Bearer {TOKEN.upper()}", f"Bearer{TOKEN}", f"Bearer\t{TOKEN}", f"Bearer {TOKEN[1:]}"]),
    latin1_text.map(lambda t: f"Bearer {t}"),
))
def test_wrong_credentials_get_401_on_every_route_but_health(auth_env: Env, method: str, path: str,
                                                            authorization: str) -> None:
    resp = auth_env.client.open(path, method=method, headers={"Authorization": authorization})
    body = assert_answer(resp, method)
    if path == "/health":
        assert resp.status_code in (200, 405)
    else:
        assert resp.status_code == 401, (path, authorization, resp.status_code)
        if method != "HEAD":
            err = resp.get_json()["error"]
            assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")
    assert TOKEN.encode() not in body and TOKEN[4:].encode() not in body
    auth_env.settle()


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "])
def test_right_credentials_pass_in_any_scheme_case(auth_env: Env, authorization: str) -> None:
    resp = auth_env.client.get("/v1/models", headers={"Authorization": authorization})
    assert resp.status_code == 200 and TOKEN.encode() not in resp.get_data()


def test_known_crashers_stay_fixed(env: Env) -> None:
    """The inputs that once crashed arbstr, each a minimal repro (see the hypothesis tests above)."""
    chat = "/v1/chat/completions"
    cases = [
        # 500 RecursionError from json.loads
        (chat, b"[" * 60_000, {}, 400), ("/v1/cost", b"{\"a\":" * 12_000, {}, 400),
        # a lone surrogate: 500 on streams (re-encoding) and on /v1/cost, and the request-log writer
        # thread died on the row's model/error message, losing every later row of the process
        (chat, b'{"model":"gpt-4o\\ud800","messages":[]}', {}, 400),
        (chat, b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"\\udfff"}]}', {}, 400),
        ("/v1/cost", b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\ud800"}]}', {}, 400),
        # an x-stainless-retry-count beyond SQLite's INTEGER killed the log writer the same way
        (chat, b'{"model":"gpt-4o","messages":[]}', {"x-stainless-retry-count": "9" * 30}, 200),
        (chat, b'{"model":"gpt-4o","messages":[]}', {"x-stainless-retry-count": "-5"}, 200),
        # /v1/cost: OverflowError (int too large for a float)
        ("/v1/cost", b'{"model":"gpt-4o","messages":[],"max_tokens":1' + b"0" * 400 + b"}", {}, 400),
    ]
    for route, body, hdrs, status in cases:
        resp = env.client.post(route, data=body, headers=hdrs)
        assert_answer(resp, "POST")
        assert resp.status_code == status, (body[:60], resp.get_data()[:300])
        env.settle()
    # A paired surrogate escape is an ordinary emoji, not an error.
    resp = env.client.post(chat, data=b'{"model":"gpt-4o","messages":[{"role":"user","content":"\\ud83d\\ude00"}]}')
    assert resp.status_code == 200
    rid = resp.headers["x-arbstr-request-id"]
    env.settle()
    assert queries.get_request(str(env.db), rid)["http_status"] == 200


@pytest.mark.parametrize("query", ["until=9999-12-31T23:59:59-01:00", "since=0001-01-01T00:00:00%2B01:00",
                                   "until=0001-01-02T00:00:00Z", "since=9999-12-31T00:00:00Z"])
def test_times_at_the_edge_of_the_calendar(env: Env, query: str) -> None:
    resp = env.client.get("/v1/stats", query_string=query)
    env.errors.take()
    assert resp.status_code == 400, resp.get_data()[:200]
    assert resp.get_json()["error"]["param"] == query.partition("=")[0]


# ---- hostile upstream answers (responses) ---------------------------------------------------------

UPSTREAM = "https://hostile-upstream.test/v1"


@pytest.fixture(scope="module")
def upstream_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env.__new__(Env)
    e.db = tmp_path_factory.mktemp("hostile-upstream") / "arbstr.db"
    config = from_mapping({
        "providers": [{"name": "hostile", "url": UPSTREAM, "models": ["gpt-4o"], "api_key": "sk-hostile-0123456789"}],
        "database": {"path": str(e.db)},
        "retry": {"max_retries": 0, "backoff_base_ms": 0, "max_retry_after_secs": 0},
        "circuit_breaker": {"failure_threshold": 1_000_000},
        "server": {"request_timeout_secs": 10},
    }, env={})
    e.app = create_app(config)
    e.state = e.app.extensions["arbstr"]
    e.client = e.app.test_client()
    e.errors = ErrorRecords()
    logging.getLogger("arbstr").addHandler(e.errors)
    yield e
    e.close()


upstream_bodies = st.one_of(
    st.binary(max_size=120),
    st.builds(encode, json_values, st.sampled_from(["ascii", "utf8"])),
    st.builds(lambda m: json.dumps({"error": {"message": m, "type": 5, "code": ["x"]}}).encode(), hostile_text),
    st.builds(lambda u: json.dumps({"id": "x", "choices": [], "usage": u}).encode(), json_values),
    st.builds(lambda m: json.dumps({"error": {"message": m}}).encode(), hostile_text),
    st.builds(lambda c, u: b"".join(b"data: " + json.dumps(x).encode() + b"\n\n" for x in (
        {"choices": [{"index": 0, "delta": {"content": c}}]}, {"choices": [], "usage": u}, {"error": {"message": c}}
    )) + b"data: [DONE]\n\n", hostile_text, json_values),
    st.sampled_from([b"<html><body>502 Bad Gateway</body></html>", b"data: [DONE]\n\n", b"[]", b"null",
                     b'data: {"error": {"message": "sk-hostile-0123456789 is broke"}}\n\n',
                     b'data: {"choices": [{"delta": {"content": "x"}}]}\n\ndata: {"choices": [], "usage": 7}\n\n',
                     (b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "x": "\\udfff"}}'
                     b'\n\ndata: [DONE]\n\n'),
                     (b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
                     b'data: {"error": {"message": "\\ud800 gone"}}\n\n')]),
)


@hostile(150)
@given(status=st.integers(200, 599), body=upstream_bodies,
       ctype=st.sampled_from(["application/json", "text/html", "text/event-stream", "text/plain"]),
       stream=st.booleans(), usage=st.booleans(),
       retry_after=st.one_of(st.none(), latin1_text, st.integers(-5, 10**12).map(str)))
def test_any_upstream_answer(upstream_env: Env, status: int, body: bytes, ctype: str, stream: bool, usage: bool,
                             retry_after: str | None) -> None:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mocked:
        mocked.add(responses.POST, UPSTREAM + "/chat/completions", body=body, status=status, content_type=ctype,
                   headers=headers)
        resp = upstream_env.client.post("/v1/chat/completions", json={
            "model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "stream_options": {"include_usage": usage}})
        out = assert_answer(resp, "POST", relayed=True)
    assert b"sk-hostile-0123456789" not in out
    if 200 <= status < 300 and not stream and resp.status_code < 400:
        assert out == body  # a success is relayed byte for byte
    upstream_env.settle()


# ---------------------------------------------------------------------------------------------------
# Real gunicorn over raw sockets


class Raw:
    """One HTTP/1.1 exchange written byte by byte; the answer read until the server closes or is done."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before an answer: {buf!r}")
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(hdrs.get("content-length", "-1"))
        while length < 0 or len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, hdrs, rest if length < 0 else rest[:length]

    def closed_by_server(self, timeout: float = 15.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def request_bytes(method: str, path: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
                  length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines += [k + b": " + v for k, v in headers or []]
    lines.append(b"Content-Length: " + str(len(body) if length is None else length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
IDLE_SECS = 3  # request_timeout_secs of the real server: also how long a body may stall


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArbstrServer]:
    tmp = tmp_path_factory.mktemp("hostile-real")
    up = FakeUpstream("real-up").start()
    config = write_config(tmp, [up], server={"max_body_bytes": 1024 * 1024, "request_timeout_secs": IDLE_SECS},
                          logging={"level": "debug"})
    server = ArbstrServer(tmp / "arbstr.log", config).start()
    yield server
    up.stop()
    server.stop(timeout=20)
    log = server.log_text()
    assert "Traceback" not in log and "unhandled error" not in log and "writer thread crashed" not in log, log[-3000:]


def exchange(server: ArbstrServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    raw = Raw(server.port)
    try:
        raw.send(data)
        return raw.answer()
    finally:
        raw.close()


def test_real_oversized_bodies_get_413(real: ArbstrServer) -> None:
    limit = 1024 * 1024
    for path in ("/v1/chat/completions", "/v1/cost"):
        r = real.post(path, data=b"x" * (limit + 1), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        err = assert_error_shape(413, r.headers["Content-Type"], r.content)
        assert err["code"] == "request_too_large" and str(limit) in err["message"]
        # Chunked, so no Content-Length to refuse up front: werkzeug counts while reading.
        r = real.post(path, data=iter([b"[" * 65536] * 20), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert_error_shape(413, r.headers["Content-Type"], r.content)
    # A Content-Length of 10 GB is refused from the header, without waiting for the body.
    t0 = time.monotonic()
    status, hdrs, body = exchange(real, request_bytes("POST", "/v1/chat/completions", b"{", length=10**10))
    assert status == 413 and time.monotonic() - t0 < IDLE_SECS
    assert_error_shape(status, hdrs["content-type"], body)
    assert hdrs.get("x-arbstr-request-id")
    # Exactly at the limit is parsed (and is no valid chat body).
    r = real.post("/v1/chat/completions", data=b" " * (limit - len(CHAT)) + CHAT)
    assert r.status_code == 200, r.text[:300]


def test_real_deeply_nested_and_invalid_utf8_bodies(real: ArbstrServer) -> None:
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000,
                 b'{"model":"gpt-4o","messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                 b'{"model":"gpt-4o","stream":true,"messages":' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        for path in ("/v1/chat/completions", "/v1/cost"):
            r = real.post(path, data=body)
            assert r.status_code == 400, (path, body[:40], r.text[:300])
            assert assert_error_shape(400, r.headers["Content-Type"], r.content)["code"] == "invalid_json"
    for body in (b'{"model":"gpt-4o","messages":[{"role":"user","content":"\xff\xfe"}]}',
                 b'{"model":"gpt-\xc3","messages":[]}', b"\xef\xbb\xbf\xff",
                 b'{"model":"gpt-4o","messages":[{"role":"user","content":"\xed\xa0\x80"}]}'):  # CESU-8 surrogate
        r = real.post("/v1/chat/completions", data=body)
        assert r.status_code == 400 and assert_error_shape(400, r.headers["Content-Type"], r.content)
    # UTF-8 that is valid is of course fine.
    r = real.post("/v1/chat/completions", data='{"model":"gpt-4o","messages":[{"role":"user","content":"é😀"}]}'
                  .encode())
    assert r.status_code == 200


def test_real_header_values_with_invalid_utf8_and_non_ascii(real: ArbstrServer) -> None:
    for value in (b"\xff\xfe", "é".encode(), "😀".encode(), b"\xc3", b"a\tb"):
        status, hdrs, body = exchange(real, request_bytes("POST", "/v1/chat/completions", CHAT,
                                                          [(b"X-Arbstr-Policy", value)]))
        assert status == 400, (value, body[:200])
        assert assert_error_shape(status, hdrs["content-type"], body)["code"] == "unknown_policy"
        for name in (b"x-stainless-retry-count", b"Authorization", b"X-Unknown", b"Content-Type"):
            status, hdrs, body = exchange(real, request_bytes("POST", "/v1/chat/completions", CHAT, [(name, value)]))
            assert status == 200, (name, value, body[:200])
            rid = hdrs["x-arbstr-request-id"]
    # The last row (a retry count of garbage) was written, with no retry count.
    deadline = time.monotonic() + 15
    while (row := real.get(f"/v1/requests/{rid}")).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.05)  # the writer thread commits in the background; nothing to wait on over HTTP
    assert row.status_code == 200 and row.json()["http_status"] == 200


def test_real_cr_lf_and_folded_headers_are_refused_by_gunicorn(real: ArbstrServer) -> None:
    """Malformed HTTP never reaches arbstr: gunicorn itself answers 400 (its own short HTML page, not
    arbstr's JSON: see the module report) and closes the connection; arbstr keeps serving."""
    written = real.get("/health").json()["log"]["written"]
    for extra in (b"X-Arbstr-Policy: a\rb", b"X-Arbstr-Policy: a\nb", b"X-Arbstr-Policy: a\x00b",
                  b"X-Arbstr-Policy: a\r\n folded", b"Bad Header: x", b"X-Arbstr-Policy : x",
                  b"X-Arbstr-Policy: a\x01b", b"X-Arbstr-Policy: a\x7fb",
                  b"Content-Type: application/json\r\nContent-Type: text/plain"):
        raw = Raw(real.port)
        try:
            raw.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\nContent-Length: "
                     + str(len(CHAT)).encode() + b"\r\n\r\n" + CHAT)
            status, hdrs, body = raw.answer()
            assert status == 400, (extra, status, body[:200])
            assert b"Traceback" not in body and "x-arbstr-request-id" not in hdrs
            assert raw.closed_by_server()
        finally:
            raw.close()
    assert real.chat().status_code == 200
    assert real.get("/health").json()["log"]["written"] >= written  # the refused requests made no row


def test_real_huge_query_strings(real: ArbstrServer) -> None:
    # Under gunicorn's request-line limit (4094 bytes): arbstr parses it and names the bad parameter.
    r = real.get("/v1/requests", params={"range": "x" * 3900})
    assert r.status_code == 400 and assert_error_shape(400, r.headers["Content-Type"], r.content)["param"] == "range"
    r = real.get("/v1/stats", params=[("model", "m")] * 300 + [("group_by", "day")])
    assert r.status_code == 200 and r.json()["counts"]["total"] == 0
    r = real.get("/v1/requests", params={"model": "\U0010ffff" * 200, "page": "9" * 100})
    assert r.status_code == 200 and r.json()["data"] == []
    # Over it: gunicorn refuses the request line itself (414) and closes; arbstr never sees it.
    status, _, body = exchange(real, b"GET /v1/requests?model=" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 414) and b"Traceback" not in body
    assert real.get("/health").status_code == 200


def test_real_slow_client_stalling_mid_body_gets_408_and_others_are_served(real: ArbstrServer) -> None:
    """gunicorn's gthread worker bounds no body read; arbstr reads chat/cost bodies with a per-read
    timeout of request_timeout_secs, so a client gone silent mid-body gets 408 instead of holding a
    worker thread for good. Meanwhile every other client is served."""
    raw = Raw(real.port)
    try:
        body = CHAT
        raw.send(request_bytes("POST", "/v1/chat/completions", b"", length=len(body)))
        sent_at = time.monotonic()
        for i in range(6):  # trickle: one byte per 0.3 s keeps it alive past the idle timeout...
            raw.send(body[i:i + 1])
            assert real.get("/health").status_code == 200  # ...while the others are served
            assert real.chat().status_code == 200
            time.sleep(max(0.0, 0.3 - (time.monotonic() - sent_at)))  # pacing the trickle is the point
            sent_at = time.monotonic()
        stalled = time.monotonic()
        status, hdrs, answer = raw.answer()  # ...then silence: 408 after IDLE_SECS
        waited = time.monotonic() - stalled
        assert status == 408, answer[:300]
        assert assert_error_shape(status, hdrs["content-type"], answer)["code"] == "request_timeout"
        assert IDLE_SECS - 0.5 <= waited <= IDLE_SECS + 10, waited
        assert raw.closed_by_server(), "the connection is closed after a 408 (its body state is unknown)"
        rid = hdrs["x-arbstr-request-id"]
    finally:
        raw.close()
    deadline = time.monotonic() + 15
    while (row := real.get(f"/v1/requests/{rid}")).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert row.json()["http_status"] == 408
    # A slow client that does finish its body within the idle bound is simply served.
    raw = Raw(real.port)
    try:
        raw.send(request_bytes("POST", "/v1/chat/completions", b"", length=len(CHAT)))
        for part in (CHAT[:10], CHAT[10:30], CHAT[30:]):
            time.sleep(0.2)  # a slow link, on purpose
            raw.send(part)
        status, _, answer = raw.answer()
        assert status == 200, answer[:200]
    finally:
        raw.close()


def test_real_stalled_clients_do_not_starve_the_worker(real: ArbstrServer) -> None:
    """More stalled bodies than the worker has threads (16): all get their 408 within about two idle
    periods and /health answers throughout the second batch's wait."""
    clients = [Raw(real.port) for _ in range(20)]
    try:
        for c in clients:
            c.send(request_bytes("POST", "/v1/cost", b'{"model"', length=500))
        t0 = time.monotonic()
        statuses = []
        for c in clients:
            status, _, _ = c.answer()
            statuses.append(status)
            c.close()  # the client hangs up too (gunicorn lingers up to 2 s on the main loop otherwise)
        assert statuses == [408] * 20
        assert time.monotonic() - t0 < 3 * IDLE_SECS + 10
    finally:
        for c in clients:
            c.close()
    assert real.get("/health").status_code == 200


# Raw bytes in every part of a request, through gunicorn. Header values keep to what HTTP allows
# (visible ASCII, tab, and obs-text 0x80-0xFF, valid UTF-8 or not): control characters are refused by
# gunicorn's parser before arbstr runs (see the CR/LF test).
CONTROL = set(range(0x20)) - {0x09} | {0x7F}
header_bytes = st.binary(max_size=30).filter(lambda b: not set(b) & CONTROL and b.strip(b" \t") == b)


@hostile(40)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/cost", "/v1/stats", "/v1/requests", "/v1/models",
                             "/providers", "/health", "/v1/requests/x", "/nope"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       query=st.binary(max_size=40).map(lambda b: quote(b, safe="=&%").encode()),
       hdrs=st.dictionaries(st.sampled_from([b"X-Arbstr-Policy", b"x-stainless-retry-count", b"Authorization",
                                             b"Content-Type", b"X-Anything"]), header_bytes, max_size=3)
       .map(lambda d: list(d.items())),  # one of each: gunicorn itself refuses a repeated Content-Type
       body=st.one_of(st.binary(max_size=200), st.builds(encode, chat_body, st.sampled_from(["ascii", "utf8"]))))
def test_real_raw_requests(real: ArbstrServer, path: str, method: str, query: bytes,
                           hdrs: list[tuple[bytes, bytes]], body: bytes) -> None:
    target = path + ("?" + query.decode("ascii") if query else "")
    status, got, answer = exchange(real, request_bytes(method, target, body, hdrs))
    assert status != 500 and b"Traceback" not in answer, answer[:300]
    if status >= 400:
        assert_error_shape(status, got["content-type"], answer)


def test_real_server_never_logged_a_traceback(real: ArbstrServer) -> None:
    log = real.log_text()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
    assert real.get("/health").json()["log"]["db_ok"] is True
