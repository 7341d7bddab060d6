"""Configuration: one frozen dataclass tree, loaded once from TOML and validated at startup.

Each table is declared once in ``_TABLES`` (key → type and default); that declaration drives the
defaults, the unknown-key check and the type checks, so a typo can never silently drop a limit.
Every error names the file, the key and the fix.
"""

from __future__ import annotations

import math
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .secrets import SOURCE_LITERAL, Secret, convention_var, expand, resolve_key

STRATEGIES = ("cheapest", "lowest_latency", "round_robin")
LOG_LEVELS = ("debug", "info", "warning", "error")

_NUM = (int, float)
_SECRET_KEYS = frozenset({"api_key", "auth_token"})
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", list: "an array", dict: "a table"}
# table → key → (accepted types, default). None as a default means "required" for providers.
_TABLES: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "server": {
        "listen": ((str,), "127.0.0.1:8080"),
        "auth_token": ((str,), None),
        "request_timeout_secs": (_NUM, 30),
        "connect_timeout_secs": (_NUM, 5),
        "stream_idle_timeout_secs": (_NUM, 120),
        "max_body_bytes": ((int,), 10 * 1024 * 1024),
        "rate_limit_rps": (_NUM, 0),
        "max_concurrent": ((int,), 0),
        "threads": ((int,), 256),
        "allow_unauthenticated": ((bool,), False),
    },
    "database": {
        "path": ((str,), "./arbstr.db"),
        "retention_days": (_NUM, 0),
        "queue_size": ((int,), 10000),
    },
    "retry": {
        "max_retries": ((int,), 2),
        "backoff_base_ms": (_NUM, 1000),
        "max_retry_after_secs": (_NUM, 10),
        "fallback": ((bool,), True),
    },
    "circuit_breaker": {
        "failure_threshold": ((int,), 3),
        "open_secs": (_NUM, 30),
    },
    "logging": {
        "level": ((str,), "info"),
        "log_requests": ((bool,), True),
    },
    "providers": {
        "name": ((str,), None),
        "url": ((str,), None),
        "api_key": ((str,), None),
        "models": ((list,), None),
        "input_rate": (_NUM, 0),
        "output_rate": (_NUM, 0),
        "base_fee": (_NUM, 0),
        "timeout_secs": (_NUM, None),
    },
    "policies": {
        "default_strategy": ((str,), "cheapest"),
        "rules": ((list,), []),
    },
    "policies.rules": {
        "name": ((str,), None),
        "allowed_models": ((list,), []),
        "strategy": ((str,), "cheapest"),
        "max_sats_per_1k_output": (_NUM, None),
        "keywords": ((list,), []),
    },
}


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    auth_token: Secret | None = None
    request_timeout_secs: float = 30
    connect_timeout_secs: float = 5
    stream_idle_timeout_secs: float = 120
    max_body_bytes: int = 10 * 1024 * 1024
    rate_limit_rps: float = 0
    max_concurrent: int = 0
    threads: int = 256
    allow_unauthenticated: bool = False


@dataclass(frozen=True)
class DatabaseConfig:
    path: str = "./arbstr.db"
    retention_days: float = 0
    queue_size: int = 10000


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = 2
    backoff_base_ms: float = 1000
    max_retry_after_secs: float = 10
    fallback: bool = True


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 3
    open_secs: float = 30


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    log_requests: bool = True


@dataclass(frozen=True)
class Provider:
    name: str
    url: str
    models: tuple[str, ...]
    input_rate: float = 0
    output_rate: float = 0
    base_fee: float = 0
    api_key: Secret | None = None
    key_source: str = "none"
    timeout_secs: float | None = None  # longest wait for an answer / first event; None = the deadline

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class PolicyRule:
    name: str
    allowed_models: tuple[str, ...] = ()
    strategy: str = "cheapest"
    max_sats_per_1k_output: float | None = None
    keywords: tuple[str, ...] = ()


@dataclass(frozen=True)
class PoliciesConfig:
    default_strategy: str = "cheapest"
    rules: tuple[PolicyRule, ...] = ()


@dataclass(frozen=True)
class Config:
    providers: tuple[Provider, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    path: str | None = None
    mock: bool = False
    # Startup warnings (literal keys, loose file permissions) for the log and `arbstr check`.
    warnings: tuple[str, ...] = ()

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)

    def rule(self, name: str) -> PolicyRule | None:
        return next((r for r in self.policies.rules if r.name == name), None)


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the config at ``path``; raise :class:`ConfigError` on any problem."""
    env = os.environ if env is None else env
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found; copy config.example.toml to {path} and edit it, "
            "or run with --mock (ARBSTR_MOCK=1 for gunicorn) to try arbstr on built-in mock providers"
        ) from None
    except PermissionError:
        raise ConfigError(f"{path}: config file is not readable by this user; check its owner and mode") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    warnings: list[str] = []
    mode = os.stat(path).st_mode
    if mode & 0o077:
        warnings.append(
            f"{path}: config file is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    cfg = from_mapping(raw, env, path, warnings)
    return cfg


def from_mapping(
    raw: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    path: str = "<config>",
    warnings: list[str] | None = None,
    mock: bool = False,
) -> Config:
    """Build a validated :class:`Config` from parsed TOML (also used for the built-in mock config)."""
    env = os.environ if env is None else env
    warnings = [] if warnings is None else warnings
    unknown = set(raw) - {"server", "database", "retry", "circuit_breaker", "logging", "providers", "policies"}
    if unknown:
        key = min(unknown)
        raise ConfigError(
            f"{path}: unknown table or key '{key}'; valid tables are server, database, retry, "
            "circuit_breaker, logging, providers, policies"
        )
    server = _table(raw, "server", path)
    token: Secret | None = None
    if server.get("auth_token") is not None:
        value, _ = expand(server.pop("auth_token"), env, f"{path}: [server] auth_token")
        token = Secret(value) if value else None
    else:
        server.pop("auth_token", None)
    server_cfg = ServerConfig(auth_token=token, **server)
    _check_listen(server_cfg.listen, path)
    for key in ("request_timeout_secs", "connect_timeout_secs", "stream_idle_timeout_secs", "max_body_bytes"):
        if getattr(server_cfg, key) <= 0:
            raise ConfigError(f"{path}: [server] {key} must be positive; remove it to use the default")
    for key in ("rate_limit_rps", "max_concurrent"):
        if getattr(server_cfg, key) < 0:
            raise ConfigError(f"{path}: [server] {key} must be 0 (unlimited) or positive")
    if server_cfg.threads < 1:
        raise ConfigError(
            f"{path}: [server] threads must be at least 1 (it is how many streams a worker serves at once); "
            "remove it to use the default 256"
        )

    database = DatabaseConfig(**_table(raw, "database", path))
    if database.retention_days < 0 or database.queue_size <= 0:
        raise ConfigError(f"{path}: [database] retention_days must be ≥ 0 and queue_size positive")
    retry = RetryConfig(**_table(raw, "retry", path))
    if retry.max_retries < 0 or retry.backoff_base_ms < 0 or retry.max_retry_after_secs < 0:
        raise ConfigError(f"{path}: [retry] max_retries, backoff_base_ms and max_retry_after_secs must be ≥ 0")
    breaker = BreakerConfig(**_table(raw, "circuit_breaker", path))
    if breaker.failure_threshold < 1 or breaker.open_secs <= 0:
        raise ConfigError(f"{path}: [circuit_breaker] failure_threshold must be ≥ 1 and open_secs positive")
    logging_cfg = LoggingConfig(**_table(raw, "logging", path))
    if logging_cfg.level not in LOG_LEVELS:
        raise ConfigError(f"{path}: [logging] level '{logging_cfg.level}' is not one of {', '.join(LOG_LEVELS)}")

    providers = _providers(raw.get("providers", []), env, path, warnings)
    if not providers and not mock:
        raise ConfigError(
            f"{path}: no [[providers]] configured; add at least one (see config.example.toml) or run with --mock"
        )
    policies = _policies(raw.get("policies", {}), path)
    return Config(
        providers=providers,
        server=server_cfg,
        database=database,
        retry=retry,
        circuit_breaker=breaker,
        logging=logging_cfg,
        policies=policies,
        path=path,
        mock=mock,
        warnings=tuple(warnings),
    )


def _table(raw: Mapping[str, Any], name: str, path: str, value: Any = None, label: str | None = None) -> dict:
    """Check one table against its declaration; return its values with defaults filled in."""
    label = label or f"[{name}]"
    value = raw.get(name, {}) if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {label} must be a table")
    spec = _TABLES[name]
    for key in value:
        if key not in spec:
            raise ConfigError(
                f"{path}: unknown key '{key}' in {label}; valid keys are {', '.join(spec)}"
            )
    out: dict[str, Any] = {}
    for key, (types, default) in spec.items():
        if key not in value:
            out[key] = default
            continue
        v = value[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            # A mistyped key or token is still a key: name its type, never echo its value.
            got = type(v).__name__ if key in _SECRET_KEYS else f"{type(v).__name__} {v!r}"
            raise ConfigError(f"{path}: {label} {key} must be {_type_name(types)}, got {got}")
        if isinstance(v, float) and not math.isfinite(v):
            # TOML has inf and nan; neither is a rate, a limit or a timeout anyone means.
            raise ConfigError(f"{path}: {label} {key} must be a finite number, got {v!r}")
        out[key] = v
    return out


def _type_name(types: tuple[type, ...]) -> str:
    """How an error names the expected type: ints are numbers too where floats are allowed."""
    if float in types:
        return "a number"
    return " or ".join(_TYPE_NAMES.get(t, f"a {t.__name__}") for t in types)


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), IPv6 brackets removed; ValueError naming the expected shape."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"'{listen}' must be HOST:PORT, for example 127.0.0.1:8080")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _check_listen(listen: str, path: str) -> None:
    try:
        split_listen(listen)
    except ValueError as e:
        raise ConfigError(f"{path}: [server] listen {e}") from None


def _providers(raw: Any, env: Mapping[str, str], path: str, warnings: list[str]) -> tuple[Provider, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: providers must be an array of tables, written [[providers]]")
    out: list[Provider] = []
    for i, entry in enumerate(raw):
        label = f"[[providers]] #{i + 1}"
        values = _table({}, "providers", path, value=entry, label=label)
        name = values["name"]
        if not name:
            raise ConfigError(f"{path}: {label} needs a name, for example name = \"provider-alpha\"")
        label = f"provider '{name}'"
        if any(p.name == name for p in out):
            raise ConfigError(f"{path}: {label} is defined twice; provider names must be unique")
        url = values["url"] or ""
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            raise ConfigError(f"{path}: {label} url '{url}' must be an http:// or https:// base URL")
        models = values["models"]
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{path}: {label} models must be a non-empty list of model ids")
        for key in ("input_rate", "output_rate", "base_fee"):
            if values[key] < 0:
                raise ConfigError(f"{path}: {label} {key} must be ≥ 0")
        if values["timeout_secs"] is not None and values["timeout_secs"] <= 0:
            raise ConfigError(
                f"{path}: {label} timeout_secs must be positive; remove it to wait up to the request's deadline"
            )
        key = resolve_key(name, values["api_key"], env, f"{path}: {label} api_key")
        if key.source == SOURCE_LITERAL:
            warnings.append(
                f"{path}: {label} has a literal api_key in the config file; prefer the environment "
                f"variable {convention_var(name)}"
            )
        out.append(
            Provider(
                name=name,
                url=url,
                models=tuple(models),
                input_rate=values["input_rate"],
                output_rate=values["output_rate"],
                base_fee=values["base_fee"],
                api_key=key.secret,
                key_source=key.source,
                timeout_secs=values["timeout_secs"],
            )
        )
    warnings.extend(_provider_warnings(out, path))
    return tuple(out)


def _provider_warnings(providers: list[Provider], path: str) -> list[str]:
    """Mistakes that still load: a url arbstr would extend twice, and one key at two providers."""
    out: list[str] = []
    for p in providers:
        base = p.url.rstrip("/")
        if base.endswith("/chat/completions"):
            out.append(
                f"{path}: provider '{p.name}' url '{p.url}' already ends in /chat/completions and arbstr appends "
                f"that itself (it would post to {p.endpoint}); set url = \"{base.removesuffix('/chat/completions')}\""
            )
    sharing: dict[Secret, list[str]] = {}
    for p in providers:
        if p.api_key is not None:
            sharing.setdefault(p.api_key, []).append(p.name)
    for names in sharing.values():
        if len(names) > 1:
            out.append(
                f"{path}: providers {', '.join(repr(n) for n in names)} use the same api_key; a Cashu token "
                "redeemed at one node is spent for the others, so give each provider its own key"
            )
    return out


def _policies(raw: Any, path: str) -> PoliciesConfig:
    values = _table({"policies": raw}, "policies", path)
    if values["default_strategy"] not in STRATEGIES:
        raise ConfigError(
            f"{path}: [policies] default_strategy '{values['default_strategy']}' is not one of {', '.join(STRATEGIES)}"
        )
    rules: list[PolicyRule] = []
    for i, entry in enumerate(values["rules"]):
        label = f"[[policies.rules]] #{i + 1}"
        r = _table({}, "policies.rules", path, value=entry, label=label)
        if not r["name"]:
            raise ConfigError(f"{path}: {label} needs a name")
        if any(x.name == r["name"] for x in rules):
            raise ConfigError(f"{path}: policy rule '{r['name']}' is defined twice; rule names must be unique")
        if r["strategy"] not in STRATEGIES:
            raise ConfigError(
                f"{path}: policy rule '{r['name']}' strategy '{r['strategy']}' is not one of {', '.join(STRATEGIES)}"
            )
        for key in ("allowed_models", "keywords"):
            if not all(isinstance(x, str) for x in r[key]):
                raise ConfigError(f"{path}: policy rule '{r['name']}' {key} must be a list of strings")
        limit = r["max_sats_per_1k_output"]
        if limit is not None and limit < 0:
            raise ConfigError(f"{path}: policy rule '{r['name']}' max_sats_per_1k_output must be ≥ 0")
        rules.append(
            PolicyRule(
                name=r["name"],
                allowed_models=tuple(r["allowed_models"]),
                strategy=r["strategy"],
                max_sats_per_1k_output=limit,
                keywords=tuple(r["keywords"]),
            )
        )
    return PoliciesConfig(default_strategy=values["default_strategy"], rules=tuple(rules))
