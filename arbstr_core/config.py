"""Configuration: one frozen dataclass tree, loaded once from TOML and validated at startup.

Each key is declared once, as a dataclass field made by :func:`_key`: its default, a one-line help and
the check its value must pass; its TOML type follows from the annotation. The loader walks those fields
for the unknown-key, type and range checks, and :func:`describe` lists them for the docs, so a typo
can never silently drop a limit and the docs cannot drift. Every error names the file, the key and the fix.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .secrets import SOURCE_LITERAL, SOURCE_NONE, Secret, convention_var, expand, resolve_key

STRATEGIES = ("cheapest", "lowest_latency", "round_robin", "fastest_first_token", "performance")
CAPTURE_MODES = ("all", "header")
LOG_LEVELS = ("debug", "info", "warning", "error")

# A check takes a well-typed value and says what is wrong with it ("must be positive"), or None.
Check = Callable[[Any], str | None]


def _key(default: Any = MISSING, help: str = "", check: Check | None = None) -> Any:
    """Declare a config key; a field without help (``key_source``) is derived, never read from TOML."""
    return field(default=default, metadata={"help": help, "check": check})


def _bound(low: float, phrase: str, strict: bool = False) -> Check:
    return lambda v: None if (v > low if strict else v >= low) else f"must be {phrase}"


def _one_of(choices: tuple[str, ...]) -> Check:
    return lambda v: None if v in choices else f"'{v}' is not one of {', '.join(choices)}"


def _strings(phrase: str, non_empty: bool = False) -> Check:
    def check(v: tuple[Any, ...] | None) -> str | None:
        ok = v is not None and (v or not non_empty) and all(isinstance(x, str) and (x or not non_empty) for x in v)
        return None if ok else phrase
    return check


def _listen(value: str) -> str | None:
    try:
        split_listen(value)
    except ValueError as e:
        return str(e)
    return None


def _base_url(url: str | None) -> str | None:
    parts = urlsplit(url or "")
    ok = parts.scheme in ("http", "https") and parts.netloc
    return None if ok else f"'{url or ''}' must be an http:// or https:// base URL"


POSITIVE = _bound(0, "positive", strict=True)
AT_LEAST_0 = _bound(0, "≥ 0")
UNLIMITED_OR_POSITIVE = _bound(0, "0 (unlimited) or positive")


def _share(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


@dataclass(frozen=True)
class ServerConfig:
    listen: str = _key("127.0.0.1:8080", "HOST:PORT to bind; `arbstr serve -l` overrides", _listen)
    auth_token: Secret | None = _key(None, "when set, every route but /health needs it")  # noqa: RUF009 (a Field)
    request_timeout_secs: float = _key(30, "deadline of a whole non-streaming request, retries included", POSITIVE)
    connect_timeout_secs: float = _key(5, "per upstream attempt", POSITIVE)
    stream_idle_timeout_secs: float = _key(120, "longest silence tolerated inside a stream", POSITIVE)
    max_body_bytes: int = _key(10 * 1024 * 1024, "larger request bodies get 413", POSITIVE)
    rate_limit_rps: float = _key(0, "0 = unlimited; else a token bucket, excess gets 429", UNLIMITED_OR_POSITIVE)
    max_concurrent: int = _key(0, "0 = unlimited in-flight chat requests; excess gets 503", UNLIMITED_OR_POSITIVE)
    threads: int = _key(256, "gunicorn threads per worker = streams served at once",
                        _bound(1, "at least 1 (it is how many streams a worker serves at once)"))
    allow_unauthenticated: bool = _key(False, "true lets a non-loopback listen address serve without auth_token")


@dataclass(frozen=True)
class DatabaseConfig:
    path: str = _key("./arbstr.db", "SQLite file, created with its directory if missing")
    retention_days: float = _key(0, "0 = keep forever; else older rows are deleted daily", AT_LEAST_0)
    queue_size: int = _key(10000, "log queue bound; beyond it rows are dropped and counted", POSITIVE)


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = _key(2, "extra attempts on the first provider", AT_LEAST_0)
    backoff_base_ms: float = _key(1000, "first backoff, doubling, each ±25 % jitter", AT_LEAST_0)
    max_retry_after_secs: float = _key(10, "an upstream Retry-After above this is not waited for", AT_LEAST_0)
    fallback: bool = _key(True, "then try the next candidates, one attempt each")


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = _key(3, "consecutive failures that open a circuit", _bound(1, "≥ 1"))
    open_secs: float = _key(30, "then one probe request is let through", POSITIVE)


@dataclass(frozen=True)
class MarketConfig:
    refresh_secs: float = _key(300, "how often discovered prices and balances are refreshed", POSITIVE)
    min_balance_sats: float = _key(0, "a provider whose known balance is below this is skipped", AT_LEAST_0)


@dataclass(frozen=True)
class DebugConfig:
    enabled: bool = _key(False, "true: captured requests store the prompt, the upstream request and its answer")
    capture: str = _key("all", "all = every request; header = only requests sending X-Arbstr-Debug: true",
                        _one_of(CAPTURE_MODES))
    retention_days: float = _key(7, "captures older than this are deleted daily", POSITIVE)
    max_bytes: int = _key(65536, "per part of a capture; longer parts are cut and marked truncated", POSITIVE)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _key("info", "debug | info | warning | error, to stderr", _one_of(LOG_LEVELS))
    log_requests: bool = _key(True, "false = no request rows are written")


@dataclass(frozen=True)
class Provider:
    name: str = _key(help="unique; used in headers, logs and breaker state")
    url: str = _key(help="base URL; arbstr posts to url + /chat/completions", check=_base_url)
    models: tuple[str, ...] = _key((), "the exact model ids it serves (optional with discover = true)",
                                   _strings("must be a non-empty list of model ids", non_empty=True))
    input_rate: float = _key(0, "sats per 1,000 input tokens", AT_LEAST_0)
    output_rate: float = _key(0, "sats per 1,000 output tokens", AT_LEAST_0)
    base_fee: float = _key(0, "sats per request", AT_LEAST_0)
    cached_input_rate: float | None = _key(None, "sats per 1,000 cached input tokens; absent: input_rate",
                                           AT_LEAST_0)
    api_key: Secret | None = _key(None, "absent: ARBSTR_<NAME>_API_KEY, else none")  # noqa: RUF009 (a Field)
    key_source: str = SOURCE_NONE
    timeout_secs: float | None = _key(
        None, "longest wait for the answer or a stream's first event; absent: the request's deadline",
        _bound(0, "positive; remove it to wait up to the request's deadline", strict=True))
    discover: bool = _key(False, "true: models and rates come from {url}/models (a Routstr node), refreshed")
    max_output_tokens: int | None = _key(None, "max_tokens / max_completion_tokens above this are lowered",
                                         _bound(0, "positive", strict=True))

    @property
    def cached_rate(self) -> float:
        """What a cached input token costs (SPEC §2.3): ``cached_input_rate``, else ``input_rate``."""
        return self.input_rate if self.cached_input_rate is None else self.cached_input_rate

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/chat/completions"


@dataclass(frozen=True)
class PolicyRule:
    name: str = _key(help="chosen by header X-Arbstr-Policy, or by a keyword in the last user message")
    allowed_models: tuple[str, ...] = _key((), "empty = any model", _strings("must be a list of strings"))
    strategy: str = _key("cheapest", " | ".join(STRATEGIES), _one_of(STRATEGIES))
    max_sats_per_1k_output: float | None = _key(None, "providers charging more per 1k output are excluded",
                                                AT_LEAST_0)
    keywords: tuple[str, ...] = _key((), "case-insensitive words that select this rule",
                                     _strings("must be a list of strings"))


@dataclass(frozen=True)
class PoliciesConfig:
    default_strategy: str = _key("cheapest", " | ".join(STRATEGIES), _one_of(STRATEGIES))
    window_minutes: float = _key(15, "how far back the per-provider measurements that order providers reach",
                                 POSITIVE)
    explore_share: float = _key(0.05, "share of requests that first try the least recently measured provider "
                                "(fastest_first_token, performance)", _share)
    rules: tuple[PolicyRule, ...] = _key((), "written [[policies.rules]]; first keyword match wins")


@dataclass(frozen=True)
class Config:
    providers: tuple[Provider, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    circuit_breaker: BreakerConfig = field(default_factory=BreakerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    market: MarketConfig = field(default_factory=MarketConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    aliases: tuple[tuple[str, str], ...] = ()  # [aliases]: client name or glob → the model id to route
    path: str | None = None
    mock: bool = False
    # Startup warnings (literal keys, loose file permissions) for the log and `arbstr check`.
    warnings: tuple[str, ...] = ()


# TOML table → the dataclass that declares its keys, in the order errors list them.
_TABLES: dict[str, type] = {
    "server": ServerConfig, "database": DatabaseConfig, "retry": RetryConfig, "circuit_breaker": BreakerConfig,
    "logging": LoggingConfig, "market": MarketConfig, "providers": Provider, "policies": PoliciesConfig, "policies.rules": PolicyRule,
    "debug": DebugConfig,
}
# A field's annotation (without "| None") → the TOML types it accepts; any tuple[...] is an array.
_TOML_TYPES = {"str": (str,), "Secret": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false", list: "an array", dict: "a table"}


def describe() -> Iterator[tuple[str, str, Any, str]]:
    """Every key as (table, key, default, help); ``dataclasses.MISSING`` marks a required key."""
    for table, cls in _TABLES.items():
        for f in _keys(cls).values():
            yield table, f.name, f.default, f.metadata["help"]


def load(path: str, env: Mapping[str, str] | None = None) -> Config:
    """Read, validate and freeze the config at ``path``; raise :class:`ConfigError` on any problem."""
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
    return from_mapping(raw, env, path, warnings)


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
    tables = [t for t in _TABLES if "." not in t] + ["aliases"]
    unknown = set(raw) - set(tables)
    if unknown:
        raise ConfigError(f"{path}: unknown table or key '{min(unknown)}'; valid tables are {', '.join(tables)}")
    server = _table(ServerConfig, raw.get("server", {}), path, "[server]")
    if server["auth_token"] is not None:
        value, _ = expand(server["auth_token"], env, f"{path}: [server] auth_token")
        server["auth_token"] = Secret(value) if value else None
    simple = {name: _TABLES[name](**_table(_TABLES[name], raw.get(name, {}), path, f"[{name}]"))
              for name in ("database", "retry", "circuit_breaker", "logging", "market", "debug")}
    providers = _providers(raw.get("providers", []), env, path, warnings)
    if not providers and not mock:
        raise ConfigError(
            f"{path}: no [[providers]] configured; add at least one (see config.example.toml) or run with --mock"
        )
    return Config(providers=providers, server=ServerConfig(**server), policies=_policies(raw.get("policies", {}), path),
                  aliases=_aliases(raw.get("aliases", {}), path), path=path, mock=mock, warnings=tuple(warnings),
                  **simple)


def _keys(cls: type) -> dict[str, Field]:
    """A table's keys: the fields declared with :func:`_key`, in declaration order."""
    return {f.name: f for f in fields(cls) if f.metadata.get("help")}


def _read(cls: type, value: Any, path: str, label: str) -> dict[str, Any]:
    """Check a table's keys and types against ``cls``; fill in defaults (None for a missing required key)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {label} must be a table")
    keys = _keys(cls)
    for key in value:
        if key not in keys:
            raise ConfigError(f"{path}: unknown key '{key}' in {label}; valid keys are {', '.join(keys)}")
    out: dict[str, Any] = {}
    for key, f in keys.items():
        if key not in value:
            out[key] = None if f.default is MISSING else f.default
            continue
        v, ann = value[key], str(f.type).removesuffix(" | None")
        types = (list,) if ann.startswith("tuple[") else _TOML_TYPES[ann]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            # A mistyped key or token is still a key: name its type, never echo its value.
            got = type(v).__name__ if ann == "Secret" else f"{type(v).__name__} {v!r}"
            raise ConfigError(f"{path}: {label} {key} must be {_type_name(types)}, got {got}")
        if isinstance(v, float) and not math.isfinite(v):
            # TOML has inf and nan; neither is a rate, a limit or a timeout anyone means.
            raise ConfigError(f"{path}: {label} {key} must be a finite number, got {v!r}")
        out[key] = tuple(v) if isinstance(v, list) else v
    return out


def _checked(cls: type, values: dict[str, Any], path: str, label: str) -> dict[str, Any]:
    """Run each key's check; an optional key left unset (None) is not checked, a required one is."""
    for key, f in _keys(cls).items():
        check, v = f.metadata["check"], values[key]
        if check and (v is not None or f.default is MISSING) and (problem := check(v)):
            fix = "" if f.default in (MISSING, None) else f"; remove it to use the default {json.dumps(f.default)}"
            raise ConfigError(f"{path}: {label} {key} {problem}{fix}")
    return values


def _table(cls: type, value: Any, path: str, label: str) -> dict[str, Any]:
    return _checked(cls, _read(cls, value, path, label), path, label)


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


def _providers(raw: Any, env: Mapping[str, str], path: str, warnings: list[str]) -> tuple[Provider, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: providers must be an array of tables, written [[providers]]")
    out: list[Provider] = []
    for i, entry in enumerate(raw):
        values = _read(Provider, entry, path, f"[[providers]] #{i + 1}")
        name = values["name"]
        if not name:
            raise ConfigError(f"{path}: [[providers]] #{i + 1} needs a name, for example name = \"provider-alpha\"")
        label = f"provider '{name}'"
        if any(p.name == name for p in out):
            raise ConfigError(f"{path}: {label} is defined twice; provider names must be unique")
        if not values["models"]:
            if not values["discover"]:
                raise ConfigError(f"{path}: {label} models must be a non-empty list of model ids "
                                  "(or set discover = true to read them from the provider)")
            values["models"] = None  # the node's /models will say; until then it serves nothing
        _checked(Provider, values, path, label)
        values["models"] = values["models"] or ()
        key = resolve_key(name, values["api_key"], env, f"{path}: {label} api_key")
        if key.source == SOURCE_LITERAL:
            warnings.append(
                f"{path}: {label} has a literal api_key in the config file; prefer the environment "
                f"variable {convention_var(name)}"
            )
        out.append(Provider(**values | {"api_key": key.secret, "key_source": key.source}))
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


def _aliases(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    """``[aliases]``: names clients send (exact, or glob patterns such as ``"claude-*"``) → a model id."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [aliases] must be a table of \"name\" = \"model id\"")
    for name, target in raw.items():
        if not isinstance(target, str) or not target or not name:
            raise ConfigError(f"{path}: [aliases] \"{name}\" must name a model id, for example \"{name}\" = \"gpt-4o\"")
    return tuple(raw.items())


def _policies(raw: Any, path: str) -> PoliciesConfig:
    values = _table(PoliciesConfig, raw, path, "[policies]")
    rules: list[PolicyRule] = []
    for i, entry in enumerate(values["rules"]):
        r = _read(PolicyRule, entry, path, f"[[policies.rules]] #{i + 1}")
        if not r["name"]:
            raise ConfigError(f"{path}: [[policies.rules]] #{i + 1} needs a name")
        if any(x.name == r["name"] for x in rules):
            raise ConfigError(f"{path}: policy rule '{r['name']}' is defined twice; rule names must be unique")
        rules.append(PolicyRule(**_checked(PolicyRule, r, path, f"policy rule '{r['name']}'")))
    return PoliciesConfig(**{**values, "rules": tuple(rules)})
