"""`webhookd serve` on PostgreSQL, as real processes on a real (private) cluster: an event
submitted over the socket reaches a real aiohttp receiver with a signature that verifies;
the password never shows; PostgreSQL stopped and started again under load: intake refuses
meanwhile (HTTP 503, `webhookd submit` exits 75), the daemon reconnects by itself, says so
in its logs and metrics, and every acknowledged event is delivered."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from tests.pg import DATABASE, SECRET_PASSWORD, SECRET_USER, SUPERUSER, Cluster, new_schema, wait_ready
from tests.test_process import Proc, ThreadReceiver, lines, receiver, wait_until  # noqa: F401


class AiohttpReceiver:
    """An aiohttp server on loopback, on an event loop in a thread of its own."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self.port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def hook(request: web.Request) -> web.Response:
            self.received.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
            return web.Response(text="ok")

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_post("/hook", hook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            return runner

        self._runner = self._loop.run_until_complete(start())
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def aiohttp_receiver() -> Iterator[AiohttpReceiver]:
    r = AiohttpReceiver()
    yield r
    r.close()


def storage_table(dsn: str, password_file: Path | None = None) -> str:
    table = f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
    return table + (f'password_file = "{password_file}"\n' if password_file else "")


def admin_get(sock: Path, path: str) -> tuple[int, bytes]:
    """GET on the admin socket (what Prometheus would scrape through a proxy)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def metric(d: Proc, name: str) -> float | None:
    status, body = admin_get(d.run / "admin.sock", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_serve_on_postgresql_delivers_signed_events_and_never_shows_the_password(
    pg_cluster: Cluster, proc: Callable[..., Proc], aiohttp_receiver: AiohttpReceiver, tmp_path: Path,
) -> None:
    dsn = (await new_schema(pg_cluster, owner=SECRET_USER)).replace(f"{SUPERUSER}@", f"{SECRET_USER}@")
    password_file = tmp_path / "pg-password"
    password_file.write_text(SECRET_PASSWORD + "\n")
    password_file.chmod(0o600)
    d = proc()
    d.write_config(tables=storage_table(dsn, password_file))
    d.start()
    hook = d.json("webhooks", "create", "--url", aiohttp_receiver.url)
    done = d.cli("submit", stdin=lines(3, "pg"))  # over the intake socket
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(b'"ok":true') == 3
    wait_until(lambda: len(aiohttp_receiver.received) >= 3, what="three deliveries")
    for headers, body in aiohttp_receiver.received:
        assert Webhook(hook["secret"]).verify(body, headers)["data"]["message_id"].startswith("<pg-")
    assert sorted(json.loads(b)["data"]["message_id"] for _, b in aiohttp_receiver.received) == [
        f"<pg-{i}@x>" for i in range(3)]
    status = d.json("status")
    instance = status["storage"].pop("instance")
    assert instance.startswith("ins_")  # this daemon's id in the fleet sharing the database
    assert status["storage"] == {"backend": "postgresql", "database": f"postgresql://{SECRET_USER}@/{DATABASE}",
                                 "connected": True, "reconnects": 0, "takeovers": 0}  # the DSN without its query
    wait_until(lambda: {x["status"] for x in d.json("deliveries", "list", "--webhook", hook["id"])["deliveries"]}
               == {"succeeded"}, what="the outcomes committed")
    check = d.cli("check-config")
    shown = d.log.read_text() + json.dumps(status) + admin_get(d.run / "admin.sock", "/metrics")[1].decode()
    shown += (check.stdout + check.stderr).decode()
    assert SECRET_PASSWORD not in shown


def test_postgresql_stopped_and_restarted_under_load(
    pg_cluster: Cluster, proc: Callable[..., Proc], receiver: ThreadReceiver,  # noqa: F811
) -> None:
    dsn = asyncio.run(new_schema(pg_cluster))
    d = proc({"retry_base": "50ms", "retry_max": "200ms"})
    # a short lease: the fleet's upkeep (every lease / 3) finds its listening connection lost soon
    d.write_config({"retry_base": "50ms", "retry_max": "200ms"}, tables=storage_table(dsn) + 'lease = "3s"\n')
    d.start()
    d.json("webhooks", "create", "--url", receiver.url)
    acked: list[str] = []
    refused: list[tuple[int, str]] = []
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        while not stop.is_set():
            message_id = f"<load-{n}@x>"
            n += 1
            body = json.dumps({"event": "delivered", "data": {"message_id": message_id}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{d.port}/v1/events", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=10) as answer:
                    if answer.status == 202:
                        acked.append(message_id)
            except urllib.error.HTTPError as exc:
                refused.append((exc.code, exc.read().decode()))
                time.sleep(0.01)
            except Exception as exc:
                errors.append(repr(exc))
                time.sleep(0.01)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    try:
        wait_until(lambda: len(acked) >= 100 or refused or errors, what="events acknowledged before the outage")
        assert not refused and not errors, (refused[:3], errors[:3])
        pg_cluster.stop("fast")
        try:
            wait_until(lambda: len(refused) >= 20 or errors, what="intake refusing while PostgreSQL is down")
            assert not errors, errors[:3]
            assert {code for code, _ in refused} == {503}
            assert all("storage" in text for _, text in refused)
            submit = d.cli("submit", '{"event": "delivered", "data": {"message_id": "<down@x>"}}')
            assert submit.returncode == 75, submit  # EX_TEMPFAIL: the MTA tries again later
            wait_until(lambda: metric(d, "webhookd_store_connected") == 0, what="the connected gauge at 0")
            down = d.json("status")  # the daemon still answers: its storage is what is down
            assert down["deliveries"] is None and down["storage"]["connected"] is False
            assert d.proc is not None and d.proc.poll() is None
        finally:
            pg_cluster.start()
            wait_ready(pg_cluster)
        before = len(acked)
        wait_until(lambda: len(acked) >= before + 100, timeout=60, what="intake accepting again, by itself")
    finally:
        stop.set()
        loader.join(15)
    assert d.proc is not None and d.proc.poll() is None  # never crashed
    wait_until(lambda: receiver.delivered() >= set(acked), timeout=60, what="every acknowledged event delivered")
    assert (metric(d, "webhookd_store_reconnects_total") or 0) >= 1
    assert metric(d, "webhookd_store_connected") == 1
    assert d.logged("storage connection lost") and d.logged("storage reconnected")
    # LISTEN/NOTIFY came back too (the other daemons' changes reach this one again)
    wait_until(lambda: d.logged("listening again for the other instances"), what="the listener reconnected")


def test_check_config_plan_reads_the_declared_webhooks_from_postgresql(
    pg_cluster: Cluster, proc: Callable[..., Proc], receiver: ThreadReceiver,  # noqa: F811
) -> None:
    dsn = asyncio.run(new_schema(pg_cluster))
    d = proc()
    d.write_config(tables=storage_table(dsn) + f'[[webhooks]]\nname = "main"\nurl = "{receiver.url}"\n'
                   'events = "all"\n')

    def plan() -> list[str]:
        p = d.cli("check-config", "--plan")
        assert p.returncode == 0, p.stderr
        return p.stdout.decode().splitlines()[1:]

    assert plan()[-1] == "plan: 1 to create, 0 to update, 0 to disable"  # an untouched database: nothing stored
    d.start()
    assert plan() == ["no changes"]  # read from PostgreSQL, not from a SQLite file that is not there


def test_serve_on_postgresql_sends_signed_batches_and_lists_them(
    pg_cluster: Cluster, proc: Callable[..., Proc], aiohttp_receiver: AiohttpReceiver,
) -> None:
    """Batched delivery on PostgreSQL: a batching webhook's receiver gets JSON arrays whose
    signatures verify and that hold every submitted event once; the attempts name the batch
    (read back from PostgreSQL) and `deliveries list/count --batch` find its deliveries."""
    dsn = asyncio.run(new_schema(pg_cluster))
    d = proc()
    d.write_config(tables=storage_table(dsn))
    d.start()
    hook = d.json("webhooks", "create", "--url", aiohttp_receiver.url, "--batch-max-events", "5",
                  "--batch-linger", "200ms")
    assert (hook["batch_max_events"], hook["batch_linger"]) == (5, "200ms")
    done = d.cli("submit", stdin=lines(12, "pgb"))
    assert done.returncode == 0, done.stderr
    uids = [json.loads(line)["id"] for line in done.stdout.splitlines()]
    wait_until(lambda: sum(len(json.loads(b)) for _, b in aiohttp_receiver.received) >= 12,
               what="12 events in batches")
    seen: list[str] = []
    for headers, body in aiohttp_receiver.received:
        Webhook(hook["secret"]).verify(body, headers)  # raises if the signature does not verify
        assert headers["webhook-id"].startswith("batch_") and headers["x-webhook-event"] == "batch"
        elements = json.loads(body)
        assert isinstance(elements, list) and 1 <= len(elements) <= 5
        seen.extend(e["id"] for e in elements)
    assert sorted(seen) == sorted(uids)  # each event once
    headers, body = aiohttp_receiver.received[0]
    batch_id, in_batch = headers["webhook-id"], sorted(e["id"] for e in json.loads(body))

    def listed() -> list[dict[str, object]]:
        found: list[dict[str, object]] = d.json("deliveries", "list", "--batch", batch_id)["deliveries"]
        return found

    wait_until(lambda: sorted(str(x["event_id"]) for x in listed()) == in_batch, what="the batch's outcome committed")
    assert {x["status"] for x in listed()} == {"succeeded"}
    assert d.json("deliveries", "count", "--batch", batch_id)["count"] == len(in_batch)
    one = d.json("deliveries", "show", listed()[0]["id"])
    assert [a["batch_id"] for a in one["attempt_log"]] == [batch_id]
    assert [w["batch_max_events"] for w in d.json("webhooks", "list")["webhooks"]] == [5]  # stored in PostgreSQL
