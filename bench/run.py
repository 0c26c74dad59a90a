"""webhookd benchmark: each figure beside a ceiling measured in the same run. Prints JSON.

    .venv/bin/python bench/run.py [--events 50000] [--deliveries 5000]

The daemon runs as a real `webhookd serve` process pinned to core 0 (taskset, when
available); the load generator and the receiver run on core 1. Only loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DAEMON_CORE, LOAD_CORE = "0", "1"


def pin(cmd: list[str], core: str) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", core, *cmd]
    return cmd


def pin_self(core: str) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(core)})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event_line(i: int) -> bytes:
    return json.dumps({
        "event": "delivered",
        "data": {"message_id": f"<bench-{i}@mail.example.com>", "from": "shop@example.com",
                 "to": f"customer{i}@example.org", "subject": "Order Confirmation", "tags": ["order"],
                 "metadata": {"order_id": str(i)}},
    }).encode() + b"\n"


class Daemon:
    def __init__(self, root: Path, durability: str = "full") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="whb", dir="/tmp"))
        self.config = root / "config.toml"
        self.config.write_text(
            f'environment = "development"\nstate_dir = "{root / "state"}"\nruntime_dir = "{self.run_dir}"\n'
            f'[storage]\ndurability = "{durability}"\n'
            f'[intake]\nhttp_listen = "127.0.0.1:{free_port()}"\n'
            '[log]\nlevel = "warning"\nformat = "json"\n'
        )
        self.env = {**os.environ, "WEBHOOKD_CONFIG": str(self.config)}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def intake(self) -> str:
        return str(self.run_dir / "intake.sock")

    def start(self) -> float:
        started = time.perf_counter()
        cmd = pin([sys.executable, "-m", "webhookd", "serve"], DAEMON_CORE)
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}")
            if self.cli("status").returncode == 0:
                return time.perf_counter() - started
            time.sleep(0.01)

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "webhookd", *args], env=self.env, capture_output=True)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def pipelined_submit(path: str, n: int) -> float:
    """Send n events on one connection while reading answers; seconds until the last answer."""
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    payload = [event_line(i) for i in range(n)]
    started = time.perf_counter()

    async def send() -> None:
        for start in range(0, n, 500):
            writer.write(b"".join(payload[start:start + 500]))
            await writer.drain()

    sender = asyncio.create_task(send())
    ok = 0
    for _ in range(n):
        line = await reader.readline()
        ok += line.startswith(b'{"ok":true')
    elapsed = time.perf_counter() - started
    await sender
    writer.close()
    assert ok == n, f"{n - ok} events not acknowledged"
    return elapsed


def sqlite_ceiling(path: Path, n: int, batch: int = 1000) -> float:
    """Rows/s for the same two inserts per event (event + delivery), WAL + synchronous=FULL, batched."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, uid TEXT, k TEXT, type TEXT, body BLOB, at REAL)")
    conn.execute("CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_id INT, webhook_id TEXT, status TEXT,"
                 " next REAL, at REAL, up REAL)")
    conn.execute("CREATE INDEX d1 ON deliveries (webhook_id, next, id) WHERE status = 'pending'")
    conn.execute("CREATE INDEX d2 ON deliveries (status, webhook_id)")
    bodies = [event_line(i) for i in range(n)]
    started = time.perf_counter()
    for start in range(0, n, batch):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?)",
                         [(i, f"evt_{i:026d}", None, "delivered", bodies[i], 0.0)
                          for i in range(start, min(n, start + batch))])
        conn.executemany("INSERT INTO deliveries VALUES (?,?,?,?,?,?,?)",
                         [(i, i, "wh_1", "pending", 0.0, 0.0, 0.0) for i in range(start, min(n, start + batch))])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return n / elapsed


RECEIVER = r"""
import sys
from aiohttp import web
count = 0
async def hook(request):
    global count
    await request.read()
    count += 1
    return web.Response(text="ok")
async def stats(request):
    return web.Response(text=str(count))
app = web.Application()
app.router.add_post("/hook", hook)
app.router.add_get("/count", stats)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def receiver_count(session: Any, base: str) -> int:
    async with session.get(f"{base}/count") as r:
        return int(await r.text())


async def bare_client_rate(url: str, n: int, concurrency: int) -> float:
    """The ceiling: a bare aiohttp client POSTing the same bodies, same concurrency."""
    import aiohttp

    bodies = [event_line(i) for i in range(n)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        queue = iter(range(n))

        async def worker() -> None:
            for i in queue:
                async with session.post(url, data=bodies[i], headers={"Content-Type": "application/json"}) as r:
                    await r.read()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - started)


async def deliveries_rate(daemon: Daemon, base: str, n: int) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        before = await receiver_count(session, base)
        started = time.perf_counter()
        await pipelined_submit(daemon.intake, n)
        while await receiver_count(session, base) < before + n:
            await asyncio.sleep(0.01)
        return n / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--deliveries", type=int, default=5_000)
    args = ap.parse_args()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    pin_self(LOAD_CORE)
    with tempfile.TemporaryDirectory(prefix="webhookd-bench-") as tmp:
        root = Path(tmp)
        results["sqlite_batched_insert_events_per_s"] = round(sqlite_ceiling(root / "ceiling.db", args.events))

        daemon = Daemon(root / "intake")
        results["daemon_start_s"] = round(daemon.start(), 3)
        try:
            elapsed = asyncio.run(pipelined_submit(daemon.intake, args.events))
            results["intake_events_per_s"] = round(args.events / elapsed)
        finally:
            daemon.stop()
        results["intake_ratio_to_sqlite"] = round(
            results["intake_events_per_s"] / results["sqlite_batched_insert_events_per_s"], 3)

        port = free_port()
        recv = subprocess.Popen(pin([sys.executable, "-c", RECEIVER, str(port)], LOAD_CORE))
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(500):
                try:
                    socket.create_connection(("127.0.0.1", port), 0.1).close()
                    break
                except OSError:
                    time.sleep(0.01)
            daemon = Daemon(root / "delivery")
            daemon.start()
            try:
                hook = daemon.cli("webhooks", "create", "--url", f"{base}/hook", "--json")
                assert hook.returncode == 0, hook.stderr
                rate = asyncio.run(deliveries_rate(daemon, base, args.deliveries))
            finally:
                daemon.stop()
            pin_self(DAEMON_CORE)  # the ceiling client gets the core the daemon had
            ceiling = asyncio.run(bare_client_rate(f"{base}/hook", args.deliveries, 32))
            pin_self(LOAD_CORE)
        finally:
            recv.terminate()
            recv.wait(10)
        results["end_to_end_deliveries_per_s"] = round(rate)
        results["bare_aiohttp_posts_per_s"] = round(ceiling)
        results["end_to_end_ratio"] = round(rate / ceiling, 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
