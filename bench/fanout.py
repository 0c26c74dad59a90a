"""What fan-out costs per event at intake (`Scheduler.fan_out`, which `Daemon.submit` calls),
with and without webhook filters: the scheduler alone, no storage, no sockets.

    python bench/fanout.py [--events 200000]

Prints JSON: microseconds per event (best of 5) for each case. Run it pinned to one core
(`taskset -c 0`) to compare runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from webhookd.config import DeliveryConfig
from webhookd.events import Event, validate_event
from webhookd.filters import EMPTY_FILTER, WebhookFilter
from webhookd.scheduler import Scheduler
from webhookd.webhooks import Webhook

EVENT = {"event": "delivered", "data": {
    "message_id": "<abc123@mail.example.com>", "from": "Shop <orders@eu.shop.example>", "to": "alice@example.org",
    "subject": "Your order 12345", "tags": ["order", "eu"], "metadata": {"order_id": "12345", "plan": "gold"}}}


def tenants(n: int, **more: Any) -> list[WebhookFilter]:
    return [WebhookFilter.parse({"from_domains": [f"t{i}.example", f"*.t{i}.example"], **more}) for i in range(n)]


CASES: dict[str, list[WebhookFilter]] = {
    "3 webhooks, no filter": [EMPTY_FILTER] * 3,
    "3 webhooks, 1 filtered by sender": [EMPTY_FILTER] * 2 + tenants(1),
    "10 tenants by sender, 1 matching": [*tenants(9), WebhookFilter.parse({"from_domains": ["*.shop.example"]})],
    "100 tenants by sender, tags and metadata": tenants(100, tags=["order"], metadata={"plan": "gold"}),
    "10 filtered by tags only": [WebhookFilter.parse({"tags": [f"tag{i}", "order"]}) for i in range(10)],
}


def scheduler(filters: list[WebhookFilter]) -> Scheduler:
    s = Scheduler(None, None, DeliveryConfig())  # type: ignore[arg-type]  # no storage or dispatcher needed
    for i, f in enumerate(filters):
        wh = Webhook(id=f"wh_{i}", url="https://hooks.example/h", events=("*",), description="",
                     secret="whsec_x", previous_secret=None, previous_secret_expires_at=None, created_at=0.0,
                     updated_at=0.0, filter=f)
        s.webhooks[wh.id] = wh
    return s


def per_event_us(s: Scheduler, ev: Event, n: int) -> float:
    s.fan_out(ev)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            s.fan_out(ev)
        best = min(best, (time.perf_counter() - t) / n)
    return round(best * 1e6, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    ev = validate_event(EVENT, now=time.time())
    out = {}
    for name, filters in CASES.items():
        s = scheduler(filters)
        out[name] = {"us_per_event": per_event_us(s, ev, args.events), "subscribers": len(s.fan_out(ev))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
