"""SIGHUP reaches the running daemon (issue 10 item 8).

Every `[delivery]` key that docs/operations.md calls live changes what a receiver sees
after `kill -HUP`; the keys that need a restart are named in the log and keep their
old value. A real `webhookd serve` (tests/test_process.py's Proc, a TOML file in a temp
dir) delivers to aiohttp receivers on 127.0.0.1 (tests/conftest.py's Receiver) that run
in the test's event loop, so the blocking Proc and CLI calls run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Receiver, event, eventually
from tests.test_process import Proc, lines


async def blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking call (a CLI run, a log poll) in a thread: the receivers keep answering."""
    return await asyncio.to_thread(fn, *args)


async def holds_within(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `check` until it holds or `timeout` passes; whether it held. The caller asserts
    with the numbers it measured."""

    async def poll() -> bool:
        return check()

    with contextlib.suppress(AssertionError):
        await eventually(poll, timeout)
    return check()


async def start(d: Proc) -> None:
    await blocking(d.start)


async def create_webhook(d: Proc, url: str, events: str = "all") -> str:
    hook = await blocking(d.json, "webhooks", "create", "--url", url, "--events", events)
    return str(hook["id"])


async def submit(d: Proc, kind: str, n: int) -> str:
    """Submit conftest's event(kind, n); its event id."""
    p = await blocking(d.cli, "submit", json.dumps(event(kind, n)))
    assert p.returncode == 0, p.stdout + p.stderr
    return str(json.loads(p.stdout)["id"])


async def reload(d: Proc, delivery: dict[str, Any], **config: Any) -> dict[str, Any]:
    """Rewrite the config file, kill -HUP, wait for the reload's log line; that line."""
    d.write_config(delivery, **config)
    line: dict[str, Any] = await blocking(d.reload)
    assert line["event"] == "config reloaded", line
    return line


async def delivery(d: Proc, webhook_id: str, event_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """`deliveries show --json` of the delivery of `event_id` to `webhook_id`, once `done` holds."""

    async def check() -> dict[str, Any] | None:
        listed = await blocking(d.json, "deliveries", "list", "--webhook", webhook_id)
        for row in listed["deliveries"]:
            if row["event_id"] == event_id:
                shown: dict[str, Any] = await blocking(d.json, "deliveries", "show", row["id"])
                return shown if done(shown) else None
        return None

    result: dict[str, Any] = await eventually(check, 15, f"the delivery of {event_id}")
    return result


def arrivals(receiver: Receiver, n: int) -> list[float]:
    """When the requests for conftest's event(_, n) arrived (monotonic seconds)."""
    mid = f"<msg-{n}@mail.example.com>"
    return [r.at for r in receiver.requests if r.json["data"]["message_id"] == mid]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A loopback URL whose TCP connections never complete: a listener that never accepts,
    with its accept queue full, drops new SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
            with socket.socket() as probe:
                probe.settimeout(0.2)
                try:
                    probe.connect(("127.0.0.1", port))
                except TimeoutError:
                    break
        else:
            pytest.fail("cannot make a loopback listener that leaves connections hanging")
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_per_webhook_concurrency_follows_a_reload_under_load(
    proc: Callable[..., Proc], make_receiver: Callable[..., Any]
) -> None:
    """The bug of issue 10 item 8: the running pump kept the limit it started with."""
    receiver = await make_receiver(delay=0.2)
    hanging = await make_receiver(hang=True)
    settings: dict[str, Any] = {"per_webhook_concurrency": 2, "timeout": "10s"}
    d = proc(settings)
    await start(d)
    await create_webhook(d, receiver.url, "delivered")
    await create_webhook(d, hanging.url, "bounced")
    # a backlog far beyond what the test drains: 10/s at 2 in flight, 160/s at 32
    p = await blocking(lambda: d.cli("submit", stdin=lines(800, "c")))
    assert p.returncode == 0, p.stderr
    p = await blocking(d.cli, "submit", *(json.dumps(event("bounced", n)) for n in range(8)))
    assert p.returncode == 0, p.stderr
    await receiver.wait_for(8)
    assert receiver.max_active == 2 and hanging.active == 2, "the limit before the reload"

    await reload(d, {**settings, "per_webhook_concurrency": 32})
    receiver.max_active = receiver.active
    # slow start: the webhook doubles its limit with each success, from 2 to 32 in four steps
    raised = await holds_within(lambda: receiver.max_active > 16)
    assert raised, f"per_webhook_concurrency 2 -> 32: at most {receiver.max_active} in flight after the reload"
    # a webhook whose attempts all hang has no attempt ending to wake its pump: the reload
    # does, and it starts up to its slow-start limit of 4, no more
    woken = await holds_within(lambda: hanging.active >= 4, 5)
    assert woken and hanging.active == 4, f"2 -> 32 with every attempt hanging: {hanging.active} in flight, not 4"

    await reload(d, settings)
    lowered = await holds_within(lambda: receiver.active <= 2)  # the ones in flight finish (200 ms)
    assert lowered, f"per_webhook_concurrency 32 -> 2: still {receiver.active} in flight"
    receiver.max_active = receiver.active
    sent = len(receiver.requests)
    await receiver.wait_for(sent + 10)  # a second more of the backlog
    assert receiver.max_active <= 2, f"per_webhook_concurrency 32 -> 2: {receiver.max_active} in flight"
    assert hanging.max_active == 4


async def test_timeouts_response_size_and_shutdown_grace_follow_a_reload(
    proc: Callable[..., Proc], make_receiver: Callable[..., Any], black_hole: str
) -> None:
    receiver = await make_receiver(delay=0.5, reply=b"x" * 800)
    settings: dict[str, Any] = {
        "timeout": "5s", "connect_timeout": "300ms", "max_response_bytes": 500, "shutdown_grace": "10s",
        "max_attempts": 100, "disable_after": 100,
    }
    d = proc(settings)
    await start(d)
    answering = await create_webhook(d, receiver.url, "delivered")
    hanging = await create_webhook(d, black_hole, "bounced")

    # before: a reply after 500 ms succeeds, kept to 500 bytes; connecting gives up after 300 ms
    slow, unreachable = await submit(d, "delivered", 1), await submit(d, "bounced", 2)
    shown = await delivery(d, answering, slow, lambda x: x["status"] == "succeeded")
    [attempt] = shown["attempt_log"]
    assert attempt["status_code"] == 200 and attempt["response_body"] == "x" * 500
    shown = await delivery(d, hanging, unreachable, lambda x: x["attempts"] >= 1)
    first = shown["attempt_log"][0]
    assert first["error"] == "connect timeout after 0.3s" and first["duration_ms"] >= 290

    # after: the same reply times out at 200 ms, the next one is kept to 100 bytes;
    # connecting gives up after 100 ms (at 300 ms the 200 ms timeout would come first)
    await reload(d, {**settings, "timeout": "200ms", "connect_timeout": "100ms", "max_response_bytes": 100})
    slow, unreachable = await submit(d, "delivered", 3), await submit(d, "bounced", 4)
    await eventually(lambda: asyncio.sleep(0, arrivals(receiver, 3)), what="the first attempt after the reload")
    receiver.delay = 0  # the retry is answered at once
    shown = await delivery(d, answering, slow, lambda x: x["status"] == "succeeded")
    # on a loaded machine a retry may come before the delay is lifted and time out too
    *timed_out, answered = shown["attempt_log"]
    assert timed_out and all(a["error"] == "timeout after 0.2s" and a["status_code"] is None for a in timed_out)
    assert answered["status_code"] == 200 and answered["response_body"] == "x" * 100
    shown = await delivery(d, hanging, unreachable, lambda x: x["attempts"] >= 1)
    assert shown["attempt_log"][0]["error"] == "connect timeout after 0.1s"

    # shutdown_grace 10 s -> 200 ms: SIGTERM abandons an attempt that hangs after 200 ms
    await reload(d, {**settings, "timeout": "30s", "shutdown_grace": "200ms"})
    receiver.hang = True
    await submit(d, "delivered", 5)
    await eventually(lambda: asyncio.sleep(0, arrivals(receiver, 5)), what="the hanging attempt")
    assert d.proc is not None
    started = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert await blocking(d.proc.wait, 15) == 0
    took = time.monotonic() - started
    assert took < 5, f"shutdown_grace 200ms after the reload, but the drain took {took:.1f} s"
    [stopped] = d.logged('"stopped"')
    assert stopped["abandoned_attempts"] >= 1


async def test_retries_max_attempts_and_disable_after_follow_a_reload(
    proc: Callable[..., Proc], make_receiver: Callable[..., Any]
) -> None:
    receiver = await make_receiver(default=500)
    settings: dict[str, Any] = {"retry_base": "20ms", "retry_max": "20ms", "max_attempts": 3, "disable_after": 100}
    d = proc(settings)
    await start(d)
    hook = await create_webhook(d, receiver.url)

    # before: 3 attempts about 20 ms apart
    first = await submit(d, "delivered", 1)
    shown = await delivery(d, hook, first, lambda x: x["status"] == "failed")
    assert shown["attempts"] == 3
    before = gaps(arrivals(receiver, 1))
    assert len(before) == 2 and max(before) < 0.25, f"retries 20 ms apart before the reload: {before}"

    # after: 4 attempts at least 320 ms apart (400 ms less the 20 % jitter); the webhook's
    # own backoff is capped by retry_max too, so both keys must have changed
    await reload(d, {**settings, "retry_base": "400ms", "retry_max": "400ms", "max_attempts": 4})
    second = await submit(d, "delivered", 2)
    shown = await delivery(d, hook, second, lambda x: x["status"] == "failed")
    assert shown["attempts"] == 4
    after = gaps(arrivals(receiver, 2))
    assert len(after) == 3 and min(after) >= 0.3, f"retries 400 ms apart after the reload: {after}"

    # 7 consecutive failures and still enabled with disable_after 100; 2 disables it at the next one
    webhook = await blocking(d.json, "webhooks", "show", hook)
    assert webhook["enabled"] and webhook["consecutive_failures"] == 7
    await reload(d, {**settings, "disable_after": 2})
    third = await submit(d, "delivered", 3)
    shown = await delivery(d, hook, third, lambda x: x["status"] == "paused")
    assert shown["attempts"] == 1
    webhook = await blocking(d.json, "webhooks", "show", hook)
    assert not webhook["enabled"] and webhook["disabled_reason"] == "consecutive_failures"


async def test_restart_only_keys_are_reported_and_keep_their_value(
    proc: Callable[..., Proc], make_receiver: Callable[..., Any], tmp_path: Path
) -> None:
    receiver = await make_receiver(delay=0.1)
    settings: dict[str, Any] = {"concurrency": 3, "timeout": "5s"}
    d = proc(settings)
    await start(d)
    await create_webhook(d, receiver.url)
    p = await blocking(lambda: d.cli("submit", stdin=lines(400, "r")))
    assert p.returncode == 0, p.stderr
    await receiver.wait_for(6)
    assert receiver.max_active == 3, "delivery.concurrency caps the slow-start limit of 4"

    bundle = tmp_path / "ca.pem"
    bundle.write_text("not read before a restart\n")
    changed = {**settings, "concurrency": 64, "ca_file": str(bundle), "allow_targets": ["10.0.0.0/8"]}
    tables = '[storage]\nretention = "1d"\n[admin]\nsocket_mode = "0660"\n'
    line = await reload(d, changed, intake={"max_connections": 7}, tables=tables)
    expected = {"delivery.concurrency", "delivery.ca_file", "delivery.allow_targets", "storage", "intake", "admin"}
    assert set(line["needs_restart"]) == expected

    # still 3 slots, though the webhook's own limit (per_webhook_concurrency 32) allows more
    receiver.max_active = receiver.active
    await receiver.wait_for(len(receiver.requests) + 30)
    assert receiver.max_active <= 3, f"delivery.concurrency 3 -> 64 applied live: {receiver.max_active} in flight"
    admin_socket = d.run / "admin.sock"
    assert os.stat(admin_socket).st_mode & 0o777 == 0o600, "admin.socket_mode applied live"
    # reloading the same file again still names them: they differ from what runs
    line = await reload(d, changed, intake={"max_connections": 7}, tables=tables)
    assert set(line["needs_restart"]) == expected
