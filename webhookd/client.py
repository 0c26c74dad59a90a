"""Synchronous clients for the CLI: the admin API and the intake socket (stdlib only, fast to import)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DaemonUnreachable(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"daemon not running (cannot connect to {path}: {reason})")
        self.path = path


def _connect_unix(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise DaemonUnreachable(path, exc.strerror or str(exc)) from None
    return sock


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = _connect_unix(self.path, self.timeout or 30.0)


class AdminClient:
    """JSON over HTTP/1.1 on the admin Unix socket."""

    def __init__(self, socket_path: Path, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except DaemonUnreachable:
                raise
            except (OSError, http.client.HTTPException) as exc:
                raise DaemonUnreachable(self.socket_path, str(exc) or type(exc).__name__) from None
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = {"error": raw.decode(errors="replace")[:200]}
            return resp.status, data
        finally:
            conn.close()


def submit_lines(socket_path: Path, lines: Iterable[bytes], timeout: float = 60.0) -> Iterator[bytes]:
    """Send lines pipelined on one connection, half-close, and yield each answer line.

    A writer thread sends while this generator reads, so a large input can never
    deadlock against the daemon's answers.
    """
    sock = _connect_unix(socket_path, timeout)
    failure: list[BaseException] = []

    def write() -> None:
        try:
            for line in lines:
                sock.sendall(line if line.endswith(b"\n") else line + b"\n")
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failure.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        with sock.makefile("rb") as answers:
            for answer in answers:
                yield answer.rstrip(b"\n")
    finally:
        writer.join(timeout)
        sock.close()
    if failure:
        raise ConnectionError(f"connection to {socket_path} broke: {failure[0]}")
