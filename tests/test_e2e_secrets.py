"""Provider keys and the auth token never leave arbstr (SPEC §1.1): one full session, every byte searched.

Keys are realistic (Cashu ``cashuA`` tokens, ``sk-proj-``/``sk-`` keys) and come from every source:
a literal in the file, ``${VAR}`` expansion, the ``ARBSTR_<NAME>_API_KEY`` convention; the auth token
comes from ``${ARBSTR_AUTH_TOKEN}``. The upstreams are hostile: they echo the Authorization header
they received (whole, its first 40 and last 12 characters) in error messages, in the error's type,
param and code, in SSE error events (first event and mid-stream), in 429s and even in a successful
completion. Clients are careless: they send a provider key as their bearer token, as the model name,
as the policy header, as a request id and in query strings.

Searched: every response body and header, the gunicorn process' stdout/stderr at debug level
(arbstr's ``[logging] level = "debug"`` and gunicorn's ``--log-level debug``), the database files
(``-wal`` and ``-shm`` while running, the file after shutdown) with debug capture on, so every prompt,
upstream request and answer above is stored in ``debug_captures`` too, the captures as
``/v1/requests/<id>/debug`` shows them, and the output of every CLI command, including bad configs. A leak is the whole key or any 12 consecutive characters of it; the masked
form of SPEC §1.1 (first 6 characters, ``...***``) is allowed and must be seen.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import sqlite3
import time
from pathlib import Path

import requests
from conftest import ArbstrServer, provider, run_cli, write_config
from fakes import SSE, Exchange, Reply, stream_chunks

MSG = [{"role": "user", "content": "hi"}]
WINDOW = 12  # any run of this many characters of a secret counts as a leak


def cashu_token(mint: str) -> str:
    """A Cashu v3 token as wallets print it: ``cashuA`` + base64url(JSON) without padding."""
    proofs = [{"id": "009a1f293253e41e", "amount": amount, "secret": secrets.token_hex(32),
               "C": "02" + secrets.token_hex(32)} for amount in (1, 4, 16)]
    raw = json.dumps({"token": [{"mint": mint, "proofs": proofs}], "unit": "sat", "memo": ""}).encode()
    return "cashuA" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


ALPHA_KEY = cashu_token("https://mint.alpha.example")   # literal in the config file
BETA_KEY = cashu_token("https://mint.beta.example")     # ${BETA_CASHU}
GAMMA_KEY = "sk-proj-" + secrets.token_urlsafe(96)      # ARBSTR_GAMMA_API_KEY (convention)
DELTA_KEY = "sk-" + secrets.token_hex(24)               # ${DELTA_OPENAI_KEY}
TOKEN = "arb_" + secrets.token_urlsafe(32)              # ${ARBSTR_AUTH_TOKEN}
KEYS = {"alpha": ALPHA_KEY, "beta": BETA_KEY, "gamma": GAMMA_KEY, "delta": DELTA_KEY}
SECRETS = {**KEYS, "auth token": TOKEN}
ENV = {"ARBSTR_AUTH_TOKEN": TOKEN, "BETA_CASHU": BETA_KEY, "ARBSTR_GAMMA_API_KEY": GAMMA_KEY,
       "DELTA_OPENAI_KEY": DELTA_KEY}


def echoed(ex: Exchange) -> str:
    """What a chatty provider says about the key it got: all of it, and truncated both ways."""
    said = ex.request.headers.get("Authorization", "")
    key = said.removeprefix("Bearer ")
    return f"key rejected: {said} (got {key[:40]}... ending ...{key[-12:]})"


def echo(status: int, **headers: str):
    def action(ex: Exchange) -> None:
        key = ex.request.headers.get("Authorization", "").removeprefix("Bearer ")
        body = {"error": {"message": echoed(ex), "type": f"bad_key_{key}", "param": key, "code": key[-16:]}}
        Reply(status, json=body, headers=headers).run(ex)
    return action


def echo_stream_mid(ex: Exchange) -> None:
    """One good chunk, then an error event quoting the key: relayed (so the SDK raises), scrubbed."""
    chunks = stream_chunks(ex.request.model)[:2]
    SSE([*chunks, {"error": {"message": f"balance empty: {echoed(ex)}", "type": "upstream_error"}}],
        done=False).run(ex)


def echo_stream_first(ex: Exchange) -> None:
    """An error as the first event: arbstr fails over to the next provider."""
    SSE([{"error": {"message": echoed(ex), "type": "insufficient_quota"}}], done=True).run(ex)


def echo_success(ex: Exchange) -> None:
    """A 200 completion that quotes the key (a provider with a debug echo left on)."""
    Reply(200, content=f"debug: {echoed(ex)}").run(ex)


def echo_stream_success(ex: Exchange) -> None:
    """A streamed answer whose text quotes the key, whole in one delta, with CRLF framing."""
    SSE(stream_chunks(ex.request.model, pieces=["debug: ", echoed(ex)]), eol=b"\r\n").run(ex)


def captured_debug(server: ArbstrServer, request_id: str, auth: dict[str, str]) -> requests.Response:
    """The request's capture, once written: a stream's is queued when the stream ends, just after its last
    byte left, and the log writer is asynchronous."""
    deadline = time.monotonic() + 10
    while (r := server.get(f"/v1/requests/{request_id}/debug", headers=auth)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)
    return r


def test_no_secret_in_any_byte_of_a_full_session(fake_upstream, gunicorn_server, tmp_path: Path) -> None:
    alpha, beta, gamma, delta = fake_upstream(4)
    config = write_config(
        tmp_path,
        [provider(alpha, "alpha", output_rate=1, api_key=ALPHA_KEY),
         provider(beta, "beta", output_rate=2, api_key="${BETA_CASHU}"),
         provider(gamma, "gamma", output_rate=3),
         provider(delta, "delta", output_rate=4, api_key="${DELTA_OPENAI_KEY}")],
        server={"auth_token": "${ARBSTR_AUTH_TOKEN}", "max_body_bytes": 65536},
        logging={"level": "debug"}, retry={"max_retries": 0, "backoff_base_ms": 0}, debug={"enabled": True},
        circuit_breaker={"failure_threshold": 100}, rules=[{"name": "coding", "keywords": ["code"]}],
    )
    server = gunicorn_server(config, env=ENV, args=["--log-level", "debug", "--access-logfile", "-"])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    produced: list[tuple[str, bytes]] = []  # (where it came from, the bytes)

    def record(r: requests.Response) -> requests.Response:
        where = f"{r.request.method} {r.request.path_url[:80]} -> {r.status_code}"
        produced.append((where, r.content))
        produced.append((where + " headers", json.dumps(dict(r.headers)).encode()))
        return r

    def chat(body: dict | None = None, headers: dict | None = None, **kw) -> requests.Response:
        body = body or {"model": "gpt-4o", "messages": MSG}
        return record(server.post("/v1/chat/completions", json=body, headers={**auth, **(headers or {})}, **kw))

    # Successes, plain and streamed (alpha is the cheapest).
    ids = [chat().headers["x-arbstr-request-id"],
           chat({"model": "gpt-4o", "messages": MSG, "stream": True,
                 "stream_options": {"include_usage": True}}).headers["x-arbstr-request-id"]]
    # A 400 passed through: message, type, param and code all quote alpha's key.
    alpha.script(echo(400))
    r = chat()
    assert r.status_code == 400 and "[REDACTED]" in r.json()["error"]["message"]
    # Every provider fails, each quoting its own key: 402, 503, 429 (+ Retry-After), 500 → 502. (Not 401:
    # a rejected key is skipped until restart, and alpha must stay in play for the streams below.)
    # The status depends on which providers the chain reaches: 429 only if every attempt was rate
    # limited (gamma alone, were the others skipped), else 502. So the scenario pins the reach: every
    # circuit closed (failure_threshold 100) and no scripted action left over, so this request meets
    # exactly the four scripted failures, in price order, once each.
    assert {c["state"] for c in server.get("/health").json()["providers"].values()} == {"closed"}
    assert [f.pending for f in (alpha, beta, gamma, delta)] == [0, 0, 0, 0]
    before = [len(f.requests) for f in (alpha, beta, gamma, delta)]
    alpha.script(echo(402))
    beta.script(echo(503))
    gamma.script(echo(429, **{"Retry-After": "0"}))
    delta.script(echo(500))
    r = chat()
    assert r.status_code == 502, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "upstream_failed"
    assert r.headers["x-arbstr-retries"] == "1/alpha, 1/beta, 1/gamma, 1/delta"
    assert r.headers["x-arbstr-provider"] == "delta" and r.headers["x-should-retry"] == "false"
    assert "Retry-After" not in r.headers  # gamma's 429 is not the answer: nothing to wait for
    assert [len(f.requests) - n for f, n in zip((alpha, beta, gamma, delta), before, strict=True)] == [1, 1, 1, 1]
    assert [f.pending for f in (alpha, beta, gamma, delta)] == [0, 0, 0, 0]
    # Streams: an error event mid-stream, then an error as the first event (fails over to beta).
    alpha.script(echo_stream_mid)
    r = chat({"model": "gpt-4o", "messages": MSG, "stream": True})
    assert b'"error"' in r.content and b"[REDACTED]" in r.content
    alpha.script(echo_stream_first)
    r = chat({"model": "gpt-4o", "messages": MSG, "stream": True})
    assert r.status_code == 200 and r.headers["x-arbstr-provider"] == "beta"
    # A success that quotes the key, streamed and not.
    alpha.script(echo_success)
    r = chat()
    assert r.status_code == 200 and "[REDACTED]" in r.json()["choices"][0]["message"]["content"]
    ids.append(r.headers["x-arbstr-request-id"])
    alpha.script(echo_stream_success)
    r = chat({"model": "gpt-4o", "messages": MSG, "stream": True})
    assert r.status_code == 200 and b"key rejected: Bearer [REDACTED]" in r.content
    assert r.content.endswith(b"data: [DONE]\r\n\r\n")  # framing kept
    # Careless clients: a provider key as the model, the policy, a request id, query values.
    for key in (ALPHA_KEY, GAMMA_KEY):
        assert chat({"model": key, "messages": MSG}).status_code == 404
        assert chat(headers={"X-Arbstr-Policy": key}).status_code == 400
        assert record(server.post("/v1/cost", json={"model": key, "messages": MSG}, headers=auth)).status_code == 404
        assert record(server.get(f"/v1/requests/{key}", headers=auth)).status_code == 404
        assert record(server.get(f"/v1/requests/{key}/debug", headers=auth)).status_code == 404
        for q in ({"range": key}, {"model": key}, {"since": key}, {"group_by": key}, {"sort": key}):
            record(server.get("/v1/stats", params=q, headers=auth))
            record(server.get("/v1/requests", params=q, headers=auth))
    # Other client errors: bad JSON, too large, unknown model, wrong method and path, rate of paths.
    record(server.post("/v1/chat/completions", data=b"{not json", headers=auth))
    record(server.post("/v1/chat/completions", data=b"x" * 70_000, headers=auth))
    chat({"model": "no-such-model", "messages": MSG})
    chat({"model": "gpt-4o", "messages": [{"role": "user", "content": "write code"}]})  # policy 'coding'
    record(server.get("/v1/chat/completions", headers=auth))
    record(server.get("/nope", headers=auth))
    # 401s: none, wrong, a provider key or the token's neighbour used as the bearer token.
    for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {ALPHA_KEY}"},
                {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Basic {TOKEN}"},
                {"Authorization": TOKEN}):
        r = record(server.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG}, headers=bad))
        assert r.status_code == 401
        for path in ("/v1/models", "/providers", "/v1/stats", "/v1/requests", f"/v1/requests/{ids[0]}/debug"):
            assert record(server.get(path, headers=bad)).status_code == 401
    # Every route, authorised.
    for path in ("/v1/models", "/providers", "/health", "/v1/stats", "/v1/stats?group_by=provider",
                 "/v1/stats?group_by=policy", "/v1/requests?per_page=100", "/v1/requests?success=false&per_page=100"):
        assert record(server.get(path, headers=auth)).status_code == 200
    record(server.post("/v1/cost", json={"model": "gpt-4o", "messages": MSG, "max_tokens": 50}, headers=auth))
    record(server.get("/health"))  # no auth needed

    health = server.get("/health").json()
    errors = {name: c["last_error"] for name, c in health["providers"].items()}  # 401/429 are breaker-neutral
    assert all("[REDACTED]" in errors[name] for name in ("alpha", "beta", "delta")), errors
    shown = {p["name"]: p for p in server.get("/providers", headers=auth).json()["providers"]}
    assert {n: p["api_key"] for n, p in shown.items()} == {n: k[:6] + "...***" for n, k in KEYS.items()}
    assert {n: p["key_source"] for n, p in shown.items()} == {
        "alpha": "config-literal", "beta": "env-expanded", "gamma": "convention (ARBSTR_GAMMA_API_KEY)",
        "delta": "env-expanded"}
    for rid in ids:
        assert record(server.get(f"/v1/requests/{rid}", headers=auth)).status_code == 200
    # Every chat request was captured; the captures show the keys masked, and what quoted them redacted.
    captured = [record(captured_debug(server, rid, auth)) for rid in ids]
    assert all(b"cashuA...***" in r.content for r in captured) and b"[REDACTED]" in captured[-1].content
    with sqlite3.connect(tmp_path / "arbstr.db") as conn:  # failures and careless clients too
        assert conn.execute("SELECT COUNT(*) FROM debug_captures").fetchone()[0] >= 15

    # Upstream side: each provider got exactly its own key, none got the client's token.
    for fake, name in ((alpha, "alpha"), (beta, "beta"), (gamma, "gamma"), (delta, "delta")):
        sent = {r.headers.get("Authorization") for r in fake.requests}
        assert sent == {f"Bearer {KEYS[name]}"}, (name, sent)
        assert all(TOKEN not in json.dumps(dict(r.headers)) for r in fake.requests)

    # The database while running (WAL and shm included), then after a clean shutdown.
    deadline_rows = server.get("/health").json()["log"]
    assert deadline_rows["db_ok"] is True
    snapshot = tmp_path / "db-while-running"
    snapshot.mkdir()
    for f in tmp_path.glob("arbstr.db*"):
        shutil.copy(f, snapshot / f.name)
        produced.append((f"{f.name} while running", f.read_bytes()))
    assert any(f.name.endswith("-wal") for f in snapshot.iterdir())
    assert server.stop() == 0
    produced.extend((f"{f.name} after shutdown", f.read_bytes()) for f in tmp_path.glob("arbstr.db*"))
    produced.append(("gunicorn stdout/stderr", server.log_text().encode()))
    log = server.log_text()  # gunicorn really logged paths at debug, request lines in its access log:
    assert "[DEBUG] GET /v1/requests/[REDACTED]" in log and '"GET /v1/stats?model=[REDACTED] HTTP/1.1" 200' in log

    # The CLI, on the same config and database.
    for args in (["check"], ["providers"], ["stats"], ["stats", "--range", "last_1h", "--group-by", "provider"],
                 ["stats", "--json"], ["stats", "--json", "--group-by", "model"], ["requests"],
                 ["requests", "--limit", "100"], ["requests", "--json", "--limit", "100"]):
        out = run_cli(*args, "-c", str(config), env=ENV)
        assert out.returncode == 0, (args, out.stderr)
        produced.append((f"arbstr {' '.join(args)}", (out.stdout + out.stderr).encode()))
    # Bad configs holding the keys, through `arbstr check` and through gunicorn's startup.
    good = config.read_text()
    bad_configs = {
        "missing-var": good.replace("${DELTA_OPENAI_KEY}", "${NOT_SET_ANYWHERE}"),
        "toml-error": good.replace(f'api_key = "{ALPHA_KEY}"', f"api_key = {ALPHA_KEY}"),
        "unknown-key": good.replace(f'api_key = "{ALPHA_KEY}"', f'api_key = "{ALPHA_KEY}"\napi_kee = "{ALPHA_KEY}"'),
        "bad-url": good.replace(alpha.url, "ftp://mint.example/v1"),
        "bad-rate": good.replace("output_rate = 1\n", "output_rate = -1\n", 1),
        "bad-token": good.replace('auth_token = "${ARBSTR_AUTH_TOKEN}"', 'auth_token = "${ARBSTR_AUTH_TOKEN"'),
    }
    for name, text in bad_configs.items():
        assert text != good, name
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        path.chmod(0o644)  # also draws the permissions warning
        out = run_cli("check", "-c", str(path), env=ENV)
        assert out.returncode == 1 and "config error" in out.stderr, (name, out.stdout, out.stderr)
        produced.append((f"arbstr check ({name})", (out.stdout + out.stderr).encode()))
    broken = ArbstrServer(tmp_path / "broken.log", tmp_path / "unknown-key.toml", env=ENV)
    try:
        broken.start(ready_timeout=15)
        raise AssertionError("gunicorn started with a bad config")
    except AssertionError as e:
        assert "config error" in str(e), e
    produced.append(("gunicorn with a bad config", broken.log_text().encode()))

    everything = b"\n".join(data for _, data in produced)
    assert b"cashuA...***" in everything and b"sk-pro...***" in everything  # the search sees real output
    assert b"[REDACTED]" in everything
    leaks = []
    for what, secret in SECRETS.items():
        pieces = [secret[i:i + WINDOW].encode() for i in range(len(secret) - WINDOW + 1)]
        if any(piece in everything for piece in pieces):  # then say where
            for where, data in produced:
                found = [i for i, piece in enumerate(pieces) if piece in data]
                if found:
                    whole = "whole" if secret.encode() in data else f"characters {found[0]}-{found[-1] + WINDOW}"
                    leaks.append(f"{what} ({whole}) in {where}")
    assert not leaks, "\n".join(leaks)


def test_scrub_redacts_a_key_quoted_truncated_or_masked() -> None:
    """Providers quote keys cut short (``cashuAeyJ0b2tl...``) or by their end (``...f00dcafe1234``)."""
    from arbstr_core.secrets import FRAGMENT, REDACTED, Secret

    key = GAMMA_KEY
    s = Secret(key)
    assert s.scrub(f"bad key {key[:40]}...") == f"bad key {REDACTED}..."
    assert s.scrub(f"key ending ...{key[-FRAGMENT:]}.") == f"key ending ...{REDACTED}."
    assert s.scrub(f"[{key[-30:]}]") == f"[{REDACTED}]"
    assert s.scrub(f"{key[:FRAGMENT]}{key[:FRAGMENT]} {key}") == f"{REDACTED}{REDACTED} {REDACTED}"
    # Short of a fragment, and the masked form of SPEC §1.1, stay as they are.
    assert s.scrub(key[:FRAGMENT - 1]) == key[:FRAGMENT - 1]
    assert s.scrub(f"{key[:6]}...***") == f"{key[:6]}...***"
    assert s.scrub("nothing to see") == "nothing to see"
    assert Secret("short").scrub("a short key") == f"a {REDACTED} key"
