"""The `arbstr` command: serve, check, providers, stats, requests (SPEC §8)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from typing import TextIO

from ..config import Config, split_listen
from ..errors import ConfigError
from ..reads import report
from ..request.market import Market
from ..request.upstream import Upstream
from . import startup
from .factory import load_config


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, mock_mode=getattr(args, "mock", False) or None)


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    from .server import EmbeddedServer, settings

    config = _config(args)
    server = config.server
    if args.listen:
        server = dataclasses.replace(server, listen=args.listen)
    if args.threads:
        server = dataclasses.replace(server, threads=args.threads)  # the app's executor sizes itself by it too
    config = dataclasses.replace(config, server=server)
    startup.check_listen(config)  # refuse before gunicorn starts; a worker would only refuse after binding
    EmbeddedServer(config, settings(config, args.workers)).run()
    return 0


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    config = _config(args)
    exposure = startup.check_listen(config)
    print(f"config:        {config.path}", file=out)
    print(f"listen:        {config.server.listen}", file=out)
    print(f"providers:     {len(config.providers)}", file=out)
    print(f"policy rules:  {len(config.policies.rules)}", file=out)
    print(f"auth token:    {'set' if config.server.auth_token else 'not set'}", file=out)
    print(f"database:      {config.database.path}", file=out)
    for p in config.providers:
        print(f"  {p.name}: key source {p.key_source}", file=out)
    for warning in config.warnings:
        print(f"warning: {warning}", file=out)
    if exposure:
        print(f"warning: {exposure}", file=out)
    print("config OK", file=out)
    return 0


def cmd_providers(args: argparse.Namespace, out: TextIO) -> int:
    """The configured providers; those with ``discover = true`` are asked for their prices and balance now
    (the only command that contacts providers)."""
    config = _config(args)
    market = Market(config.providers, functools.partial(Upstream().get_json, timeout=config.server.connect_timeout_secs),
                    refresh_secs=config.market.refresh_secs, min_balance_sats=config.market.min_balance_sats)
    market.refresh()
    rows = [("NAME", "MODELS", "IN/1k", "CACHED/1k", "OUT/1k", "FEE", "PRICES", "BALANCE", "KEY", "KEY SOURCE")]
    for p in market.providers():
        key = p.api_key.masked() if p.api_key is not None else "-"
        live = market.snapshot(p.name)
        prices = live["prices"]["source"] + (" (refresh failed)" if live["prices"]["error"] else "")
        balance = "-" if live["balance_sats"] is None else f"{live['balance_sats']:.3f} sats"
        rows.append((p.name, ", ".join(p.models) or "-", f"{p.input_rate:g}", f"{p.cached_rate:g}",
                     f"{p.output_rate:g}", f"{p.base_fee:g}", prices, balance, key, p.key_source))
    print_table(rows, out)
    return 0


def print_table(rows: list[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


def cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    return report.run_stats(_config(args), range_=args.range, group_by=args.group_by, as_json=args.json, out=out)


def cmd_requests(args: argparse.Namespace, out: TextIO) -> int:
    return report.run_requests(_config(args), limit=args.limit, as_json=args.json, out=out)


def _listen(value: str) -> str:
    try:
        split_listen(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"'{value}' must be a whole number ≥ 1")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arbstr", description="Route OpenAI chat completions to the cheapest provider.")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, fn) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.add_argument("-c", "--config", default=None,
                       help="config file (default: $ARBSTR_CONFIG or ./config.toml)")
        c.add_argument("--mock", action="store_true", help="use the built-in mock providers instead of a file")
        c.set_defaults(fn=fn)
        return c

    serve = command("serve", "run the proxy under gunicorn (gthread workers)", cmd_serve)
    serve.add_argument("-l", "--listen", type=_listen, help="HOST:PORT, overrides [server] listen")
    serve.add_argument("--workers", type=_positive, default=1)
    serve.add_argument("--threads", type=_positive, default=None,
                       help="streams each worker serves at once (default: [server] threads, 256)")
    command("check", "validate the config without contacting anything", cmd_check)
    command("providers", "list providers, models, rates and masked keys", cmd_providers)
    stats = command("stats", "spend, tokens and latency from the request log", cmd_stats)
    stats.add_argument("--range", default="last_24h", choices=["last_1h", "last_24h", "last_7d", "last_30d"])
    stats.add_argument("--group-by", choices=["model", "provider", "policy", "api", "hour", "day"])
    stats.add_argument("--json", action="store_true")
    reqs = command("requests", "the most recent requests from the request log", cmd_requests)
    reqs.add_argument("--limit", type=int, default=20)
    reqs.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args, sys.stdout)
    except ConfigError as e:
        print(f"arbstr: config error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
