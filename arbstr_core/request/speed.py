"""How fast a provider produced an answer: output tokens a second (pure)."""

from __future__ import annotations

MIN_SPAN_MS = 1.0  # a shorter span says nothing about speed (a one-chunk stream)


def tokens_per_sec(output_tokens: int | None, latency_ms: float | None, ttft_ms: float | None,
                   streaming: bool) -> float | None:
    """Output tokens over the time they took: a stream's from its first content to its end (generation
    speed, without the wait before the first token, which ``ttft_ms`` measures), an answer's over its
    whole latency (a client of a non-streaming answer waits for all of it). None when a figure is missing
    or the span is too short to mean anything."""
    if not output_tokens or latency_ms is None:
        return None
    if streaming:
        if ttft_ms is None:
            return None
        span = latency_ms - ttft_ms
    else:
        span = latency_ms
    if span < MIN_SPAN_MS:
        return None
    return round(output_tokens * 1000 / span, 3)
