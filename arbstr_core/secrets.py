"""Provider keys and the auth token: bearer money that must never be printed.

A key lives in a :class:`Secret`, whose every textual form is ``[REDACTED]``. Outside this class
the raw value is read only by :meth:`Secret.reveal`, called in exactly one place: where the upstream
Authorization header is built (``upstream.py``). Comparison and scrubbing are methods, so they never
hand the value out.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .errors import ConfigError

REDACTED = "[REDACTED]"
FRAGMENT = 12  # a run of a secret's first or last characters this long is redacted on its own

# Key sources as reported by startup logs, `arbstr check` and /providers.
SOURCE_LITERAL = "config-literal"
SOURCE_EXPANDED = "env-expanded"
SOURCE_NONE = "none"


def scrub_bytes(body: bytes, scrub: Callable[[str], str]) -> bytes:
    """``body`` unchanged, byte for byte (the same object), unless it contains a secret (a provider
    echoing its key); bytes that are not UTF-8 survive the round trip as they were."""
    text = body.decode("utf-8", "surrogateescape")
    clean = scrub(text)
    return body if clean == text else clean.encode("utf-8", "surrogateescape")


class Secret:
    """A string that refuses to be printed, logged, formatted or serialised."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def matches(self, candidate: str) -> bool:
        """Constant-time comparison, so response timing reveals nothing about the token."""
        return hmac.compare_digest(candidate.encode("utf-8"), self._value.encode("utf-8"))

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of this secret replaced by [REDACTED]; also any run of its
        first or last FRAGMENT+ characters, because providers quote keys truncated or masked
        (``bad key cashuAeyJ0b2tlbi...``, ``sk-...f00dcafe1234``). A fragment from the middle is not
        recognised; the masked form (first 6 characters) stays readable."""
        value = self._value
        if not value:
            return text
        if value in text:
            text = text.replace(value, REDACTED)
        if len(value) > FRAGMENT:
            if value[:FRAGMENT] in text:
                text = _redact_runs(text, value, from_start=True)
            if value[-FRAGMENT:] in text:
                text = _redact_runs(text, value, from_start=False)
        return text

    def __len__(self) -> int:
        return len(self._value)

    def masked(self) -> str:
        """`cashuAbcdef…` → `cashuA...***`; short keys reveal nothing."""
        return f"{self._value[:6]}...***" if len(self._value) >= 10 else REDACTED

    def __repr__(self) -> str:
        return REDACTED

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return REDACTED

    def __html__(self) -> str:
        """Flask's JSON provider (and Jinja) render objects through ``__html__``: the JSON form."""
        return REDACTED

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        """Immutable, so copies are itself; lets ``dataclasses.asdict`` walk a config holding keys."""
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple:
        raise TypeError("a Secret cannot be pickled")


def _redact_runs(text: str, value: str, from_start: bool) -> str:
    """Replace each run of ``value``'s first (or last) characters, FRAGMENT or more, by REDACTED."""
    anchor = value[:FRAGMENT] if from_start else value[-FRAGMENT:]
    i = text.find(anchor)
    while i >= 0:
        start, end = i, i + FRAGMENT
        if from_start:
            while end < len(text) and end - start < len(value) and text[end] == value[end - start]:
                end += 1
        else:
            while start > 0 and end - start < len(value) and text[start - 1] == value[-(end - start) - 1]:
                start -= 1
        text = text[:start] + REDACTED + text[end:]
        i = text.find(anchor, start + len(REDACTED))
    return text


_VAR = re.compile(r"\$\{([^{}]*)\}")


def expand(value: str, env: Mapping[str, str], where: str) -> tuple[str, bool]:
    """Expand ``${VAR}`` references once; return the value and whether anything was expanded.

    ``where`` names the key and the provider for error messages. No defaults, no nesting and no
    re-expansion: a value that came from the environment is used as it is.
    """
    out: list[str] = []
    pos = 0
    expanded = False
    for m in _VAR.finditer(value):
        if "${" in value[pos : m.start()]:
            # "${A${B}}": nesting is not supported; without this check it became "${A" + B + "}".
            raise ConfigError(f"{where}: '${{' without a closing '}}' (nested references are not supported)")
        name = m.group(1)
        if not name:
            raise ConfigError(f"{where}: empty variable reference '${{}}'; write ${{NAME}}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"{where}: '${{{name}}}' is not a valid variable name")
        if name not in env:
            raise ConfigError(f"{where}: environment variable {name} is not set; export it or remove the reference")
        out.append(value[pos : m.start()])
        out.append(env[name])
        pos = m.end()
        expanded = True
    rest = value[pos:]
    if "${" in rest:
        raise ConfigError(f"{where}: '${{' without a closing '}}'; write ${{NAME}}")
    out.append(rest)
    return "".join(out), expanded


def convention_var(provider_name: str) -> str:
    """`provider-beta` → `ARBSTR_PROVIDER_BETA_API_KEY`."""
    return "ARBSTR_" + re.sub(r"[- ]", "_", provider_name.upper()) + "_API_KEY"


@dataclass(frozen=True)
class ResolvedKey:
    secret: Secret | None
    source: str


def resolve_key(provider_name: str, configured: str | None, env: Mapping[str, str], where: str) -> ResolvedKey:
    """Apply SPEC §1.1's order: the file (with expansion), else the convention variable, else none."""
    if configured is not None:
        value, expanded = expand(configured, env, where)
        if value:
            return ResolvedKey(Secret(value), SOURCE_EXPANDED if expanded else SOURCE_LITERAL)
    var = convention_var(provider_name)
    if env.get(var):
        return ResolvedKey(Secret(env[var]), f"convention ({var})")
    return ResolvedKey(None, SOURCE_NONE)


class Scrubber:
    """Replaces every configured secret in a text. Used on anything that echoes upstream words."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        # Longest first, so a key that contains another key is never left half visible.
        self._secrets = sorted(secrets, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = secret.scrub(text)
        return text
