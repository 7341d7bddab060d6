"""The floor of arbstr's stack: Flask + one ``requests.Session`` per thread, forwarding bytes, nothing else.

bench_proxy.py serves it with ``gunicorn bare_forwarder:app -c gunicorn.conf.py`` (arbstr's own
settings: 1 gthread worker × 16 threads). It forwards the POST body to ``BENCH_UPSTREAM`` + the request
path and returns the upstream's bytes; SSE is relayed with ``read1`` as it arrives. No parsing, routing,
logging or accounting: what arbstr costs above this is arbstr's own work.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ["BENCH_UPSTREAM"]
app = Flask(__name__)
_local = threading.local()


def _session() -> requests.Session:
    """One per thread: Sessions are not documented as thread-safe."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.trust_env = False
    return session


@app.post("/<path:path>")
def forward(path: str) -> Response:
    upstream = _session().post(f"{UPSTREAM}/{path}", data=request.get_data(), stream=True, timeout=30,
                               headers={"Content-Type": "application/json"})
    content_type = upstream.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        return Response(_relay(upstream), upstream.status_code, content_type=content_type, direct_passthrough=True)
    return Response(upstream.content, upstream.status_code, content_type=content_type)


def _relay(upstream: requests.Response) -> Iterator[bytes]:
    try:
        while chunk := upstream.raw.read1(65536):
            yield chunk
    finally:
        upstream.close()
