"""Talking to providers over HTTP: the only module that imports ``requests`` or sees its exceptions.

One ``requests.Session`` per thread (Sessions are not documented as thread-safe), connection pooling
within it, and every lower-level exception translated into :class:`UpstreamError` with a ``sent``
flag: whether the request may have reached the provider, which decides if retrying it could pay
twice (SPEC §5.1).
"""

from __future__ import annotations

import http.client
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
from requests.adapters import BaseAdapter, HTTPAdapter

from ..config import Provider

USER_AGENT = "arbstr/0.1"
READ_SIZE = 65536


class UpstreamError(Exception):
    """A provider could not be reached or its answer could not be read."""

    def __init__(self, message: str, *, sent: bool, timeout: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.timeout = timeout


class Cutoff:
    """Ends an abandoned attempt's connection at once, from another thread.

    Per-read timeouts restart with every byte, so an upstream that trickles its headers or body would
    outlive the request's deadline and hold its connection (and, at shutdown, the worker) long after
    the client got its 504. The request thread fires the cutoff when the deadline passes: the socket of
    the attempt in flight (and of any attempt that starts later) is shut down, which ends a read blocked
    in the chain's thread at once; ``fired`` tells the attempt why its answer broke off.
    """

    def __init__(self) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sock = sock
            fired = self.fired
        if fired:
            _shut(sock)

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = self._sock
        if sock is not None:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        # The plain socket call on the descriptor: works for TLS sockets too, and after http.client
        # has dropped its reference to a Connection: close socket that the response still reads.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


_watching = threading.local()  # the Cutoff of the attempt this thread is sending, if any


class _Watched:
    """Reports the socket of each request (new or pooled connection) to the sending attempt's Cutoff."""

    sock: socket.socket | None

    def _report(self) -> None:
        cutoff = getattr(_watching, "cutoff", None)
        if cutoff is not None:
            cutoff.attach(self.sock)

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self._report()

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._report()  # a pooled connection is already connected: connect() will not run
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _WatchedAdapter(HTTPAdapter):
    """HTTPAdapter whose connections report to the sending attempt's Cutoff."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


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
            http = _WatchedAdapter(pool_connections=self._pool_size, pool_maxsize=self._pool_size, max_retries=0)
            s.mount("http://", http)
            s.mount("https://", http)
            for prefix, adapter in self._adapters.items():
                s.mount(prefix, adapter)
            self._local.session = s
        return s

    def get_json(self, provider: Provider, path: str, *, timeout: float) -> Any:
        """``GET {url}/{path}`` with the provider's key, parsed: a node's ``/models`` or ``/balance/info``.
        Raises UpstreamError (or ValueError for a body that is not JSON)."""
        try:
            return _get_json(self.session(), provider, path, timeout)
        except requests.RequestException as e:
            raise translate(e) from None

    def post(
        self,
        provider: Provider,
        body: bytes,
        request_id: str,
        *,
        stream: bool,
        connect_timeout: float,
        read_timeout: float,
        cutoff: Cutoff | None = None,
    ) -> requests.Response:
        """Send one attempt; the body is read by the caller (``stream=True`` always, to control reads).

        ``cutoff``, if given, is attached to the connection the attempt uses.

        The request is prepared here and sent with ``Session.send``: every header is set explicitly,
        so nothing of the Session's defaults (``Accept-Encoding: gzip``, ``python-requests`` agent)
        or the environment is merged in, and the merging itself (a tenth of a proxied request's CPU
        with requests 2.34) is skipped. ``identity``: the answer's bytes are relayed as they come.
        """
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream" if stream else "application/json",
            "Accept-Encoding": "identity",
            "Idempotency-Key": request_id,
            "User-Agent": USER_AGENT,
        }
        if provider.api_key is not None:
            headers["Authorization"] = "Bearer " + provider.api_key.reveal()
        _watching.cutoff = cutoff
        try:
            prepared = requests.PreparedRequest()
            prepared.prepare(method="POST", url=provider.endpoint, headers=headers, data=body)
            return self.session().send(
                prepared,
                stream=True,
                timeout=(max(connect_timeout, 0.001), max(read_timeout, 0.001)),
                allow_redirects=False,
                proxies={},
            )
        except requests.RequestException as e:
            raise translate(e) from None
        finally:
            _watching.cutoff = None


def _get_json(session: requests.Session, provider: Provider, path: str, timeout: float) -> Any:
    headers = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    if provider.api_key is not None:
        headers["Authorization"] = "Bearer " + provider.api_key.reveal()
    resp = session.get(provider.url.rstrip("/") + "/" + path, headers=headers, timeout=(timeout, timeout * 2),
                       allow_redirects=False)
    try:
        if resp.status_code != 200:
            raise UpstreamError(f"HTTP {resp.status_code}", sent=True)
        return resp.json()
    finally:
        resp.close()


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
    """Yield body bytes as they arrive: ``read1`` returns what is there, chunked or close-delimited.

    A provider that compresses although asked for ``identity`` is decoded (gzip, deflate), so the
    client and the JSON parser get the answer's text, never compressed bytes without their header.
    """
    raw = resp.raw
    try:
        while True:
            data = raw.read1(READ_SIZE, decode_content=True)
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


def set_read_timeout(resp: requests.Response, seconds: float) -> None:
    """Change the read timeout of an open streaming response (first-event wait → idle limit)."""
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def finish(resp: requests.Response) -> None:
    """Hand a fully read response's connection back to the pool for the next attempt."""
    release = getattr(resp.raw, "release_conn", None)
    if release is not None:
        release()
    else:
        resp.close()
