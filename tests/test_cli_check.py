"""`arbstr check` and `arbstr providers` (SPEC §1, §1.1, §8) on config files in tmp_path.

Whatever the outcome, no key value may appear in anything the CLI prints.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from arbstr_core.app.cli import main

ALPHA_KEY = "cashuAalphaSECRETalpha0123456789"
BETA_KEY = "sk-beta-SECRET-0123456789abcdef"
GAMMA_KEY = "gammaSECRET-9876543210"
SHORT_KEY = "tiny-key"  # < 10 characters: masked as [REDACTED]
TOKEN = "auth-token-SECRET-0123456789"
ALL_SECRETS = (ALPHA_KEY, BETA_KEY, GAMMA_KEY, SHORT_KEY, TOKEN)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient ARBSTR_* variable (mock mode, config path, convention keys) may leak into a test."""
    for name in list(os.environ):
        if name.startswith("ARBSTR_") or name in ("ALPHA_KEY", "BETA_KEY", "GAMMA_KEY"):
            monkeypatch.delenv(name)


def provider_toml(name: str, key_line: str = "", models: str = '["gpt-4o"]', output_rate: float = 30) -> str:
    return (
        f'[[providers]]\nname = "{name}"\nurl = "https://{name}.example/v1"\nmodels = {models}\n'
        f"input_rate = 10\noutput_rate = {output_rate}\nbase_fee = 1\n{key_line}\n"
    )


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    for secret in ALL_SECRETS:
        assert secret not in out and secret not in err, "a key value reached the CLI output"
    return code, out, err


def source_line(out: str, provider: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(f"{provider}:"))


# --- check ----------------------------------------------------------------------------------------


def test_check_reports_listen_counts_and_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (
        '[server]\nlisten = "127.0.0.1:9090"\n'
        + provider_toml("provider-alpha")
        + provider_toml("provider-beta")
        + '[[policies.rules]]\nname = "code"\nkeywords = ["code"]\n'
        + '[[policies.rules]]\nname = "cheap"\nmax_sats_per_1k_output = 40\n'
    )
    path = write(tmp_path, text)
    code, out, err = run(capsys, "check", "-c", str(path))
    assert code == 0
    assert "127.0.0.1:9090" in out
    assert str(path) in out
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert lines["providers"] == "2"
    assert lines["policy rules"] == "2"
    assert "warning" not in out.lower()
    assert err == ""


def test_check_literal_key_warns_and_recommends_the_convention_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, provider_toml("provider-alpha", f'api_key = "{ALPHA_KEY}"'))
    code, out, _ = run(capsys, "check", "-c", str(path))
    assert code == 0
    assert "config-literal" in source_line(out, "provider-alpha")
    warnings = [line for line in out.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1
    assert "ARBSTR_PROVIDER_ALPHA_API_KEY" in warnings[0]
    assert "provider-alpha" in warnings[0]


def test_check_env_expanded_convention_and_none_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BETA_KEY", BETA_KEY)
    monkeypatch.setenv("ARBSTR_PROVIDER_GAMMA_API_KEY", GAMMA_KEY)
    text = (
        provider_toml("provider-beta", 'api_key = "${BETA_KEY}"')
        + provider_toml("provider-gamma")
        + provider_toml("provider-delta")
    )
    code, out, _ = run(capsys, "check", "-c", str(write(tmp_path, text)))
    assert code == 0
    assert "env-expanded" in source_line(out, "provider-beta")
    assert "convention (ARBSTR_PROVIDER_GAMMA_API_KEY)" in source_line(out, "provider-gamma")
    assert source_line(out, "provider-delta").endswith("none")
    assert "warning" not in out.lower()


def test_check_unset_variable_fails_naming_variable_and_provider(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, provider_toml("provider-alpha") + provider_toml("provider-beta", 'api_key = "${BETA_KEY}"'))
    code, out, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert "BETA_KEY" in err and "provider-beta" in err
    assert str(path) in err
    assert "config OK" not in out


def test_check_unset_auth_token_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[server]\nauth_token = "${ARBSTR_AUTH_TOKEN}"\n' + provider_toml("provider-alpha"))
    code, _, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert "ARBSTR_AUTH_TOKEN" in err and "auth_token" in err


def test_check_auth_token_is_reported_but_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARBSTR_AUTH_TOKEN", TOKEN)
    path = write(tmp_path, '[server]\nauth_token = "${ARBSTR_AUTH_TOKEN}"\n' + provider_toml("provider-alpha"))
    code, out, _ = run(capsys, "check", "-c", str(path))
    assert code == 0
    assert "auth token" in out and "set" in out


@pytest.mark.parametrize(
    ("text", "key", "table"),
    [
        ('[retry]\nmax_retrys = 5\n', "max_retrys", "[retry]"),
        ('[server]\nrequest_timeout = 5\n', "request_timeout", "[server]"),
        ('[circuit_breaker]\nfailure_treshold = 5\n', "failure_treshold", "[circuit_breaker]"),
    ],
)
def test_check_typo_fails_naming_key_and_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, table: str
) -> None:
    path = write(tmp_path, text + provider_toml("provider-alpha", f'api_key = "{ALPHA_KEY}"'))
    code, out, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert f"'{key}'" in err and table in err and str(path) in err
    assert "config OK" not in out


def test_check_typo_in_a_provider(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, provider_toml("provider-alpha", f'api_key = "{ALPHA_KEY}"\noutput_rat = 5'))
    code, _, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert "'output_rat'" in err and "[[providers]] #1" in err


def test_check_mistyped_key_value_is_not_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    numeric_key = "98765432109876543"
    path = write(tmp_path, provider_toml("provider-alpha", f"api_key = {numeric_key}"))
    code, out, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert "api_key" in err
    assert numeric_key not in err and numeric_key not in out


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_check_warns_about_loose_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int) -> None:
    path = write(tmp_path, provider_toml("provider-alpha"), mode)
    code, out, _ = run(capsys, "check", "-c", str(path))
    assert code == 0
    assert f"chmod 600 {path}" in out


def test_check_private_file_has_no_permission_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "-c", str(write(tmp_path, provider_toml("provider-alpha"), 0o600)))
    assert code == 0
    assert "chmod" not in out


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    code, _, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert str(path) in err
    assert "config.example.toml" in err and "--mock" in err


def test_check_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, f'[[providers]]\nname = "a"\napi_key = "{ALPHA_KEY}\n')
    code, _, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert str(path) in err


def test_check_reads_arbstr_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, provider_toml("provider-from-env"))
    monkeypatch.setenv("ARBSTR_CONFIG", str(path))
    code, out, _ = run(capsys, "check")
    assert code == 0
    assert str(path) in out and "provider-from-env" in out


def test_check_mock_needs_no_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--mock", "-c", str(tmp_path / "absent.toml"))
    assert code == 0
    providers = next(line for line in out.splitlines() if line.startswith("providers:"))
    assert int(providers.split(":")[1]) >= 3


def test_check_never_prints_any_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BETA_KEY", BETA_KEY)
    monkeypatch.setenv("ARBSTR_PROVIDER_GAMMA_API_KEY", GAMMA_KEY)
    monkeypatch.setenv("ARBSTR_AUTH_TOKEN", TOKEN)
    text = (
        '[server]\nauth_token = "${ARBSTR_AUTH_TOKEN}"\n'
        + provider_toml("provider-alpha", f'api_key = "{ALPHA_KEY}"')
        + provider_toml("provider-beta", 'api_key = "${BETA_KEY}"')
        + provider_toml("provider-gamma")
        + provider_toml("provider-short", f'api_key = "{SHORT_KEY}"')
    )
    code, out, _ = run(capsys, "check", "-c", str(write(tmp_path, text, 0o644)))  # run() asserts no key leaks
    assert code == 0
    assert out.count("warning") == 3  # two literal keys and the file mode


@pytest.mark.parametrize("listen", ["0.0.0.0:9090", "[::]:9090", "192.0.2.7:9090"])
def test_check_refuses_a_network_listen_without_auth_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str
) -> None:
    path = write(tmp_path, f'[server]\nlisten = "{listen}"\n' + provider_toml("provider-alpha"))
    code, out, err = run(capsys, "check", "-c", str(path))
    assert code == 1
    assert "config OK" not in out
    assert str(path) in err and listen in err
    assert "[server] auth_token" in err and "allow_unauthenticated = true" in err, "names both fixes"
    assert len(err.strip().splitlines()) == 1


def test_check_warns_when_allow_unauthenticated_lets_it_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = '[server]\nlisten = "0.0.0.0:9090"\nallow_unauthenticated = true\n' + provider_toml("provider-alpha")
    code, out, err = run(capsys, "check", "-c", str(write(tmp_path, text)))
    assert code == 0 and err == ""
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "0.0.0.0:9090" in warning and "auth_token" in warning and "allow_unauthenticated" in warning
    assert "config OK" in out


def test_check_network_listen_with_auth_token_is_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARBSTR_AUTH_TOKEN", TOKEN)
    text = '[server]\nlisten = "0.0.0.0:9090"\nauth_token = "${ARBSTR_AUTH_TOKEN}"\n' + provider_toml("provider-alpha")
    code, out, _ = run(capsys, "check", "-c", str(write(tmp_path, text)))
    assert code == 0 and "warning" not in out and "config OK" in out


@pytest.mark.parametrize("listen", ["127.0.0.1:9090", "127.3.2.1:9090", "[::1]:9090", "localhost:9090"])
def test_check_loopback_listen_needs_no_token(tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str) -> None:
    path = write(tmp_path, f'[server]\nlisten = "{listen}"\n' + provider_toml("provider-alpha"))
    code, out, _ = run(capsys, "check", "-c", str(path))
    assert code == 0 and "warning" not in out


def test_check_warns_about_a_url_ending_in_chat_completions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = provider_toml("provider-alpha").replace(
        "https://provider-alpha.example/v1", "https://provider-alpha.example/v1/chat/completions")
    code, out, _ = run(capsys, "check", "-c", str(write(tmp_path, text)))
    assert code == 0
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "provider-alpha" in warning and 'set url = "https://provider-alpha.example/v1"' in warning


def test_check_warns_about_a_key_shared_by_two_providers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BETA_KEY", BETA_KEY)
    monkeypatch.setenv("ARBSTR_PROVIDER_GAMMA_API_KEY", BETA_KEY)
    text = provider_toml("provider-beta", 'api_key = "${BETA_KEY}"') + provider_toml("provider-gamma")
    code, out, _ = run(capsys, "check", "-c", str(write(tmp_path, text)))  # run() asserts the key is not printed
    assert code == 0
    (warning,) = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "'provider-beta', 'provider-gamma'" in warning and "same api_key" in warning


# --- providers ------------------------------------------------------------------------------------


def test_providers_masks_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BETA_KEY", BETA_KEY)
    text = (
        provider_toml("provider-alpha", f'api_key = "{ALPHA_KEY}"', models='["gpt-4o", "gpt-4o-mini"]')
        + provider_toml("provider-beta", 'api_key = "${BETA_KEY}"', output_rate=12.5)
        + provider_toml("provider-short", f'api_key = "{SHORT_KEY}"')
        + provider_toml("provider-none")
    )
    code, out, _ = run(capsys, "providers", "-c", str(write(tmp_path, text)))
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert ALPHA_KEY[:6] + "...***" in rows["provider-alpha"]
    assert ALPHA_KEY[:6] == "cashuA"
    assert BETA_KEY[:6] + "...***" in rows["provider-beta"]
    assert "[REDACTED]" in rows["provider-short"]
    assert "...***" not in rows["provider-none"] and "[REDACTED]" not in rows["provider-none"]
    assert "gpt-4o, gpt-4o-mini" in rows["provider-alpha"]
    assert "12.5" in rows["provider-beta"]
    assert "config-literal" in rows["provider-alpha"] and "env-expanded" in rows["provider-beta"]


def test_providers_table_is_aligned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = provider_toml("a", f'api_key = "{ALPHA_KEY}"') + provider_toml("a-much-longer-provider-name")
    code, out, _ = run(capsys, "providers", "-c", str(write(tmp_path, text)))
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    header = lines[0]
    column = header.index("MODELS")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines)


def test_providers_config_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, provider_toml("provider-alpha", 'api_key = "${NOPE}"'))
    code, _, err = run(capsys, "providers", "-c", str(path))
    assert code == 1
    assert "NOPE" in err and "provider-alpha" in err
