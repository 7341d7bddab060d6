"""The failure-class table of SPEC §5.1, row by row, and Retry-After parsing."""

from __future__ import annotations

import pytest

from arbstr_core.request import failures
from arbstr_core.request.failures import (
    BAD_BODY,
    CLIENT_FAULT,
    CONNECT_FAILED,
    FAILURE,
    KEY_REJECTED,
    NEUTRAL,
    OK,
    RATE_LIMITED,
    RATE_LIMITED_LONG,
    SENT_FAILED,
    SERVER_ERROR,
    SUCCESS,
    Verdict,
    classify_status,
    parse_retry_after,
)

MAX_RETRY_AFTER = 10.0


def row(v: Verdict) -> tuple[bool, bool, str]:
    return v.retry_same, v.fallback, v.breaker


# SPEC §5.1: (retry same provider, fall back, breaker)
def test_connection_failed_before_sending() -> None:
    assert row(CONNECT_FAILED) == (True, True, FAILURE)


@pytest.mark.parametrize("status", [500, 501, 502, 503, 504, 505, 520, 529, 599])
def test_5xx(status: int) -> None:
    v = classify_status(status, None, MAX_RETRY_AFTER)
    assert v is SERVER_ERROR
    assert row(v) == (True, True, FAILURE)


@pytest.mark.parametrize("retry_after", [None, 0.0, 1.0, 9.99, MAX_RETRY_AFTER])
def test_429_with_a_retry_after_we_can_honour(retry_after: float | None) -> None:
    v = classify_status(429, retry_after, MAX_RETRY_AFTER)
    assert v is RATE_LIMITED
    assert row(v) == (True, True, NEUTRAL)
    assert v.kind == "rate_limited"


@pytest.mark.parametrize("retry_after", [MAX_RETRY_AFTER + 0.001, 11.0, 60.0, 3600.0])
def test_429_with_a_retry_after_above_the_cap(retry_after: float) -> None:
    v = classify_status(429, retry_after, MAX_RETRY_AFTER)
    assert v is RATE_LIMITED_LONG
    assert row(v) == (False, True, NEUTRAL)
    assert v.kind == "rate_limited"


def test_429_cap_of_zero_only_retries_immediate_retry_after() -> None:
    assert classify_status(429, 0.0, 0) is RATE_LIMITED
    assert classify_status(429, 1.0, 0) is RATE_LIMITED_LONG


def test_read_timeout_or_reset_after_sending_is_never_retried_on_the_same_provider() -> None:
    assert row(SENT_FAILED) == (False, True, FAILURE)


def test_2xx_with_an_invalid_body() -> None:
    assert row(BAD_BODY) == (False, True, FAILURE)


@pytest.mark.parametrize("status", [401, 403])
def test_provider_key_refused(status: int) -> None:
    v = classify_status(status, None, MAX_RETRY_AFTER)
    assert v is KEY_REJECTED
    assert row(v) == (False, True, NEUTRAL)


@pytest.mark.parametrize("code", ["invalid_api_key", "invalid_cashu_token", "cashu_token_already_spent"])
def test_a_400_naming_a_key_fault_blames_the_key_not_the_request(code: str) -> None:
    """Routstr answers a spent or invalid Cashu token with 400: the provider's fault, not the client's."""
    assert classify_status(400, None, MAX_RETRY_AFTER, code) is KEY_REJECTED
    assert classify_status(400, None, MAX_RETRY_AFTER, "invalid_value") is CLIENT_FAULT


def test_402_is_the_balance_running_out() -> None:
    v = classify_status(402, None, MAX_RETRY_AFTER)
    assert v is failures.BALANCE
    assert row(v) == (False, True, NEUTRAL)


def test_404_falls_back_neutrally() -> None:
    """Another provider may serve the model (SPEC §5.1)."""
    v = classify_status(404, None, MAX_RETRY_AFTER)
    assert v is failures.MODEL_NOT_FOUND
    assert row(v) == (False, True, NEUTRAL)


@pytest.mark.parametrize("status", [400, 409, 413, 422])
def test_the_requests_own_fault(status: int) -> None:
    v = classify_status(status, None, MAX_RETRY_AFTER)
    assert v is CLIENT_FAULT
    assert row(v) == (False, False, NEUTRAL)
    assert status in failures.CLIENT_FAULT_STATUSES


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_success(status: int) -> None:
    v = classify_status(status, None, MAX_RETRY_AFTER)
    assert v is OK
    assert v.breaker == SUCCESS
    assert not v.retry_same and not v.fallback


@pytest.mark.parametrize("status", [405, 406, 408, 410, 411, 415, 418, 421, 451, 301, 302, 304])
def test_other_statuses_fall_back_without_blaming_the_provider(status: int) -> None:
    v = classify_status(status, None, MAX_RETRY_AFTER)
    assert row(v) == (False, True, NEUTRAL)
    assert v.kind == f"http_{status}"


def test_retry_after_only_matters_for_429() -> None:
    assert classify_status(503, 3600.0, MAX_RETRY_AFTER) is SERVER_ERROR
    assert classify_status(403, 3600.0, MAX_RETRY_AFTER) is KEY_REJECTED


def test_every_failure_row_falls_back_except_client_faults() -> None:
    rows = [CONNECT_FAILED, SERVER_ERROR, RATE_LIMITED, RATE_LIMITED_LONG, SENT_FAILED, BAD_BODY, KEY_REJECTED]
    assert all(v.fallback for v in rows)
    assert not CLIENT_FAULT.fallback


def test_only_nothing_sent_5xx_and_short_429_are_retried_on_the_same_provider() -> None:
    all_rows = [CONNECT_FAILED, SERVER_ERROR, RATE_LIMITED, RATE_LIMITED_LONG, SENT_FAILED, BAD_BODY,
                KEY_REJECTED, CLIENT_FAULT, OK]
    assert {v for v in all_rows if v.retry_same} == {CONNECT_FAILED, SERVER_ERROR, RATE_LIMITED}


def test_verdicts_are_immutable() -> None:
    with pytest.raises(AttributeError):
        SENT_FAILED.retry_same = True  # type: ignore[misc]


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 5.0), ("0", 0.0), (" 2.5 ", 2.5), ("120", 120.0), ("1e1", 10.0)],
)
def test_parse_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize(
    "value",
    [None, "", "   ", "-1", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "inf", "Infinity", "-inf", "nan", "1e999"],
)
def test_parse_retry_after_unusable(value: str | None) -> None:
    assert parse_retry_after(value) is None
