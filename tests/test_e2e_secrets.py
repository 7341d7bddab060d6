"""Provider keys and the auth token never leave arbstr: not in responses, logs, the database or the CLI.

Upstreams here are hostile: they echo the Authorization header they received back in error messages
(401, 400 pass-through, 503 → /health last_error, and SSE error events), which real providers do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from conftest import provider, run_cli
from fakes import Exchange, Reply, error_body, sse_event

ALPHA_KEY = "cashuAeyJ0b2tlbiI6W3sibWludCI6ImFscGhhIn1dfQ-alpha-secret"
BETA_KEY = "cashuBeyJ0b2tlbiI6W3sibWludCI6ImJldGEifV19-beta-secret"
TOKEN = "arbstr-auth-token-do-not-leak-42"
MSG = [{"role": "user", "content": "hi"}]


def echo(status: int):
    """An upstream error whose message repeats the bearer key it was sent."""
    def action(ex: Exchange) -> None:
        said = ex.request.headers.get("Authorization", "")
        Reply(status, json=error_body(f"key rejected: {said} (Authorization: {said})")).run(ex)
    return action


def echo_stream(ex: Exchange) -> None:
    said = ex.request.headers.get("Authorization", "")
    body = sse_event({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    body += sse_event({"error": {"message": f"balance empty for {said}", "type": "upstream_error"}})
    ex.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)


@pytest.fixture
def session(fake_upstream, make_config, gunicorn_server, tmp_path: Path):
    alpha, beta = fake_upstream(2)
    config = make_config(
        [provider(alpha, "alpha", output_rate=1, api_key=ALPHA_KEY), provider(beta, "beta", output_rate=2)],
        server={"auth_token": "${ARBSTR_AUTH_TOKEN}"}, logging={"level": "debug"},
        circuit_breaker={"failure_threshold": 1, "open_secs": 3600},
    )
    env = {"ARBSTR_AUTH_TOKEN": TOKEN, "ARBSTR_BETA_API_KEY": BETA_KEY}
    server = gunicorn_server(config, env=env)
    return server, alpha, beta, config, env


def test_no_key_in_any_output(session, tmp_path: Path) -> None:
    server, alpha, beta, config, env = session
    auth = {"Authorization": f"Bearer {TOKEN}"}
    produced: list[bytes] = []

    def record(r: requests.Response) -> requests.Response:
        produced.append(r.content)
        produced.append(json.dumps(dict(r.headers)).encode())
        return r

    # 400 pass-through of an error that echoes alpha's key.
    alpha.script(echo(400))
    r = record(server.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG}, headers=auth))
    assert r.status_code == 400 and "[REDACTED]" in r.json()["error"]["message"]
    assert alpha.requests[0].headers["Authorization"] == f"Bearer {ALPHA_KEY}"  # the key did go upstream
    # 401 from alpha (echoing) then beta echoes its key in a 503: the 502 message carries the last error.
    alpha.script(echo(401))
    beta.script(echo(503))
    r = record(server.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG}, headers=auth))
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    assert beta.requests[-1].headers["Authorization"] == f"Bearer {BETA_KEY}"
    # Beta's circuit opened on that failure (threshold 1): /health shows last_error, scrubbed.
    health = record(server.get("/health"))
    assert "[REDACTED]" in health.json()["providers"]["beta"]["last_error"]
    # A stream whose first event is fine and then an error event echoes alpha's key.
    alpha.script(echo_stream)
    record(server.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG, "stream": True},
                       headers=auth))
    # Every other route, authorised and not.
    for path in ("/v1/models", "/providers", "/v1/stats", "/v1/requests", "/v1/stats?group_by=provider"):
        record(server.get(path, headers=auth))
        record(server.get(path))
    record(server.post("/v1/cost", json={"model": "gpt-4o", "messages": MSG}, headers=auth))
    record(server.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG},
                       headers={"Authorization": "Bearer wrong"}))
    providers = server.get("/providers", headers=auth).json()["providers"]
    assert providers[0]["api_key"] == ALPHA_KEY[:6] + "...***"
    assert providers[1]["key_source"] == "convention (ARBSTR_BETA_API_KEY)"

    assert server.stop() == 0  # drains the log queue
    produced.append(server.log_text().encode())
    db = Path(tmp_path / "arbstr.db")
    assert db.exists()
    produced.extend(p.read_bytes() for p in tmp_path.glob("arbstr.db*"))
    for args in (["check"], ["providers"], ["stats", "--range", "last_1h"], ["stats", "--json"],
                 ["requests"], ["requests", "--json"]):
        out = run_cli(*args, "-c", str(config), env=env)
        assert out.returncode == 0, (args, out.stderr)
        produced.append((out.stdout + out.stderr).encode())
    everything = b"\n".join(produced)
    assert b"cashuA...***" in everything  # the masked form did appear, so the search sees real output
    for secret in (ALPHA_KEY, BETA_KEY, TOKEN):
        assert secret.encode() not in everything, secret[:8]
        assert secret[10:].encode() not in everything, secret[:8]
