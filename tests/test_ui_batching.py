"""Batched delivery in the dashboard (the rig of tests/test_ui.py): the create and edit forms
set the batch settings, the webhook's page shows them, errors come back in the form with the
field named, and a delivery's page names the batch of each attempt with a link to the batch's
deliveries (the deliveries screen filters by batch)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from markupsafe import escape

from tests.conftest import Receiver, event
from tests.test_ui import Html, UIFactory, make_ui, ui_logged_in, wait_status  # noqa: F401 - make_ui: a fixture
from webhookd.batching import OFF, Batching

URL = "http://127.0.0.1:9/bulk"


async def test_batch_settings_in_the_forms_and_the_detail_page(make_ui: UIFactory) -> None:  # noqa: F811
    ui = await ui_logged_in(make_ui)
    form = await ui.page("/ui/webhooks/new")
    for name in ("batch_max_events", "batch_max_bytes", "batch_linger"):
        assert f'name="{name}"' in form
    page = Html(form)  # every new control has its label
    assert {c["id"] for c in page.controls if c.get("name", "").startswith("batch_")} <= page.labels
    reply = await ui.post("/ui/webhooks/new", [("url", URL), ("events", "*"), ("batch_max_events", "100"),
                                               ("batch_max_bytes", "65536"), ("batch_linger", "50ms")])
    assert reply.status == 303, reply.text
    wid = reply.location.rsplit("/", 1)[1]
    wh = ui.h.daemon.scheduler.webhooks[wid]
    assert wh.batching == Batching(100, 65536, 0.05)
    detail = await ui.page(f"/ui/webhooks/{wid}")
    assert "up to 100 events and 65536 bytes per request, linger 50ms" in detail
    assert 'name="batch_max_events" value="100"' in detail and 'name="batch_linger" value="50ms"' in detail
    plain = await ui.create("http://127.0.0.1:9/plain")  # the form without batch inputs: off
    assert ui.h.daemon.scheduler.webhooks[plain].batching == OFF
    assert "Off: one event per request" in await ui.page(f"/ui/webhooks/{plain}")

    reply = await ui.post(f"/ui/webhooks/{wid}", [("url", URL), ("events", "*"), ("batch_max_events", "0"),
                                                  ("batch_max_bytes", "65536"), ("batch_linger", "0ms")])
    assert reply.status == 303 and wh.batching == Batching(0, 65536, 0.0)

    for fields, message in [
        ([("batch_max_events", "1001")], "batch_max_events must be between 0 and 1000, got 1001"),
        ([("batch_max_events", "ten")], "batch_max_events must be an integer between 0 and 1000, got &#39;ten&#39;"),
        ([("batch_max_events", "9" * 40)], "batch_max_events must be an integer"),
        ([("batch_max_bytes", "12")], "batch_max_bytes must be between 1024 and 4194304, got 12"),
        ([("batch_linger", "an hour")], "batch_linger must be a duration"),
        ([("batch_linger", "<script>alert(1)</script>")], "batch_linger must be a duration"),
    ]:
        bad = await ui.post(f"/ui/webhooks/{wid}", [("url", URL), ("events", "*"), *fields])
        assert bad.status == 400 and message in bad.text, (fields, bad.text[:2000])
        assert "<script>alert(1)" not in bad.text
    assert wh.batching == Batching(0, 65536, 0.0)  # nothing half-applied
    kept = await ui.post("/ui/webhooks/new", [("url", URL), ("events", "*"), ("batch_linger", "soon")])
    assert kept.status == 400 and 'name="batch_linger" value="soon"' in kept.text  # what was typed is kept


async def test_a_delivery_page_names_its_batch_and_links_its_siblings(
        make_ui: UIFactory, make_receiver: Callable[..., Awaitable[Receiver]]) -> None:  # noqa: F811
    ui = await ui_logged_in(make_ui)
    receiver = await make_receiver()
    status, made = await ui.h.api("POST", "/v1/webhooks", {"url": receiver.url, "batch_max_events": 3})
    assert status == 201
    wid = made["id"]
    await ui.h.submit(*(event("delivered", i) for i in range(3)))
    rows: list[dict[str, Any]] = await wait_status(ui, wid, "succeeded", 3)
    [sent] = receiver.requests
    batch_id = sent.headers["webhook-id"]
    page = await ui.page(f"/ui/deliveries/{rows[0]['id']}")
    link = f'/ui/deliveries?webhook_id={wid}&amp;batch={batch_id}'
    assert f'in batch <a href="{link}"><code>{batch_id}</code></a>' in page
    assert f'<code>{batch_id}</code> <a href="{link}">its deliveries</a>' in page
    assert f'<code>webhook-id</code></td><td><code class="wrap">{escape(batch_id)}</code>' in page  # as sent
    assert '<code>X-Webhook-Event</code></td><td><code class="wrap">batch</code>' in page
    listed = await ui.page(f"/ui/deliveries?webhook_id={wid}&batch={batch_id}")
    for row in rows:
        assert f"/ui/deliveries/{row['id']}" in listed
    assert f'name="batch" value="{batch_id}"' in listed
    bad = await ui.get(f"/ui/deliveries?webhook_id={wid}&batch=%3Cscript%3E")
    assert bad.status == 400 and "batch must be a batch id" in bad.text and "<script>" not in bad.text
