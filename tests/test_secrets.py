"""Secrets (SPEC §1.1): the Secret type, ${VAR} expansion, key sources and masking."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle

import pytest
from flask import Flask

from arbstr_core.config import Provider
from arbstr_core.errors import ConfigError
from arbstr_core.secrets import (
    REDACTED,
    SOURCE_EXPANDED,
    SOURCE_LITERAL,
    SOURCE_NONE,
    Scrubber,
    Secret,
    convention_var,
    expand,
    resolve_key,
)

KEY = "cashuAbcdefghijklmnopqrstuvwxyz0123456789"


# --- Secret ------------------------------------------------------------------------------------


def test_every_text_form_is_redacted() -> None:
    s = Secret(KEY)
    forms = [
        repr(s),
        str(s),
        f"{s}",
        f"{s!r}",
        f"{s!s}",
        f"{s:>60}",
        "%s" % s,  # noqa: UP031 - every formatting path is the point
        "%r" % s,  # noqa: UP031
        "{}".format(s),  # noqa: UP032
        format(s, ""),
        repr([s]),
        repr({"k": s}),
        str((s,)),
    ]
    for form in forms:
        assert KEY not in form
        assert REDACTED in form


def test_json_forms_never_reveal_the_key() -> None:
    s = Secret(KEY)
    # Flask's JSON provider (what every route uses) renders it as [REDACTED].
    app = Flask(__name__)
    assert json.loads(app.json.dumps({"api_key": s})) == {"api_key": REDACTED}
    # The stdlib encoder has no hook for it: it must refuse, not leak; with default=str it redacts.
    with pytest.raises(TypeError):
        json.dumps(s)
    assert json.dumps({"k": s}, default=str) == json.dumps({"k": REDACTED})


def test_a_provider_holding_a_key_serialises_with_the_key_redacted() -> None:
    provider = Provider("p", "http://x", ("m",), api_key=Secret(KEY), key_source=SOURCE_LITERAL)
    assert KEY not in repr(provider)
    app = Flask(__name__)
    out = app.json.dumps(dataclasses.asdict(provider))
    assert KEY not in out
    assert json.loads(out)["api_key"] == REDACTED


def test_logging_a_secret_prints_redacted(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="arbstr.test"):
        logging.getLogger("arbstr.test").info("key=%s repr=%r", Secret(KEY), Secret(KEY))
    assert KEY not in caplog.text
    assert caplog.text.count(REDACTED) == 2


def test_secret_cannot_be_pickled() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret(KEY))


def test_copies_are_the_same_immutable_secret() -> None:
    s = Secret(KEY)
    assert copy.copy(s) is s
    assert copy.deepcopy(s) is s


def test_reveal_returns_the_raw_value() -> None:
    assert Secret(KEY).reveal() == KEY


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [(KEY, True), (KEY[:-1], False), (KEY + "x", False), ("", False), (KEY.upper(), False)],
)
def test_matches_compares_exactly(candidate: str, expected: bool) -> None:
    assert Secret(KEY).matches(candidate) is expected


def test_matches_handles_non_ascii() -> None:
    assert Secret("pässwörd-ü").matches("pässwörd-ü")
    assert not Secret("pässwörd-ü").matches("passwort-u")


def test_equality_and_hash_follow_the_value() -> None:
    assert Secret("a" * 12) == Secret("a" * 12)
    assert Secret("a" * 12) != Secret("b" * 12)
    assert Secret("a" * 12) != "a" * 12
    assert len({Secret("a" * 12), Secret("a" * 12)}) == 1


def test_scrub_replaces_every_occurrence() -> None:
    s = Secret(KEY)
    text = f"upstream said: bad key {KEY}; again {KEY}."
    assert s.scrub(text) == f"upstream said: bad key {REDACTED}; again {REDACTED}."
    assert s.scrub("nothing here") == "nothing here"


def test_scrub_with_an_empty_secret_is_a_no_op() -> None:
    assert Secret("").scrub("some text") == "some text"


@pytest.mark.parametrize(
    "key",
    ["cashuAbcdefghijklmno", "0123456789", "sk-proj-abcdefghijklmnop", "x" * 200],
)
def test_masked_long_keys_show_six_characters(key: str) -> None:
    assert len(key) >= 10
    assert Secret(key).masked() == key[:6] + "...***"


@pytest.mark.parametrize("key", ["", "a", "short", "123456789"])
def test_masked_short_keys_reveal_nothing(key: str) -> None:
    assert len(key) < 10
    assert Secret(key).masked() == REDACTED


def test_masked_spec_example() -> None:
    assert Secret("cashuAbcdef" + "0" * 30).masked() == "cashuA...***"


# --- ${VAR} expansion --------------------------------------------------------------------------


def test_expand_without_references_is_literal() -> None:
    assert expand("plain-key-value", {}, "w") == ("plain-key-value", False)


def test_expand_whole_value() -> None:
    assert expand("${ALPHA_KEY}", {"ALPHA_KEY": KEY}, "w") == (KEY, True)


def test_expand_several_references_and_text() -> None:
    env = {"A": "one", "B_2": "two"}
    assert expand("x-${A}-${B_2}-y", env, "w") == ("x-one-two-y", True)


def test_expand_does_not_re_expand_values_from_the_environment() -> None:
    env = {"A": "${B}", "B": "secret"}
    assert expand("${A}", env, "w") == ("${B}", True)


def test_expand_unset_variable_names_variable_and_place() -> None:
    where = "/etc/arbstr/config.toml: provider 'provider-alpha' api_key"
    with pytest.raises(ConfigError) as e:
        expand("${ALPHA_KEY}", {}, where)
    assert "ALPHA_KEY" in str(e.value)
    assert "provider-alpha" in str(e.value)
    assert "/etc/arbstr/config.toml" in str(e.value)


def test_expand_set_but_empty_variable_is_not_an_error() -> None:
    assert expand("${EMPTY}", {"EMPTY": ""}, "w") == ("", True)


@pytest.mark.parametrize(
    "value",
    [
        "${}",
        "${ALPHA",
        "prefix${",
        "${A}${",
        "${A:-default}",  # no defaults syntax
        "${A-B}",
        "${1A}",
        "${A B}",
        "${A${B}}",  # no nesting
    ],
)
def test_expand_rejects_malformed_references(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        expand(value, {"A": "a", "B": "b", "ALPHA": "x"}, "cfg: provider 'p' api_key")
    assert "cfg: provider 'p' api_key" in str(e.value)


def test_expand_errors_never_echo_environment_values() -> None:
    with pytest.raises(ConfigError) as e:
        expand("${A}${", {"A": KEY}, "w")
    assert KEY not in str(e.value)


def test_lone_dollar_and_braces_are_literal() -> None:
    assert expand("a$b}c{d", {}, "w") == ("a$b}c{d", False)


# --- convention variable and key resolution ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "var"),
    [
        ("provider-beta", "ARBSTR_PROVIDER_BETA_API_KEY"),
        ("alpha", "ARBSTR_ALPHA_API_KEY"),
        ("My Provider", "ARBSTR_MY_PROVIDER_API_KEY"),
        ("routstr-node-2", "ARBSTR_ROUTSTR_NODE_2_API_KEY"),
        ("a b-c", "ARBSTR_A_B_C_API_KEY"),
    ],
)
def test_convention_var(name: str, var: str) -> None:
    assert convention_var(name) == var


def test_resolve_literal_key() -> None:
    key = resolve_key("provider-alpha", KEY, {}, "w")
    assert key.source == SOURCE_LITERAL == "config-literal"
    assert key.secret is not None and key.secret.reveal() == KEY


def test_resolve_expanded_key() -> None:
    key = resolve_key("provider-alpha", "${ALPHA_KEY}", {"ALPHA_KEY": KEY}, "w")
    assert key.source == SOURCE_EXPANDED == "env-expanded"
    assert key.secret is not None and key.secret.reveal() == KEY


def test_resolve_convention_key() -> None:
    env = {"ARBSTR_PROVIDER_BETA_API_KEY": KEY}
    key = resolve_key("provider-beta", None, env, "w")
    assert key.source == "convention (ARBSTR_PROVIDER_BETA_API_KEY)"
    assert key.secret is not None and key.secret.reveal() == KEY


def test_resolve_file_key_wins_over_convention() -> None:
    env = {"ARBSTR_PROVIDER_BETA_API_KEY": "from-convention-var", "B": "from-expansion"}
    assert resolve_key("provider-beta", "${B}", env, "w").secret == Secret("from-expansion")
    assert resolve_key("provider-beta", "literal-key-1", env, "w").secret == Secret("literal-key-1")


def test_resolve_no_key() -> None:
    key = resolve_key("provider-gamma", None, {}, "w")
    assert key.secret is None
    assert key.source == SOURCE_NONE == "none"


def test_resolve_empty_convention_variable_is_no_key() -> None:
    key = resolve_key("provider-gamma", None, {"ARBSTR_PROVIDER_GAMMA_API_KEY": ""}, "w")
    assert (key.secret, key.source) == (None, SOURCE_NONE)


def test_resolve_empty_file_value_falls_back_to_convention() -> None:
    env = {"ARBSTR_P_API_KEY": "conv-key-value", "EMPTY": ""}
    assert resolve_key("p", "", env, "w").source == "convention (ARBSTR_P_API_KEY)"
    assert resolve_key("p", "${EMPTY}", env, "w").source == "convention (ARBSTR_P_API_KEY)"


def test_resolve_unset_reference_is_an_error_even_with_a_convention_variable() -> None:
    env = {"ARBSTR_P_API_KEY": "conv-key-value"}
    with pytest.raises(ConfigError, match="MISSING"):
        resolve_key("p", "${MISSING}", env, "cfg: provider 'p' api_key")


# --- Scrubber ---------------------------------------------------------------------------------


def test_scrubber_replaces_every_configured_secret() -> None:
    keys = ["cashuAalpha0123456789", "sk-beta-abcdefghijkl", "auth-token-xyz"]
    scrub = Scrubber(Secret(k) for k in keys)
    text = f"invalid key {keys[0]} (also tried {keys[1]}); token {keys[2]} and {keys[0]} again"
    out = scrub(text)
    assert all(k not in out for k in keys)
    assert out == f"invalid key {REDACTED} (also tried {REDACTED}); token {REDACTED} and {REDACTED} again"


def test_scrubber_without_secrets_is_identity() -> None:
    assert Scrubber([])("nothing to hide") == "nothing to hide"


def test_scrubber_leaves_unrelated_text_alone() -> None:
    assert Scrubber([Secret("cashuAalpha0123456789")])("model not found") == "model not found"


def test_scrubber_handles_a_key_containing_another() -> None:
    long_key, short_key = "prefix-0123456789-suffix", "0123456789"
    for order in ([long_key, short_key], [short_key, long_key]):
        out = Scrubber(Secret(k) for k in order)(f"a {long_key} b {short_key}")
        assert long_key not in out and short_key not in out
