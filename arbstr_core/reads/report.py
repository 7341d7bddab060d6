"""The ``arbstr stats`` and ``arbstr requests`` tables: the HTTP API's documents, read from the database (SPEC §8).

Formatting is pure (``format_*`` take the API documents and return text); ``run_*`` read the documents
through :mod:`.queries`, as the API does, and return the process exit code.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ..config import Config
from ..errors import ArbstrError
from . import queries
from .args import MAX_PER_PAGE

_EVERYTHING = "1970-01-01T00:00:00Z"  # `arbstr requests` shows the latest rows, however old


def _int(v: Any) -> str:
    return "-" if v is None else f"{round(v):,}"


def _sats(v: Any) -> str:
    return "-" if v is None else f"{v:,.3f}"  # msat precision, as the API rounds (SPEC §2.3)


def _speed(v: Any) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _share(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: range) -> str:
    """Aligned columns: numbers (the ``numeric`` column positions) flush right, text flush left."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [str(c).rjust(w) if i in numeric else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def format_stats(doc: dict[str, Any], range_: str | None = None) -> str:
    c, k, p = doc["counts"], doc["costs"], doc["performance"]
    span = f"{doc['since'][:19].replace('T', ' ')} → {doc['until'][:19].replace('T', ' ')} UTC"
    summary = {
        "requests": [f"{_int(c['total'])} total", f"{_int(c['success'])} ok", f"{_int(c['error'])} errors",
                     f"{_int(c['streaming'])} streaming"],
        "cost": [f"{_sats(k['total_cost_sats'])} sats", f"reported by providers {_sats(k['reported_cost_sats'])}",
                 f"at configured rates {_sats(k['rates_cost_sats'])}"],
        "saved": [f"{_sats(k['savings_sats'])} sats (vs. the dearest provider that could have served each request)"],
        "tokens": [f"{_int(k['total_input_tokens'])} in ({_int(k['total_cached_tokens'])} cached)",
                   f"{_int(k['total_output_tokens'])} out ({_int(k['total_reasoning_tokens'])} reasoning)"],
        "latency": [f"avg {_int(p['avg_latency_ms'])} ms", f"p50 {_int(p['p50_latency_ms'])}",
                    f"p95 {_int(p['p95_latency_ms'])}", f"p99 {_int(p['p99_latency_ms'])}"],
        "ttft": [f"avg {_int(p['avg_ttft_ms'])} ms", f"p50 {_int(p['p50_ttft_ms'])}", f"p95 {_int(p['p95_ttft_ms'])}"],
        "speed": [f"p50 {_speed(p['p50_output_tokens_per_sec'])} output tokens/s",
                  f"{_sats(p['cost_per_1m_output_tokens_sats'])} sats per 1M output tokens",
                  f"{_share(p['success_rate'])} of requests succeeded"],
    }
    text = f"arbstr stats  {range_ + '  ' if range_ else ''}{span}\n\n"
    text += "".join(f"  {name:<9} {'   '.join(parts)}\n" for name, parts in summary.items())
    groups = doc.get("groups")
    if groups is None:
        return text
    if isinstance(groups, dict):
        title = "GROUP"
        items = sorted(groups.items(), key=lambda kv: (-kv[1]["counts"]["total"], kv[0]))
    else:
        title = "START (UTC)"
        items = [(g["start"][:16].replace("T", " "), g) for g in groups]
    rows = [
        [
            name, _int(g["counts"]["total"]), _int(g["counts"]["error"]), _int(g["counts"]["streaming"]),
            _sats(g["costs"]["total_cost_sats"]), _sats(g["costs"]["reported_cost_sats"]),
            _sats(g["costs"]["rates_cost_sats"]), _sats(g["costs"]["savings_sats"]),
            _int(g["costs"]["total_input_tokens"]), _int(g["costs"]["total_cached_tokens"]),
            _int(g["costs"]["total_output_tokens"]), _int(g["costs"]["total_reasoning_tokens"]),
        ]
        for name, g in items
    ]
    headers = [title, "REQUESTS", "ERRORS", "STREAMS", "COST_SATS", "REPORTED", "AT_RATES", "SAVED_SATS",
               "IN_TOKENS", "CACHED", "OUT_TOKENS", "REASONING"]
    perf = [_performance_row(name, g["performance"]) for name, g in items]
    perf_headers = [title, "OK", "P50_MS", "P95_MS", "P99_MS", "TTFT_P50", "TTFT_P95", "TOK/S_P50", "SATS/1M_OUT"]
    return (text + "\n" + table(headers, rows, numeric=range(1, len(headers)))
            + "\n" + table(perf_headers, perf, numeric=range(1, len(perf_headers))))


def _performance_row(name: str, q: dict[str, Any]) -> list[str]:
    return [
        name, _share(q["success_rate"]), _int(q["p50_latency_ms"]), _int(q["p95_latency_ms"]),
        _int(q["p99_latency_ms"]), _int(q["p50_ttft_ms"]), _int(q["p95_ttft_ms"]),
        _speed(q["p50_output_tokens_per_sec"]), _sats(q["cost_per_1m_output_tokens_sats"]),
    ]


def format_requests(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no requests logged yet\n"
    body = [
        [
            r["timestamp"][:19].replace("T", " "), r["api"], _model(r), r["provider"] or "-", r["policy"] or "-",
            r["status"], _int(r["http_status"]), _int(r["tokens"]["input"]), _int(r["tokens"]["output"]),
            _sats(r["cost_sats"]), _int(r["timing"]["latency_ms"]), (r["error"] or {}).get("type") or "-",
            r["retries"] or "-", r["request_id"],
        ]
        for r in rows
    ]
    headers = ["TIME (UTC)", "API", "MODEL", "PROVIDER", "POLICY", "STATUS", "HTTP", "IN", "OUT", "COST_SATS",
               "LATENCY_MS", "ERROR", "RETRIES", "REQUEST_ID"]
    return table(headers, body, numeric=range(6, 11))


def _model(r: dict[str, Any]) -> str:
    """The model as the client named it, and what an alias routed it to: ``claude-sonnet-4-5→gpt-4o``."""
    model, routed = r["model"] or "-", r["routed_model"] or "-"
    return model if routed.casefold() == model.casefold() else f"{model}→{routed}"


def _no_log_note(cfg: Config) -> None:
    if not os.path.exists(cfg.database.path):
        print(f"note: no request log at {cfg.database.path} yet (nothing recorded)", file=sys.stderr)


def run_stats(
    cfg: Config, range_: str = "last_24h", group_by: str | None = None, as_json: bool = False, out: TextIO | None = None
) -> int:
    args = {"range": range_, **({"group_by": group_by} if group_by else {})}
    try:
        doc = queries.stats(cfg.database.path, args)
    except ArbstrError as e:
        print(f"arbstr stats: {e.message}", file=sys.stderr)
        return 1
    _no_log_note(cfg)
    (out or sys.stdout).write(json.dumps(doc, indent=2) + "\n" if as_json else format_stats(doc, range_))
    return 0


def run_requests(cfg: Config, limit: int = 20, as_json: bool = False, out: TextIO | None = None) -> int:
    if limit < 1:
        print("arbstr requests: --limit must be at least 1", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = []
    total = 0
    try:
        page = 1
        while len(rows) < limit:  # the API serves at most 100 a page; --limit may ask for more
            doc = queries.list_requests(
                cfg.database.path,
                {"since": _EVERYTHING, "page": str(page), "per_page": str(MAX_PER_PAGE)},
            )
            rows.extend(doc["data"][: limit - len(rows)])
            total = doc["total"]
            if page >= doc["total_pages"]:
                break
            page += 1
    except ArbstrError as e:
        print(f"arbstr requests: {e.message}", file=sys.stderr)
        return 1
    _no_log_note(cfg)
    text = json.dumps({"data": rows, "total": total}, indent=2) + "\n" if as_json else format_requests(rows)
    (out or sys.stdout).write(text)
    return 0
