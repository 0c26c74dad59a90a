"""The Unix socket and HTTP intakes, on real sockets, against a real SQLite file."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import orjson

from tests.conftest import event


async def test_pipelined_lines_are_answered_in_order(start_daemon: Any) -> None:
    h = await start_daemon()
    lines = []
    for i in range(500):
        lines.append(orjson.dumps(event("delivered", i)) if i % 7 else b"{broken")
    acks = await h.submit_raw(b"\n".join(lines) + b"\n")
    assert len(acks) == 500
    for i, ack in enumerate(acks):
        assert ack["ok"] is bool(i % 7), (i, ack)
    ids = [a["id"] for a in acks if a["ok"]]
    assert len(set(ids)) == len(ids)
    rows = h.sql("SELECT count(*) FROM events")
    assert rows[0][0] == len(ids)


async def test_group_commit_takes_many_events_per_transaction(start_daemon: Any) -> None:
    h = await start_daemon()
    store = h.daemon.store
    before = store.commits
    acks = await h.submit(*[event("delivered", i) for i in range(2000)])
    assert all(a["ok"] for a in acks)
    assert store.commits - before < 200, "events must share commits under load"


async def test_last_line_without_newline_then_half_close(start_daemon: Any) -> None:
    h = await start_daemon()
    acks = await h.submit_raw(orjson.dumps(event()))
    assert len(acks) == 1 and acks[0]["ok"] is True


async def test_exim_style_readsocket_with_raw_socket(start_daemon: Any) -> None:
    h = await start_daemon()
    path = str(h.config.intake.socket)

    def exchange() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(orjson.dumps(event("bounced")))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

    data = await asyncio.to_thread(exchange)
    assert data.endswith(b"\n") and orjson.loads(data)["ok"] is True


async def test_connection_stays_open_between_lines(start_daemon: Any) -> None:
    h = await start_daemon()
    reader, writer = await asyncio.open_unix_connection(str(h.config.intake.socket))
    for i in range(3):
        writer.write(orjson.dumps(event("opened", i)) + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert orjson.loads(line)["ok"] is True
        await asyncio.sleep(0.05)
    writer.write(b"[]\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    assert orjson.loads(line) == {"ok": False, "error": "event must be a JSON object, got array"}
    writer.close()


async def test_bad_input_each_named_and_connection_survives(start_daemon: Any) -> None:
    h = await start_daemon()
    raw = b"\n".join([
        b"{not json",
        b'{"event": "delivered", "data": {"message_id": "\xff\xfe"}}',
        orjson.dumps({"event": "exploded", "data": {"message_id": "x"}}),
        orjson.dumps({"event": "delivered", "data": {}}),
        orjson.dumps({"event": "bounced", "data": {"message_id": "x"}}),
        orjson.dumps({"event": "delivered", "data": {"message_id": "x", "tags": "a"}}),
        orjson.dumps(event()),
    ]) + b"\n"
    acks = await h.submit_raw(raw)
    assert [a["ok"] for a in acks] == [False] * 6 + [True]
    errors = [a["error"] for a in acks[:6]]
    assert "JSON" in errors[0]
    assert "UTF-8" in errors[1]
    assert "exploded" in errors[2]
    assert "message_id" in errors[3]
    assert "bounce_type" in errors[4]
    assert "tags" in errors[5]


async def test_oversized_line_is_skipped_up_to_the_newline(start_daemon: Any) -> None:
    h = await start_daemon(intake={"max_event_bytes": 1024})
    huge = orjson.dumps(event(subject="x" * 5000))
    raw = huge + b"\n" + orjson.dumps(event("delivered", 2)) + b"\n"
    acks = await h.submit_raw(raw)
    assert len(acks) == 2
    assert acks[0]["ok"] is False and "max_event_bytes" in acks[0]["error"]
    assert acks[1]["ok"] is True


async def test_oversized_line_arriving_in_pieces(start_daemon: Any) -> None:
    h = await start_daemon(intake={"max_event_bytes": 1024})
    reader, writer = await asyncio.open_unix_connection(str(h.config.intake.socket))
    for _ in range(20):  # 20 KiB without a newline, sent in pieces
        writer.write(b"a" * 1024)
        await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    assert "max_event_bytes" in orjson.loads(line)["error"]
    writer.write(b"still the same line\n" + orjson.dumps(event()) + b"\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    assert orjson.loads(line)["ok"] is True
    writer.close()


async def test_idempotency_key_returns_the_original_id(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    await h.create_webhook(receiver.url)
    ev = {**event(), "id": "exim-1a2b3c-x@example.org"}
    # twice in the same batch, then again on a later connection
    first, second = await h.submit(ev, ev)
    [third] = await h.submit(ev)
    assert first["ok"] and first["id"] == second["id"] == third["id"]
    await receiver.wait_for(1)
    await asyncio.sleep(0.1)
    assert len(receiver.requests) == 1
    rows = h.sql("SELECT count(*) FROM events")
    assert rows[0][0] == 1


async def test_max_connections_is_enforced(start_daemon: Any) -> None:
    h = await start_daemon(intake={"max_connections": 2})
    path = str(h.config.intake.socket)
    held = [await asyncio.open_unix_connection(path) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_unix_connection(path)
    line = await asyncio.wait_for(reader.readline(), 5)
    assert "max_connections" in orjson.loads(line)["error"]
    writer.close()
    held[0][1].close()
    await asyncio.sleep(0.05)
    acks = await h.submit(event())
    assert acks[0]["ok"] is True
    for _, w in held[1:]:
        w.close()


async def test_client_that_never_reads_does_not_block_others(start_daemon: Any) -> None:
    h = await start_daemon()
    path = str(h.config.intake.socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.connect(path)
    line = orjson.dumps(event()) + b"\n"
    sent = 0
    try:
        for _ in range(20000):  # keep writing, never read: the daemon must stop reading us
            sent += sock.send(line * 10)
    except BlockingIOError:
        pass
    acks = await asyncio.wait_for(h.submit(event("opened")), 5)
    assert acks[0]["ok"] is True
    sock.close()


async def test_socket_mode_is_tight(start_daemon: Any) -> None:
    h = await start_daemon()
    assert h.config.intake.socket.stat().st_mode & 0o777 == 0o660
    assert h.config.admin.socket.stat().st_mode & 0o777 == 0o600
    assert h.config.storage.path.stat().st_mode & 0o777 == 0o600
    assert h.config.state_dir.stat().st_mode & 0o777 == 0o700


# -- HTTP ---------------------------------------------------------------------------------------
async def _post(h: Any, payload: Any, *, raw: bytes | None = None, token: str | None = None) -> tuple[int, Any]:
    host, port = h.config.intake.http_listen
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as s, s.post(
        f"http://{host}:{port}/v1/events", data=raw if raw is not None else orjson.dumps(payload), headers=headers
    ) as r:
        return r.status, await r.json(content_type=None)


async def test_http_single_and_array(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    await h.create_webhook(receiver.url)
    status, body = await _post(h, event("opened"))
    assert status == 202 and body["id"].startswith("evt_")
    status, body = await _post(h, [event("clicked", 1, url="https://e.com/a"), event("clicked", 2)])
    assert status == 202 and len(body["ids"]) == 2
    await receiver.wait_for(3)


async def test_http_array_is_all_or_nothing(start_daemon: Any) -> None:
    h = await start_daemon()
    status, body = await _post(h, [event("delivered", 1), {"event": "delivered"}])
    assert status == 400 and body["error"].startswith("events[1]: ")
    rows = h.sql("SELECT count(*) FROM events")
    assert rows[0][0] == 0
    assert (await _post(h, None, raw=b"{nope"))[0] == 400
    assert (await _post(h, []))[0] == 400


async def test_http_token_and_size_limits(start_daemon: Any) -> None:
    h = await start_daemon(intake={"http_token": "s3cret-token-0123456789", "max_event_bytes": 1024})
    assert (await _post(h, event()))[0] == 401
    assert (await _post(h, event(), token="wrong-token-0123456789"))[0] == 401
    assert (await _post(h, event(), token="s3cret-token-0123456789"))[0] == 202
    status, _body = await _post(h, event(subject="y" * 4000), token="s3cret-token-0123456789")
    assert status == 413


async def test_answers_wait_for_the_head_and_keep_their_order() -> None:
    """LineProtocol waits on the head's commit only (one callback per wait, not per event); a
    later event resolved first (refused while closing, say) is answered after the head, in order."""
    from webhookd.events import Event
    from webhookd.intake import IntakeStats, LineProtocol
    from webhookd.store import StoreError

    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[str]] = []

    def submit(_event: Event) -> asyncio.Future[str]:
        futures.append(loop.create_future())
        return futures[-1]

    class Transport:
        def __init__(self) -> None:
            self.out = b""

        def write(self, data: bytes) -> None:
            self.out += data

        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...
        def close(self) -> None: ...

    proto = LineProtocol(submit, max_line=10_000, max_connections=10, stats=IntakeStats())
    transport = Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(b"".join(orjson.dumps(event("delivered", i)) + b"\n" for i in range(3)) + b"{bad\n")
    assert len(futures) == 3 and transport.out == b""
    futures[2].set_exception(StoreError("unavailable: daemon is shutting down"))
    futures[1].set_result("evt_b")
    await asyncio.sleep(0)
    assert transport.out == b""  # the head is not committed yet
    assert proto.waiting is futures[0]  # the one future _flush waits on
    futures[0].set_result("evt_a")
    await asyncio.sleep(0)
    lines = [orjson.loads(line) for line in transport.out.splitlines()]
    assert [line["ok"] for line in lines] == [True, True, False, False]
    assert [line.get("id") for line in lines[:2]] == ["evt_a", "evt_b"]
    assert lines[2]["error"].startswith("unavailable") and proto.stats.accepted == 2
