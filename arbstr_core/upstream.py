"""Talking to providers over HTTP: the only module that imports ``requests`` or sees its exceptions.

One ``requests.Session`` per thread (Sessions are not documented as thread-safe), connection pooling
within it, and every lower-level exception translated into :class:`UpstreamError` with a ``sent``
flag: whether the request may have reached the provider, which decides if retrying it could pay
twice (SPEC §5.1).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator, Mapping

import requests
import urllib3.exceptions
from requests.adapters import BaseAdapter, HTTPAdapter

from .config import Provider

USER_AGENT = "arbstr/0.1"
READ_SIZE = 65536


class UpstreamError(Exception):
    """A provider could not be reached or its answer could not be read."""

    def __init__(self, message: str, *, sent: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.timeout = timeout


class Upstream:
    """Per-thread sessions; ``adapters`` maps URL prefixes to transports (mock mode, tests)."""

    def __init__(self, adapters: Mapping[str, BaseAdapter] | None = None, pool_size: int = 16) -> None:
        self._adapters = dict(adapters or {})
        self._pool_size = pool_size
        self._local = threading.local()

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.trust_env = False  # never route provider traffic through an ambient proxy or .netrc
            http = HTTPAdapter(pool_connections=self._pool_size, pool_maxsize=self._pool_size, max_retries=0)
            s.mount("http://", http)
            s.mount("https://", http)
            for prefix, adapter in self._adapters.items():
                s.mount(prefix, adapter)
            self._local.session = s
        return s

    def post(
        self,
        provider: Provider,
        body: bytes,
        request_id: str,
        *,
        stream: bool,
        connect_timeout: float,
        read_timeout: float,
    ) -> requests.Response:
        """Send one attempt; the body is read by the caller (``stream=True`` always, to control reads)."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "Idempotency-Key": request_id,
            "User-Agent": USER_AGENT,
        }
        if stream:
            headers["Accept-Encoding"] = "identity"  # SSE bytes must arrive as sent, event by event
        if provider.api_key is not None:
            headers["Authorization"] = "Bearer " + provider.api_key.reveal()
        try:
            return self.session().post(
                provider.endpoint,
                data=body,
                headers=headers,
                stream=True,
                timeout=(max(connect_timeout, 0.001), max(read_timeout, 0.001)),
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise translate(e) from None


def _causes(e: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps: requests wraps urllib3, which wraps the socket error."""
    for _ in range(6):
        yield e
        inner = getattr(e, "reason", None)
        if not isinstance(inner, BaseException) and e.args and isinstance(e.args[0], BaseException):
            inner = e.args[0]
        if not isinstance(inner, BaseException):
            return
        e = inner


def translate(e: BaseException) -> UpstreamError:
    """Map a requests/urllib3 exception to an UpstreamError, deciding whether the request was sent."""
    chain = list(_causes(e))
    if any(isinstance(x, urllib3.exceptions.NewConnectionError) for x in chain):
        return UpstreamError("connection failed", sent=False)  # includes DNS failures
    if isinstance(e, requests.ConnectTimeout) or any(
        type(x) is urllib3.exceptions.ConnectTimeoutError for x in chain
    ):
        return UpstreamError("connect timeout", sent=False, timeout=True)
    if any(isinstance(x, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for x in chain):
        return UpstreamError("read timeout", sent=True, timeout=True)
    return UpstreamError(f"connection lost ({type(chain[-1]).__name__})", sent=True)


def read_chunks(resp: requests.Response) -> Iterator[bytes]:
    """Yield body bytes as they arrive: ``read1`` returns what is there, chunked or close-delimited."""
    raw = resp.raw
    try:
        while True:
            data = raw.read1(READ_SIZE)
            if not data:
                return
            yield data
    except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
        raise translate(e) from None


def read_body(resp: requests.Response, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (a larger answer is an error, not a memory spike)."""
    parts: list[bytes] = []
    size = 0
    for chunk in read_chunks(resp):
        size += len(chunk)
        if size > limit:
            raise UpstreamError(f"response larger than {limit} bytes", sent=True)
        parts.append(chunk)
    return b"".join(parts)


def finish(resp: requests.Response) -> None:
    """Hand a fully read response's connection back to the pool for the next attempt."""
    release = getattr(resp.raw, "release_conn", None)
    if release is not None:
        release()
    else:
        resp.close()
