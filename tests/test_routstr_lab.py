"""arbstr against a real Routstr node and Cashu mint (the lab in tests/routstr_lab.py).

Why: the fakes in tests/fakes.py answer the way arbstr expects; the node is what arbstr will really
be paid through. These tests pin what works today (requests succeed, are charged once, are logged,
and the token stays secret) and print the logged-versus-charged cost that the money-truth work will
turn into an assertion. The lab comes up once per session (skipped with the reason where it cannot).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conftest import write_config

if TYPE_CHECKING:  # imported for real by pytest_plugins, which lets pytest rewrite its asserts
    from routstr_lab import ArbstrInNamespace, RoutstrLab

pytest_plugins = ["routstr_lab"]  # registered once per session: every module shares one lab

PROVIDER = "routstr-lab"
KEY_ENV = "ARBSTR_ROUTSTR_LAB_API_KEY"  # the ARBSTR_<NAME>_API_KEY convention for PROVIDER


def node_model(lab: RoutstrLab) -> dict[str, Any]:
    """The node's first (only) model from /v1/models."""
    return lab.models()["data"][0]


def lab_config(tmp_path: Path, lab: RoutstrLab, **tables: Any) -> tuple[Path, str]:
    """An arbstr config with the node as its only provider, priced as the node lists it now
    (sats_pricing is sats per token; arbstr's rates are sats per 1,000 tokens), no base fee, no key in
    the file. Returns the path and the model id."""
    model = node_model(lab)
    pricing = model["sats_pricing"]
    provider = {"name": PROVIDER, "url": lab.node_url, "models": [model["id"]], "input_rate": pricing["prompt"] * 1000,
                "output_rate": pricing["completion"] * 1000, "base_fee": 0}
    return write_config(tmp_path, [provider], **tables), model["id"]


def start(lab: RoutstrLab, config: Path) -> ArbstrInNamespace:
    """arbstr in the lab's namespace, with the lab's token as the provider key (from the environment)."""
    return lab.start_arbstr(config, env={KEY_ENV: lab.token})


def wait_rows(server: ArbstrInNamespace, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The request log's rows once ``n`` are there and none is still ``streaming`` (the writer batches
    for up to 50 ms, and a stream's row is updated when it ends)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = server.get("/v1/requests", params={"per_page": 100}).json()["data"]
        if len(rows) >= n and all(r["status"] != "streaming" for r in rows):
            return rows
        assert time.monotonic() < deadline, f"want {n} finished rows, got {json.dumps(rows)}"
        time.sleep(0.05)


def test_completion_and_stream_through_arbstr_are_charged_once_and_logged(
    routstr_lab: RoutstrLab, tmp_path: Path
) -> None:
    """A completion and a stream through arbstr reach the node, are charged there, logged as successes."""
    lab = routstr_lab
    before = lab.balance_info(lab.token)  # the first use redeems the token
    config, model = lab_config(tmp_path, lab)
    server = start(lab, config)
    client = server.openai_client()

    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content.startswith("w0 w1")
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": "hello"}]) if chunk.choices)
    assert text.startswith("w0 w1") and text.strip().endswith("w9")

    after = lab.wait_settled(lab.token, before["total_requests"] + 2)
    spent_msats = after["total_spent"] - before["total_spent"]
    assert spent_msats > 0
    assert after["balance"] == before["balance"] - spent_msats

    rows = wait_rows(server, 2)
    assert sorted((r["streaming"], r["status"], r["success"], r["provider"]) for r in rows) == sorted(
        [(False, "ok", True, PROVIDER), (True, "complete", True, PROVIDER)]), rows
    logged_sats = sum(r["cost_sats"] for r in rows)
    print(f"\n[money] arbstr logged cost_sats sum = {logged_sats!r} sats ({[r['cost_sats'] for r in rows]}); "
          f"node total_spent delta = {spent_msats} msats = {spent_msats / 1000!r} sats; "
          f"difference (logged - charged) = {logged_sats * 1000 - spent_msats:+.3f} msats")
    assert server.stop() == 0


def test_token_never_in_arbstr_log_answers_or_database(routstr_lab: RoutstrLab, tmp_path: Path) -> None:
    """The Cashu token (and the node account key it became, sk- + its sha256) appear in none of arbstr's
    stderr log, its HTTP answers (successes, errors, streams, info routes) or its SQLite files."""
    lab = routstr_lab
    account_key = lab.balance_info(lab.token)["api_key"]
    key_is_token_hash = account_key == "sk-" + hashlib.sha256(lab.token.encode()).hexdigest()
    assert key_is_token_hash, "the node's account key is no longer sk- + sha256(token)"  # so the hash is secret too
    config, model = lab_config(tmp_path, lab, retry={"max_retries": 0}, logging={"level": "debug"})
    server = start(lab, config)

    answers: dict[str, str] = {}

    def record(name: str, response: Any) -> None:
        answers[name] = f"{response.status_code}\n{json.dumps(dict(response.headers))}\n{response.text}"

    def chat(content: str, **extra: Any) -> Any:
        return server.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": content}], **extra})

    record("completion", chat("hello"))
    record("stream", chat("hello", stream=True))
    record("upstream 400", chat("ERR400"))
    record("upstream 500", chat("ERR500"))
    record("unknown model", server.post("/v1/chat/completions", json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}))
    assert answers["completion"].startswith("200") and answers["stream"].startswith("200")
    assert not answers["upstream 400"].startswith("200") and not answers["upstream 500"].startswith("200")
    wait_rows(server, 4)
    for path in ("/providers", "/health", "/v1/models", "/v1/requests", "/v1/stats"):
        record(path, server.get(path))
    record("/v1/cost", server.post("/v1/cost", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}))
    assert server.stop() == 0  # drains the log queue and closes the database

    sources = {"stderr log": server.log_text(), **{f"answer {k}": v for k, v in answers.items()}}
    for db_file in sorted(tmp_path.glob("arbstr.db*")):  # the database, its -wal and -shm if left
        sources[db_file.name] = db_file.read_bytes().decode("latin-1")
    assert "arbstr.db" in sources
    secrets = {"token": lab.token, "account key": account_key, "account key hash": account_key.removeprefix("sk-")}
    leaks = sorted(f"{secret} in {source}" for source, text in sources.items()
                   for secret, value in secrets.items() if value in text)
    assert leaks == []  # names only: printing the text would print the secret


def test_restart_node_changes_price_and_keeps_the_balance(routstr_lab: RoutstrLab) -> None:
    """restart_node(btc_usd) re-prices the node (sats follow 1/BTC) and keeps its DB (the account).
    Restores the default price even on failure: later tests of the session price at BTC = $100k."""
    lab = routstr_lab
    prompt = node_model(lab)["sats_pricing"]["prompt"]
    before = lab.balance_info(lab.token)
    try:
        lab.restart_node(btc_usd=50_000)
        assert node_model(lab)["sats_pricing"]["prompt"] == 2 * prompt
        after = lab.balance_info(lab.token)
        assert (after["balance"], after["total_spent"], after["total_requests"]) == (
            before["balance"], before["total_spent"], before["total_requests"])
    finally:
        lab.restart_node(btc_usd=100_000)
    assert node_model(lab)["sats_pricing"]["prompt"] == prompt
