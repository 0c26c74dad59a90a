"""Batched delivery end to end: a real `webhookd serve` process, webhooks made and changed with
the CLI, events submitted on the intake socket, and a real aiohttp receiver that verifies each
batch's signatures (Standard Webhooks and X-Webhook-Signature) and the event ids inside it.
The subprocess calls run in threads: the receiver answers on this test's event loop."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook

from tests.conftest import eventually
from tests.test_process import Proc, lines


async def test_a_batching_webhook_gets_signed_arrays_with_every_event_id(
    proc: Callable[..., Proc], make_receiver: Any,
) -> None:
    receiver = await make_receiver(plan=[500])  # the first batch fails once: retried with its id
    d = proc()
    await asyncio.to_thread(d.start)
    made = await asyncio.to_thread(d.json, "webhooks", "create", "--url", receiver.url,
                                   "--batch-max-events", "5", "--batch-linger", "300ms")
    assert (made["batch_max_events"], made["batch_max_bytes"], made["batch_linger"]) == (5, 1048576, "300ms")
    shown = await asyncio.to_thread(d.cli, "webhooks", "show", made["id"])
    fields = dict(line.split(":", 1) for line in shown.stdout.decode().splitlines())
    assert (fields["batch_max_events"].strip(), fields["batch_linger"].strip()) == ("5", "300ms")
    secret = made["secret"]

    submitted = await asyncio.to_thread(d.cli, "submit", stdin=lines(12, "b"))
    assert submitted.returncode == 0, submitted.stderr
    uids = [json.loads(line)["id"] for line in submitted.stdout.splitlines()]

    def events_arrived() -> int:
        return sum(len(r.json) for r in receiver.requests[1:])  # the 500's batch comes again

    await eventually(lambda: asyncio.sleep(0, events_arrived() >= 12), timeout=20, what="12 events in batches")
    requests = receiver.requests
    ids_seen: list[str] = []
    for r in requests:
        headers = {k.lower(): v for k, v in r.headers.items()}
        assert headers["webhook-id"].startswith("batch_") and headers["x-webhook-event"] == "batch"
        Webhook(secret).verify(r.body, headers)  # raises if the signature does not verify
        expected = hmac.new(secret.encode(), r.body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(expected, headers["x-webhook-signature"])
        elements = r.json
        assert isinstance(elements, list) and 1 <= len(elements) <= 5
        for e in elements:
            assert set(e) == {"id", "event", "timestamp", "data"} and e["event"] == "delivered"
    first, retry = requests[0], next(r for r in requests[1:] if r.headers["webhook-id"] == requests[0].headers[
        "webhook-id"])
    assert retry.body == first.body  # the failed batch again: same events, same id
    for r in requests[1:]:
        ids_seen.extend(e["id"] for e in r.json)
    assert sorted(ids_seen) == sorted(uids)  # every event once, each with its own id
    assert [len(r.json) for r in requests[1:]].count(5) == 2 and sum(len(r.json) for r in requests[1:]) == 12

    # the attempt log names the batch; the batch lists its deliveries
    batch_id = first.headers["webhook-id"]
    listed = await asyncio.to_thread(d.json, "deliveries", "list", "--batch", batch_id)
    assert sorted(x["event_id"] for x in listed["deliveries"]) == sorted(e["id"] for e in first.json)
    one = await asyncio.to_thread(d.json, "deliveries", "show", listed["deliveries"][0]["id"])
    assert [a["batch_id"] for a in one["attempt_log"]] == [batch_id, batch_id]
    assert [a["status_code"] for a in one["attempt_log"]] == [500, 200]
    text = await asyncio.to_thread(d.cli, "deliveries", "show", listed["deliveries"][0]["id"])
    assert b"BATCH" in text.stdout and batch_id.encode() in text.stdout
    counted = await asyncio.to_thread(d.json, "deliveries", "count", "--batch", batch_id)
    assert counted["count"] == len(first.json)

    # turned off with the CLI: one event per POST again, its event id as webhook-id
    await asyncio.to_thread(d.json, "webhooks", "update", made["id"], "--batch-max-events", "0")
    before = len(receiver.requests)
    again = await asyncio.to_thread(d.cli, "submit", stdin=lines(2, "single"))
    single_ids = [json.loads(line)["id"] for line in again.stdout.splitlines()]
    await eventually(lambda: asyncio.sleep(0, len(receiver.requests) >= before + 2), timeout=20,
                     what="two single deliveries")
    singles = receiver.requests[before:]
    assert sorted(r.headers["webhook-id"] for r in singles) == sorted(single_ids)
    assert all(isinstance(orjson.loads(r.body), dict) for r in singles)


async def test_batch_settings_are_refused_with_the_field_named(proc: Callable[..., Proc]) -> None:
    d = proc()
    await asyncio.to_thread(d.start)
    for flags, word in [
        (["--batch-max-events", "5000"], "batch_max_events must be between 0 and 1000"),
        (["--batch-max-bytes", "99999999999"], "batch_max_bytes must be between 1024 and 4194304"),
        (["--batch-linger", "1h"], "batch_linger must be a duration"),
        (["--batch-linger", "9s"], "batch_linger must be between 0ms and 5s"),
    ]:
        p = await asyncio.to_thread(d.cli, "webhooks", "create", "--url", "http://127.0.0.1:9/x", *flags)
        assert p.returncode != 0 and word.encode() in p.stderr, (flags, p.stderr)
    listed = await asyncio.to_thread(d.json, "webhooks", "list")
    assert listed["webhooks"] == []
