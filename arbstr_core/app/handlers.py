"""Every error leaves arbstr here, rendered once as OpenAI's error JSON (SPEC §4): arbstr's own, Flask's
and Werkzeug's (404, 405, 413, 415), and crashes (500). On the chat route the request's
:class:`~arbstr_core.request.chat.ChatRequest` adds its headers and records the error for its row.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..errors import ArbstrError
from ..request.state import AppState

log = logging.getLogger("arbstr")

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def register(app: Flask, state: AppState) -> None:
    def render(error: ArbstrError) -> Response:
        chat = g.get("chat")
        if chat is not None:
            error = chat.failed(error)
        response = jsonify(chat.error_body(error) if chat is not None else error.body(state.scrub))
        response.status_code = error.status
        response.headers.update(error.headers)
        return response

    @app.errorhandler(ArbstrError)
    def _arbstr_error(e: ArbstrError) -> Response:
        return render(e)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Response:
        status = e.code or 500
        kind = "server_error" if status >= 500 else "invalid_request_error"
        message = e.description or e.name
        if status == 413:
            message = f"Request body is larger than max_body_bytes ({state.config.server.max_body_bytes} bytes)"
        return render(ArbstrError(status, message, type=kind, code=HTTP_CODES.get(status, "http_error")))

    @app.errorhandler(Exception)
    def _crash(e: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return render(ArbstrError(500, "Internal error in arbstr; see its log", type="server_error",
                                  code="internal_error"))
