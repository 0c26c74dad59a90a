"""Synchronous clients for the CLI: the admin API and the intake socket.

Standard library only. `http.client` (which pulls in `ssl` and `email`) is imported on
first use, so `webhookd submit` -- run once per message by MTA hooks -- pays only for
`socket` and `threading`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import http.client

DEFAULT_TIMEOUT = 30.0


class DaemonUnreachable(Exception):
    """Nothing accepts connections on the socket: missing, refused, or not a socket."""

    def __init__(self, socket_path: Path, reason: str) -> None:
        super().__init__(f"daemon not running (cannot connect to {socket_path}: {reason})")
        self.socket_path = socket_path
        self.reason = reason


class ConnectionBroken(Exception):
    """Connected, but the exchange did not complete: reset, timeout, or a garbled answer."""

    def __init__(self, socket_path: Path, reason: str) -> None:
        super().__init__(f"connection to the daemon on {socket_path} failed: {reason}")
        self.socket_path = socket_path
        self.reason = reason


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def connect_unix(socket_path: Path, timeout: float) -> socket.socket:
    """A connected AF_UNIX stream socket, or DaemonUnreachable."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except OSError as exc:
        sock.close()
        raise DaemonUnreachable(socket_path, _reason(exc)) from None
    return sock


def _unix_connection(socket_path: Path, timeout: float) -> http.client.HTTPConnection:
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        """HTTP/1.1 over an AF_UNIX socket; the Host header says `localhost`."""

        def connect(self) -> None:
            self.sock = connect_unix(socket_path, timeout)

    return UnixHTTPConnection("localhost", timeout=timeout)


class AdminClient:
    """JSON over HTTP/1.1 on the admin Unix socket, one connection per request."""

    def __init__(self, socket_path: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.last_body = b""  # the raw JSON of the last answer, for --json

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body). An undecodable error body becomes {"error": text}."""
        import http.client

        conn = _unix_connection(self.socket_path, self.timeout)
        headers = {"Accept": "application/json"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionBroken(self.socket_path, _reason(exc)) from None
        finally:
            conn.close()
        self.last_body = raw
        if not raw.strip():
            return resp.status, None
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            text = " ".join(raw.decode("utf-8", "replace").split())[:200]
            if resp.status >= 400:
                return resp.status, {"error": f"HTTP {resp.status} {resp.reason}: {text}"}
            raise ConnectionBroken(self.socket_path, f"HTTP {resp.status} answer is not JSON: {text!r}") from None


class _Writer:
    """Sends every line, then shuts down the write side; runs in its own thread."""

    def __init__(self, sock: socket.socket, lines: Iterable[bytes]) -> None:
        self.sock = sock
        self.lines = lines
        self.sent = 0
        self.finished = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for line in self.lines:
                self.sock.sendall(line if line.endswith(b"\n") else line + b"\n")
                self.sent += 1
            self.sock.shutdown(socket.SHUT_WR)
            self.finished = True
        except BaseException as exc:  # reported by the reading side
            self.error = exc


def submit_lines(socket_path: Path, lines: Iterable[bytes], timeout: float = DEFAULT_TIMEOUT) -> Iterator[bytes]:
    """Pipeline `lines` to the intake socket and yield each answer line (without newline).

    A writer thread sends while the caller reads answers, so a large input cannot
    deadlock against the daemon's answers; `lines` may be lazy (e.g. standard input).
    After the last line the write side is shut down and answers are read until the
    daemon closes. Raises DaemonUnreachable if nothing listens, and ConnectionBroken if
    the connection fails or closes before every sent line was answered. `timeout`
    bounds each socket operation.
    """
    sock = connect_unix(socket_path, timeout)
    writer = _Writer(sock, lines)
    thread = threading.Thread(target=writer.run, name="webhookd-submit", daemon=True)
    thread.start()
    answered = 0
    try:
        try:
            with sock.makefile("rb") as answers:
                for answer in answers:
                    answered += 1
                    yield answer.rstrip(b"\r\n")
        except OSError as exc:
            raise ConnectionBroken(socket_path, _reason(exc)) from None
    finally:
        if thread.is_alive():
            # Normally the writer is done (the daemon closes only after our EOF);
            # otherwise wake it from a blocked send and do not wait on its input.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            thread.join(1.0)
        sock.close()
    if writer.error is not None:
        raise ConnectionBroken(socket_path, f"sending failed after {writer.sent} lines: {_reason(writer.error)}")
    if not writer.finished:
        raise ConnectionBroken(socket_path, f"the daemon closed the connection after {answered} answers")
    if answered < writer.sent:
        raise ConnectionBroken(socket_path, f"the connection closed after {answered} of {writer.sent} answers")
