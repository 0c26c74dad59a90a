"""Benchmark receiver: an aiohttp server that answers every POST /hook with 200 (or the
status given by --status) and counts the events they carry: one for a single-event
body, the length of the array for a batch (webhookd.batching); GET /posts counts requests.

    python bench/receiver.py PORT [--latency] [--status 200]

With --latency it also records, per request, time.time_ns() at arrival minus the
event's `data.metadata.sent_ns`. GET /count (events), GET /posts, GET /latencies (JSON list of ns),
POST /reset. Loopback only; it exits on its own after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time

import orjson
from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--status", type=int, default=200)
    ap.add_argument("--lifetime", type=float, default=3600.0)
    args = ap.parse_args()
    state = {"count": 0, "posts": 0}
    latencies: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        arrived = time.time_ns()
        state["posts"] += 1
        if body[:1] == b"[":  # a batch: every element is one event
            events = orjson.loads(body)
            state["count"] += len(events)
        else:
            state["count"] += 1
            events = [orjson.loads(body)] if args.latency else []
        if args.latency:
            for event in events:
                sent = event.get("data", {}).get("metadata", {}).get("sent_ns")
                if isinstance(sent, int):
                    latencies.append(arrived - sent)
        return web.Response(status=args.status, text="ok")

    async def count(_request: web.Request) -> web.Response:
        return web.Response(text=str(state["count"]))

    async def posts(_request: web.Request) -> web.Response:
        return web.Response(text=str(state["posts"]))

    async def get_latencies(_request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(latencies), content_type="application/json")

    async def reset(_request: web.Request) -> web.Response:
        state["count"] = state["posts"] = 0
        latencies.clear()
        return web.Response(text="ok")

    async def lifetime(_app: web.Application) -> None:
        asyncio.get_running_loop().call_later(args.lifetime, os.kill, os.getpid(), signal.SIGTERM)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    app.router.add_get("/posts", posts)
    app.router.add_get("/latencies", get_latencies)
    app.router.add_post("/reset", reset)
    app.on_startup.append(lifetime)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
