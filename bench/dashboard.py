"""The dashboard's queries against a large database: server time of each screen's reads. Prints JSON.

    .venv/bin/python bench/dashboard.py [--deliveries 1000000] [--db PATH] [--runs 20] [--pages URL]

Builds (or reuses, with --db pointing at an existing file) a database shaped like the one
bench/run.py's backlog phase leaves: N deliveries queued for one webhook behind a refused
port, a second webhook with a small finished history (succeeded and failed attempts over
the last day), each event with its own message id and recipient. The events go in through
the real storage (SqliteStorage.submit, group commit); the history through record_outcome.

Then it times, for each screen of the dashboard, the storage reads that screen makes
(median and max of --runs, after one warm-up): overview (counts by status, per-webhook
stats, the 24 h chart), webhooks list (per-webhook stats), deliveries (first page, a
filtered page, a keyset page deep in the table), message-id search, recipient search and
one delivery's detail. The target (issue 11) is 50 ms of server time each.

`--pages` also serves the real dashboard (webhookd.ui.Dashboard over the same storage,
with a scheduler whose dispatcher never answers, so nothing is delivered) on a loopback
port, logs in with a one-time link and times each page over HTTP: rendering included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhookd import logs
from webhookd.events import parse_event
from webhookd.signing import generate_secret
from webhookd.store import (
    FAILED,
    PENDING,
    SUCCEEDED,
    DeliveryFilter,
    OutcomeRecord,
    SqliteStorage,
    WebhookRecord,
)

TARGET_MS = 50.0
BACKLOG_HOOK, HISTORY_HOOK = "wh_backlog", "wh_history"


def webhook(wid: str, now: float) -> WebhookRecord:
    return WebhookRecord(wid, "https://127.0.0.1:9/hook", ("*",), "bench", True, None, 0, 0.0, generate_secret(),
                         None, None, now, now)


def line(n: int) -> bytes:
    kind = "bounced" if n % 10 == 0 else "delivered"
    extra = ', "bounce_type": "hard"' if kind == "bounced" else ""
    return (f'{{"event": "{kind}", "data": {{"message_id": "<m{n}@bench.example>", '
            f'"to": "user{n}@example.org", "subject": "Order {n}"{extra}}}}}').encode()


async def build(path: Path, n: int, history: int) -> dict[str, Any]:
    started = time.perf_counter()
    now = time.time()
    storage = SqliteStorage(path, durability="normal")
    await storage.open()
    try:
        await storage.create_webhook(webhook(BACKLOG_HOOK, now))
        await storage.create_webhook(webhook(HISTORY_HOOK, now))
        chunk = 5000
        for start in range(0, n, chunk):
            futures = [storage.submit(parse_event(line(i), now=now), [(BACKLOG_HOOK, True)])
                       for i in range(start, min(n, start + chunk))]
            await asyncio.gather(*futures)
        # a finished history for the second webhook: attempts spread over the last day
        ids: list[int] = []

        def grab(events: list[Any]) -> None:
            ids.extend(fe.delivery_id(0) for fe in events)

        storage._sink.on_fresh = grab  # the bench collects the new delivery ids
        futures = [storage.submit(parse_event(line(n + i), now=now), [(HISTORY_HOOK, True)])
                   for i in range(history)]
        await asyncio.gather(*futures)
        for k, did in enumerate(ids):
            ok = k % 7 != 0
            at = now - 86400 + 86400 * k / max(1, len(ids))
            storage.record_outcome(OutcomeRecord(
                did, HISTORY_HOOK, SUCCEEDED if ok else FAILED, 1, None, at, 12.5, 200 if ok else 500,
                None if ok else "HTTP 500", "ok" if ok else "<h1>Internal Server Error</h1>", at,
            ))
    finally:
        await storage.close()
    return {"deliveries": n + history, "build_s": round(time.perf_counter() - started, 1),
            "size_mib": round(path.stat().st_size / 2**20, 1)}


async def timed(fn: Callable[[], Awaitable[Any]], runs: int) -> dict[str, float]:
    await fn()  # warm-up
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t) * 1000)
    return {"median_ms": round(statistics.median(samples), 2), "max_ms": round(max(samples), 2)}


async def measure(path: Path, runs: int) -> dict[str, Any]:
    storage = SqliteStorage(path)
    await storage.open()
    try:
        now = time.time()
        deep = (await storage.list_deliveries(DeliveryFilter(), limit=1))[0].id // 2
        some = deep + 17
        screens: dict[str, Callable[[], Awaitable[Any]]] = {}

        async def overview() -> None:
            await storage.count_by_status()
            await storage.webhook_stats(now)

        async def chart() -> None:
            await storage.hourly_counts(now - 86400, now + 1)

        async def webhooks_list() -> None:
            await storage.webhook_stats(now)

        screens["overview (counts, webhook stats)"] = overview
        screens["overview chart (24 h, loaded after the page)"] = chart
        screens["webhooks list (stats)"] = webhooks_list
        screens["deliveries, first page"] = lambda: storage.list_deliveries(DeliveryFilter(), limit=50)
        screens["deliveries, one webhook (its detail page)"] = lambda: storage.list_deliveries(
            DeliveryFilter(webhook_id=HISTORY_HOOK), limit=20)
        screens["deliveries, status=failed"] = lambda: storage.list_deliveries(
            DeliveryFilter(statuses=(FAILED,)), limit=50)
        screens["deliveries, webhook + pending, deep keyset page"] = lambda: storage.list_deliveries(
            DeliveryFilter(webhook_id=BACKLOG_HOOK, statuses=(PENDING,)), before=deep, limit=50)
        screens["deliveries, event=bounced"] = lambda: storage.list_deliveries(
            DeliveryFilter(event_type="bounced"), limit=50)
        screens["message-id search"] = lambda: storage.list_deliveries(
            DeliveryFilter(message_id=f"<m{some}@bench.example>"), limit=50)
        screens["recipient search"] = lambda: storage.list_deliveries(
            DeliveryFilter(recipient=f"USER{some}@example.org"), limit=50)
        screens["delivery detail"] = lambda: storage.delivery(some)
        screens["retry-failed count (preview)"] = lambda: storage.count_deliveries(
            DeliveryFilter(webhook_id=HISTORY_HOOK, statuses=(FAILED,)))
        results = {name: await timed(fn, runs) for name, fn in screens.items()}
    finally:
        await storage.close()
    for r in results.values():
        r["met"] = r["median_ms"] <= TARGET_MS
    return results


class _Never:
    """A dispatcher that never answers: the scheduler loads, nothing is delivered."""

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> Any:
        await asyncio.Event().wait()


async def pages(path: Path, runs: int) -> dict[str, Any]:
    import aiohttp
    from aiohttp import web

    from webhookd.config import DashboardConfig, DeliveryConfig
    from webhookd.operations import Operations
    from webhookd.scheduler import Scheduler
    from webhookd.ui import Dashboard

    scheduler: Scheduler | None = None
    storage = SqliteStorage(path, on_fresh=lambda events: scheduler.push_fresh(events) if scheduler else None)
    await storage.open()
    scheduler = Scheduler(storage, _Never(), DeliveryConfig())
    await scheduler.load()
    dashboard = Dashboard(Operations(scheduler, storage), storage, DashboardConfig(), production=False,
                          admin_token="")
    parent = web.Application()
    parent.add_subapp("/ui/", dashboard.app())
    runner = web.AppRunner(parent, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    some = (await storage.list_deliveries(DeliveryFilter(), limit=1))[0].id // 2 + 17
    urls = {
        "overview": "/ui/",
        "overview chart (svg)": "/ui/chart.svg",
        "webhooks list": "/ui/webhooks",
        "webhook detail": f"/ui/webhooks/{HISTORY_HOOK}",
        "deliveries": "/ui/deliveries",
        "deliveries, status=failed": "/ui/deliveries?status=failed",
        "message-id search": f"/ui/deliveries?message_id=%3Cm{some}%40bench.example%3E",
        "recipient search": f"/ui/deliveries?to=user{some}%40example.org",
        "delivery detail": f"/ui/deliveries/dlv_{some}",
    }
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:  # an IP host
            link, _ = dashboard.create_login_link()
            async with http.get(base + link) as r:
                assert r.status == 200, r.status  # redirected to the overview, with a session cookie
            for name, url in urls.items():
                async def get(url: str = url) -> None:
                    async with http.get(base + url, allow_redirects=False) as r:
                        assert r.status == 200, (url, r.status)
                        await r.read()

                results[name] = await timed(get, runs)
                results[name]["met"] = results[name]["median_ms"] <= TARGET_MS
    finally:
        await runner.cleanup()
        await scheduler.drain(0)
        await storage.close()
    return results


async def main() -> None:
    logs.configure("warning", "json")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--deliveries", type=int, default=1_000_000)
    ap.add_argument("--history", type=int, default=20_000, help="finished deliveries of the second webhook")
    ap.add_argument("--db", type=Path, help="reuse (or create) this database file")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--pages", action="store_true", help="also time the real pages over HTTP")
    args = ap.parse_args()
    tmp = None
    if args.db is None:
        tmp = tempfile.mkdtemp(prefix="whd-dash-")
        args.db = Path(tmp) / "webhookd.db"
    built = None
    if not args.db.exists():
        built = await build(args.db, args.deliveries, args.history)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version},
        "database": {"path": str(args.db), **(built or {"reused": True})},
        "target_ms": TARGET_MS,
        "screens": await measure(args.db, args.runs),
    }
    if args.pages:
        out["pages"] = await pages(args.db, args.runs)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
