"""The command line, in-process, against fake admin and intake servers on real Unix sockets."""

from __future__ import annotations

import io
import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from webhookd import cli
from webhookd.config import Config

HOOK: dict[str, Any] = {
    "id": "wh_abc",
    "url": "https://hooks.example.com/mail",
    "events": ["delivered", "bounced"],
    "description": "CRM",
    "enabled": True,
    "disabled_reason": None,
    "consecutive_failures": 0,
    "created_at": "2026-02-23T10:30:02Z",
    "updated_at": "2026-02-23T10:30:02Z",
}
SECRET = "whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="
DELIVERY: dict[str, Any] = {
    "id": 7,
    "event_id": "evt_1",
    "webhook_id": "wh_abc",
    "event": "bounced",
    "status": "pending",
    "attempts": 2,
    "next_attempt_at": "2026-02-23T10:31:02Z",
    "last_status_code": 503,
    "last_error": "HTTP 503",
    "created_at": "2026-02-23T10:30:02Z",
    "updated_at": "2026-02-23T10:30:32Z",
}
STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "uptime_s": 3725.5,
    "deliveries": {"pending": 3, "paused": 1, "succeeded": 120, "failed": 2},
    "webhooks": {"enabled": 2, "disabled": 1},
}


# -- a fake admin API -------------------------------------------------------------------------------
@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeAdmin:
    """Answers canned JSON per (method, path); records every request."""

    path: Path
    routes: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    hang_up: bool = False

    def reply(self, method: str, path: str, body: Any, status: int = 200) -> None:
        self.routes[(method, path)] = (status, body)

    @property
    def last(self) -> Request:
        assert self.requests, "the CLI sent no request"
        return self.requests[-1]


class UnixHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX
    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # no getfqdn() on a path
        self.server_name, self.server_port = "localhost", 0


def make_handler(fake: FakeAdmin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fake.requests.append(
                Request(self.command, self.path, dict(self.headers), json.loads(raw) if raw else None)
            )
            if fake.hang_up:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            status, body = fake.routes.get((self.command, self.path), (404, {"error": f"no route {self.path}"}))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

    return Handler


@pytest.fixture
def admin(short_dir: Path) -> Iterator[FakeAdmin]:
    fake = FakeAdmin(short_dir / "admin.sock")
    server = UnixHTTPServer(str(fake.path), make_handler(fake))  # type: ignore[arg-type]  # an AF_UNIX path
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def config_file(tmp_path: Path, short_dir: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'runtime_dir = "{short_dir}"\n'
        "[admin]\nsocket = \"admin.sock\"\n"
        "[intake]\nsocket = \"intake.sock\"\n"
    )
    return path


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(config_file: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    """main(ARGS --config FILE) -> (exit status, stdout, stderr)."""

    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = cli.main([*args, "--config", str(config_file)])
        out, err = capsys.readouterr()
        return status, out, err

    return call


# -- requests: method, path, body ---------------------------------------------------------------------
CASES = [
    (["webhooks", "create", "--url", "https://h.example/x", "--events", "delivered,bounced", "--description", "CRM"],
     "POST", "/v1/webhooks", {"url": "https://h.example/x", "events": ["delivered", "bounced"], "description": "CRM"}),
    (["webhooks", "create", "--url", "https://h.example/x"],
     "POST", "/v1/webhooks", {"url": "https://h.example/x", "events": ["*"]}),
    (["webhooks", "create", "--url", "https://h.example/x", "--events", "all"],
     "POST", "/v1/webhooks", {"url": "https://h.example/x", "events": ["*"]}),
    (["webhooks", "create", "--url", "https://h.example/x", "--from-domain", "shop.example,*.shop.example",
      "--from-domain", "eu.example", "--to-domain", "gmail.example", "--tag", "vip", "--tag", "eu,vip",
      "--metadata", "plan=gold", "--metadata", "note=a=b, c"],
     "POST", "/v1/webhooks", {"url": "https://h.example/x", "events": ["*"], "filter": {
         "from_domains": ["shop.example", "*.shop.example", "eu.example"], "to_domains": ["gmail.example"],
         "tags": ["vip", "eu"], "metadata": {"plan": "gold", "note": "a=b, c"}}}),
    (["webhooks", "update", "wh_abc", "--clear-filter"], "PATCH", "/v1/webhooks/wh_abc", {"filter": {}}),
    (["webhooks", "update", "wh_abc", "--clear-filter", "--tag", "vip"],
     "PATCH", "/v1/webhooks/wh_abc", {"filter": {"tags": ["vip"]}}),
    (["webhooks", "list"], "GET", "/v1/webhooks", None),
    (["webhooks", "show", "wh_abc"], "GET", "/v1/webhooks/wh_abc", None),
    (["webhooks", "update", "wh_abc", "--events", "opened,clicked"],
     "PATCH", "/v1/webhooks/wh_abc", {"events": ["opened", "clicked"]}),
    (["webhooks", "update", "wh_abc", "--url", "https://n.example/", "--description", ""],
     "PATCH", "/v1/webhooks/wh_abc", {"url": "https://n.example/", "description": ""}),
    (["webhooks", "delete", "wh_abc"], "DELETE", "/v1/webhooks/wh_abc", None),
    (["webhooks", "enable", "wh_abc"], "POST", "/v1/webhooks/wh_abc/enable", {"drop_backlog": False}),
    (["webhooks", "enable", "wh_abc", "--drop-backlog"], "POST", "/v1/webhooks/wh_abc/enable", {"drop_backlog": True}),
    (["webhooks", "disable", "wh_abc"], "POST", "/v1/webhooks/wh_abc/disable", None),
    (["webhooks", "test", "wh_abc"], "POST", "/v1/webhooks/wh_abc/test", {"event": "delivered"}),
    (["webhooks", "test", "wh_abc", "--event", "bounced"], "POST", "/v1/webhooks/wh_abc/test", {"event": "bounced"}),
    (["webhooks", "rotate-secret", "wh_abc"], "POST", "/v1/webhooks/wh_abc/rotate-secret", None),
    (["webhooks", "secret", "wh_abc"], "GET", "/v1/webhooks/wh_abc/secret", None),
    (["webhooks", "show", "a/b c"], "GET", "/v1/webhooks/a%2Fb%20c", None),
    (["deliveries", "list"], "GET", "/v1/deliveries", None),
    (["deliveries", "list", "--webhook", "wh_abc", "--status", "failed,paused", "--limit", "5"],
     "GET", "/v1/deliveries?webhook_id=wh_abc&status=failed%2Cpaused&limit=5", None),
    (["deliveries", "list", "--limit", "20"], "GET", "/v1/deliveries?limit=20", None),
    (["deliveries", "show", "7"], "GET", "/v1/deliveries/7", None),
    (["deliveries", "retry", "7"], "POST", "/v1/deliveries/7/retry", None),
    (["status"], "GET", "/v1/status", None),
]


@pytest.mark.parametrize(("argv", "method", "path", "body"), CASES, ids=lambda v: " ".join(v) if isinstance(v, list)
                         else None)
def test_each_command_sends_its_request_and_prints_the_json(
    admin: FakeAdmin, run: Run, argv: list[str], method: str, path: str, body: Any
) -> None:
    answer = {"some": "document", "n": [1, 2, None], "text": "ünïcode"}
    admin.reply(method, path, answer, 201 if method == "POST" else 200)
    status, out, err = run(*argv, "--json")
    assert (status, err) == (0, "")
    assert out == json.dumps(answer) + "\n"  # exactly the API's document, once
    req = admin.last
    assert (req.method, req.path, req.body) == (method, path, body)
    if body is not None:
        assert req.headers["Content-Type"] == "application/json"
    assert len(admin.requests) == 1


def test_update_without_changes_is_a_usage_error(admin: FakeAdmin, run: Run) -> None:
    status, _, err = run("webhooks", "update", "wh_abc")
    assert status == 2
    assert "nothing to update" in err
    assert admin.requests == []


def test_update_with_filter_flags_replaces_only_those_fields(admin: FakeAdmin, run: Run) -> None:
    current = {"from_domains": ["shop.example"], "to_domains": [], "tags": ["vip"], "metadata": {"plan": "gold"}}
    admin.reply("GET", "/v1/webhooks/wh_abc", {**HOOK, "filter": current})
    admin.reply("PATCH", "/v1/webhooks/wh_abc", HOOK)
    status, _, err = run("webhooks", "update", "wh_abc", "--from-domain", "a.example, b.example", "--tag", "")
    assert (status, err) == (0, "")
    assert [(r.method, r.path) for r in admin.requests] == [("GET", "/v1/webhooks/wh_abc"),
                                                            ("PATCH", "/v1/webhooks/wh_abc")]
    assert admin.last.body == {"filter": {"from_domains": ["a.example", "b.example"], "to_domains": [], "tags": [],
                                          "metadata": {"plan": "gold"}}}


@pytest.mark.parametrize("bad", ["plan", "=gold", " =x"])
def test_metadata_flags_must_be_key_value(admin: FakeAdmin, run: Run, bad: str) -> None:
    status, _, err = run("webhooks", "create", "--url", "https://h.example/x", "--metadata", bad)
    assert status == 2 and "--metadata takes KEY=VALUE" in err
    assert admin.requests == []


def test_the_filter_is_shown_short_in_lists_and_whole_in_show(admin: FakeAdmin, run: Run) -> None:
    domains = [f"tenant{i}.example" for i in range(8)]
    f = {"from_domains": domains, "to_domains": [], "tags": ["vip"], "metadata": {"plan": "gold"}}
    admin.reply("GET", "/v1/webhooks", {"webhooks": [{**HOOK, "filter": f}]})
    admin.reply("GET", "/v1/webhooks/wh_abc", {**HOOK, "filter": f})
    _, out, _ = run("webhooks", "list")
    header, row = out.splitlines()
    cell = row[header.index("FILTER"):header.index("URL")].strip()
    assert cell.startswith("from tenant0.example,tenant1.example") and cell.endswith("…") and len(cell) == 40
    _, out, _ = run("webhooks", "show", "wh_abc")
    assert f"filter:               from {','.join(domains)}; tags vip; metadata plan=gold\n" in out


def test_options_go_before_or_after_the_command(admin: FakeAdmin, config_file: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    admin.reply("GET", "/v1/webhooks/wh_abc", HOOK)
    for argv in (["--json", "--config", str(config_file), "webhooks", "show", "wh_abc"],
                 ["webhooks", "--config", str(config_file), "show", "--json", "wh_abc"],
                 ["webhooks", "show", "wh_abc", "--json", "--config", str(config_file)]):
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out) == HOOK


# -- readable output --------------------------------------------------------------------------------
def test_create_shows_the_secret_once_with_a_reminder(admin: FakeAdmin, run: Run) -> None:
    admin.reply("POST", "/v1/webhooks", {**HOOK, "secret": SECRET}, 201)
    status, out, _ = run("webhooks", "create", "--url", HOOK["url"])
    assert status == 0
    assert "id:" in out and "wh_abc" in out
    assert "url:" in out and HOOK["url"] in out
    assert "events:" in out and "delivered,bounced" in out
    assert out.count(SECRET) == 1
    assert "store the secret now" in out.lower()


def test_rotate_secret_shows_the_new_secret(admin: FakeAdmin, run: Run) -> None:
    admin.reply("POST", "/v1/webhooks/wh_abc/rotate-secret", {**HOOK, "secret": SECRET,
                                                              "previous_secret_expires_at": "2026-02-24T10:30:02Z"})
    status, out, _ = run("webhooks", "rotate-secret", "wh_abc")
    assert status == 0
    assert SECRET in out and "store the secret now" in out.lower()
    assert "previous_secret_expires_at: 2026-02-24T10:30:02Z" in out


def test_webhooks_list_is_a_table(admin: FakeAdmin, run: Run) -> None:
    broken = {**HOOK, "id": "wh_def", "url": "https://down.example/h", "events": ["*"], "enabled": False,
              "disabled_reason": "consecutive_failures", "consecutive_failures": 10}
    admin.reply("GET", "/v1/webhooks", {"webhooks": [HOOK, broken]})
    status, out, _ = run("webhooks", "list")
    assert status == 0
    header, first, second = out.splitlines()
    assert header.split() == ["ID", "STATE", "FAILS", "EVENTS", "FILTER", "URL"]
    assert first.split() == ["wh_abc", "enabled", "0", "delivered,bounced", "-", HOOK["url"]]
    assert "wh_def" in second and "disabled (consecutive_failures)" in second and "10" in second
    assert "all" in second and "https://down.example/h" in second
    assert header.index("URL") == first.index(HOOK["url"]) == second.index("https://down.example/h")


def test_empty_lists_say_so(admin: FakeAdmin, run: Run) -> None:
    admin.reply("GET", "/v1/webhooks", {"webhooks": []})
    admin.reply("GET", "/v1/deliveries", {"deliveries": []})
    assert "no webhooks" in run("webhooks", "list")[1]
    assert "no deliveries" in run("deliveries", "list")[1]


def test_deliveries_list_is_a_table(admin: FakeAdmin, run: Run) -> None:
    done = {**DELIVERY, "id": 8, "status": "succeeded", "attempts": 1, "next_attempt_at": None,
            "last_status_code": 200, "last_error": None}
    admin.reply("GET", "/v1/deliveries?status=pending", {"deliveries": [DELIVERY, done]})
    status, out, _ = run("deliveries", "list", "--status", "pending")
    assert status == 0
    header, first, second = out.splitlines()
    for column in ("ID", "STATUS", "ATTEMPTS", "EVENT", "WEBHOOK", "NEXT ATTEMPT", "LAST"):
        assert column in header
    assert first.split()[:6] == ["7", "pending", "2", "bounced", "wh_abc", "2026-02-23T10:31:02Z"]
    assert "503" in first and "HTTP 503" in first
    assert second.split() == ["8", "succeeded", "1", "bounced", "wh_abc", "-", "200"]


def test_delivery_show_has_the_attempt_log(admin: FakeAdmin, run: Run) -> None:
    log = [
        {"at": "2026-02-23T10:30:03Z", "duration_ms": 12.34, "status_code": None, "error": "connection refused",
         "response_body": None},
        {"at": "2026-02-23T10:30:33Z", "duration_ms": 40.0, "status_code": 503, "error": "HTTP 503",
         "response_body": "busy\nplease retry"},
    ]
    admin.reply("GET", "/v1/deliveries/7", {**DELIVERY, "attempt_log": log})
    status, out, _ = run("deliveries", "show", "7")
    assert status == 0
    assert "status: " in out and "pending" in out
    assert "event_id: " in out and "evt_1" in out
    assert "last_status_code: 503" in out.replace("  ", " ").replace("  ", " ")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("AT"))
    assert header.split() == ["AT", "MS", "CODE", "ERROR", "RESPONSE"]
    assert any("10:30:03Z" in line and "connection refused" in line and " 12 " in line for line in lines)
    assert any("10:30:33Z" in line and "503" in line and "busy please retry" in line for line in lines)


def test_webhook_test_summary(admin: FakeAdmin, run: Run) -> None:
    admin.reply("POST", "/v1/webhooks/wh_abc/test",
                {"ok": False, "status_code": 500, "duration_ms": 42.3, "response_body": "oops", "error": "HTTP 500"})
    status, out, _ = run("webhooks", "test", "wh_abc")
    assert status == 0  # the test was made; the receiver's verdict is in the output
    assert "NOT accepted" in out and "HTTP 500" in out and "42 ms" in out and "oops" in out
    admin.reply("POST", "/v1/webhooks/wh_abc/test",
                {"ok": True, "status_code": 204, "duration_ms": 3, "response_body": "", "error": None})
    status, out, _ = run("webhooks", "test", "wh_abc")
    assert status == 0
    assert out.startswith("test event accepted: HTTP 204")


def test_status_summary(admin: FakeAdmin, run: Run) -> None:
    admin.reply("GET", "/v1/status", {**STATUS, "in_flight": 4})
    status, out, _ = run("status")
    assert status == 0
    assert "webhookd 0.1.0, up 1h 2m" in out
    assert "3 pending, 1 paused, 120 succeeded, 2 failed" in out
    assert "2 enabled, 1 disabled" in out
    assert "in_flight: 4" in out


def test_delete_and_secret(admin: FakeAdmin, run: Run) -> None:
    admin.reply("DELETE", "/v1/webhooks/wh_abc", {"deleted": "wh_abc"})
    admin.reply("GET", "/v1/webhooks/wh_abc/secret", {"id": "wh_abc", "secret": SECRET})
    assert run("webhooks", "delete", "wh_abc")[1] == "deleted wh_abc\n"
    assert f"secret: {SECRET}" in run("webhooks", "secret", "wh_abc")[1]


# -- errors -----------------------------------------------------------------------------------------
def test_unknown_id_is_exit_1_with_one_line(admin: FakeAdmin, run: Run) -> None:
    admin.reply("GET", "/v1/webhooks/nope", {"error": "no webhook with id 'nope'"}, 404)
    status, out, err = run("webhooks", "show", "nope", "--json")
    assert (status, out) == (1, "")
    assert err == "webhookd: no webhook with id 'nope'\n"


@pytest.mark.parametrize("code", [400, 409, 500, 503])
def test_refusals_and_server_errors_are_exit_1(admin: FakeAdmin, run: Run, code: int) -> None:
    admin.reply("POST", "/v1/deliveries/7/retry", {"error": f"refused\nwith {code}"}, code)
    status, out, err = run("deliveries", "retry", "7")
    assert (status, out) == (1, "")
    assert err == f"webhookd: refused with {code}\n"


def test_daemon_not_running_is_69_naming_the_socket(run: Run, short_dir: Path) -> None:
    status, out, err = run("webhooks", "list")
    assert (status, out) == (69, "")
    sock = short_dir / "admin.sock"
    assert err == f"webhookd: daemon not running (cannot connect to {sock}: No such file or directory)\n"


def test_socket_path_that_is_not_a_socket_is_69(run: Run, short_dir: Path) -> None:
    (short_dir / "admin.sock").write_text("")
    status, _, err = run("status")
    assert status == 69
    assert str(short_dir / "admin.sock") in err and err.count("\n") == 1


def test_daemon_hanging_up_mid_request_is_69(admin: FakeAdmin, run: Run) -> None:
    admin.hang_up = True
    status, _, err = run("status")
    assert status == 69
    assert str(admin.path) in err and err.count("\n") == 1


def test_bad_config_is_78_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[delivery]\ndelivery_typo = 3\n")
    for argv in (["check-config"], ["status"], ["submit", "{}"], ["serve"], ["webhooks", "list", "--json"]):
        assert cli.main([*argv, "--config", str(bad)]) == 78
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("webhookd: config error: delivery.delivery_typo: unknown key")
        assert err.count("\n") == 1


def test_unparsable_or_missing_config_is_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("state_dir = \n")
    assert cli.main(["check-config", "--config", str(broken)]) == 78
    assert "config error" in capsys.readouterr().err
    assert cli.main(["check-config", "--config", str(tmp_path / "absent.toml")]) == 78
    assert "absent.toml" in capsys.readouterr().err


def test_check_config_ok(config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                         tmp_path: Path) -> None:
    assert cli.main(["check-config", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out == f"config OK: {config_file.resolve()}\n"
    assert cli.main(["check-config", "--config", str(config_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "config": str(config_file.resolve())}
    if Path("/etc/webhookd/config.toml").exists():
        return
    monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == "config OK: built-in defaults\n"
    monkeypatch.setenv("WEBHOOKD_CONFIG", str(config_file))
    assert cli.main(["check-config"]) == 0
    assert capsys.readouterr().out == f"config OK: {config_file.resolve()}\n"


def test_usage_errors_are_exit_2(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("webhooks")[0] == 2
    assert run("deliveries", "list", "--limit", "many")[0] == 2
    assert run("webhooks", "create")[0] == 2  # --url is required
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--help"]) == 0
    assert "webhooks" in capsys.readouterr().out


def test_unexpected_errors_are_one_line(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from webhookd.client import AdminClient

    def boom(*args: Any) -> Any:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(AdminClient, "request", boom)
    status, _, err = run("status")
    assert status == 1
    assert err == "webhookd: unexpected error: RuntimeError: boom second line\n"

    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(AdminClient, "request", interrupted)
    assert run("status")[0] == 130


# -- serve ------------------------------------------------------------------------------------------
def test_serve_runs_the_daemon_with_the_config(run: Run, monkeypatch: pytest.MonkeyPatch, short_dir: Path) -> None:
    import webhookd.daemon

    seen: list[Config] = []

    def fake_run(config: Config) -> int:
        seen.append(config)
        return 3

    monkeypatch.setattr(webhookd.daemon, "run", fake_run)
    assert run("serve")[0] == 3
    assert run("serve", "--dev")[0] == 3
    assert [c.environment for c in seen] == ["production", "development"]
    assert seen[0].admin.socket == short_dir / "admin.sock"


# -- submit -----------------------------------------------------------------------------------------
@dataclass
class FakeIntake:
    """Reads each connection to EOF (so the client must half-close), then answers every line.

    With `eager`, answers each line as soon as it is read, echoing it, so a client that
    does not read while writing deadlocks on a large input.
    """

    path: Path
    answer: Callable[[bytes], dict[str, Any]]
    eager: bool = False
    answer_only: int | None = None
    connections: list[list[bytes]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def serve(self, conn: socket.socket) -> None:
        lines: list[bytes] = []
        self.connections.append(lines)
        conn.settimeout(10)
        try:
            with conn, conn.makefile("rb") as reader:
                if self.eager:
                    for raw in reader:
                        lines.append(raw.rstrip(b"\n"))
                        reply = {**self.answer(lines[-1]), "echo": raw.decode()}
                        conn.sendall(json.dumps(reply).encode() + b"\n")
                    return
                lines.extend(raw.rstrip(b"\n") for raw in reader)  # until the client's EOF
                answers = lines if self.answer_only is None else lines[: self.answer_only]
                conn.sendall(b"".join(json.dumps(self.answer(line)).encode() + b"\n" for line in answers))
        except BaseException as exc:
            self.errors.append(exc)


def answer(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "invalid JSON"}
    if event.get("event") == "nope":
        return {"ok": False, "error": "unknown event 'nope'"}
    if event.get("event") == "diskfull":
        return {"ok": False, "error": "storage full: cannot commit (database or disk is full)"}
    if event.get("event") == "shutdown":
        return {"ok": False, "error": "temporarily unavailable: daemon is shutting down"}
    return {"ok": True, "id": f"evt_{event['data']['message_id']}"}


@pytest.fixture
def intake(short_dir: Path) -> Iterator[FakeIntake]:
    fake = FakeIntake(short_dir / "intake.sock", answer)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(fake.path))
    listener.listen(16)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=fake.serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield fake
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(5)
    assert not fake.errors


def ev(kind: str = "delivered", n: int = 0) -> str:
    return json.dumps({"event": kind, "data": {"message_id": f"m{n}"}})


def feed_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_submit_arguments(intake: FakeIntake, run: Run) -> None:
    status, out, err = run("submit", ev(n=1), ev("bounced", 2))
    assert (status, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"ok": True, "id": "evt_m1"},
        {"ok": True, "id": "evt_m2"},
    ]
    assert intake.connections == [[ev(n=1).encode(), ev("bounced", 2).encode()]]  # one connection, pipelined


def test_submit_flattens_a_multi_line_argument(intake: FakeIntake, run: Run) -> None:
    pretty = json.dumps({"event": "delivered", "data": {"message_id": "m1"}}, indent=2)
    status, out, _ = run("submit", pretty)
    assert status == 0
    assert len(out.splitlines()) == 1
    [[line]] = intake.connections
    assert json.loads(line) == json.loads(pretty)


def test_submit_stdin(intake: FakeIntake, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    feed_stdin(monkeypatch, f"{ev(n=1)}\n\n{ev(n=2)}\r\n   \n{ev(n=3)}".encode())  # blank lines skipped
    status, out, err = run("submit")
    assert (status, err) == (0, "")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["evt_m1", "evt_m2", "evt_m3"]
    assert intake.connections == [[ev(n=1).encode(), ev(n=2).encode(), ev(n=3).encode()]]


def test_submit_prints_rejections_and_exits_65(intake: FakeIntake, run: Run) -> None:
    status, out, _ = run("submit", ev(n=1), ev("nope", 2), "{not json")
    assert status == 65
    assert [json.loads(line) for line in out.splitlines()] == [
        {"ok": True, "id": "evt_m1"},
        {"ok": False, "error": "unknown event 'nope'"},
        {"ok": False, "error": "invalid JSON"},
    ]


@pytest.mark.parametrize("kind", ["diskfull", "shutdown"])
def test_submit_exits_75_when_the_daemon_cannot_commit(intake: FakeIntake, run: Run, kind: str) -> None:
    status, out, _ = run("submit", ev(n=1), ev("nope", 2), ev(kind, 3))
    assert status == 75
    assert len(out.splitlines()) == 3


def test_submit_exits_75_when_the_connection_breaks(intake: FakeIntake, run: Run) -> None:
    intake.answer_only = 1
    status, out, err = run("submit", ev(n=1), ev(n=2), ev(n=3))
    assert status == 75
    assert len(out.splitlines()) == 1  # what did arrive is still printed
    assert str(intake.path) in err and "1 of 3" in err and err.count("\n") == 1


def test_submit_without_a_daemon_exits_75(run: Run, short_dir: Path) -> None:
    status, out, err = run("submit", ev())
    assert (status, out) == (75, "")
    sock = short_dir / "intake.sock"
    assert err == f"webhookd: daemon not running (cannot connect to {sock}: No such file or directory)\n"


def test_submit_empty_stdin_does_nothing(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    feed_stdin(monkeypatch, b"\n  \n")
    assert run("submit") == (0, "", "")  # no daemon needed for nothing to do


def test_submit_large_stdin_does_not_deadlock(intake: FakeIntake, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    intake.eager = True  # answers (as big as the lines) while the client is still sending
    n = 4000
    pad = "x" * 1000
    lines = [json.dumps({"event": "delivered", "data": {"message_id": f"m{i}", "pad": pad}}) for i in range(n)]
    feed_stdin(monkeypatch, "\n".join(lines).encode() + b"\n")
    status, out, _ = run("submit")
    assert status == 0
    answers = out.splitlines()
    assert len(answers) == n
    assert json.loads(answers[-1])["id"] == f"evt_m{n - 1}"
    assert len(intake.connections) == 1 and len(intake.connections[0]) == n
