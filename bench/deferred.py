"""What the storage spends per event and per delivery when an event fans out to one enabled
webhook and N - 1 disabled ones (deferred fan-out, webhookd/store/sqlite_fanout.py): the
SQLite backend alone, no scheduler, no sockets.

    python bench/deferred.py [--events 5000] [--subscribers 51] [--tree DIR]

Submits the events in runs of 200 (as pipelined intake does), then walks the enabled
webhook's deliveries with take_due (128 at a time, as a refill does) and records each as
succeeded. Prints JSON: CPU microseconds (process time, all threads) per event at intake
and per delivery taken and recorded. `--tree DIR` imports webhookd from another checkout
(to compare with an older commit: `git archive COMMIT | tar -x -C DIR`). Pin it to one core
(`taskset -c 0`) to compare runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


async def run(events: int, subscribers: int) -> dict[str, Any]:
    import orjson

    from webhookd.events import parse_event
    from webhookd.store import OutcomeRecord, SqliteStorage, WebhookRecord

    def hook(i: int) -> WebhookRecord:
        return WebhookRecord(
            id=f"wh_{i}", url="http://127.0.0.1/hook", events=("*",), description="", enabled=i == 0,
            disabled_reason=None if i == 0 else "disabled by hand", consecutive_failures=0, backoff_until=0.0,
            secret="whsec_x", previous_secret=None, previous_secret_expires_at=None, created_at=1.0, updated_at=1.0)

    with tempfile.TemporaryDirectory(prefix="webhookd-deferred-") as tmp:
        s = SqliteStorage(Path(tmp) / "webhookd.db", on_fresh=lambda _events: None)
        await s.open()
        try:
            for i in range(subscribers):
                await s.create_webhook(hook(i))
            subs = [(f"wh_{i}", i == 0) for i in range(subscribers)]
            evs = [parse_event(orjson.dumps({"event": "delivered", "data": {"message_id": f"<m{i}@x>"}}), now=1.0)
                   for i in range(events)]
            t0 = time.process_time()
            for start in range(0, events, 200):
                await asyncio.gather(*(s.submit(e, subs) for e in evs[start:start + 200]))
            t1 = time.process_time()
            after, done = (float("-inf"), -1), 0
            loop = asyncio.get_running_loop()
            while rows := await s.take_due("wh_0", after, 128):
                futures: list[asyncio.Future[None]] = []
                for r in rows:
                    fut: asyncio.Future[None] = loop.create_future()
                    s.record_outcome(OutcomeRecord(r.delivery_id, "wh_0", "succeeded", 1, None, 2.0, 1.0, 200, None,
                                                   "", 2.0), on_commit=fut.set_result)
                    futures.append(fut)
                await asyncio.gather(*futures)
                done += len(rows)
                after = rows[-1].key
            t2 = time.process_time()
            counts = await s.count_by_status()
        finally:
            await s.close()
    return {"events": events, "subscribers": subscribers, "delivered": done, "counts": counts,
            "intake_cpu_us_per_event": round(1e6 * (t1 - t0) / events, 1),
            "take_and_record_cpu_us_per_delivery": round(1e6 * (t2 - t1) / max(done, 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--subscribers", type=int, default=51, help="one enabled webhook and N - 1 disabled ones")
    ap.add_argument("--tree", type=Path, help="import webhookd from this checkout")
    args = ap.parse_args()
    sys.path.insert(0, str(args.tree.resolve() if args.tree else Path(__file__).resolve().parent.parent))
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # no migration lines
    print(json.dumps(asyncio.run(run(args.events, args.subscribers)), indent=2))


if __name__ == "__main__":
    main()
