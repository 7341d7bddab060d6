"""The Flask application factory: config, shared state, logging, hooks, routes, error handlers.

``create_app`` reads nothing at import time and starts nothing before the first request, so
gunicorn can fork workers safely; the log writer starts lazily in each worker.
"""

from __future__ import annotations

import logging
import os

from flask import Flask, Response, g, request

from ..config import Config, load
from ..request.chat import ChatRequest
from ..request.state import AppState, build_state
from ..request.upstream import Upstream
from . import handlers, mock, routes, startup
from .guard import check_auth, receive_body
from .logroutes import logapi
from .logsetup import setup_logging

log = logging.getLogger("arbstr")

# The routes that read a request body.
BODY_PATHS = (routes.CHAT_PATH, routes.MESSAGES_PATH, routes.MESSAGES_PATH + "/count_tokens", "/v1/cost")


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
    state.market.start()  # in the worker, after fork; the first refresh does not delay any request
    app = Flask("arbstr")
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    app.json.sort_keys = False
    app.extensions["arbstr"] = state
    _register_hooks(app, state)
    handlers.register(app, state)
    routes.register(app, state)
    app.register_blueprint(logapi)
    for warning in config.warnings:
        log.warning("%s", warning)
    for p in config.providers:
        log.info("provider %s: %d models, key source %s", p.name, len(p.models), p.key_source)
    return app


def _register_hooks(app: Flask, state: AppState) -> None:
    token = state.config.server.auth_token

    @app.before_request
    def _before() -> None:
        state.logstore.start()
        state.market.start()
        if (api := routes.API_OF_PATH.get(request.path)) is not None:
            g.chat = ChatRequest(state, request, api)  # first: every answer on the route, errors too, has its row
        if token is not None and request.path != "/health":
            check_auth(token)
        if request.method == "POST" and request.path in BODY_PATHS:
            receive_body(state.config.server.request_timeout_secs)

    @app.after_request
    def _after(response: Response) -> Response:
        chat = g.get("chat")
        if chat is not None:
            chat.finish(response)
        return response
