"""What every request passes before a view runs: the auth token (SPEC §4.1) and a bounded body read."""

from __future__ import annotations

import socket

from flask import request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from ..errors import ArbstrError
from ..secrets import Secret


def check_auth(token: Secret) -> None:
    """``Authorization: Bearer <token>`` (OpenAI clients) or ``x-api-key: <token>`` (Anthropic clients),
    compared in constant time, else 401 ``invalid_api_key``."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    bearer = scheme.lower() == "bearer" and token.matches(given.strip())
    if not bearer and not token.matches(request.headers.get("x-api-key", "").strip()):
        raise ArbstrError(401, "Missing or invalid API key: send Authorization: Bearer <server.auth_token>",
                          type="authentication_error", code="invalid_api_key")


def receive_body(idle_secs: float) -> None:
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
