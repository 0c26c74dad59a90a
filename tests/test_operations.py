"""What an operator relies on: alerts, logs without secrets, admin over TCP, forced stop."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import structlog.testing

from tests.conftest import event, eventually, free_port
from tests.test_process import Proc, ThreadReceiver, wait_until


async def test_notify_command_runs_when_a_webhook_is_disabled(
    start_daemon: Any, make_receiver: Any, tmp_path: Path
) -> None:
    receiver = await make_receiver(default=500)
    out = tmp_path / "alert.txt"
    script = tmp_path / "alert.sh"
    script.write_text(f'#!/bin/sh\nenv | grep ^WEBHOOKD_ | sort > "{out}"\n')
    script.chmod(0o755)
    h = await start_daemon(delivery={"disable_after": 2}, notify={"command": str(script)})
    hook = await h.create_webhook(receiver.url)
    await h.submit(event())

    async def alerted() -> Any:
        return out.exists() and out.read_text()

    text = await eventually(alerted)
    assert f"WEBHOOKD_WEBHOOK_ID={hook['id']}" in text
    assert "WEBHOOKD_EVENT=webhook_disabled" in text
    assert "WEBHOOKD_REASON=consecutive_failures" in text
    assert "WEBHOOKD_CONSECUTIVE_FAILURES=2" in text
    assert f"WEBHOOKD_WEBHOOK_URL={receiver.url}" in text
    assert "whsec_" not in text


async def test_attempt_log_lines_carry_the_ids(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(plan=[503])
    h = await start_daemon(delivery={"disable_after": 1})
    with structlog.testing.capture_logs() as logs:
        hook = await h.create_webhook(receiver.url)
        [ack] = await h.submit(event())
        await receiver.wait_for(1)
        await eventually(lambda: asyncio.sleep(0, any(e["event"] == "webhook disabled" for e in logs)))
    [attempt] = [e for e in logs if e["event"] == "attempt"]
    assert attempt["webhook_id"] == hook["id"] and attempt["event_id"] == ack["id"]
    assert attempt["delivery_id"] == 1 and attempt["attempt"] == 1
    assert attempt["status_code"] == 503 and attempt["duration_ms"] >= 0
    [warning] = [e for e in logs if e["event"] == "webhook disabled" and e.get("reason") == "consecutive_failures"]
    assert warning["log_level"] == "warning"
    assert hook["secret"] not in repr(logs)


def test_secrets_and_tokens_never_reach_the_log(tmp_path: Path, short_dir: Path) -> None:
    receiver = ThreadReceiver()
    try:
        d = Proc(tmp_path, short_dir, {"disable_after": 1})
        token = "intake-token-0123456789abcdef"
        d.config.write_text(d.config.read_text().replace("[intake]\n", f'[intake]\nhttp_token = "{token}"\n'))
        d.start()
        hook = d.json("webhooks", "create", "--url", receiver.url)
        rotated = d.json("webhooks", "rotate-secret", hook["id"])
        receiver.status = 500
        assert d.cli("submit", '{"event": "delivered", "data": {"message_id": "m"}}').returncode == 0
        wait_until(lambda: "webhook disabled" in d.log.read_text(), what="the disable warning")
        text = d.log.read_text()
        for secret in (hook["secret"], rotated["secret"], token):
            assert secret not in text
        for line in text.splitlines():
            json.loads(line)  # JSON lines when stdout is not a TTY
    finally:
        d.stop()
        receiver.close()


async def test_admin_over_tcp_requires_the_token(start_daemon: Any) -> None:
    port = free_port()
    token = "admin-token-0123456789abcdef"
    h = await start_daemon(admin={"http_listen": f"127.0.0.1:{port}", "token": token})
    await h.create_webhook("https://hooks.example.com/a")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/v1/webhooks") as r:
            assert r.status == 401
        async with s.get(f"http://127.0.0.1:{port}/v1/webhooks", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.get(f"http://127.0.0.1:{port}/v1/webhooks",
                         headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200
            assert len((await r.json())["webhooks"]) == 1


def test_second_signal_forces_the_exit(tmp_path: Path, short_dir: Path) -> None:
    receiver = ThreadReceiver()
    receiver.delay = 30.0
    d = Proc(tmp_path, short_dir, {"shutdown_grace": "60s", "timeout": "60s"})
    try:
        d.start()
        d.json("webhooks", "create", "--url", receiver.url)
        assert d.cli("submit", '{"event": "delivered", "data": {"message_id": "m"}}').returncode == 0
        time.sleep(0.3)  # the attempt now hangs at the receiver
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert d.proc.poll() is None, "the first signal waits for in-flight deliveries"
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        # the abandoned attempt stays pending and is sent again after a restart
        receiver.delay = 0
        d.start()
        wait_until(lambda: receiver.delivered() == {"m"}, what="the abandoned delivery after restart")
    finally:
        d.stop()
        receiver.close()
