"""arbstr against a real Routstr node and Cashu mint (the lab in tests/routstr_lab.py).

Why: the fakes in tests/fakes.py answer the way arbstr expects; the node is what arbstr will really
be paid through. What a user relies on, checked against the node's own books (``/v1/balance/info``):
every cost arbstr logs is what the node charged, to the msat, whatever the configured rates say and
after the node's prices move (SPEC §2.3, §11); discovered prices follow the node; a spent token is
dropped after one refusal and never leaks; a short balance is skipped without /health showing
amounts; a 402 says the money ran out. The lab comes up once per session (skipped with the reason
where it cannot); the node is restarted once (a price change, in the last test).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from conftest import settled_rows, write_config

if TYPE_CHECKING:  # imported for real by pytest_plugins, which lets pytest rewrite its asserts
    from routstr_lab import ArbstrInNamespace, RoutstrLab, SecretStr

pytest_plugins = ["routstr_lab"]  # registered once per session: every module shares one lab

PROVIDER = "routstr-lab"
KEY_ENV = "ARBSTR_ROUTSTR_LAB_API_KEY"  # the ARBSTR_<NAME>_API_KEY convention for PROVIDER
HELLO = [{"role": "user", "content": "hello"}]
WORDS = "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9"  # what the fake LLM behind the node says


# ---------------------------------------------------------------------------------------------------
# Helpers


def key_env(name: str) -> str:
    return "ARBSTR_" + re.sub(r"[- ]", "_", name).upper() + "_API_KEY"


def msats(sats: float) -> int:
    """Sats as whole msats: how costs are compared (a float sum is exact to the msat once rounded)."""
    return round(sats * 1000)


def node_model(lab: RoutstrLab) -> dict[str, Any]:
    """The node's first (only) model from /v1/models."""
    return lab.models()["data"][0]


def model_rates(model: Mapping[str, Any], factor: float = 1.0) -> dict[str, float]:
    """A node model's prices in arbstr's units (sats per 1,000 tokens), times ``factor``; no base fee."""
    pricing = model["sats_pricing"]
    return {"input_rate": pricing["prompt"] * 1000 * factor, "output_rate": pricing["completion"] * 1000 * factor,
            "base_fee": 0}


def node_rates(lab: RoutstrLab, factor: float = 1.0) -> dict[str, float]:
    """The node's prices now (``model_rates``)."""
    return model_rates(node_model(lab), factor)


def static_provider(lab: RoutstrLab, name: str = PROVIDER, factor: float = 1.0) -> dict[str, Any]:
    """A provider entry for the node with static rates: the node's now × ``factor``; no key in the file."""
    return {"name": name, "url": lab.node_url, "models": [node_model(lab)["id"]], **node_rates(lab, factor)}


def live_provider(lab: RoutstrLab, name: str) -> dict[str, Any]:
    """A provider entry with ``discover = true`` and nothing else: models and rates come from the node."""
    return {"name": name, "url": lab.node_url, "discover": True}


def config_in(tmp_path: Path, sub: str, providers: list[dict[str, Any]], **tables: Any) -> Path:
    """A config (and its database) in ``tmp_path/sub``: each arbstr of a test gets its own database."""
    directory = tmp_path / sub
    directory.mkdir()
    return write_config(directory, providers, **tables)


def lab_config(tmp_path: Path, lab: RoutstrLab, **tables: Any) -> tuple[Path, str]:
    """An arbstr config with the node as its only provider, priced as the node lists it now."""
    return write_config(tmp_path, [static_provider(lab)], **tables), node_model(lab)["id"]


def start(lab: RoutstrLab, config: Path, keys: Mapping[str, str] | None = None) -> ArbstrInNamespace:
    """arbstr in the lab's namespace; provider keys by the naming convention (from the environment),
    by default the lab's token for PROVIDER."""
    keys = keys if keys is not None else {PROVIDER: lab.token}
    return lab.start_arbstr(config, env={key_env(name): key for name, key in keys.items()})


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 10.0, interval: float = 0.1) -> Any:
    """``probe()``'s first truthy value; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(interval)


def listed(server: ArbstrInNamespace) -> dict[str, dict[str, Any]]:
    """``/providers`` by name."""
    return {p["name"]: p for p in server.get("/providers").json()["providers"]}


def chat(server: ArbstrInNamespace, model: str, **extra: Any) -> Any:
    """One chat completion through arbstr (raw: headers and, for a stream, the whole SSE text)."""
    return server.post("/v1/chat/completions", json={"model": model, "messages": HELLO, **extra})


def parse_sse(text: str) -> tuple[list[dict[str, Any]], list[str], bool]:
    """A whole SSE body → (data chunks as JSON, comment lines without the colon, [DONE] seen)."""
    chunks, comments, done = [], [], False
    for line in re.split(r"\r?\n", text):
        if line.startswith(":"):
            comments.append(line[1:].strip())
        elif line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
            else:
                chunks.append(json.loads(payload))
    return chunks, comments, done


class Answer:
    """What the client saw of one request: headers, the node's own cost figure when the client can see
    it (non-streaming body, or the relayed usage chunk), arbstr's trailer and usage-chunk figures."""

    def __init__(self, response: Any, stream: bool, include_usage: bool | None = None) -> None:
        assert response.status_code == 200, response.text[:500]
        self.headers = response.headers
        self.request_id = response.headers["x-arbstr-request-id"]
        self.provider = response.headers.get("x-arbstr-provider")
        self.retries = response.headers.get("x-arbstr-retries")
        self.stream = stream
        self.node_msats: int | None = None
        self.trailer: dict[str, Any] | None = None
        self.chunk_arbstr: dict[str, Any] | None = None
        if not stream:
            body = response.json()
            assert body["choices"][0]["message"]["content"].strip() == WORDS
            self.node_msats = body["usage"]["cost"]["total_msats"]
            self.text = body["choices"][0]["message"]["content"]
            return
        chunks, comments, done = parse_sse(response.text)
        assert done, response.text[-500:]
        self.text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert self.text.strip() == WORDS
        usage_chunks = [c for c in chunks if not c.get("choices") and c.get("usage")]
        if include_usage:  # relayed, with arbstr's figure added (SPEC §6.1)
            assert len(usage_chunks) == 1, chunks
            self.node_msats = usage_chunks[0]["usage"]["cost"]["total_msats"]
            self.chunk_arbstr = usage_chunks[0]["arbstr"]
        else:  # not asked for (or refused): the node's usage chunk is removed, though the node always sends one
            assert usage_chunks == [], usage_chunks
        trailers = [json.loads(c.removeprefix("arbstr ")) for c in comments if c.startswith("arbstr ")]
        assert len(trailers) == 1, comments
        self.trailer = trailers[0]


def send(server: ArbstrInNamespace, model: str, kind: str) -> Answer:
    """One request of a kind: "completion", "stream+usage" (include_usage true), "stream" (no
    stream_options: arbstr asks the node for usage, the client does not get it), "stream-usage"
    (include_usage false, explicitly)."""
    if kind == "completion":
        return Answer(chat(server, model), stream=False)
    if kind == "stream+usage":
        return Answer(chat(server, model, stream=True, stream_options={"include_usage": True}), True, True)
    if kind == "stream":
        return Answer(chat(server, model, stream=True), True, None)
    if kind == "stream-usage":
        return Answer(chat(server, model, stream=True, stream_options={"include_usage": False}), True, False)
    raise ValueError(kind)


def check_costs(answers: Iterable[Answer], rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each answer's row says cost_source "provider", and every figure the client saw is the row's:
    the node's own (body or usage chunk), x-arbstr-cost-sats (3 decimals), the usage chunk's
    ``arbstr.cost_sats`` and the stream trailer's ``cost_sats``. Returns the rows by request id."""
    by_id = {r["request_id"]: r for r in rows}
    for a in answers:
        row = by_id[a.request_id]
        assert (row["success"], row["cost_source"], row["provider"]) == (True, "provider", a.provider), row
        assert (row["tokens"]["input"], row["tokens"]["output"]) == (20, 10), row
        assert {"cached", "reasoning"} <= set(row["tokens"]), row
        if a.node_msats is not None:
            assert msats(row["cost_sats"]) == a.node_msats, (row, a.node_msats)
        if a.stream:
            assert a.trailer is not None and a.trailer["request_id"] == a.request_id
            assert a.trailer["cost_sats"] == row["cost_sats"], (a.trailer, row)
            assert a.trailer["provider"] == a.provider
            if a.chunk_arbstr is not None:
                assert a.chunk_arbstr["cost_sats"] == row["cost_sats"], (a.chunk_arbstr, row)
            assert "x-arbstr-cost-sats" not in a.headers  # a stream's cost is known at its end only
        else:
            assert a.headers["x-arbstr-cost-sats"] == f"{row['cost_sats']:.3f}", (dict(a.headers), row)
    return by_id


def rates_formula(rates: Mapping[str, float], row: Mapping[str, Any]) -> float:
    return (row["tokens"]["input"] * rates["input_rate"] + row["tokens"]["output"] * rates["output_rate"]) / 1000 \
        + rates["base_fee"]


def leaks(secrets: Mapping[str, str], server: ArbstrInNamespace, db_dir: Path,
          answers: Mapping[str, str] | None = None) -> list[str]:
    """Where any of ``secrets`` shows in arbstr's log, its database files or ``answers`` (names only:
    printing the text would print the secret). Call after ``server.stop()`` (the log is drained)."""
    sources = {"stderr log": server.log_text(), **{f"answer {k}": v for k, v in (answers or {}).items()}}
    for db_file in sorted(db_dir.glob("arbstr.db*")):  # the database, its -wal and -shm if left
        sources[db_file.name] = db_file.read_bytes().decode("latin-1")
    assert "arbstr.db" in sources and sources["stderr log"], "the search is over nothing"
    return sorted(f"{secret} in {source}" for source, text in sources.items()
                  for secret, value in secrets.items() if value and value in text)


def record(response: Any) -> str:
    return f"{response.status_code}\n{json.dumps(dict(response.headers))}\n{response.text}"


@pytest.fixture(scope="module")
def tokens(routstr_lab: RoutstrLab) -> dict[str, SecretStr]:
    """Fresh tokens from the lab wallet, made in one wallet process (~10 s): "tiny" (5 sat: 4 sat at
    the node, far below one request's ~121 sat reservation), "fresh" (1500 sat), and "spent" (sent,
    then taken back: the mint says spent)."""
    tiny, fresh, spent = routstr_lab.send_tokens(5, 1500, 2, spend={2})
    return {"tiny": tiny, "fresh": fresh, "spent": spent}


# ---------------------------------------------------------------------------------------------------
# Money truth (SPEC §2.3, §11)


def test_money_truth_logged_costs_equal_the_node_charges_to_the_msat(routstr_lab: RoutstrLab, tmp_path: Path) -> None:
    """Completions and streams (with include_usage, without stream_options, with include_usage false)
    through arbstr whose static rates are deliberately half the node's: the sum of logged cost_sats
    equals the node's total_spent delta to the msat, each row's cost_source is "provider", every figure
    the client sees (x-arbstr-cost-sats, the trailer, the usage chunk) is the row's, and
    rates_cost_sats shows the drift. /v1/stats totals the same, and /providers' balance (taken from the
    answers) is the node's to the msat. Each request is charged once."""
    lab = routstr_lab
    before = lab.balance_info(lab.token)  # the first use redeems the token
    half = node_rates(lab, 0.5)
    model = node_model(lab)["id"]
    server = start(lab, write_config(tmp_path, [static_provider(lab, factor=0.5)]))

    kinds = ["completion", "stream+usage", "stream", "completion", "stream-usage"]
    answers = [send(server, model, kind) for kind in kinds]
    assert all(a.provider == PROVIDER and a.retries is None for a in answers)

    after = lab.wait_settled(lab.token, before["total_requests"] + len(kinds))  # once each, no more
    charged = after["total_spent"] - before["total_spent"]
    assert after["balance"] == before["balance"] - charged
    rows = settled_rows(server, len(kinds))
    assert len(rows) == len(kinds)
    by_id = check_costs(answers, rows)
    logged = sum(r["cost_sats"] for r in rows)
    print(f"\n[money] logged {msats(logged)} msats over {len(rows)} requests "
          f"({[r['cost_sats'] for r in rows]} sats), node charged {charged} msats; "
          f"rates_cost_sats at the half rates {[r['rates_cost_sats'] for r in rows]}")
    assert msats(logged) == charged

    for row in by_id.values():  # the configured rates' figure is kept beside the real one: the drift shows
        assert msats(row["rates_cost_sats"]) == msats(rates_formula(half, row)), row
        assert msats(row["rates_cost_sats"]) != msats(row["cost_sats"]), row
    stats = server.get("/v1/stats").json()
    assert stats["counts"]["total"] == len(kinds)
    assert msats(stats["costs"]["total_cost_sats"]) == charged, stats["costs"]
    assert stats["costs"]["savings_sats"] >= 0, stats["costs"]  # never negative (SPEC §2.3)

    balance = listed(server)[PROVIDER]  # static provider: its balance comes from answers only
    assert balance["balance_sats"] is not None and msats(balance["balance_sats"]) == after["balance"], balance
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

    def say(content: str, **extra: Any) -> Any:
        return server.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": content}], **extra})

    answers["completion"] = record(say("hello"))
    answers["stream"] = record(say("hello", stream=True))
    answers["upstream 400"] = record(say("ERR400"))
    answers["upstream 500"] = record(say("ERR500"))
    answers["unknown model"] = record(server.post("/v1/chat/completions", json={
        "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}))
    assert answers["completion"].startswith("200") and answers["stream"].startswith("200")
    assert not answers["upstream 400"].startswith("200") and not answers["upstream 500"].startswith("200")
    settled_rows(server, 4)
    for path in ("/providers", "/health", "/v1/models", "/v1/requests", "/v1/stats"):
        answers[path] = record(server.get(path))
    answers["/v1/cost"] = record(server.post("/v1/cost", json={"model": model, "messages": HELLO}))
    assert server.stop() == 0  # drains the log queue and closes the database
    assert PROVIDER in server.log_text()
    found = leaks({"token": lab.token, "account key": account_key, "account key hash": account_key.removeprefix("sk-")},
                  server, tmp_path, answers)
    assert found == []


def test_an_abandoned_request_is_charged_by_the_node_and_logged_as_unknown(
    routstr_lab: RoutstrLab, tmp_path: Path
) -> None:
    """SPEC §11 "What abandoning costs": arbstr gives up on an answer (timeout_secs = 1, the node's LLM
    answers after 2 s), the node keeps going and charges. The client is told not to retry; the row
    names the provider that was sent the request and its cost is unknown (null), never 0. The gap
    between the node's charge and the log is printed: it is what the README must warn about."""
    lab = routstr_lab
    before = lab.balance_info(lab.token)
    provider = static_provider(lab) | {"timeout_secs": 1}
    server = start(lab, write_config(tmp_path, [provider]))
    answer = server.post("/v1/chat/completions", json={
        "model": node_model(lab)["id"], "messages": [{"role": "user", "content": "SLEEP2"}]})
    assert answer.status_code in (502, 504), answer.text
    assert answer.headers.get("x-should-retry") == "false"
    after = lab.wait_settled(lab.token, before["total_requests"] + 1)
    charged = after["total_spent"] - before["total_spent"]
    rows = settled_rows(server, 1)
    print(f"\n[money] abandoned: node charged {charged} msats, arbstr logged cost_sats={rows[0]['cost_sats']} "
          f"({rows[0]['status']}, {rows[0]['http_status']}): {rows[0]['error']}")
    assert charged > 0  # the node did charge
    assert (rows[0]["provider"], rows[0]["success"], rows[0]["cost_sats"]) == (PROVIDER, False, None), rows
    assert server.stop() == 0


# ---------------------------------------------------------------------------------------------------
# Key and balance faults (SPEC §5.1, §11)


def test_rejected_keys_are_dropped_after_one_refusal_and_never_leak(
    routstr_lab: RoutstrLab, tokens: dict[str, SecretStr], tmp_path: Path
) -> None:
    """Four providers on the same node, cheapest first: "spent" (a token the mint knows as spent: 400
    cashu_token_already_spent), "garbled" (not a token: 400 invalid_cashu_token), "unknown" (an sk- key
    the node never issued: 401) and "funded" (the lab's token). Every request is answered by "funded";
    only the first carries x-arbstr-retries, naming the three in order; /health shows each complaint
    as key_rejected (degraded, not unhealthy), /providers key_rejected true; the node sees no rejected
    key after the first request; no key is in arbstr's log, answers or database."""
    lab = routstr_lab
    model = node_model(lab)["id"]
    keys = {"spent": tokens["spent"], "garbled": "cashuB" + "x" * 60,
            "unknown": "sk-" + hashlib.sha256(b"no such account").hexdigest(), "funded": lab.token}
    complaints = {"spent": "already spent", "garbled": "invalid cashu token", "unknown": "invalid api key"}
    config = write_config(tmp_path, [static_provider(lab, name, factor=f) for name, f in (
        ("spent", 0.25), ("garbled", 0.5), ("unknown", 0.75), ("funded", 1))], logging={"level": "debug"})
    server = start(lab, config, keys=keys)
    assert server.get("/health").json()["status"] == "ok"
    before = lab.balance_info(lab.token)
    node_log_at = len(lab.node_log())

    def refusals() -> int:  # the node's log lines for a refused bearer key since the test began
        text = lab.node_log()[node_log_at:]
        return text.count("Bearer token rejected") + text.count("API key not found")

    kinds = ["completion", "stream+usage", "completion", "stream"]
    raw: dict[str, str] = {}
    answers = []
    for i, kind in enumerate(kinds):
        answer = send(server, model, kind)
        answers.append(answer)
        raw[f"{i} {kind}"] = json.dumps(dict(answer.headers)) + answer.text
        if i == 0:
            refused_first = refusals()
    assert [(a.provider, a.retries) for a in answers] == [("funded", "1/spent, 1/garbled, 1/unknown")] + [
        ("funded", None)] * 3

    health = server.get("/health")
    raw["/health"] = record(health)
    state = health.json()
    assert health.status_code == 200 and state["status"] == "degraded", state
    for name, complaint in complaints.items():
        said = state["providers"][name]["key_rejected"]
        assert isinstance(said, str) and complaint in said.lower(), (name, state)
    assert state["providers"]["funded"]["key_rejected"] is None, state
    providers = server.get("/providers")
    raw["/providers"] = record(providers)
    flags = {p["name"]: p["key_rejected"] for p in providers.json()["providers"]}
    assert flags == {"spent": True, "garbled": True, "unknown": True, "funded": False}

    after = lab.wait_settled(lab.token, before["total_requests"] + len(kinds))
    rows = settled_rows(server, len(kinds))
    by_id = check_costs(answers, rows)
    assert [by_id[a.request_id]["retries"] for a in answers][1:] == [None] * 3, rows
    assert all(n in (by_id[answers[0].request_id]["retries"] or "") for n in complaints), rows
    charged = after["total_spent"] - before["total_spent"]
    logged = sum(r["cost_sats"] for r in rows)
    print(f"\n[money] rejected-keys run: logged {msats(logged)} msats, node charged {charged} msats; "
          f"node refusals after the first request {refused_first}, at the end {refusals()}")
    assert msats(logged) == charged
    assert refused_first >= 3 and refusals() == refused_first  # asked once with each bad key, never again

    raw["/v1/requests"] = record(server.get("/v1/requests"))
    assert server.stop() == 0
    log = server.log_text().lower()
    assert all(name in log and complaint in log for name, complaint in complaints.items())  # named, with the reason
    assert leaks({f"{name} key": key for name, key in keys.items()}, server, tmp_path, raw) == []


def test_a_balance_below_the_minimum_is_skipped_and_health_shows_no_amounts(
    routstr_lab: RoutstrLab, tokens: dict[str, SecretStr], tmp_path: Path
) -> None:
    """[market] min_balance_sats between two accounts' balances: "funded" (discover = true, the lab's
    token, cheaper) is skipped once its balance is known, without being tried; "fresh" (static rates,
    twice the node's, a new 1500-sat token) answers. /health says balance_low for funded (degraded) and
    shows no amount anywhere; /providers' balances are the node's to the msat, for fresh taken from
    the answers. With funded as the only provider, the request is refused (503) and the node not asked."""
    lab = routstr_lab
    model = node_model(lab)["id"]
    funded_before = lab.balance_info(lab.token)
    fresh_before = lab.balance_info(tokens["fresh"])  # redeems it: about 1499 sat
    assert funded_before["balance"] < fresh_before["balance"]
    minimum = (funded_before["balance"] + fresh_before["balance"]) / 2000  # sats, between the two
    market = {"refresh_secs": 30, "min_balance_sats": minimum}
    keys = {"funded": lab.token, "fresh": tokens["fresh"]}
    server = start(lab, config_in(tmp_path, "two", [live_provider(lab, "funded"), static_provider(lab, "fresh", 2)],
                                  market=market), keys=keys)
    alone = start(lab, config_in(tmp_path, "alone", [live_provider(lab, "funded")], market=market),
                  keys={"funded": lab.token})

    def known(s: ArbstrInNamespace) -> dict[str, Any] | None:
        entry = listed(s)["funded"]
        return entry if entry["balance_sats"] is not None and entry["prices"]["source"] == "discovered" else None

    for s in (server, alone):
        entry = wait_until("funded's balance is known", lambda s=s: known(s))
        assert msats(entry["balance_sats"]) == funded_before["balance"], entry

    health = server.get("/health")
    state = health.json()
    assert health.status_code == 200 and state["status"] == "degraded", state
    assert state["providers"]["funded"]["balance_low"] is True and state["providers"]["fresh"]["balance_low"] is False

    def keys_of(value: Any) -> Iterable[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys_of(v)
        elif isinstance(value, list):
            for v in value:
                yield from keys_of(v)

    balance_keys = {k for k in keys_of(state) if "balance" in k}
    assert balance_keys == {"balance_low"}, state
    figures = {str(funded_before["balance"]), str(funded_before["balance"] / 1000), f"{minimum}",
               str(fresh_before["balance"]), str(fresh_before["balance"] / 1000)}
    assert [f for f in figures if f in health.text] == [], state

    answers = [send(server, model, kind) for kind in ("completion", "stream+usage")]
    assert [(a.provider, a.retries) for a in answers] == [("fresh", None)] * 2  # funded skipped, not tried
    fresh_after = lab.wait_settled(tokens["fresh"], fresh_before["total_requests"] + 2)
    rows = settled_rows(server, 2)
    check_costs(answers, rows)
    charged = fresh_after["total_spent"] - fresh_before["total_spent"]
    logged = sum(r["cost_sats"] for r in rows)
    print(f"\n[money] balance run: logged {msats(logged)} msats, node charged fresh {charged} msats")
    assert msats(logged) == charged
    entries = listed(server)
    assert msats(entries["fresh"]["balance_sats"]) == fresh_after["balance"], entries["fresh"]  # from the answers
    assert entries["fresh"]["balance_at"] is not None

    refused = chat(alone, model)
    print(f"\n[balance] funded alone below the minimum: {refused.status_code} {refused.text}")
    assert refused.status_code == 503, refused.text
    assert lab.balance_info(lab.token)["total_requests"] == funded_before["total_requests"]  # never asked
    assert alone.get("/health").json()["providers"]["funded"]["balance_low"] is True
    assert server.stop() == 0 and alone.stop() == 0
    assert leaks({"fresh token": tokens["fresh"], "funded token": lab.token}, server, tmp_path / "two") == []


def test_402_falls_back_and_alone_says_the_balance_ran_out(
    routstr_lab: RoutstrLab, tokens: dict[str, SecretStr], tmp_path: Path
) -> None:
    """A 4-sat account ("tiny") cannot cover one request's reservation: the node answers 402. Cheaper
    than "funded", it is tried first and the request falls back (x-arbstr-retries). As the only
    provider, the openai SDK raises APIStatusError 502 with code insufficient_balance and a message
    saying the balance ran out, naming the provider and its complaint, for a completion and a stream;
    no x-should-retry, no key_rejected, no charge."""
    lab = routstr_lab
    model = node_model(lab)["id"]
    tiny_before = lab.balance_info(tokens["tiny"])  # redeems it
    assert 0 < tiny_before["balance"] < 10_000, tiny_before["balance"]
    both = start(lab, config_in(tmp_path, "both", [static_provider(lab, "tiny", 0.5), static_provider(lab, "funded")]),
                 keys={"tiny": tokens["tiny"], "funded": lab.token})
    answer = send(both, model, "completion")
    assert (answer.provider, answer.retries) == ("funded", "1/tiny")
    state = both.get("/health").json()
    assert state["status"] == "ok" and state["providers"]["tiny"]["key_rejected"] is None, state

    alone = start(lab, config_in(tmp_path, "alone", [static_provider(lab, "tiny")]), keys={"tiny": tokens["tiny"]})
    client = alone.openai_client()
    errors = []
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=model, messages=HELLO, stream=stream)
        errors.append(caught.value)
    for e in errors:
        body = e.body if isinstance(e.body, dict) else {}
        message = body.get("message", "")
        print(f"\n[402] {e.status_code} {body}")
        assert e.status_code == 502 and body.get("code") == "insufficient_balance", body
        assert "balance ran out" in message and "tiny" in message and "Insufficient balance" in message, body
        assert e.response.headers.get("x-should-retry") == "false"
        assert e.response.headers.get("x-arbstr-provider") == "tiny"
    state = alone.get("/health").json()
    assert state["providers"]["tiny"]["key_rejected"] is None and state["providers"]["tiny"]["state"] == "closed"
    rows = settled_rows(alone, 2)
    assert [(r["success"], r["http_status"], r["provider"], r["cost_sats"]) for r in rows] == [
        (False, 502, "tiny", None)] * 2, rows
    tiny_after = lab.balance_info(tokens["tiny"])
    assert (tiny_after["balance"], tiny_after["total_spent"], tiny_after["reserved"]) == (tiny_before["balance"], 0, 0)
    assert both.stop() == 0 and alone.stop() == 0
    assert leaks({"tiny token": tokens["tiny"]}, alone, tmp_path / "alone") == []


# ---------------------------------------------------------------------------------------------------
# Live prices: the node's price moves, the logged costs follow it (SPEC §11)


def test_costs_and_discovered_prices_follow_the_node_when_its_price_changes(
    routstr_lab: RoutstrLab, tmp_path: Path
) -> None:
    """Two arbstrs on the same account: "static" (config rates, half the node's) and "live" (discover =
    true, no models or rates, refresh_secs = 2). Live routes with the node's prices, /providers shows
    them as "discovered" and the node's balance. The node restarts at BTC = $50k (its prices double, the
    account survives): within a refresh live shows the new rates, and both arbstrs still log exactly
    what the node charged, to the msat: the costs follow the node, not the config. Last in the file:
    the node stays at $50k (a restart back would cost ~15 s; every test here reads prices from the node)."""
    lab = routstr_lab
    refresh = 2
    model = node_model(lab)
    static = start(lab, config_in(tmp_path, "static", [static_provider(lab, factor=0.5)]))
    live = start(lab, config_in(tmp_path, "live", [live_provider(lab, "live")], market={"refresh_secs": refresh}),
                 keys={"live": lab.token})

    def discovered(pricing: Mapping[str, float], since: str | None = None) -> dict[str, Any] | None:
        """live's /providers entry once it shows ``pricing`` (newer than ``since``), else None."""
        entry = listed(live)["live"]
        rates = (entry["prices"]["models"] or {}).get(model["id"])
        if entry["prices"]["source"] != "discovered" or rates is None or entry["prices"]["updated_at"] == since \
                or entry["balance_sats"] is None:  # a round fetches the prices, then the balance
            return None
        want = {"input_rate": pricing["prompt"] * 1000, "output_rate": pricing["completion"] * 1000,
                "base_fee": pricing["request"], "cached_input_rate": pricing["input_cache_read"] * 1000}
        same = all(math.isclose(rates[k], v, rel_tol=1e-9) for k, v in want.items())
        return entry if same else None

    def round_trip(phase: str, rows_each: int) -> tuple[int, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """A completion and a stream through each arbstr: (node charge, static rows, live rows); each
        arbstr then holds ``rows_each`` rows."""
        before = lab.balance_info(lab.token)
        answers = {"static": [send(static, model["id"], k) for k in ("completion", "stream+usage")],
                   "live": [send(live, model["id"], k) for k in ("completion", "stream")]}
        assert [a.provider for a in answers["live"]] == ["live", "live"]
        assert all(a.retries is None for a in answers["static"] + answers["live"])  # no stale connection
        after = lab.wait_settled(lab.token, before["total_requests"] + 4)
        charged = after["total_spent"] - before["total_spent"]
        rows = {name: {r["request_id"]: r for r in settled_rows(server, rows_each)}
                for name, server in (("static", static), ("live", live))}
        mine = {name: {a.request_id: rows[name][a.request_id] for a in answers[name]} for name in answers}
        for name, sent in answers.items():
            check_costs(sent, mine[name].values())
        logged = sum(r["cost_sats"] for side in mine.values() for r in side.values())
        print(f"\n[money] {phase}: logged {msats(logged)} msats "
              f"(static {[r['cost_sats'] for r in mine['static'].values()]}, "
              f"live {[r['cost_sats'] for r in mine['live'].values()]} sats), node charged {charged} msats; "
              f"rates_cost_sats static {[r['rates_cost_sats'] for r in mine['static'].values()]}, "
              f"live {[r['rates_cost_sats'] for r in mine['live'].values()]}")
        assert msats(logged) == charged
        return charged, mine["static"], mine["live"]

    first = wait_until("live shows the node's prices as discovered and its balance",
                       lambda: discovered(model["sats_pricing"]))
    account = lab.balance_info(lab.token)
    assert first["prices"]["error"] is None and first["prices"]["age_secs"] is not None
    assert first["balance_sats"] is not None and msats(first["balance_sats"]) == account["balance"], first
    assert live.get("/health").json()["status"] == "ok"

    charged_100k, static_100k, live_100k = round_trip("BTC $100k", 2)
    old_rates = first["prices"]["models"][model["id"]]
    for row in static_100k.values():  # static's formula uses its (wrong) config rates
        assert msats(row["rates_cost_sats"]) == msats(rates_formula(model_rates(model, 0.5), row)), row
    for row in live_100k.values():  # live's formula uses the discovered rates
        assert msats(row["rates_cost_sats"]) == msats(rates_formula(old_rates, row)), row
    lab.restart_node(btc_usd=50_000)
    restarted = time.monotonic()
    priced = node_model(lab)
    assert priced["sats_pricing"]["prompt"] == 2 * model["sats_pricing"]["prompt"]
    survived = lab.balance_info(lab.token)
    assert (survived["balance"], survived["total_spent"], survived["total_requests"]) == (
        account["balance"] - charged_100k, account["total_spent"] + charged_100k, account["total_requests"] + 4)
    moved = wait_until("live shows the node's new prices", lambda: discovered(
        priced["sats_pricing"], since=first["prices"]["updated_at"]), timeout=3 * refresh + 5, interval=0.2)
    took = time.monotonic() - restarted
    print(f"\n[prices] live showed the doubled prices {took:.1f}s after the node came back (refresh {refresh}s)")
    assert took <= 2 * refresh + 1  # the next round after the node is back, not a later one
    assert moved["prices"]["error"] is None

    charged_50k, static_50k, live_50k = round_trip("BTC $50k", 4)
    assert charged_50k == 2 * charged_100k  # the same requests, twice the price
    for row in static_50k.values():  # the config did not move; the logged cost did (doubled)
        assert msats(row["rates_cost_sats"]) == msats(rates_formula(model_rates(model, 0.5), row)), row
    assert sorted(msats(r["cost_sats"]) for r in static_50k.values()) == sorted(
        2 * msats(r["cost_sats"]) for r in static_100k.values())
    for row in live_50k.values():
        assert msats(row["rates_cost_sats"]) == msats(rates_formula(moved["prices"]["models"][model["id"]], row))
    account = lab.balance_info(lab.token)

    def balance_shown() -> dict[str, Any] | None:
        entry = listed(live)["live"]
        return entry if entry["balance_sats"] is not None and msats(entry["balance_sats"]) == account["balance"] \
            else None

    balance = wait_until("live's balance is the node's", balance_shown, timeout=refresh + 3)
    assert balance["key_rejected"] is False
    assert live.get("/health").json()["status"] == "ok"  # a refresh that failed while the node was down
    assert static.stop() == 0 and live.stop() == 0
