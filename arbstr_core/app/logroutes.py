"""HTTP read API over the request log: GET /v1/stats, /v1/requests, /v1/requests/<id> (SPEC §4.7, §4.8), and
a request's debug capture, /v1/requests/<id>/debug (README "Debug capture").

Auth and error rendering are app-wide (factory.py, handlers.py): views raise :class:`ArbstrError` and return plain dicts.
State comes from ``current_app.extensions["arbstr"]`` (``.config``); reads go straight to the SQLite
file through :mod:`arbstr_core.reads.queries`, never through the writer.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, request

from ..errors import ArbstrError
from ..log import captures
from ..reads import queries
from ..request import debug

logapi = Blueprint("logapi", __name__)


def _config() -> Any:
    return current_app.extensions["arbstr"].config


@logapi.get("/v1/stats")
def stats() -> dict[str, Any]:
    cfg = _config()
    return queries.stats(cfg.database.path, request.args)


@logapi.get("/v1/requests")
def list_requests() -> dict[str, Any]:
    return queries.list_requests(_config().database.path, request.args)


@logapi.get("/v1/requests/<request_id>")
def get_request(request_id: str) -> dict[str, Any]:
    row = queries.get_request(_config().database.path, request_id)
    if row is None:
        raise ArbstrError(404, f"no request with id '{request_id}' in the log", code="request_not_found",
                          param="request_id")
    return row


@logapi.get("/v1/requests/<request_id>/debug")
def get_capture(request_id: str) -> dict[str, Any]:
    """While capture is off nothing is shown, not even captures kept from when it was on."""
    cfg = _config()
    off = debug.off_reason(cfg)
    if off is not None:
        raise ArbstrError(404, f"{off}; no request is captured", code="debug_capture_off", param="request_id")
    with queries.reader(cfg.database.path) as conn:  # the log's one way to read (version check, no creation)
        capture = captures.get(conn, request_id) if conn is not None else None
    if capture is None:
        which = f"only requests sending {debug.HEADER}: true are captured, " if cfg.debug.capture == "header" else ""
        raise ArbstrError(404, f"no debug capture for request '{request_id}' ({which}captures are kept "
                               f"{cfg.debug.retention_days:g} days)", code="capture_not_found", param="request_id")
    return capture
