"""GET /metrics on the admin socket: Prometheus text that tracks what happened."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import event, eventually
from webhookd.metrics import Metrics
from webhookd.reasons import ATTEMPT_REASONS, Reason


async def scrape(h: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert h.config.admin.socket is not None
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(h.config.admin.socket))) as s, \
            s.get("http://admin/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_follow_intake_and_delivery(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(plan=[500])
    h = await start_daemon()
    await h.create_webhook(receiver.url)
    parked = await h.create_webhook(receiver.url, ["complained"])
    await h.api("POST", f"/v1/webhooks/{parked['id']}/disable")
    acks = await h.submit(event("delivered", 1), event("bounced", 2), event("complained", 3))
    assert all(a["ok"] for a in acks)
    await h.submit_raw(b"{nope\n" + b'{"event": "x", "data": {"message_id": "m"}}\n')
    await receiver.wait_for(4)

    async def settled() -> Any:
        m = await scrape(h)
        return m if m.get(("webhookd_deliveries", (("status", "succeeded"),))) == 3 else None

    m = await eventually(settled)
    assert m[("webhookd_events_received_total", (("event", "delivered"),))] == 1
    assert m[("webhookd_events_received_total", (("event", "bounced"),))] == 1
    assert m[("webhookd_intake_rejections_total", (("reason", "invalid_json"),))] == 1
    assert m[("webhookd_intake_rejections_total", (("reason", "invalid_event"),))] == 1
    assert m[("webhookd_delivery_attempts_total", (("outcome", "success"),))] == 3
    assert m[("webhookd_delivery_attempts_total", (("outcome", "http_status"),))] == 1
    assert m[("webhookd_attempt_duration_seconds_count", ())] == 4
    assert m[("webhookd_deliveries", (("status", "paused"),))] == 1
    assert m[("webhookd_webhooks", (("state", "enabled"),))] == 1
    assert m[("webhookd_webhooks", (("state", "disabled"),))] == 1


async def test_auto_disable_is_counted(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver(default=500)
    h = await start_daemon(delivery={"disable_after": 2})
    await h.create_webhook(receiver.url)
    await h.submit(event())

    async def disabled() -> Any:
        m = await scrape(h)
        return m.get(("webhookd_webhooks_auto_disabled_total", ())) == 1

    await eventually(disabled)


def outcome_counts(metrics: Metrics) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "webhookd_delivery_attempts_total":
                out[sample.labels["outcome"]] = sample.value
    return out


def test_attempt_outcomes_are_labelled_by_reason() -> None:
    metrics = Metrics()
    metrics.observe_attempt(None, 0.01)
    for reason in ATTEMPT_REASONS:
        metrics.observe_attempt(reason, 0.01)
    assert outcome_counts(metrics) == {"success": 1, **{r.value: 1 for r in ATTEMPT_REASONS}}


def test_an_intake_reason_on_an_attempt_counts_as_other() -> None:
    metrics = Metrics()
    metrics.observe_attempt(Reason.STORAGE, 0.01)  # a bug at the call site must not grow the label set
    assert outcome_counts(metrics) == {"other": 1}
