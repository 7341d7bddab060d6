"""Output tokens a second (request/speed.py), against figures worked out by hand."""

from __future__ import annotations

import pytest

from arbstr_core.request.speed import tokens_per_sec


def test_a_stream_is_timed_from_its_first_content_to_its_end() -> None:
    # 300 tokens; first content at 200 ms, end at 1700 ms: 1.5 s of generation → 200 tokens a second.
    assert tokens_per_sec(300, 1700, 200, True) == 200.0
    # The wait before the first token is not generation: the same stream with a 1 s wait is as fast.
    assert tokens_per_sec(300, 2500, 1000, True) == 200.0


def test_an_answer_is_timed_over_its_whole_latency() -> None:
    assert tokens_per_sec(45, 900, None, False) == 50.0
    assert tokens_per_sec(1, 3, None, False) == pytest.approx(333.333)  # 3 decimals


@pytest.mark.parametrize("output, latency, ttft, streaming", [
    (None, 1000, 100, True),  # usage unknown
    (0, 1000, 100, True),  # nothing generated
    (10, None, None, False),  # no latency
    (10, 1000, None, True),  # a stream without a first content
    (10, 100, 100, True),  # everything in one chunk: no span to divide by
    (10, 0.5, None, False),
])
def test_unknown_when_a_figure_is_missing_or_there_is_no_span(output, latency, ttft, streaming) -> None:
    assert tokens_per_sec(output, latency, ttft, streaming) is None
