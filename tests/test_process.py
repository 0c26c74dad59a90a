"""The real `webhookd serve` process: kill -9, SIGTERM drain, --dev with no config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest

WEBHOOKD = [sys.executable, "-m", "webhookd"]


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class ThreadReceiver:
    """A receiver in a thread, independent of any event loop; status and delay are settable."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []  # of each body, in the same order
        self.spans: list[tuple[float, float, int]] = []  # every request: monotonic start, end, status
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                start = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if outer.delay:
                    time.sleep(outer.delay)
                with outer.lock:
                    status = outer.status
                    outer.spans.append((start, time.monotonic(), status))
                    if status == 200:
                        outer.bodies.append(body)
                        outer.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> set[str]:
        return {p["data"]["message_id"] for p in self.payloads()}

    def payloads(self) -> list[dict[str, Any]]:
        """The JSON bodies answered 200, in arrival order."""
        with self.lock:
            return [json.loads(b) for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[ThreadReceiver]:
    r = ThreadReceiver()
    yield r
    r.close()


class Proc:
    def __init__(self, root: Path, run: Path, delivery: dict[str, Any] | None = None) -> None:
        self.root = root
        self.run = run
        self.config = root / "config.toml"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.write_config(delivery)
        self.env = {**os.environ, "WEBHOOKD_CONFIG": str(self.config)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "daemon.log"

    def write_config(self, delivery: dict[str, Any] | None = None, *, intake: dict[str, Any] | None = None,
                     tables: str = "") -> None:
        """(Re)write the config file: the test's [delivery] defaults updated with `delivery`,
        [intake] keys beside http_listen, then `tables` (more TOML tables, verbatim)."""
        settings = {"retry_base": "50ms", "retry_max": "200ms", "shutdown_grace": "5s", **(delivery or {})}

        def keys(values: dict[str, Any]) -> str:
            return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())

        self.config.write_text(
            f'environment = "development"\nstate_dir = "{self.root / "state"}"\nruntime_dir = "{self.run}"\n'
            f'[intake]\nhttp_listen = "127.0.0.1:{self.port}"\n' + keys(intake or {})
            + '[log]\nformat = "json"\n'
            "[delivery]\n" + keys(settings) + tables
        )

    def logged(self, word: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines that contain `word`, oldest first (whole lines only:
        the last one may be being written)."""
        return [json.loads(x) for x in self.log.read_text().splitlines(keepends=True) if word in x and x[-1] == "\n"]

    def reload(self, timeout: float = 15.0) -> dict[str, Any]:
        """kill -HUP the daemon; the log line of that reload ("config reloaded" or "... failed")."""
        assert self.proc is not None
        before = len(self.logged('"config reload'))
        self.proc.send_signal(signal.SIGHUP)
        lines = wait_until(lambda: self.logged('"config reload')[before:], timeout, what="the reload log line")
        return dict(lines[0])

    def start(self) -> Self:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*WEBHOOKD, "serve"], env=self.env, stdout=out, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            return self.cli("status").returncode == 0

        wait_until(ready, what="the daemon to answer")
        return self

    def cli(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*WEBHOOKD, *args], env=self.env, input=stdin, capture_output=True, timeout=60)

    def json(self, *args: str) -> Any:
        p = self.cli(*args, "--json")
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def lines(n: int, prefix: str) -> bytes:
    out = []
    for i in range(n):
        out.append(json.dumps({"event": "delivered", "data": {"message_id": f"<{prefix}-{i}@x>"}}))
    return ("\n".join(out) + "\n").encode()


def test_acknowledged_events_survive_kill_9(proc: Callable[..., Proc], receiver: ThreadReceiver) -> None:
    receiver.status = 503
    d = proc({"retry_base": "1s", "retry_max": "1s"}).start()
    d.json("webhooks", "create", "--url", receiver.url)
    p = d.cli("submit", stdin=lines(300, "k"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(b'"ok":true') == 300
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)

    receiver.status = 200
    d.start()
    expected = {f"<k-{i}@x>" for i in range(300)}
    wait_until(lambda: receiver.delivered() >= expected, timeout=60, what="all acknowledged events")


def test_sigterm_lets_in_flight_deliveries_finish(proc: Callable[..., Proc], receiver: ThreadReceiver) -> None:
    receiver.delay = 0.5
    d = proc().start()
    hook = d.json("webhooks", "create", "--url", receiver.url)
    # 4: a new webhook's slow-start window, so all of them are in flight at once
    assert d.cli("submit", stdin=lines(4, "t")).returncode == 0
    time.sleep(0.2)  # the requests are now in flight at the slow receiver
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert receiver.delivered() == {f"<t-{i}@x>" for i in range(4)}
    # their outcomes were recorded before exit: nothing is sent again after a restart
    d.start()
    ds = d.json("deliveries", "list", "--webhook", hook["id"])["deliveries"]
    assert {x["status"] for x in ds} == {"succeeded"}
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    assert len(receiver.bodies) == 4


def test_submit_exit_codes(proc: Callable[..., Proc]) -> None:
    d = proc()
    p = d.cli("submit", '{"event": "delivered", "data": {"message_id": "a"}}')
    assert p.returncode == 75  # daemon not running: MTAs retry later
    d.start()
    assert d.cli("submit", '{"event": "delivered", "data": {"message_id": "a"}}').returncode == 0
    p = d.cli("submit", '{"event": "nope", "data": {"message_id": "a"}}')
    assert p.returncode == 65 and b"nope" in p.stdout


def test_serve_dev_works_with_no_config(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WEBHOOKD_CONFIG", "STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 8025))
        except OSError:
            pytest.skip("127.0.0.1:8025, the --dev default, is in use on this machine")
    p = subprocess.Popen([*WEBHOOKD, "serve", "--dev"], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (tmp_path / "webhookd-data" / "admin.sock").exists(), what="sockets in ./webhookd-data")
        status = subprocess.run([*WEBHOOKD, "status", "--json"], cwd=tmp_path, env=env, capture_output=True,
                                timeout=30)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["webhooks"] == {"enabled": 0, "disabled": 0}
        assert (tmp_path / "webhookd-data" / "intake.sock").exists()
        assert (tmp_path / "webhookd-data" / "webhookd.db").exists()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0


def test_sighup_reloads_and_keeps_the_old_config_on_error(proc: Callable[..., Proc]) -> None:
    d = proc().start()
    assert d.proc is not None
    text = d.config.read_text()
    d.write_config({"retry_base": "100ms"}, intake={"max_connections": 7})
    reloaded = d.reload()
    assert reloaded["event"] == "config reloaded" and "intake" in reloaded["needs_restart"]
    d.config.write_text("[delivery]\nretry_base = 'soon'\n")
    failed = d.reload()
    assert failed["event"] == "config reload failed; keeping the running config"
    assert "delivery.retry_base" in failed["error"]
    assert d.proc.poll() is None  # still running, on the old config
    d.config.write_text(text)
    assert d.cli("status").returncode == 0


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_sd_notify_over_a_real_datagram_socket(proc: Callable[..., Proc], short_dir: Path, abstract: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"webhookd-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(short_dir / "notify.sock")
        sock.bind(address)
    sock.settimeout(10)
    d = proc()
    d.env = {**d.env, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    d.start()
    messages: list[str] = []

    def receive_until(word: str) -> None:
        while not any(word in m for m in messages):
            messages.append(sock.recv(4096).decode())

    receive_until("READY=1")
    ready = next(m for m in messages if "READY=1" in m)
    assert "STATUS=0 deliveries pending" in ready and f"MAINPID={d.proc.pid}" in ready  # type: ignore[union-attr]
    receive_until("WATCHDOG=1")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    receive_until("STOPPING=1")
    assert d.proc.wait(15) == 0
    sock.close()


def test_serve_runs_on_uvloop_when_installed(proc: Callable[..., Proc]) -> None:
    pytest.importorskip("uvloop")
    d = proc().start()
    p = d.cli("submit", '{"event": "delivered", "data": {"message_id": "u"}}')
    assert p.returncode == 0, p.stdout + p.stderr
    assert b"uvloop" in d.log.read_bytes()  # the start line names the event loop
