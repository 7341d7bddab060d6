"""``upstream.translate``: requests/urllib3 exceptions → UpstreamError with the ``sent`` flag.

``sent`` is the money rule of SPEC §5.1: if the request may have reached the provider, retrying it on
the same provider could pay twice. The first half builds the exception objects exactly as requests
2.x / urllib3 2.x raise them; the second half provokes the real ones from raw-socket servers on
localhost (refused, silent, hung up, cut-off chunked body, stalled body, reset).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
import requests
import urllib3.exceptions as u3
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.response import HTTPResponse

from arbstr_core.config import Provider
from arbstr_core.request import failures
from arbstr_core.request.attempt import Caller
from arbstr_core.request.upstream import Upstream, UpstreamError, read_body, read_chunks, translate
from arbstr_core.secrets import Secret

URL = "http://provider.example:443/v1/chat/completions"
POOL = HTTPConnectionPool("provider.example", 443)
CONN = HTTPConnection("provider.example", 443)
REQUEST = requests.Request("POST", URL).prepare()


def connect_timeout() -> requests.ConnectTimeout:
    reason = u3.ConnectTimeoutError(CONN, "Connection to provider.example timed out. (connect timeout=5)")
    return requests.ConnectTimeout(u3.MaxRetryError(POOL, URL, reason), request=REQUEST)


def refused() -> requests.ConnectionError:
    reason = u3.NewConnectionError(CONN, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.ConnectionError(u3.MaxRetryError(POOL, URL, reason), request=REQUEST)


def dns_failure() -> requests.ConnectionError:
    reason = u3.NameResolutionError("provider.example", CONN, socket.gaierror(-2, "Name or service not known"))
    return requests.ConnectionError(u3.MaxRetryError(POOL, URL, reason), request=REQUEST)


def read_timeout() -> requests.ReadTimeout:
    return requests.ReadTimeout(u3.ReadTimeoutError(POOL, URL, "Read timed out. (read timeout=30)"), request=REQUEST)


def read_timeout_mid_body() -> requests.ConnectionError:
    # iter_content re-raises urllib3's ReadTimeoutError as ConnectionError (FIELD-NOTES), not Timeout.
    return requests.ConnectionError(u3.ReadTimeoutError(POOL, None, "Read timed out."))


def remote_disconnected() -> requests.ConnectionError:
    cause = http.client.RemoteDisconnected("Remote end closed connection without response")
    return requests.ConnectionError(u3.ProtocolError("Connection aborted.", cause), request=REQUEST)


def reset_after_send() -> requests.ConnectionError:
    cause = ConnectionResetError(104, "Connection reset by peer")
    return requests.ConnectionError(u3.ProtocolError("Connection aborted.", cause), request=REQUEST)


def chunked_cut() -> requests.exceptions.ChunkedEncodingError:
    cause = u3.ProtocolError("Response ended prematurely")
    return requests.exceptions.ChunkedEncodingError(cause)


def invalid_chunk_length() -> requests.exceptions.ChunkedEncodingError:
    resp = HTTPResponse(body=b"", preload_content=False)
    cause = u3.ProtocolError("Connection broken: InvalidChunkLength(got length b'', 0 bytes read)",
                             u3.InvalidChunkLength(resp, b""))
    return requests.exceptions.ChunkedEncodingError(cause)


def max_retry_read_timeout() -> requests.ConnectionError:
    reason = u3.ReadTimeoutError(POOL, URL, "Read timed out. (read timeout=30)")
    return requests.ConnectionError(u3.MaxRetryError(POOL, URL, reason), request=REQUEST)


# (exception, sent, timeout)
CASES: dict[str, tuple[Callable[[], BaseException], bool, bool]] = {
    "connect timeout": (connect_timeout, False, True),
    "connection refused": (refused, False, False),
    "dns failure": (dns_failure, False, False),
    "read timeout": (read_timeout, True, True),
    "read timeout mid-body": (read_timeout_mid_body, True, True),
    "read timeout after retries": (max_retry_read_timeout, True, True),
    "remote disconnected": (remote_disconnected, True, False),
    "reset after sending": (reset_after_send, True, False),
    "chunked body cut": (chunked_cut, True, False),
    "invalid chunk length": (invalid_chunk_length, True, False),
    "bare urllib3 protocol error from read1": (lambda: u3.ProtocolError("Response ended prematurely"), True, False),
    "bare urllib3 read timeout from read1": (lambda: u3.ReadTimeoutError(None, None, "Read timed out."), True, True),
    "incomplete read": (lambda: http.client.IncompleteRead(b"partial", 100), True, False),
    "socket error": (lambda: OSError(32, "Broken pipe"), True, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_translate_constructed_exceptions(name: str) -> None:
    make, sent, timeout = CASES[name]
    err = translate(make())
    assert isinstance(err, UpstreamError)
    assert (err.sent, err.timeout) == (sent, timeout), name


def test_new_connection_error_is_a_connect_timeout_subclass_but_never_sent() -> None:
    # urllib3 makes NewConnectionError a subclass of ConnectTimeoutError; it must still be "not sent"
    # and must not be reported as a timeout.
    assert issubclass(u3.NewConnectionError, u3.ConnectTimeoutError)
    err = translate(refused())
    assert (err.sent, err.timeout) == (False, False)


def test_translated_messages_do_not_carry_urls_or_hosts() -> None:
    for make, _, _ in CASES.values():
        message = str(translate(make()))
        assert "provider.example" not in message and "http" not in message


# --- real exceptions from real sockets ----------------------------------------------------------


class RawServer:
    """Accepts connections on localhost and runs ``behaviour(conn, request_bytes)`` for each."""

    def __init__(self, behaviour: Callable[[socket.socket, bytes, threading.Event], None]) -> None:
        self.behaviour = behaviour
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = read_request(conn)
                self.requests.append(request)
                self.behaviour(conn, request, self.done)

    def close(self) -> None:
        self.done.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


def read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return data
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        part = conn.recv(65536)
        if not part:
            break
        body += part
    return head + b"\r\n\r\n" + body


def silent(conn: socket.socket, request: bytes, done: threading.Event) -> None:
    done.wait(10)


def hang_up(conn: socket.socket, request: bytes, done: threading.Event) -> None:
    pass  # closed by the `with` in _serve, without a byte of response


def reset(conn: socket.socket, request: bytes, done: threading.Event) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST


def cut_chunked(conn: socket.socket, request: bytes, done: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"d\r\ndata: hello\n\n\r\n" b"20\r\ndata: cut")  # 13 bytes, then 9 of 32


def stall_body(conn: socket.socket, request: bytes, done: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"id\":")
    done.wait(10)


@pytest.fixture
def server() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def start(behaviour: Callable[[socket.socket, bytes, threading.Event], None]) -> RawServer:
        s = RawServer(behaviour)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def provider_at(port: int, key: str | None = None) -> Provider:
    return Provider("provider-alpha", f"http://127.0.0.1:{port}/v1", ("gpt-4o",),
                    api_key=Secret(key) if key else None)


def raw_post(port: int, read: float = 0.3) -> requests.Response:
    return Upstream().session().post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}",
                                     timeout=(2, read), stream=True)


def real_exception(fn: Callable[[], object]) -> requests.RequestException:
    with pytest.raises(requests.RequestException) as e:
        fn()
    return e.value


def test_real_connection_refused_is_not_sent() -> None:
    port = closed_port()
    exc = real_exception(lambda: raw_post(port))
    assert type(exc) is requests.ConnectionError
    err = translate(exc)
    assert (err.sent, err.timeout) == (False, False)


def test_real_read_timeout_is_sent(server: Callable[..., RawServer]) -> None:
    s = server(silent)
    exc = real_exception(lambda: raw_post(s.port, read=0.2))
    assert isinstance(exc, requests.ReadTimeout)
    err = translate(exc)
    assert (err.sent, err.timeout) == (True, True)
    assert s.requests and s.requests[0].startswith(b"POST /v1/chat/completions"), "the request did arrive"


def test_real_remote_disconnect_is_sent(server: Callable[..., RawServer]) -> None:
    s = server(hang_up)
    exc = real_exception(lambda: raw_post(s.port))
    assert type(exc) is requests.ConnectionError
    err = translate(exc)
    assert (err.sent, err.timeout) == (True, False)


def test_real_reset_after_request_is_sent(server: Callable[..., RawServer]) -> None:
    s = server(reset)
    exc = real_exception(lambda: raw_post(s.port))
    assert isinstance(exc, requests.ConnectionError)
    assert translate(exc).sent is True


def test_real_cut_chunked_body_via_iter_content(server: Callable[..., RawServer]) -> None:
    s = server(cut_chunked)
    resp = raw_post(s.port)
    exc = real_exception(lambda: b"".join(resp.iter_content(None)))
    assert isinstance(exc, requests.exceptions.ChunkedEncodingError)
    assert translate(exc).sent is True


def test_real_cut_chunked_body_via_read_chunks(server: Callable[..., RawServer]) -> None:
    s = server(cut_chunked)
    resp = raw_post(s.port)
    got: list[bytes] = []
    with pytest.raises(UpstreamError) as e:
        for chunk in read_chunks(resp):
            got.append(chunk)  # noqa: PERF402 - keeps what arrived before the exception
    assert e.value.sent is True and e.value.timeout is False
    assert b"".join(got).startswith(b"data: hello\n\n"), "what arrived before the cut was relayed"


def test_real_read_timeout_mid_body_via_read_body(server: Callable[..., RawServer]) -> None:
    s = server(stall_body)
    resp = raw_post(s.port, read=0.2)
    with pytest.raises(UpstreamError) as e:
        read_body(resp, 1 << 20)
    assert (e.value.sent, e.value.timeout) == (True, True)


def test_upstream_post_raises_only_upstream_errors() -> None:
    port = closed_port()
    with pytest.raises(UpstreamError) as e:
        Upstream().post(provider_at(port), b"{}", "req-1", stream=False, connect_timeout=1, read_timeout=1)
    assert e.value.sent is False
    assert e.value.__cause__ is None and e.value.__suppress_context__, "requests' exception is not chained"


def test_upstream_post_sends_the_key_only_in_authorization(server: Callable[..., RawServer]) -> None:
    key = "cashuAupstreamkey0123456789"
    s = server(silent)
    with pytest.raises(UpstreamError) as e:
        Upstream().post(provider_at(s.port, key), b'{"model":"gpt-4o"}', "req-42", stream=True,
                        connect_timeout=1, read_timeout=0.2)
    assert e.value.sent and e.value.timeout
    head, _, body = s.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers["authorization"] == f"Bearer {key}"
    assert headers["idempotency-key"] == "req-42"
    assert headers["content-type"] == "application/json"
    assert body == b'{"model":"gpt-4o"}'
    assert key not in str(e.value)


# --- the verdict an attempt ends with: sent decides whether the same provider is asked again ------


def caller() -> Caller:
    return Caller(Upstream(), b"{}", {}, "req-1", connect_timeout=1, read_timeout=0.2, max_response_bytes=1 << 20,
                  max_retry_after=10, scrub=lambda s: s)


def test_refused_attempt_may_be_retried_on_the_same_provider() -> None:
    result = caller().json(provider_at(closed_port()), None)
    assert result.verdict is failures.CONNECT_FAILED and result.verdict.retry_same


@pytest.mark.parametrize("behaviour", [silent, hang_up, stall_body])
def test_attempt_that_reached_the_provider_is_never_retried_there(
    server: Callable[..., RawServer], behaviour: Callable[[socket.socket, bytes, threading.Event], None]
) -> None:
    s = server(behaviour)
    result = caller().json(provider_at(s.port), None)
    assert result.verdict is failures.SENT_FAILED
    assert not result.verdict.retry_same and result.verdict.fallback
