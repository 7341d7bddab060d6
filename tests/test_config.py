"""Configuration loading and validation (SPEC §1): defaults, unknown keys, types, ranges, files."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from arbstr_core.config import Config, describe, from_mapping, load
from arbstr_core.errors import ConfigError
from arbstr_core.secrets import Secret

PATH = "/srv/arbstr/config.toml"
ROOT = Path(__file__).resolve().parent.parent

# The example of SPEC §1, verbatim.
SPEC_EXAMPLE = """
[server]
listen = "127.0.0.1:8080"        # host:port; `arbstr serve -l` overrides
auth_token = "${ARBSTR_AUTH_TOKEN}"  # optional; when set, every route but /health needs it (§4.1)
request_timeout_secs = 30        # total deadline for one non-streaming request, retries included
connect_timeout_secs = 5         # per upstream attempt
stream_idle_timeout_secs = 120   # longest silence tolerated inside a stream
max_body_bytes = 10485760        # larger request bodies get 413
rate_limit_rps = 0               # 0 = unlimited; otherwise a token bucket, excess gets 429 + Retry-After
max_concurrent = 0               # 0 = unlimited; in-flight cap, excess gets 503 + Retry-After
threads = 256                    # gunicorn threads per worker = streams served at once (§8); idle ones cost nothing
allow_unauthenticated = false    # a non-loopback bind without auth_token refuses to start unless true (§4.1)

[database]
path = "./arbstr.db"             # SQLite file; created with its directory if missing
retention_days = 0               # 0 = keep forever; otherwise rows older than this are deleted daily
queue_size = 10000               # log queue bound; when full, rows are dropped and counted, never blocking

[retry]
max_retries = 2                  # extra attempts on the same provider (so up to 3 tries)
backoff_base_ms = 1000           # 1 s, then 2 s (doubling), each with ±25 % jitter
max_retry_after_secs = 10        # an upstream Retry-After above this is not waited for
fallback = true                  # after the primary is exhausted, try the next candidates

[circuit_breaker]
failure_threshold = 3            # consecutive failures that open a circuit
open_secs = 30                   # how long a circuit stays open before one probe is let through

[[providers]]
name = "provider-alpha"          # unique; used in headers, logs, breaker state
url = "https://alpha.example/v1" # base URL; arbstr posts to url + "/chat/completions"
api_key = "${ALPHA_KEY}"         # optional; see §1.1
models = ["gpt-4o", "gpt-4o-mini"]  # required, non-empty: the exact model ids it serves
input_rate = 10                  # sats per 1,000 input tokens (float allowed)
output_rate = 30                 # sats per 1,000 output tokens
base_fee = 1                     # sats per request
timeout_secs = 20                # optional: longest wait for this provider's answer (non-streaming) or
                                 # first event (streaming), capped by the time left of the deadline

[logging]
level = "info"                   # debug | info | warning | error (to stderr, one line per event)
log_requests = true              # false = no request rows are written

[policies]
default_strategy = "cheapest"    # cheapest | lowest_latency | round_robin

[[policies.rules]]
name = "code_generation"
allowed_models = ["gpt-4o"]      # empty or absent = any model
strategy = "cheapest"
max_sats_per_1k_output = 50      # providers whose output_rate exceeds this are excluded
keywords = ["code", "function", "implement", "debug"]
"""

ALPHA_KEY = "cashuAalphaalphaalphaalpha"
AUTH_TOKEN = "tok-0123456789abcdef"


def prov(**overrides: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"name": "provider-alpha", "url": "https://alpha.example/v1", "models": ["gpt-4o"]}
    p.update(overrides)
    return p


def raw(**tables: Any) -> dict[str, Any]:
    """A parsed-TOML mapping with one valid provider unless ``providers`` is given."""
    out: dict[str, Any] = {"providers": [prov()]}
    out.update(tables)
    return out


def build(mapping: dict[str, Any], env: dict[str, str] | None = None, **kw: Any) -> Config:
    return from_mapping(mapping, env or {}, PATH, **kw)


def config_error(mapping: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        build(mapping, env)
    message = str(e.value)
    assert PATH in message, "every error names the file"
    return message


def write(tmp_path: Path, text: str, mode: int = 0o600, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


# --- defaults and the SPEC example ------------------------------------------------------------


def test_defaults_are_the_documented_values() -> None:
    cfg = build(raw())
    assert cfg.server.listen == "127.0.0.1:8080"
    assert cfg.server.auth_token is None
    assert cfg.server.request_timeout_secs == 30
    assert cfg.server.connect_timeout_secs == 5
    assert cfg.server.stream_idle_timeout_secs == 120
    assert cfg.server.max_body_bytes == 10485760
    assert cfg.server.rate_limit_rps == 0
    assert cfg.server.max_concurrent == 0
    assert cfg.server.threads == 256
    assert cfg.server.allow_unauthenticated is False
    assert cfg.database.path == "./arbstr.db"
    assert cfg.database.retention_days == 0
    assert cfg.database.queue_size == 10000
    assert cfg.retry.max_retries == 2
    assert cfg.retry.backoff_base_ms == 1000
    assert cfg.retry.max_retry_after_secs == 10
    assert cfg.retry.fallback is True
    assert cfg.circuit_breaker.failure_threshold == 3
    assert cfg.circuit_breaker.open_secs == 30
    assert cfg.logging.level == "info"
    assert cfg.logging.log_requests is True
    assert cfg.policies.default_strategy == "cheapest"
    assert cfg.policies.rules == ()
    p = cfg.providers[0]
    assert (p.input_rate, p.output_rate, p.base_fee) == (0, 0, 0)
    assert (p.api_key, p.key_source) == (None, "none")
    assert p.timeout_secs is None
    assert cfg.warnings == ()


def test_spec_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, SPEC_EXAMPLE)
    cfg = load(str(path), env={"ALPHA_KEY": ALPHA_KEY, "ARBSTR_AUTH_TOKEN": AUTH_TOKEN})
    assert cfg.path == str(path)
    assert cfg.server.auth_token == Secret(AUTH_TOKEN)
    (alpha,) = cfg.providers
    assert alpha.name == "provider-alpha"
    assert alpha.models == ("gpt-4o", "gpt-4o-mini")
    assert (alpha.input_rate, alpha.output_rate, alpha.base_fee) == (10, 30, 1)
    assert alpha.api_key == Secret(ALPHA_KEY)
    assert alpha.key_source == "env-expanded"
    assert alpha.endpoint == "https://alpha.example/v1/chat/completions"
    assert alpha.timeout_secs == 20
    assert (cfg.server.threads, cfg.server.allow_unauthenticated) == (256, False)
    (rule,) = cfg.policies.rules
    assert rule.name == "code_generation"
    assert rule.allowed_models == ("gpt-4o",)
    assert rule.strategy == "cheapest"
    assert rule.max_sats_per_1k_output == 50
    assert rule.keywords == ("code", "function", "implement", "debug")
    assert cfg.warnings == ()
    # The expanded secrets appear in no textual form of the config.
    assert ALPHA_KEY not in repr(cfg) and AUTH_TOKEN not in repr(cfg)


def test_config_is_frozen() -> None:
    cfg = build(raw())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.listen = "0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.providers[0].output_rate = 0  # type: ignore[misc]
    assert isinstance(cfg.providers, tuple) and isinstance(cfg.providers[0].models, tuple)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("https://alpha.example/v1", "https://alpha.example/v1/chat/completions"),
        ("https://alpha.example/v1/", "https://alpha.example/v1/chat/completions"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000/chat/completions"),
    ],
)
def test_provider_endpoint(url: str, endpoint: str) -> None:
    assert build(raw(providers=[prov(url=url)])).providers[0].endpoint == endpoint


def test_float_rates_and_timeouts_are_accepted() -> None:
    cfg = build(raw(providers=[prov(input_rate=0.5, output_rate=1.25, base_fee=0.1)],
                    server={"request_timeout_secs": 2.5}))
    p = cfg.providers[0]
    assert (p.input_rate, p.output_rate, p.base_fee) == (0.5, 1.25, 0.1)
    assert cfg.server.request_timeout_secs == 2.5


def test_providers_keep_config_order() -> None:
    names = ["c", "a", "b"]
    cfg = build(raw(providers=[prov(name=n) for n in names]))
    assert [p.name for p in cfg.providers] == names


def test_mock_mode_needs_no_providers() -> None:
    cfg = build({}, mock=True)
    assert cfg.providers == () and cfg.mock is True


# --- unknown keys: a typo must never silently drop a limit ---------------------------------------


def test_unknown_top_level_table() -> None:
    message = config_error(raw(servers={"listen": "127.0.0.1:1"}))
    assert "'servers'" in message


@pytest.mark.parametrize(
    ("mapping", "key", "table"),
    [
        (raw(server={"request_timeout": 5}), "request_timeout", "[server]"),
        (raw(database={"retention": 3}), "retention", "[database]"),
        (raw(retry={"max_retrys": 5}), "max_retrys", "[retry]"),
        (raw(circuit_breaker={"threshold": 5}), "threshold", "[circuit_breaker]"),
        (raw(logging={"lvl": "debug"}), "lvl", "[logging]"),
        (raw(policies={"default": "cheapest"}), "default", "[policies]"),
        (raw(providers=[prov(output_rat=5)]), "output_rat", "[[providers]] #1"),
        (raw(providers=[prov(), prov(name="b", apikey="x")]), "apikey", "[[providers]] #2"),
        (raw(policies={"rules": [{"name": "r", "max_sats_per_1k": 5}]}), "max_sats_per_1k", "[[policies.rules]] #1"),
    ],
)
def test_unknown_key_names_key_and_table(mapping: dict[str, Any], key: str, table: str) -> None:
    message = config_error(mapping)
    assert f"'{key}'" in message
    assert table in message


def test_unknown_key_is_reported_from_a_file(tmp_path: Path) -> None:
    text = SPEC_EXAMPLE.replace("max_retries = 2", "max_retrys = 5")
    with pytest.raises(ConfigError) as e:
        load(str(write(tmp_path, text)), env={"ALPHA_KEY": "k" * 12, "ARBSTR_AUTH_TOKEN": "t" * 12})
    assert "'max_retrys'" in str(e.value) and "[retry]" in str(e.value)
    assert "max_retries" in str(e.value), "the message lists the valid keys"


# --- types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        (raw(server={"request_timeout_secs": "30"}), "request_timeout_secs"),
        (raw(server={"request_timeout_secs": True}), "request_timeout_secs"),
        (raw(server={"max_body_bytes": 1.5}), "max_body_bytes"),
        (raw(server={"listen": 8080}), "listen"),
        (raw(retry={"max_retries": 2.5}), "max_retries"),
        (raw(retry={"fallback": 1}), "fallback"),
        (raw(retry={"fallback": "yes"}), "fallback"),
        (raw(logging={"log_requests": 0}), "log_requests"),
        (raw(providers=[prov(models="gpt-4o")]), "models"),
        (raw(providers=[prov(output_rate="30")]), "output_rate"),
        (raw(providers=[prov(base_fee=False)]), "base_fee"),
        (raw(policies={"rules": {"name": "r"}}), "rules"),
    ],
)
def test_wrong_type_names_the_key(mapping: dict[str, Any], key: str) -> None:
    assert key in config_error(mapping)


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (raw(server={"request_timeout_secs": "30"}), "[server] request_timeout_secs must be a number, got str '30'"),
        (raw(retry={"max_retries": 2.5}), "[retry] max_retries must be an integer, got float 2.5"),
        (raw(server={"threads": 2.5}), "[server] threads must be an integer, got float 2.5"),
        (raw(server={"threads": True}), "[server] threads must be an integer, got bool True"),
        (raw(server={"allow_unauthenticated": "yes"}),
         "[server] allow_unauthenticated must be true or false, got str 'yes'"),
        (raw(server={"listen": 8080}), "[server] listen must be a string, got int 8080"),
        (raw(providers=[prov(models="gpt-4o")]), "[[providers]] #1 models must be an array, got str 'gpt-4o'"),
        (raw(providers=[prov(timeout_secs="20")]), "[[providers]] #1 timeout_secs must be a number, got str '20'"),
    ],
)
def test_wrong_type_message_names_the_expected_type(mapping: dict[str, Any], expected: str) -> None:
    assert expected in config_error(mapping)


@pytest.mark.parametrize("table", ["server", "database", "retry", "circuit_breaker", "logging", "policies"])
def test_scalar_where_a_table_belongs(table: str) -> None:
    assert f"[{table}]" in config_error(raw(**{table: 5}))


def test_providers_must_be_an_array_of_tables() -> None:
    assert "[[providers]]" in config_error({"providers": {"name": "x"}})
    assert "[[providers]] #1" in config_error({"providers": ["x"]})


def test_mistyped_secrets_are_not_echoed() -> None:
    key_digits = 98765432109876543
    message = config_error(raw(providers=[prov(api_key=key_digits)]))
    assert "api_key" in message and str(key_digits) not in message
    message = config_error(raw(server={"auth_token": key_digits}))
    assert "auth_token" in message and str(key_digits) not in message


# --- ranges and required values --------------------------------------------------------------


def test_no_providers_is_an_error() -> None:
    message = config_error({})
    assert "providers" in message and "--mock" in message
    assert "providers" in config_error({"providers": []})


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ({"url": "https://a.example/v1", "models": ["m"]}, "name"),
        (prov(name=""), "name"),
        (prov(url=None) | {}, "url"),
        ({"name": "p", "models": ["m"]}, "url"),
        (prov(url=""), "url"),
        (prov(url="ftp://a.example/v1"), "url"),
        (prov(url="alpha.example/v1"), "url"),
        (prov(url="https://"), "url"),
        ({"name": "p", "url": "https://a.example"}, "models"),
        (prov(models=[]), "models"),
        (prov(models=[""]), "models"),
        (prov(models=["gpt-4o", 5]), "models"),
        (prov(input_rate=-1), "input_rate"),
        (prov(output_rate=-0.5), "output_rate"),
        (prov(base_fee=-1), "base_fee"),
    ],
)
def test_invalid_provider(entry: dict[str, Any], fragment: str) -> None:
    entry = {k: v for k, v in entry.items() if v is not None}
    assert fragment in config_error({"providers": [entry]})


def test_duplicate_provider_names() -> None:
    message = config_error({"providers": [prov(name="dup"), prov(name="dup")]})
    assert "'dup'" in message and "unique" in message


def test_zero_rates_are_valid() -> None:
    p = build(raw(providers=[prov(input_rate=0, output_rate=0, base_fee=0)])).providers[0]
    assert (p.input_rate, p.output_rate, p.base_fee) == (0, 0, 0)


@pytest.mark.parametrize(
    ("server", "key"),
    [
        ({"request_timeout_secs": 0}, "request_timeout_secs"),
        ({"request_timeout_secs": -1}, "request_timeout_secs"),
        ({"connect_timeout_secs": 0}, "connect_timeout_secs"),
        ({"stream_idle_timeout_secs": 0}, "stream_idle_timeout_secs"),
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"rate_limit_rps": -1}, "rate_limit_rps"),
        ({"max_concurrent": -1}, "max_concurrent"),
        ({"listen": "8080"}, "listen"),
        ({"listen": "127.0.0.1"}, "listen"),
        ({"listen": ":8080"}, "listen"),
        ({"listen": "127.0.0.1:http"}, "listen"),
        ({"listen": "127.0.0.1:0"}, "listen"),
        ({"listen": "127.0.0.1:65536"}, "listen"),
    ],
)
def test_invalid_server_values(server: dict[str, Any], key: str) -> None:
    assert key in config_error(raw(server=server))


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "0.0.0.0:1", "localhost:65535", "[::1]:8080"])
def test_valid_listen(listen: str) -> None:
    assert build(raw(server={"listen": listen})).server.listen == listen


@pytest.mark.parametrize(
    ("tables", "key"),
    [
        ({"database": {"retention_days": -1}}, "retention_days"),
        ({"database": {"queue_size": 0}}, "queue_size"),
        ({"retry": {"max_retries": -1}}, "max_retries"),
        ({"retry": {"backoff_base_ms": -1}}, "backoff_base_ms"),
        ({"retry": {"max_retry_after_secs": -1}}, "max_retry_after_secs"),
        ({"circuit_breaker": {"failure_threshold": 0}}, "failure_threshold"),
        ({"circuit_breaker": {"open_secs": 0}}, "open_secs"),
        ({"logging": {"level": "verbose"}}, "level"),
        ({"policies": {"default_strategy": "fastest"}}, "default_strategy"),
    ],
)
def test_invalid_ranges(tables: dict[str, Any], key: str) -> None:
    assert key in config_error(raw(**tables))


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda v: raw(providers=[prov(input_rate=v)]), "input_rate"),
        (lambda v: raw(providers=[prov(output_rate=v)]), "output_rate"),
        (lambda v: raw(providers=[prov(base_fee=v)]), "base_fee"),
        (lambda v: raw(providers=[prov(timeout_secs=v)]), "timeout_secs"),
        (lambda v: raw(server={"request_timeout_secs": v}), "request_timeout_secs"),
        (lambda v: raw(server={"connect_timeout_secs": v}), "connect_timeout_secs"),
        (lambda v: raw(server={"stream_idle_timeout_secs": v}), "stream_idle_timeout_secs"),
        (lambda v: raw(server={"rate_limit_rps": v}), "rate_limit_rps"),
        (lambda v: raw(database={"retention_days": v}), "retention_days"),
        (lambda v: raw(retry={"backoff_base_ms": v}), "backoff_base_ms"),
        (lambda v: raw(retry={"max_retry_after_secs": v}), "max_retry_after_secs"),
        (lambda v: raw(circuit_breaker={"open_secs": v}), "open_secs"),
        (lambda v: raw(policies={"rules": [{"name": "r", "max_sats_per_1k_output": v}]}), "max_sats_per_1k_output"),
    ],
)
def test_non_finite_numbers_are_errors(make: Callable[[float], dict[str, Any]], key: str, value: float) -> None:
    """TOML's inf and nan pass a type check, and nan every comparison with 0."""
    assert f"{key} must be a finite number, got {value!r}" in config_error(make(value))


def test_inf_from_a_toml_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[[providers]]\nname = "a"\nurl = "http://a"\nmodels = ["m"]\noutput_rate = inf\n')
    with pytest.raises(ConfigError) as e:
        load(str(path), env={})
    assert str(path) in str(e.value) and "output_rate must be a finite number, got inf" in str(e.value)


@pytest.mark.parametrize("value", [0, -1, -0.5])
def test_provider_timeout_must_be_positive(value: float) -> None:
    message = config_error(raw(providers=[prov(name="provider-alpha", timeout_secs=value)]))
    assert "provider 'provider-alpha' timeout_secs must be positive" in message


def test_provider_timeout_is_optional_and_may_be_fractional() -> None:
    cfg = build(raw(providers=[prov(name="a", timeout_secs=2.5), prov(name="b", timeout_secs=20), prov(name="c")]))
    assert [p.timeout_secs for p in cfg.providers] == [2.5, 20, None]


@pytest.mark.parametrize("threads", [0, -1])
def test_threads_must_be_at_least_one(threads: int) -> None:
    message = config_error(raw(server={"threads": threads}))
    assert "[server] threads must be at least 1" in message and "256" in message


def test_threads_and_allow_unauthenticated_are_read() -> None:
    cfg = build(raw(server={"threads": 1, "allow_unauthenticated": True}))
    assert (cfg.server.threads, cfg.server.allow_unauthenticated) == (1, True)
    assert build(raw(server={"threads": 4096})).server.threads == 4096


def test_zero_retries_and_zero_backoff_are_valid() -> None:
    cfg = build(raw(retry={"max_retries": 0, "backoff_base_ms": 0, "fallback": False}))
    assert (cfg.retry.max_retries, cfg.retry.backoff_base_ms, cfg.retry.fallback) == (0, 0, False)


@pytest.mark.parametrize("strategy", ["cheapest", "lowest_latency", "round_robin", "fastest_first_token",
                                      "performance"])
def test_known_strategies(strategy: str) -> None:
    cfg = build(raw(policies={"default_strategy": strategy, "rules": [{"name": "r", "strategy": strategy}]}))
    assert cfg.policies.default_strategy == strategy
    assert cfg.policies.rules[0].strategy == strategy


def test_measurement_window_exploration_and_debug_keys_are_read() -> None:
    cfg = build(raw(policies={"window_minutes": 2.5, "explore_share": 0, "rules": []},
                    debug={"enabled": True, "capture": "header", "retention_days": 1, "max_bytes": 4096}))
    assert (cfg.policies.window_minutes, cfg.policies.explore_share) == (2.5, 0)
    assert (cfg.debug.enabled, cfg.debug.capture, cfg.debug.retention_days, cfg.debug.max_bytes) == (
        True, "header", 1, 4096)


@pytest.mark.parametrize(("table", "values", "fragment"), [
    ("policies", {"explore_share": 1.5}, "explore_share"),
    ("policies", {"window_minutes": 0}, "window_minutes"),
    ("debug", {"capture": "sometimes"}, "capture"),
    ("debug", {"max_bytes": 0}, "max_bytes"),
])
def test_bad_measurement_and_debug_values_are_refused(table: str, values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        build(raw(**{table: values}))


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ({"keywords": ["x"]}, "name"),
        ({"name": "r", "strategy": "cheapest_first"}, "cheapest_first"),
        ({"name": "r", "allowed_models": ["gpt-4o", 4]}, "allowed_models"),
        ({"name": "r", "keywords": [None]}, "keywords"),
        ({"name": "r", "max_sats_per_1k_output": -1}, "max_sats_per_1k_output"),
    ],
)
def test_invalid_rule(rule: dict[str, Any], fragment: str) -> None:
    assert fragment in config_error(raw(policies={"rules": [rule]}))


def test_duplicate_rule_names() -> None:
    message = config_error(raw(policies={"rules": [{"name": "r"}, {"name": "r"}]}))
    assert "'r'" in message and "unique" in message


def test_rule_defaults() -> None:
    (rule,) = build(raw(policies={"rules": [{"name": "r"}]})).policies.rules
    assert rule.allowed_models == () and rule.keywords == ()
    assert rule.strategy == "cheapest" and rule.max_sats_per_1k_output is None


def test_rules_keep_config_order() -> None:
    names = ["zeta", "alpha", "mid"]
    cfg = build(raw(policies={"rules": [{"name": n} for n in names]}))
    assert [r.name for r in cfg.policies.rules] == names


# --- keys and the auth token ------------------------------------------------------------------


def test_auth_token_expansion() -> None:
    cfg = build(raw(server={"auth_token": "${TOKEN}"}), {"TOKEN": AUTH_TOKEN})
    assert cfg.server.auth_token == Secret(AUTH_TOKEN)


def test_auth_token_literal() -> None:
    assert build(raw(server={"auth_token": AUTH_TOKEN})).server.auth_token == Secret(AUTH_TOKEN)


def test_auth_token_that_expands_to_nothing_means_no_auth() -> None:
    assert build(raw(server={"auth_token": "${TOKEN}"}), {"TOKEN": ""}).server.auth_token is None
    assert build(raw(server={"auth_token": ""})).server.auth_token is None


def test_auth_token_unset_variable() -> None:
    message = config_error(raw(server={"auth_token": "${ARBSTR_AUTH_TOKEN}"}))
    assert "ARBSTR_AUTH_TOKEN" in message and "auth_token" in message


def test_api_key_unset_variable_names_variable_and_provider() -> None:
    message = config_error(raw(providers=[prov(name="provider-beta", api_key="${BETA_KEY}")]))
    assert "BETA_KEY" in message and "provider-beta" in message


@pytest.mark.parametrize("value", ["${}", "${BETA_KEY", "${A${B}}"])
def test_api_key_malformed_reference(value: str) -> None:
    message = config_error(raw(providers=[prov(name="provider-beta", api_key=value)]), {"A": "a", "B": "b"})
    assert "provider-beta" in message and "api_key" in message


def test_key_sources_per_provider() -> None:
    env = {"BETA": "beta-key-0123456789", "ARBSTR_PROVIDER_GAMMA_API_KEY": "gamma-key-0123456789"}
    cfg = build(
        {
            "providers": [
                prov(name="provider-alpha", api_key="alpha-key-0123456789"),
                prov(name="provider-beta", api_key="${BETA}"),
                prov(name="provider-gamma"),
                prov(name="provider-delta"),
            ]
        },
        env,
    )
    sources = {p.name: p.key_source for p in cfg.providers}
    assert sources == {
        "provider-alpha": "config-literal",
        "provider-beta": "env-expanded",
        "provider-gamma": "convention (ARBSTR_PROVIDER_GAMMA_API_KEY)",
        "provider-delta": "none",
    }
    keys = {p.name: p.api_key for p in cfg.providers}
    assert keys["provider-alpha"] == Secret("alpha-key-0123456789")
    assert keys["provider-beta"] == Secret(env["BETA"])
    assert keys["provider-gamma"] == Secret(env["ARBSTR_PROVIDER_GAMMA_API_KEY"])
    assert keys["provider-delta"] is None


def test_literal_key_warns_and_recommends_the_convention_variable() -> None:
    key = "literal-secret-0123456789"
    cfg = build(raw(providers=[prov(name="provider-beta", api_key=key)]))
    (warning,) = cfg.warnings
    assert "provider-beta" in warning
    assert "ARBSTR_PROVIDER_BETA_API_KEY" in warning
    assert key not in warning


def test_expanded_and_convention_keys_do_not_warn() -> None:
    env = {"K": "k" * 20, "ARBSTR_B_API_KEY": "b" * 20}
    cfg = build({"providers": [prov(name="a", api_key="${K}"), prov(name="b")]}, env)
    assert cfg.warnings == ()


@pytest.mark.parametrize("url", ["https://a.example/v1/chat/completions", "https://a.example/v1/chat/completions/"])
def test_url_ending_in_chat_completions_warns_with_the_fix(url: str) -> None:
    cfg = build(raw(providers=[prov(name="provider-alpha", url=url)]))
    (warning,) = cfg.warnings
    assert PATH in warning and "provider-alpha" in warning
    assert "https://a.example/v1/chat/completions/chat/completions" in warning, "says where it would post"
    assert 'set url = "https://a.example/v1"' in warning


def test_base_urls_do_not_warn() -> None:
    urls = ["https://a.example/v1", "https://a.example/v1/", "https://a.example/chat/completions-proxy"]
    assert build({"providers": [prov(name=str(i), url=u) for i, u in enumerate(urls)]}).warnings == ()


def test_shared_key_warns_naming_the_providers_never_the_key() -> None:
    key = "cashuAsharedsharedshared0123"
    env = {"K": key, "ARBSTR_C_API_KEY": key, "OTHER": "cashuAother0123456789"}
    cfg = build({"providers": [prov(name="a", api_key="${K}"), prov(name="b", api_key="${OTHER}"), prov(name="c"),
                               prov(name="d")]}, env)
    (warning,) = cfg.warnings
    assert "'a', 'c'" in warning and "'b'" not in warning
    assert "same api_key" in warning and "Cashu" in warning
    assert key not in warning and key[:6] not in warning


def test_providers_without_keys_do_not_share_one() -> None:
    assert build({"providers": [prov(name="a"), prov(name="b")]}).warnings == ()


def test_no_error_or_warning_contains_a_key() -> None:
    key = "cashuAsupersecret0123456789"
    cfg = build({"providers": [prov(name="a", api_key=key), prov(name="b", api_key="${K}")]}, {"K": key})
    assert all(key not in w for w in cfg.warnings)
    message = config_error({"providers": [prov(name="a", api_key=key), prov(name="a", api_key=key)]})
    assert key not in message


# --- files --------------------------------------------------------------------------------------


def test_missing_file_names_path_and_suggests_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "config.toml"
    with pytest.raises(ConfigError) as e:
        load(str(path), env={})
    message = str(e.value)
    assert str(path) in message
    assert "config.example.toml" in message
    assert "--mock" in message and "ARBSTR_MOCK" in message


def test_invalid_toml_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nlisten = ")
    with pytest.raises(ConfigError) as e:
        load(str(path), env={})
    assert str(path) in str(e.value) and "TOML" in str(e.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o700 | 0o010])
def test_loose_permissions_warn_with_chmod_600(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, 'providers = [{name = "a", url = "http://a", models = ["m"]}]', mode)
    cfg = load(str(path), env={})
    (warning,) = cfg.warnings
    assert f"chmod 600 {path}" in warning
    assert f"{mode:04o}" in warning


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_private_permissions_do_not_warn(tmp_path: Path, mode: int) -> None:
    path = write(tmp_path, 'providers = [{name = "a", url = "http://a", models = ["m"]}]', mode)
    assert load(str(path), env={}).warnings == ()


def test_permission_and_literal_key_warnings_together(tmp_path: Path) -> None:
    text = 'providers = [{name = "p-1", url = "http://a", models = ["m"], api_key = "lit-0123456789"}]'
    path = write(tmp_path, text, 0o644)
    warnings = load(str(path), env={}).warnings
    assert len(warnings) == 2
    assert any("chmod 600" in w for w in warnings)
    assert any("ARBSTR_P_1_API_KEY" in w for w in warnings)
    assert all("lit-0123456789" not in w for w in warnings)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "", 0o000)
    with pytest.raises(ConfigError) as e:
        load(str(path), env={})
    assert str(path) in str(e.value)


def test_load_reads_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARBSTR_TEST_CFG_KEY", "from-os-environ-123")
    text = 'providers = [{name = "a", url = "http://a", models = ["m"], api_key = "${ARBSTR_TEST_CFG_KEY}"}]'
    cfg = load(str(write(tmp_path, text)))
    assert cfg.providers[0].api_key == Secret("from-os-environ-123")


# --- the declaration and the docs ----------------------------------------------------------------

DECLARED = {(table, key): default for table, key, default, _ in describe()}


def toml_keys(table: str, value: Any) -> set[tuple[str, str]]:
    """(table, key) of every key in a parsed table or array of tables, nested arrays as ``table.key``."""
    out: set[tuple[str, str]] = set()
    for entry in value if isinstance(value, list) else [value]:
        for key, v in entry.items():
            out.add((table, key))
            if isinstance(v, list) and v and isinstance(v[0], dict):
                out |= toml_keys(f"{table}.{key}", v)
    return out


def test_every_key_has_a_one_line_help() -> None:
    assert all(help_ and "\n" not in help_ for *_, help_ in describe())


def test_config_example_shows_exactly_the_declared_keys() -> None:
    """Commented-out keys count: the example documents every key, set or not."""
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    doc = tomllib.loads(re.sub(r"(?m)^#\s*(?=\w+\s*=)", "", text))
    example = set().union(*(toml_keys(table, value) for table, value in doc.items()))
    assert example - DECLARED.keys() == set(), "config.example.toml shows keys arbstr does not know"
    assert DECLARED.keys() - example == set(), "config.example.toml does not show these keys"


def test_readme_configuration_table_matches_the_declaration() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip().strip("`") for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| table |")]
    assert rows, "README's Configuration table was not found"
    words = {"True": "true", "False": "false", "None": "none", str(dataclasses.MISSING): "required"}
    for table, keys, default, *_ in rows:
        for key in keys.split(", "):
            assert (table, key) in DECLARED, f"README documents [{table}] {key}, which arbstr does not know"
            value = DECLARED[table, key]
            if default:
                assert default == words.get(str(value), str(value)), f"README's default of [{table}] {key}"
