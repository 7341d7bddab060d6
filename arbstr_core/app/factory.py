"""The Flask application: factory, auth, error rendering, and the small routes.

``create_app`` reads nothing at import time and starts nothing before the first request, so
gunicorn can fork workers safely; the log writer starts lazily in each worker.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from ..config import Config, load
from ..errors import ArbstrError, bad_request
from ..request import chat as proxy
from ..request import cost as costs
from ..request.routing import match_policy, select_candidates
from ..request.state import AppState, Scrubber, build_state
from ..request.upstream import Upstream
from . import mock, startup
from .logroutes import logapi

log = logging.getLogger("arbstr")

CHAT_PATH = "/v1/chat/completions"
BODY_PATHS = (CHAT_PATH, "/v1/cost")  # the routes that read a request body
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def load_config(path: str | None = None, mock_mode: bool | None = None) -> Config:
    """The config gunicorn and the CLI run with: ``ARBSTR_MOCK`` / ``ARBSTR_CONFIG`` unless given."""
    if mock_mode is None:
        mock_mode = os.environ.get("ARBSTR_MOCK", "").lower() in ("1", "true", "yes")
    if mock_mode:
        return mock.mock_config()
    return load(path or os.environ.get("ARBSTR_CONFIG", "./config.toml"))


def create_app(config: Config | None = None, upstream: Upstream | None = None) -> Flask:
    config = config or load_config()
    if upstream is None:
        upstream = Upstream(mock.adapters() if config.mock else None)
    state = build_state(config, upstream)
    setup_logging(config, state.scrub)
    startup.check_worker(config)
    app = Flask("arbstr")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.json.sort_keys = False
    app.extensions["arbstr"] = state
    app.register_blueprint(logapi)
    _register_hooks(app, state)
    _register_routes(app, state)
    for warning in config.warnings:
        log.warning("%s", warning)
    for p in config.providers:
        log.info("provider %s: %d models, key source %s", p.name, len(p.models), p.key_source)
    return app


class _ScrubFilter(logging.Filter):
    """Last line of defence: no log record leaves with a configured secret in it."""

    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        clean = self.scrub(record.getMessage())
        if record.exc_info:
            clean += "\n" + self.scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        record.msg, record.args = clean, None  # formatted once: the handler's Formatter reuses it
        return True


def setup_logging(config: Config, scrub: Scrubber) -> None:
    logger = logging.getLogger("arbstr")
    logger.setLevel(config.logging.level.upper())
    logger.propagate = False
    handler = next((h for h in logger.handlers if getattr(h, "arbstr", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.arbstr = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    handler.filters = [_ScrubFilter(scrub)]
    # gunicorn's own loggers in this worker: its debug log names request paths, its access log request
    # lines, and a client may put a key in either (/v1/requests/<key>, ?model=<key>).
    for name in ("gunicorn.error", "gunicorn.access"):
        other = logging.getLogger(name)
        other.filters = [f for f in other.filters if not isinstance(f, _ScrubFilter)] + [_ScrubFilter(scrub)]


def error_response(error: ArbstrError, scrub: Scrubber) -> Response:
    response = jsonify(error.body(scrub))
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def _register_hooks(app: Flask, state: AppState) -> None:
    token = state.config.server.auth_token

    @app.before_request
    def _before() -> Response | None:
        state.logstore.start()
        if request.path == CHAT_PATH:
            g.chat = proxy.ChatRequest(state, request)
        if token is not None and request.path != "/health":
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.matches(given.strip()):
                return error_response(ArbstrError(
                    401, "Missing or invalid API key: send Authorization: Bearer <server.auth_token>",
                    type="authentication_error", code="invalid_api_key"), state.scrub)
        if request.method == "POST" and request.path in BODY_PATHS:
            _receive_body(state.config.server.request_timeout_secs)
        return None

    @app.after_request
    def _after(response: Response) -> Response:
        chat = g.get("chat")
        if chat is not None:
            chat.finalize(response)
        return response

    @app.errorhandler(ArbstrError)
    def _arbstr_error(e: ArbstrError) -> Response:
        return error_response(e, state.scrub)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        kind = "server_error" if status >= 500 else "invalid_request_error"
        message = e.description or e.name
        if status == 413:
            message = f"Request body is larger than max_body_bytes ({state.config.server.max_body_bytes} bytes)"
        return error_response(ArbstrError(status, message, type=kind, code=HTTP_CODES.get(status, "http_error")),
                              state.scrub)

    @app.errorhandler(Exception)
    def _crash(e: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ArbstrError(500, "Internal error in arbstr; see its log", type="server_error",
                                          code="internal_error"), state.scrub)


def _receive_body(idle_secs: float) -> None:
    """Read the request body now (the views get it from Flask's cache), giving up with a 408 after
    ``idle_secs`` without a byte from the client.

    gunicorn's gthread worker reads a body with no timeout at all: a client that stalls mid-body (a
    suspended laptop, a Wi-Fi link gone without a FIN) would hold a worker thread for good. The
    timeout is per read, so it bounds silence, not a client deliberately trickling bytes.

    Also a 413 for a chunked body over ``max_body_bytes``: werkzeug stops reading at the limit and
    returns what it has, silently truncated.
    """
    sock = request.environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return  # not under gunicorn (Flask's test client): nothing can stall
    before = sock.gettimeout()
    sock.settimeout(idle_secs)
    try:
        data = request.get_data()
        limit = request.max_content_length
        if request.content_length is None and limit is not None and len(data) >= limit:
            try:
                more = request.environ["wsgi.input"].read(1)
            except OSError as e:
                raise ClientDisconnected() from e
            if more:
                raise RequestEntityTooLarge()
    except ClientDisconnected as e:  # werkzeug turns every read error into this 400
        if isinstance(e.__context__ or e.__cause__, TimeoutError):
            raise ArbstrError(408, f"Request body not received: the client sent nothing for {idle_secs:g} s",
                              code="request_timeout") from None
        raise
    finally:
        sock.settimeout(before)


def _register_routes(app: Flask, state: AppState) -> None:
    config = state.config

    @app.post(CHAT_PATH)
    def chat_completions() -> Response:
        return proxy.handle(g.chat, request)

    @app.get("/v1/models")
    def models() -> Response:
        seen = dict.fromkeys(m for p in config.providers for m in p.models)
        return jsonify({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "arbstr"} for m in seen]})

    @app.post("/v1/cost")
    def estimate() -> Response:
        body = proxy.parse_body(request.get_data(cache=False))
        policy = match_policy(config.policies.rules, request.headers.get("X-Arbstr-Policy"), body["messages"])
        provider = select_candidates(
            body["model"], policy, config.providers, config.policies.default_strategy,
            is_available=state.breakers.is_available, median_latency=state.latency.median,
        )[0]
        input_tokens, output_tokens = costs.estimate_tokens(body)
        try:
            estimate = costs.cost_sats(provider, input_tokens, output_tokens)
        except OverflowError:
            estimate = math.inf
        if not math.isfinite(estimate):  # would be a 500, or `Infinity`, which is not JSON
            raise bad_request("max_tokens is too large to estimate a cost", param="max_tokens")
        return jsonify({
            "model": body["model"],
            "provider": provider.name,
            "policy": policy.name if policy else None,
            "estimated_input_tokens": input_tokens,
            "estimated_output_tokens": output_tokens,
            "estimated_cost_sats": estimate,
            "rates": {"input_rate": provider.input_rate, "output_rate": provider.output_rate,
                      "base_fee": provider.base_fee},
        })

    @app.get("/providers")
    def providers() -> Response:
        circuits = state.breakers.snapshot()
        return jsonify({"providers": [provider_info(p, circuits[p.name]) for p in config.providers]})

    @app.get("/health")
    def health() -> tuple[Response, int]:
        circuits = state.breakers.snapshot()
        store = state.logstore.health()
        states = [c["state"] for c in circuits.values()]
        if states and all(s == "open" for s in states):
            status = "unhealthy"
        elif any(s != "closed" for s in states) or state.logstore.degraded():
            status = "degraded"
        else:
            status = "ok"
        body = {"status": status, "providers": circuits, "log": store}
        return jsonify(body), 503 if status == "unhealthy" else 200


def provider_info(p: Any, circuit: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": p.name,
        "url": p.url,
        "models": list(p.models),
        "input_rate": p.input_rate,
        "output_rate": p.output_rate,
        "base_fee": p.base_fee,
        "key_source": p.key_source,
        "api_key": p.api_key.masked() if p.api_key is not None else None,
        "circuit": {"state": circuit["state"], "failure_count": circuit["failure_count"]},
    }
