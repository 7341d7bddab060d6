"""Live prices and balances of providers that publish them (SPEC §11): a Routstr node's ``/models``
and ``/balance/info``, refreshed by one background thread per worker.

A node's prices follow BTC/USD, so rates typed into the config drift; with ``discover = true`` the
node's own ``sats_pricing`` is what routing compares. Parsing is pure (:func:`parse_models`,
:func:`parse_balance`); :class:`Market` holds what is known now behind a lock and hands routing a
consistent view per request (:meth:`Market.providers`). A failed refresh keeps the last good prices.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import Provider
from ..timefmt import utc_timestamp

log = logging.getLogger("arbstr.market")

CONFIG, DISCOVERED = "config", "discovered"


@dataclass(frozen=True)
class Rates:
    """One model's prices at one provider, in arbstr's units (sats per 1,000 tokens, sats per request)."""

    input_rate: float
    output_rate: float
    base_fee: float = 0.0
    cached_input_rate: float | None = None


def _price(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def parse_models(body: Any) -> dict[str, Rates]:
    """A ``/models`` body → rates per model id. Entries without usable ``sats_pricing`` (sats per token)
    are skipped; a body that is no model list at all is a ValueError (the refresh failed)."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ValueError("not a model list (no 'data' array)")  # noqa: TRY004 — a bad answer, not a bad call
    out: dict[str, Rates] = {}
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            continue
        pricing = entry.get("sats_pricing")
        if not isinstance(pricing, dict):
            continue
        prompt, completion = _price(pricing.get("prompt")), _price(pricing.get("completion"))
        if prompt is None or completion is None:
            continue
        cached = _price(pricing.get("input_cache_read"))
        out[entry["id"]] = Rates(
            input_rate=prompt * 1000, output_rate=completion * 1000,
            base_fee=_price(pricing.get("request")) or 0.0,
            # A node prices cache reads at the prompt price when it lists 0 (routstr cost_calculation).
            cached_input_rate=cached * 1000 if cached else None,
        )
    return out


def parse_balance(body: Any) -> float | None:
    """The spendable balance in msats from a ``/balance/info`` body, or None."""
    return _price(body.get("balance")) if isinstance(body, dict) else None


@dataclass
class _Known:
    rates: dict[str, Rates] | None = None  # None: not discovered (yet); the config's static prices apply
    prices_at: float | None = None  # wall time of the last good discovery
    prices_error: str | None = None
    balance_msats: float | None = None
    balance_at: float | None = None


Fetch = Callable[[Provider, str], Any]  # GET {url}/{path} with the provider's key → parsed JSON, or raises


class Market:
    """What arbstr knows now of each provider's prices and balance. Thread-safe."""

    def __init__(self, providers: Sequence[Provider], fetch: Fetch, *, refresh_secs: float,
                 min_balance_sats: float, wall: Callable[[], float] = time.time) -> None:
        self._providers = tuple(providers)
        self._fetch = fetch
        self._refresh_secs = refresh_secs
        self._min_balance_msats = min_balance_sats * 1000
        self._wall = wall
        self._lock = threading.Lock()
        self._known = {p.name: _Known() for p in providers}
        self._pid: int | None = None  # the process the thread runs in: a fork leaves it behind
        self._stop = threading.Event()

    # ---- what routing reads ----------------------------------------------------------------------

    def providers(self) -> list[Provider]:
        """The providers as routing should see them now: a discovered provider serves the models its node
        lists, one view per model with that model's rates (routing picks the view of the requested model)."""
        with self._lock:
            rates = {name: known.rates for name, known in self._known.items()}
        out: list[Provider] = []
        for p in self._providers:
            listed = rates[p.name]
            if listed is None:
                out.append(p)
                continue
            out.extend(dataclasses.replace(p, models=(model,), input_rate=r.input_rate, output_rate=r.output_rate,
                                           base_fee=r.base_fee, cached_input_rate=r.cached_input_rate)
                       for model, r in listed.items())
        return out

    def balance_low(self, name: str) -> bool:
        """Known to hold less than ``min_balance_sats``: skipped like an open circuit."""
        with self._lock:
            known = self._known.get(name)
            return (known is not None and known.balance_msats is not None
                    and known.balance_msats < self._min_balance_msats)

    def note_balance(self, name: str, msats: Any) -> None:
        """An answer's ``usage.remaining_balance_msats``: fresher than the last refresh."""
        value = _price(msats)
        if value is None or name not in self._known:
            return
        with self._lock:
            known = self._known[name]
            known.balance_msats, known.balance_at = value, self._wall()

    def snapshot(self, name: str) -> dict[str, Any]:
        """``/providers``' view of one provider: price source and age, per-model rates, balance."""
        with self._lock:
            k = dataclasses.replace(self._known[name])
        return {
            "prices": {
                "source": DISCOVERED if k.rates is not None else CONFIG,
                "updated_at": utc_timestamp(k.prices_at) if k.prices_at is not None else None,
                "age_secs": round(self._wall() - k.prices_at, 1) if k.prices_at is not None else None,
                "error": k.prices_error,
                "models": {m: dataclasses.asdict(r) for m, r in k.rates.items()} if k.rates is not None else None,
            },
            "balance_sats": round(k.balance_msats / 1000, 3) if k.balance_msats is not None else None,
            "balance_at": utc_timestamp(k.balance_at) if k.balance_at is not None else None,
        }

    # ---- refreshing --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """One round: prices of every ``discover`` provider, and their balances (Routstr nodes)."""
        for p in self._providers:
            if not p.discover:
                continue
            try:
                rates = parse_models(self._fetch(p, "models"))
            except Exception as e:  # noqa: BLE001 — any failure keeps the last good prices
                with self._lock:
                    self._known[p.name].prices_error = f"{type(e).__name__}: {e}"[:300]
                log.warning("price refresh failed provider=%s: %s", p.name, e)
            else:
                with self._lock:
                    known = self._known[p.name]
                    known.rates, known.prices_at, known.prices_error = rates, self._wall(), None
            try:
                balance = parse_balance(self._fetch(p, "balance/info"))
            except Exception as e:  # noqa: BLE001 — a node without balances is not an error
                log.debug("balance refresh failed provider=%s: %s", p.name, e)
            else:
                if balance is not None:
                    self.note_balance(p.name, balance)

    def start(self) -> None:
        """The refresh thread of this worker (after fork), at once and every ``refresh_secs``; the first
        round runs in the background, so no request waits for it."""
        if self._pid == os.getpid() or not any(p.discover for p in self._providers):
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            thread = threading.Thread(target=self._run, name="arbstr-market", daemon=True)
        thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # the thread must outlive any bug in one round
                log.exception("market refresh round failed")
            if self._stop.wait(self._refresh_secs):
                return

    def stop(self) -> None:
        self._stop.set()
