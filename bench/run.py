"""webhookd benchmark: each figure beside a ceiling or target measured in the same run. Prints JSON.

    .venv/bin/python bench/run.py [--only intake,delivery,latency,backlog,isolation,batched]
        [--events 50000] [--deliveries 5000] [--latency-rate 500] [--latency-seconds 5] [--latency-rounds 3]
        [--backlog 1000000] [--backlog-connections 4] [--isolation-events 3000] [--hanging 50]
        [--late-events 1000] [--batched-events 50000] [--batch-max-events 100] [--profile DIR]
        [--backend sqlite|postgresql] [--instances N]

The daemon runs as a real `webhookd serve` process pinned to core 0 (taskset, when
available); the load generator and the receivers run on core 1; each bare-client
ceiling runs on core 0, the core the daemon had. Only loopback. Every phase runs by
default; `--only` picks some. `--profile DIR` runs `py-spy record --format raw` on the
daemon during each measured part (summarise with `bench/pyspy_top.py DIR/NAME.txt`).

`--backend postgresql` also runs the intake and delivery phases' daemon on PostgreSQL (a
private cluster in a temporary directory, as the tests start it: tests/pg.py), beside the
SQLite figures of the same run. With `--instances N` (N > 1) the delivery phase also runs N
daemons on one PostgreSQL database (one queue, docs/scaling.md), each given 1/N of every
round's events, and reports their combined rate (`postgresql_fleet_deliveries_per_s`).

Phases:
  intake     durable intake over the Unix socket vs batched SQLite inserts (the target's floor: a
             simple two-table schema; beside it the same rows into webhookd's own schema), both
             on the daemon's core
  delivery   end-to-end deliveries/s, one webhook, vs a bare aiohttp client
  latency    intake -> receiver latency at a steady rate (each event carries time.time_ns() in
             data.metadata.sent_ns; the receiver subtracts it from its own clock on arrival)
             vs a bare aiohttp client POSTing the same bodies to the receiver at that rate, and
             the ack beside the floors measured on the daemon's core after it stopped: one bare
             SQLite commit (WAL, synchronous=FULL) of a small insert, and one fsync, paced alike
Each target prints as {figure, floor, ratio, target_ratio_..., met}.
  backlog    N deliveries queued behind a refused port (retry_base 1h): submit time, peak RSS
             (VmHWM), database size, SIGTERM, restart-to-ready, RSS after restart
  isolation  a healthy webhook's deliveries/s beside N webhooks whose receivers accept and never
             answer (delivery.timeout 30s), each with a backlog, as a ratio to its solo figure;
             plus the fan-out-only control, the drain variant and the late-start case
  batched    end-to-end events/s to a receiver for one webhook with batch_max_events (events
             submitted until the receiver counted them all, inside batch bodies) vs the intake
             rate of a daemon without webhooks, in alternating rounds
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
DAEMON_CORE, LOAD_CORE = "0", "1"
PHASES = ("intake", "delivery", "latency", "backlog", "isolation", "batched")
MIB = 1024 * 1024

# Targets from issue 14 (ratios to floors measured in the same run).
TARGET_INTAKE_RATIO = 0.6  # intake >= 0.6 of SQLite's batched inserts
TARGET_ACK_P50_X_COMMIT = 3.0  # ack p50 <= 3 x a bare commit's p50
TARGET_E2E_P50_X_FLOOR = 2.0  # intake -> receiver p50 <= 2 x (commit p50 + bare POST p50)
TARGET_E2E_P99_MS = 25.0
# Targets from issue 5.
TARGET_BACKLOG_PEAK_RSS_MIB = 150
TARGET_RESTART_S = 3.0
TARGET_ISOLATION_RATIO = 0.8
TARGET_DELIVERY_RATIO = 0.6
TARGET_BATCHED_RATIO = 0.8  # issue 14: batched delivery >= 0.8 of the intake rate, end to end
LOG_LEVEL = "warning"  # --log-level: the daemon's; "info" logs a line per attempt (to daemon.log)


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


def wait_port(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return
        except OSError:
            time.sleep(0.01)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port} after {seconds:g}s")


_EVENT = (b'{"event":"%s","data":{"message_id":"<bench-%d@mail.example.com>","from":"shop@example.com",'
          b'"to":"customer%d@example.org","subject":"Order Confirmation","tags":["order"],'
          b'"metadata":{"order_id":"%d"}}}')
_TIMED = (b'{"event":"delivered","data":{"message_id":"<lat-%d@mail.example.com>","from":"shop@example.com",'
          b'"to":"customer%d@example.org","subject":"Order Confirmation","tags":["order"],'
          b'"metadata":{"sent_ns":%d}}}')


def event_line(i: int, kind: bytes = b"delivered") -> bytes:
    return _EVENT % (kind, i, i, i) + b"\n"


def timed_body(i: int) -> bytes:
    """An event carrying its send time (time.time_ns()) in data.metadata.sent_ns."""
    return _TIMED % (i, i, time.time_ns())


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the process's main thread and of all its other threads
    (the SQLite connection threads, mostly), from /proc/PID/task/*/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"main": 0.0, "other_threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        cpu = (int(fields[11]) + int(fields[12])) / tick
        out["main" if task.name == str(pid) else "other_threads"] += cpu
    return out


def cpu_us_by_thread(pid: int, before: dict[str, float], n: int) -> dict[str, float]:
    """The daemon's CPU since `before` (a thread_cpu reading), microseconds per delivery, by thread."""
    after = thread_cpu(pid)
    return {k: round((after[k] - before[k]) / n * 1e6, 1) for k in before}


def cpu_us(pid: int, before: dict[str, float], n: int) -> float:
    """The daemon's CPU (all threads) since `before`, microseconds per delivery."""
    return round(sum(cpu_us_by_thread(pid, before, n).values()), 1)


def loadavg() -> float:
    """The 1-minute load average: other work on this machine shows here."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def percentiles_ms(values_ns: list[int]) -> dict[str, float]:
    if not values_ns:
        return {"n": 0}
    v = sorted(values_ns)

    def q(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))] / 1e6, 2)

    return {"n": len(v), "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": round(v[-1] / 1e6, 2)}


# -- the daemon --------------------------------------------------------------------------------------
class Daemon:
    log_level = LOG_LEVEL  # --log-level
    pg_cluster: Any = None  # --backend postgresql: tests.pg.Cluster

    def __init__(self, root: Path, durability: str = "full", extra: str = "", *, postgresql: bool = False,
                 schema: str | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="whb", dir="/tmp"))
        self.config = root / "config.toml"
        self.db = root / "state" / "webhookd.db"
        self.log = root / "daemon.log"  # stdout and stderr: warnings and errors only
        storage = f'[storage]\ndurability = "{durability}"\n'
        self.schema = schema
        self.pinned = True  # on the daemon's core (a fleet's daemons share the machine instead)
        if postgresql:
            if schema is None:  # a database of its own; else another daemon's (one queue)
                schema = self.schema = f"bench_{root.name.replace('-', '_')}_{os.getpid()}"
                self.pg_cluster.psql(f"CREATE SCHEMA {schema}")
            storage = f'[storage]\nbackend = "postgresql"\ndsn = "{self.pg_cluster.dsn(schema=schema)}"\n'
        self.config.write_text(
            f'environment = "development"\nstate_dir = "{root / "state"}"\nruntime_dir = "{self.run_dir}"\n'
            + storage +
            f'[intake]\nhttp_listen = "127.0.0.1:{free_port()}"\n'
            f'[log]\nlevel = "{self.log_level}"\nformat = "json"\n'
            + extra
        )
        self.env = {**os.environ, "WEBHOOKD_CONFIG": str(self.config)}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def intake(self) -> str:
        return str(self.run_dir / "intake.sock")

    @property
    def admin(self) -> str:
        return str(self.run_dir / "admin.sock")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> float:
        """Start `webhookd serve`; seconds until `webhookd status` answers."""
        started = time.perf_counter()
        serve = [sys.executable, "-m", "webhookd", "serve"]
        cmd = pin(serve, DAEMON_CORE) if self.pinned else serve
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"daemon exited with {self.proc.returncode}: {self.log_tail()}")
            if self.cli("status").returncode == 0:
                return time.perf_counter() - started
            time.sleep(0.01)
        raise SystemExit(f"daemon not ready after {timeout:g}s")

    def log_tail(self, size: int = 2000) -> str:
        text = self.log.read_bytes().decode(errors="replace") if self.log.exists() else ""
        return text[-size:]

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "webhookd", *args], env=self.env, capture_output=True,
                              timeout=120)

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def proc_status(self) -> dict[str, int]:
        """VmRSS, VmHWM (peak RSS), ... of the daemon, in bytes."""
        fields: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def db_bytes(self) -> dict[str, int]:
        sizes = {}
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{self.db}{suffix}")
            sizes["db" + suffix.replace("-", "_")] = path.stat().st_size if path.exists() else 0
        return sizes

    def terminate(self, timeout: float = 60.0) -> float:
        """SIGTERM; seconds until the process exits."""
        assert self.proc is not None
        started = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.perf_counter() - started

    def stop(self) -> None:
        if self.proc and self.proc.poll() is not None and self.proc.returncode != 0:
            print(f"bench: daemon had exited with {self.proc.returncode}: {self.log_tail()}", file=sys.stderr)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def admin_call(daemon: Daemon, method: str, path: str, body: Any = None) -> Any:
    import aiohttp

    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=daemon.admin)) as session,
        session.request(method, f"http://localhost{path}", json=body, timeout=aiohttp.ClientTimeout(total=30)) as r,
    ):
        assert r.status < 300, (r.status, await r.text())
        return await r.json()


async def create_webhooks(daemon: Daemon, urls: list[str], events: tuple[str, ...] = ("*",)) -> list[str]:
    ids = []
    for url in urls:
        hook = await admin_call(daemon, "POST", "/v1/webhooks", {"url": url, "events": list(events)})
        ids.append(hook["id"])
    return ids


@contextlib.contextmanager
def profiled(pid: int, directory: Path | None, name: str) -> Iterator[None]:
    """py-spy record --format raw on `pid` for the duration of the block (when asked for)."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if directory is None or spy is None:
        if directory is not None:
            print("bench: py-spy not found; no profile", file=sys.stderr)
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}.txt"
    proc = subprocess.Popen(pin([spy, "record", "--format", "raw", "--nonblocking", "--rate", "200",
                                 "-p", str(pid), "-o", str(out)], LOAD_CORE),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- submitting over the intake socket --------------------------------------------------------------
async def read_acks(reader: asyncio.StreamReader, n: int) -> int:
    """Read n answer lines; the number that say ok."""
    ok = seen = 0
    tail = b""
    while seen < n:
        chunk = await reader.read(1 << 16)
        if not chunk:
            break
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        done, tail = data[:cut], data[cut:]
        seen += done.count(b"\n")
        ok += done.count(b'{"ok":true')
    return ok


async def pipelined_submit(path: str, n: int, *, first: int = 0, connections: int = 1,
                           timeout: float = 900.0, kind: bytes = b"delivered") -> float:
    """Send n events over `connections` pipelining connections while reading the answers;
    seconds until the last answer."""

    async def one(lo: int, hi: int) -> int:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)

        async def send() -> None:
            for start in range(lo, hi, 1000):
                writer.write(b"".join([event_line(i, kind) for i in range(start, min(hi, start + 1000))]))
                await writer.drain()

        sender = asyncio.create_task(send())
        ok = await read_acks(reader, hi - lo)
        await sender
        writer.close()
        return ok

    bounds = [first + n * k // connections for k in range(connections + 1)]
    started = time.perf_counter()
    oks = await asyncio.wait_for(asyncio.gather(*(one(bounds[k], bounds[k + 1]) for k in range(connections))),
                                 timeout)
    elapsed = time.perf_counter() - started
    assert sum(oks) == n, f"{n - sum(oks)} events not acknowledged"
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


def sqlite_daemon_schema_ceiling(path: Path, n: int, batch: int = 1000) -> float:
    """Events/s for the rows webhookd writes per event (the event with its message-id and
    recipient, one pending delivery) into webhookd's own schema and indexes (every migration),
    WAL + synchronous=FULL, batched like sqlite_ceiling: what SQLite alone costs for the
    daemon's rows, beside the simpler table sqlite_ceiling measures."""
    from webhookd.store.sqlite_schema import MIGRATIONS, split_sql

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for migration in MIGRATIONS:
        for statement in split_sql(migration):
            conn.execute(statement)
    bodies = [event_line(i) for i in range(n)]
    started = time.perf_counter()
    for start in range(0, n, batch):
        ids = range(start + 1, min(n, start + batch) + 1)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO events (id, uid, idempotency_key, type, body, created_at, message_id,"
                         " recipient) VALUES (?,?,?,?,?,?,?,?)",
                         [(i, f"evt_{i:026d}", None, "delivered", bodies[i - 1], 0.0,
                           f"<bench-{i}@mail.example.com>", f"customer{i}@example.org") for i in ids])
        conn.executemany("INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at,"
                         " updated_at) VALUES (?,?,?,?,?,?,?)",
                         [(i, i, "wh_1", "pending", 0.0, 0.0, 0.0) for i in ids])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return n / elapsed


def commit_floor(directory: Path, rate: float, seconds: float) -> dict[str, list[int]]:
    """The floors of one acknowledgement, on the daemon's core: the times (ns) of bare SQLite
    commits of a small insert (WAL, synchronous=FULL, BEGIN IMMEDIATE: the daemon's pragmas) and
    of fsyncs of a small append, each paced at `rate` like the latency phase's events."""
    directory.mkdir(parents=True, exist_ok=True)
    count = max(100, round(rate * seconds))
    body = event_line(0)

    def paced_times(op: Callable[[], None]) -> list[int]:
        times: list[int] = []
        start = time.perf_counter()
        for k in range(count):
            delay = start + k / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter_ns()
            op()
            times.append(time.perf_counter_ns() - t0)
        return times

    pin_self(DAEMON_CORE)
    try:
        conn = sqlite3.connect(directory / "commit.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB)")

        def commit() -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (body) VALUES (?)", (body,))
            conn.execute("COMMIT")

        commits = paced_times(commit)
        conn.close()
        fd = os.open(directory / "fsync.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

        def append() -> None:
            os.write(fd, body)
            os.fsync(fd)

        try:
            fsyncs = paced_times(append)
        finally:
            os.close(fd)
    finally:
        pin_self(LOAD_CORE)
    return {"sqlite_commit": commits, "fsync": fsyncs}


def against(figure: float, floor: float, target: float, *, at_most: bool) -> dict[str, Any]:
    """A figure beside its floor: the ratio, the target ratio and whether it is met."""
    ratio = figure / floor if floor else float("inf")
    return {"figure": round(figure, 3), "floor": round(floor, 3), "ratio": round(ratio, 3),
            ("target_ratio_at_most" if at_most else "target_ratio_at_least"): target,
            "met": ratio <= target if at_most else ratio >= target}


# -- receivers -------------------------------------------------------------------------------------------
class Receiver:
    """bench/receiver.py in a subprocess on the load core."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(pin([sys.executable, str(BENCH / "receiver.py"), str(self.port), *flags],
                                         LOAD_CORE))
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/hook"
        wait_port(self.port)

    async def count(self, session: Any) -> int:
        async with session.get(f"{self.base}/count") as r:
            return int(await r.text())

    async def posts(self, session: Any) -> int:
        async with session.get(f"{self.base}/posts") as r:
            return int(await r.text())

    async def latencies(self, session: Any) -> list[int]:
        async with session.get(f"{self.base}/latencies") as r:
            return list(await r.json())

    async def reset(self, session: Any) -> None:
        async with session.post(f"{self.base}/reset") as r:
            await r.read()

    async def wait_count(self, session: Any, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.count(session) >= n:
                return True
            await asyncio.sleep(0.01)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Hanging:
    """bench/hang.py: n TCP servers that read requests and never answer."""

    def __init__(self, n: int) -> None:
        self.proc = subprocess.Popen(pin([sys.executable, str(BENCH / "hang.py"), str(n)], LOAD_CORE),
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.ports: list[int] = info["ports"]
        self.control: int = info["control"]

    async def state(self) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.control)
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return dict(json.loads(line))

    async def held(self) -> tuple[int, int]:
        """(connections open now, connections accepted so far)."""
        st = await self.state()
        return int(st["open"]), int(st["total"])

    async def spread(self) -> dict[str, int]:
        """How many webhooks hold how many connections: {"32": 16, "0": 34} ..."""
        counts = Counter((await self.state())["per_port"].values())
        return {str(k): counts[k] for k in sorted(counts, reverse=True)}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- phases ------------------------------------------------------------------------------------------------
def phase_intake(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    out: dict[str, Any] = {"events": args.events}
    pin_self(DAEMON_CORE)  # the floors run on the core the daemon gets
    try:
        out["sqlite_batched_insert_events_per_s"] = round(sqlite_ceiling(root / "ceiling.db", args.events))
        out["sqlite_batched_insert_daemon_schema_events_per_s"] = round(
            sqlite_daemon_schema_ceiling(root / "ceiling-schema.db", args.events))
    finally:
        pin_self(LOAD_CORE)
    daemon = Daemon(root / "intake")
    out["daemon_start_s"] = round(daemon.start(), 3)
    try:
        with profiled(daemon.pid, args.profile, "intake"):
            elapsed = asyncio.run(pipelined_submit(daemon.intake, args.events))
        out["intake_events_per_s"] = round(args.events / elapsed)
    finally:
        daemon.stop()
    out["ratio_to_sqlite"] = round(out["intake_events_per_s"] / out["sqlite_batched_insert_events_per_s"], 3)
    if args.backend == "postgresql":
        pg = Daemon(root / "intake-pg", postgresql=True)
        pg.start()
        try:
            elapsed = asyncio.run(pipelined_submit(pg.intake, args.events))
        finally:
            pg.stop()
        out["postgresql_intake_events_per_s"] = round(args.events / elapsed)
        out["postgresql_to_sqlite_intake"] = round(
            out["postgresql_intake_events_per_s"] / out["intake_events_per_s"], 3)
    out["ratio_to_sqlite_daemon_schema"] = round(
        out["intake_events_per_s"] / out["sqlite_batched_insert_daemon_schema_events_per_s"], 3)
    out["target"] = {"intake_vs_sqlite_batched_insert": against(
        out["intake_events_per_s"], out["sqlite_batched_insert_events_per_s"], TARGET_INTAKE_RATIO, at_most=False)}
    out["met"] = out["target"]["intake_vs_sqlite_batched_insert"]["met"]
    results["intake"] = out


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def loop_runner() -> Any:
    """The event loop `webhookd serve` uses: uvloop when importable, else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


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


async def deliveries_rate(daemon: Daemon, recv: Receiver, n: int, first: int = 0, timeout: float = 300.0) -> float:
    """Submit n events (pipelined) and wait until the receiver has counted n more POSTs."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        before = await recv.count(session)
        started = time.perf_counter()
        await pipelined_submit(daemon.intake, n, first=first)
        if not await recv.wait_count(session, before + n, timeout):
            raise SystemExit(f"receiver got {await recv.count(session) - before} of {n} in {timeout:g}s")
        return n / (time.perf_counter() - started)


async def fleet_rate(daemons: list[Daemon], recv: Receiver, n: int, first: int, timeout: float = 300.0) -> float:
    """Submit n events split among the daemons (pipelined, all at once) and wait until the
    receiver has counted n more POSTs: the fleet's combined rate."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        before = await recv.count(session)
        started = time.perf_counter()
        share = n // len(daemons)
        await asyncio.gather(*[pipelined_submit(d.intake, share, first=first + i * share)
                               for i, d in enumerate(daemons)])
        total = share * len(daemons)
        if not await recv.wait_count(session, before + total, timeout):
            raise SystemExit(f"receiver got {await recv.count(session) - before} of {total} in {timeout:g}s")
        return total / (time.perf_counter() - started)


def fleet_delivery(root: Path, args: argparse.Namespace, recv: Receiver) -> dict[str, Any]:
    """`--instances N`: N daemons on one PostgreSQL database deliver one queue's events."""
    first = Daemon(root / "fleet-0", postgresql=True)
    daemons = [first] + [Daemon(root / f"fleet-{i}", postgresql=True, schema=first.schema)
                         for i in range(1, args.instances)]
    for d in daemons:
        d.pinned = False  # N daemons on one core would measure the core, not the fleet
    rates: list[float] = []
    try:
        first.start()
        assert first.cli("webhooks", "create", "--url", recv.url, "--json").returncode == 0
        for d in daemons[1:]:
            d.start()
        time.sleep(0.5)  # the others hear of the webhook (NOTIFY)
        asyncio.run(fleet_rate(daemons, recv, 500, first=40_000_000))
        for r in range(args.rounds):
            rates.append(asyncio.run(fleet_rate(daemons, recv, args.deliveries,
                                                first=50_000_000 + r * args.deliveries)))
    finally:
        for d in daemons:
            d.stop()
    return {"postgresql_instances": args.instances, "postgresql_fleet_deliveries_per_s": round(max(rates)),
            "postgresql_fleet_rounds": [round(x) for x in rates]}


def phase_delivery(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """End to end beside the bare client, in alternating rounds: other work on the machine
    moves both alike, and the best round of each is the figure (the least disturbed)."""
    recv = Receiver()
    rates: list[float] = []
    pg_rates: list[float] = []
    ceilings: list[float] = []
    cpu_rounds: list[dict[str, float]] = []
    try:
        daemon = Daemon(root / "delivery")
        daemon.start()
        pg: Daemon | None = None
        try:
            hook = daemon.cli("webhooks", "create", "--url", recv.url, "--json")
            assert hook.returncode == 0, hook.stderr
            asyncio.run(deliveries_rate(daemon, recv, 500, first=10_000_000))  # warm-up
            if args.backend == "postgresql":  # its rounds alternate with SQLite's: same machine, same moments
                pg = Daemon(root / "delivery-pg", postgresql=True)
                pg.start()
                assert pg.cli("webhooks", "create", "--url", recv.url, "--json").returncode == 0
                asyncio.run(deliveries_rate(pg, recv, 500, first=20_000_000))
            for r in range(args.rounds):
                if pg is not None:
                    pg_rates.append(asyncio.run(deliveries_rate(pg, recv, args.deliveries,
                                                                first=30_000_000 + r * args.deliveries)))
                cpu_before = thread_cpu(daemon.pid)
                with profiled(daemon.pid, args.profile if r == 0 else None, "delivery"):
                    rates.append(asyncio.run(deliveries_rate(daemon, recv, args.deliveries, first=r * args.deliveries)))
                cpu_rounds.append(cpu_us_by_thread(daemon.pid, cpu_before, args.deliveries))
                # the ceiling client gets the daemon's core (the daemon idles meanwhile); like
                # for like: the daemon runs on uvloop when it is installed, so does the ceiling
                pin_self(DAEMON_CORE)
                try:
                    ceilings.append(loop_runner()(bare_client_rate(recv.url, args.deliveries, 32)))
                finally:
                    pin_self(LOAD_CORE)
        finally:
            daemon.stop()
            if pg is not None:
                pg.stop()
    finally:
        recv.stop()
    rate, ceiling = max(rates), max(ceilings)
    results["delivery"] = {
        "deliveries": args.deliveries,
        "rounds": args.rounds,
        "event_loop": loop_name(),
        "end_to_end_deliveries_per_s": round(rate),
        "bare_aiohttp_posts_per_s": round(ceiling),
        "ratio": round(rate / ceiling, 3),
        "target_ratio": TARGET_DELIVERY_RATIO,
        "met": rate / ceiling >= TARGET_DELIVERY_RATIO,
        "rounds_end_to_end": [round(x) for x in rates],
        "rounds_bare": [round(x) for x in ceilings],
        "ratio_of_medians": round(statistics.median(rates) / statistics.median(ceilings), 3),
        # the daemon's CPU per delivery (its submission included), by thread, each round
        "daemon_cpu_us_per_delivery": cpu_rounds,
    }
    if pg_rates:
        results["delivery"].update({
            "postgresql_end_to_end_deliveries_per_s": round(max(pg_rates)),
            "postgresql_rounds_end_to_end": [round(x) for x in pg_rates],
            "postgresql_to_sqlite_delivery": round(max(pg_rates) / rate, 3),
        })
    if args.backend == "postgresql" and args.instances > 1:
        recv = Receiver()
        try:
            results["delivery"].update(fleet_delivery(root, args, recv))
        finally:
            recv.stop()


# -- latency -------------------------------------------------------------------------------------------------
async def paced(rate: float, count: int, send: Callable[[int], None]) -> None:
    """Call send(k) for k in range(count), the k-th at start + k/rate (late ones at once, in order)."""
    start = time.perf_counter()
    for k in range(count):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        send(k)


async def paced_intake(path: str, rate: float, count: int, first: int) -> list[int]:
    """Events at a steady pace over one intake connection; returns the ack latencies (ns)."""
    reader, writer = await asyncio.open_unix_connection(path)
    sent: list[int] = []
    acks: list[int] = []

    async def read() -> None:
        for k in range(count):
            line = await reader.readline()
            assert line.startswith(b'{"ok":true'), line
            acks.append(time.perf_counter_ns() - sent[k])

    reading = asyncio.create_task(read())

    def send(k: int) -> None:
        sent.append(time.perf_counter_ns())
        writer.write(timed_body(first + k) + b"\n")

    await paced(rate, count, send)
    await writer.drain()
    await asyncio.wait_for(reading, 60)
    writer.close()
    return acks


async def paced_posts(url: str, rate: float, count: int, first: int) -> None:
    """The ceiling: a bare aiohttp client POSTing timed bodies straight to the receiver at the same pace."""
    import aiohttp

    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def post(i: int) -> None:
            async with session.post(url, data=timed_body(i), headers={"Content-Type": "application/json"}) as r:
                await r.read()

        def send(k: int) -> None:
            task = asyncio.create_task(post(first + k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        await paced(rate, count, send)
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def latency_run(recv: Receiver, rate: float, seconds: float, warmup: int,
                      send: Callable[[int, int], Any]) -> tuple[dict[str, Any], Any, list[int]]:
    """Warm up (not counted), reset the receiver, then `send(count, first)` at the pace;
    percentiles, what `send` returned, and the receiver's latencies (ns)."""
    import aiohttp

    count = round(rate * seconds)
    async with aiohttp.ClientSession() as session:
        await recv.reset(session)
        await send(warmup, 10_000_000)
        if not await recv.wait_count(session, warmup, 30):
            raise SystemExit("latency warm-up did not arrive")
        await recv.reset(session)
        started = time.perf_counter()
        extra = await send(count, 0)
        sent_s = time.perf_counter() - started
        if not await recv.wait_count(session, count, 60):
            raise SystemExit(f"only {await recv.count(session)} of {count} timed events arrived")
        lat = await recv.latencies(session)
    return {**percentiles_ms(lat), "sent_per_s": round(count / sent_s, 1)}, extra, lat


def phase_latency(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Rounds of: the daemon at the pace, then the floors on its core while it idles (a bare
    commit and an fsync, paced alike; a bare aiohttp client POSTing to the same receiver), so
    other work on the machine weighs on figures and floors alike. The targets compare the
    percentiles of all rounds' samples pooled; each round's ratios are printed too."""
    rate, seconds, warmup, rounds = args.latency_rate, args.latency_seconds, 100, args.latency_rounds
    pooled: dict[str, list[int]] = {"e2e": [], "ack": [], "post": [], "sqlite_commit": [], "fsync": []}
    per_round: list[dict[str, Any]] = []
    recv = Receiver("--latency")
    try:
        daemon = Daemon(root / "latency")
        daemon.start()
        try:
            hook = daemon.cli("webhooks", "create", "--url", recv.url, "--json")
            assert hook.returncode == 0, hook.stderr
            for r in range(rounds):
                base = r * 1_000_000  # distinct event numbers each round
                with profiled(daemon.pid, args.profile if r == 0 else None, "latency"):
                    _, acks, e2e = asyncio.run(latency_run(
                        recv, rate, seconds, warmup,
                        lambda n, first: paced_intake(daemon.intake, rate, n, first + base)))  # noqa: B023
                floors = commit_floor(root / "floor", rate, min(seconds, 2.0))
                pin_self(DAEMON_CORE)  # the ceiling client gets the daemon's core (it idles meanwhile)
                try:
                    _, _, post = asyncio.run(latency_run(
                        recv, rate, seconds, warmup,
                        lambda n, first: paced_posts(recv.url, rate, n, first + base)))  # noqa: B023
                finally:
                    pin_self(LOAD_CORE)
                got = {"e2e": e2e, "ack": acks, "post": post, **floors}
                for key, values in got.items():
                    pooled[key].extend(values)
                p50 = {key: percentiles_ms(values)["p50_ms"] for key, values in got.items()}
                per_round.append({**{f"{k}_p50_ms": v for k, v in p50.items()},
                                  "ack_x_commit": round(p50["ack"] / p50["sqlite_commit"], 2),
                                  "e2e_x_commit_plus_post": round(p50["e2e"] / (p50["sqlite_commit"] + p50["post"]), 2),
                                  "e2e_p99_ms": percentiles_ms(e2e)["p99_ms"], "loadavg_1m": loadavg()})
        finally:
            daemon.stop()
    finally:
        recv.stop()
    figure, ack, ceiling = (percentiles_ms(pooled[k]) for k in ("e2e", "ack", "post"))
    commit, fsync = percentiles_ms(pooled["sqlite_commit"]), percentiles_ms(pooled["fsync"])
    commit_p50, post_p50, e2e_p99 = commit["p50_ms"], ceiling["p50_ms"], figure["p99_ms"]
    target = {
        "ack_p50_ms_vs_commit_p50": against(ack["p50_ms"], commit_p50, TARGET_ACK_P50_X_COMMIT, at_most=True),
        "intake_to_receiver_p50_ms_vs_commit_plus_post_p50": against(
            figure["p50_ms"], commit_p50 + post_p50, TARGET_E2E_P50_X_FLOOR, at_most=True),
        "intake_to_receiver_p99_ms": {"figure": e2e_p99, "target_at_most": TARGET_E2E_P99_MS,
                                      "met": e2e_p99 <= TARGET_E2E_P99_MS},
    }
    results["latency"] = {
        "rate_per_s": rate,
        "seconds_per_round": seconds,
        "rounds": rounds,
        "intake_to_receiver": figure,
        "intake_ack": ack,
        "ceiling_bare_aiohttp_post": ceiling,
        "floor": {"paced_per_s": rate, "sqlite_commit": commit, "fsync": fsync},
        "target": target,
        "met": all(t["met"] for t in target.values()),
        "per_round": per_round,
    }


@contextlib.contextmanager
def rss_samples(daemon: Daemon, every: float = 0.25, keep: int = 12) -> Iterator[list[list[float]]]:
    """Sample the daemon's RSS in a thread; the list gets `keep` evenly spaced [seconds, MiB] pairs."""
    samples: list[tuple[float, int]] = []
    done = threading.Event()
    started = time.perf_counter()

    def sample() -> None:
        while not done.wait(every):
            with contextlib.suppress(OSError, KeyError):
                samples.append((time.perf_counter() - started, daemon.proc_status()["VmRSS"]))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    series: list[list[float]] = []
    try:
        yield series
    finally:
        done.set()
        thread.join(5)
        step = max(1, len(samples) // keep)
        picked = samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])
        series.extend([round(t, 1), round(rss / MIB, 1)] for t, rss in picked)


# -- backlog ---------------------------------------------------------------------------------------------------
def phase_backlog(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    n = args.backlog
    out: dict[str, Any] = {"deliveries": n, "connections": args.backlog_connections}
    refused = free_port()  # closed again at once: every attempt gets "connection refused"
    daemon = Daemon(root / "backlog", extra='[delivery]\nretry_base = "1h"\n')
    daemon.start()
    try:
        hook = daemon.cli("webhooks", "create", "--url", f"http://127.0.0.1:{refused}/hook", "--json")
        assert hook.returncode == 0, hook.stderr
        out["rss_before_mib"] = round(daemon.proc_status()["VmRSS"] / MIB, 1)
        with profiled(daemon.pid, args.profile, "backlog-submit"), rss_samples(daemon) as series:
            elapsed = asyncio.run(pipelined_submit(daemon.intake, n, connections=args.backlog_connections,
                                                   timeout=args.backlog_timeout))
        out["rss_during_submit_mib"] = series
        out["submit_s"] = round(elapsed, 1)
        out["submit_events_per_s"] = round(n / elapsed)
        time.sleep(2)  # let the first attempts fail and the window settle
        st = daemon.status()
        out["status_after_submit"] = st["deliveries"]
        mem = daemon.proc_status()
        out["peak_rss_mib"] = round(mem["VmHWM"] / MIB, 1)
        out["rss_after_submit_mib"] = round(mem["VmRSS"] / MIB, 1)
        sizes = daemon.db_bytes()
        out["db_mib"] = round(sizes["db"] / MIB, 1)
        out["wal_mib"] = round(sizes["db_wal"] / MIB, 1)
        out["db_plus_wal_mib"] = round((sizes["db"] + sizes["db_wal"]) / MIB, 1)
        out["db_bytes_per_delivery"] = round((sizes["db"] + sizes["db_wal"]) / n)
        out["shutdown_s"] = round(daemon.terminate(), 3)
        out["db_plus_wal_after_shutdown_mib"] = round(sum(daemon.db_bytes().values()) / MIB, 1)
        out["restart_to_ready_s"] = round(daemon.start(), 3)
        cli_started = time.perf_counter()
        st = daemon.status()
        out["status_cli_s"] = round(time.perf_counter() - cli_started, 3)
        out["status_after_restart"] = st["deliveries"]
        time.sleep(3)  # the pumps have refilled their windows
        mem = daemon.proc_status()
        out["rss_after_restart_mib"] = round(mem["VmRSS"] / MIB, 1)
        out["peak_rss_after_restart_mib"] = round(mem["VmHWM"] / MIB, 1)
    finally:
        daemon.stop()
    out["target_peak_rss_mib"] = TARGET_BACKLOG_PEAK_RSS_MIB
    out["target_restart_s"] = TARGET_RESTART_S
    out["peak_rss_met"] = out["peak_rss_mib"] <= TARGET_BACKLOG_PEAK_RSS_MIB
    out["restart_met"] = out["restart_to_ready_s"] <= TARGET_RESTART_S
    results["backlog"] = out


# -- isolation ------------------------------------------------------------------------------------------------
async def drain_rate(daemon: Daemon, recv: Receiver, webhook_id: str, n: int, first: int,
                     profile: tuple[Path | None, str] = (None, ""), timeout: float = 120.0) -> float:
    """Queue n deliveries for a disabled webhook, enable it, and time until the receiver has them all."""
    import aiohttp

    await admin_call(daemon, "POST", f"/v1/webhooks/{webhook_id}/disable")
    await pipelined_submit(daemon.intake, n, first=first)
    async with aiohttp.ClientSession() as session:
        before = await recv.count(session)
        with profiled(daemon.pid, *profile):
            started = time.perf_counter()
            await admin_call(daemon, "POST", f"/v1/webhooks/{webhook_id}/enable")
            if not await recv.wait_count(session, before + n, timeout):
                raise SystemExit(f"drain: receiver got {await recv.count(session) - before} of {n} in {timeout:g}s")
            return n / (time.perf_counter() - started)


async def settled_in_flight(daemon: Daemon, seconds: float = 10.0) -> int:
    """Poll the daemon's in-flight count until it holds still (three polls alike) or time runs out."""
    deadline = time.monotonic() + seconds
    seen: list[int] = []
    while time.monotonic() < deadline:
        seen.append((await admin_call(daemon, "GET", "/v1/status"))["in_flight"])
        if len(seen) >= 3 and seen[-1] > 0 and seen[-1] == seen[-2] == seen[-3]:
            break
        await asyncio.sleep(0.2)
    return seen[-1]


async def isolation_run(daemon: Daemon, recv: Receiver, hang: Hanging, args: argparse.Namespace,
                        timeout: float) -> dict[str, Any]:
    """The healthy webhook's deliveries/s, measured two ways:

    live:  submit n events (pipelined) and time until the healthy receiver has n more. Every
           event fans out to every webhook (enabled or paused), so intake does more work when
           the others exist.
    drain: the healthy webhook disabled, n events queued, then enabled: time until the receiver
           has them all (delivery alone, intake out of the picture).

    in three situations: solo; beside the others disabled (fan-out rows written, nothing
    attempted: the control); beside the others enabled and hanging, all 51 webhooks made busy
    by the same submitted events (the backlog), within `timeout` of the first hanging attempt.
    """
    n = args.isolation_events
    out: dict[str, Any] = {}
    (healthy,) = await create_webhooks(daemon, [recv.url])
    await deliveries_rate(daemon, recv, 500, first=0)  # warm-up
    before = thread_cpu(daemon.pid)
    with profiled(daemon.pid, args.profile, "isolation-solo"):
        out["solo_deliveries_per_s"] = round(await deliveries_rate(daemon, recv, n, first=1_000_000))
    out["solo_cpu_us_per_delivery"] = cpu_us(daemon.pid, before, n)
    out["solo_drain_deliveries_per_s"] = round(
        await drain_rate(daemon, recv, healthy, n, first=2_000_000, profile=(args.profile, "isolation-solo-drain")))

    others = await create_webhooks(daemon, [f"http://127.0.0.1:{port}/hook" for port in hang.ports])
    for webhook_id in others:
        await admin_call(daemon, "POST", f"/v1/webhooks/{webhook_id}/disable")
    before = thread_cpu(daemon.pid)
    with profiled(daemon.pid, args.profile, "isolation-fanout"):
        out["fanout_only_deliveries_per_s"] = round(await deliveries_rate(daemon, recv, n, first=3_000_000))
    out["fanout_only_cpu_us_per_delivery"] = cpu_us(daemon.pid, before, n)
    for webhook_id in others:  # enabled and idle: their paused rows are dropped
        await admin_call(daemon, "POST", f"/v1/webhooks/{webhook_id}/enable",
                         {"drop_backlog": True})

    hang_started = time.monotonic()
    await deliveries_rate(daemon, recv, args.isolation_backlog, first=4_000_000)  # every webhook's backlog
    out["in_flight_before"] = await settled_in_flight(daemon)
    out["hanging_connections_before"] = (await hang.held())[0]
    out["webhooks_by_connections_held"] = await hang.spread()
    before = thread_cpu(daemon.pid)
    with profiled(daemon.pid, args.profile, "isolation-hanging"):
        out["with_hanging_deliveries_per_s"] = round(await deliveries_rate(daemon, recv, n, first=5_000_000))
    out["with_hanging_cpu_us_per_delivery"] = cpu_us(daemon.pid, before, n)
    out["with_hanging_drain_deliveries_per_s"] = round(await drain_rate(
        daemon, recv, healthy, n, first=6_000_000, profile=(args.profile, "isolation-hanging-drain")))
    out["hanging_connections_after"], out["hanging_connections_accepted"] = await hang.held()
    out["in_flight_after"] = (await admin_call(daemon, "GET", "/v1/status"))["in_flight"]
    out["seconds_since_hang_start"] = round(time.monotonic() - hang_started, 1)
    out["valid"] = out["seconds_since_hang_start"] < timeout  # no hanging attempt has timed out yet
    return out


async def own_traffic_run(daemon: Daemon, recv: Receiver, hang: Hanging, args: argparse.Namespace,
                          timeout: float) -> dict[str, Any]:
    """Isolation without fan-out: the healthy webhook subscribes to `delivered`, the 50 hanging
    ones to `opened`, each with a backlog of opened events (all attempts hanging). The healthy
    webhook's live rate for n delivered events, solo and beside them: what the hanging receivers
    themselves cost, apart from the rows that every extra subscriber of the same events costs."""
    n = args.isolation_events
    out: dict[str, Any] = {}
    await create_webhooks(daemon, [recv.url], events=("delivered",))
    await deliveries_rate(daemon, recv, 500, first=0)  # warm-up

    async def rounds(key: str, profile: str, first: int) -> None:
        """Best of three rounds: the least disturbed by other work on the machine."""
        rates = []
        before = thread_cpu(daemon.pid)
        for r in range(3):
            with profiled(daemon.pid, args.profile if r == 0 else None, profile):
                rates.append(await deliveries_rate(daemon, recv, n, first=first + r * n))
        out[f"{key}_cpu_us_per_delivery"] = cpu_us(daemon.pid, before, 3 * n)
        out[f"rounds_{key}"] = [round(x) for x in rates]
        out[f"{key}_deliveries_per_s"] = round(max(rates))

    await rounds("solo", "isolation-own-solo", 1_000_000)
    await create_webhooks(daemon, [f"http://127.0.0.1:{port}/hook" for port in hang.ports], events=("opened",))
    hang_started = time.monotonic()
    await pipelined_submit(daemon.intake, args.isolation_backlog, first=2_000_000, kind=b"opened")
    out["in_flight_before"] = await settled_in_flight(daemon)
    out["hanging_connections_before"] = (await hang.held())[0]
    await rounds("with_hanging", "isolation-own-hanging", 3_000_000)
    out["hanging_connections_after"], out["hanging_connections_accepted"] = await hang.held()
    out["seconds_since_hang_start"] = round(time.monotonic() - hang_started, 1)
    out["valid"] = out["seconds_since_hang_start"] < timeout
    out["ratio"] = round(out["with_hanging_deliveries_per_s"] / out["solo_deliveries_per_s"], 3)
    out["met"] = out["ratio"] >= TARGET_ISOLATION_RATIO
    return out


async def late_start_run(daemon: Daemon, recv: Receiver, hang: Hanging, args: argparse.Namespace,
                         window: float) -> dict[str, Any]:
    """The hanging webhooks become busy while the healthy one is idle (here: their paused backlog
    resumes on enable; the same happens when pumps start after a restart). Then n events: how
    many reach the healthy receiver within `window` seconds."""
    import aiohttp

    n = args.late_events
    out: dict[str, Any] = {}
    (_healthy,) = await create_webhooks(daemon, [recv.url])
    others = await create_webhooks(daemon, [f"http://127.0.0.1:{port}/hook" for port in hang.ports])
    for webhook_id in others:
        await admin_call(daemon, "POST", f"/v1/webhooks/{webhook_id}/disable")
    await deliveries_rate(daemon, recv, args.isolation_backlog, first=0)  # their backlog, paused
    for webhook_id in others:
        await admin_call(daemon, "POST", f"/v1/webhooks/{webhook_id}/enable")
    out["in_flight_before"] = await settled_in_flight(daemon)
    out["hanging_connections_before"] = (await hang.held())[0]
    out["webhooks_by_connections_held"] = await hang.spread()
    async with aiohttp.ClientSession() as session:
        before = await recv.count(session)
        started = time.perf_counter()
        with profiled(daemon.pid, args.profile, "isolation-late-start"):
            await pipelined_submit(daemon.intake, n, first=1_000_000)
            done = await recv.wait_count(session, before + n, window - (time.perf_counter() - started))
        elapsed = time.perf_counter() - started
        got = await recv.count(session) - before
    out.update({"events": n, "window_s": window, "healthy_delivered": got,
                "healthy_deliveries_per_s": round(got / elapsed),
                "all_delivered_s": round(elapsed, 2) if done else None})
    return out


def phase_isolation(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    timeout = 30.0
    extra = f'[delivery]\ntimeout = "{timeout:g}s"\n'
    out: dict[str, Any] = {"events": args.isolation_events, "hanging_webhooks": args.hanging,
                           "backlog_events": args.isolation_backlog, "delivery_timeout_s": timeout}
    recv = Receiver()
    try:
        hang = Hanging(args.hanging)
        daemon = Daemon(root / "isolation", extra=extra)
        try:
            daemon.start()
            out.update(asyncio.run(isolation_run(daemon, recv, hang, args, timeout)))
        finally:
            hang.stop()  # first: the daemon's hanging attempts fail at once and the shutdown is quick
            daemon.stop()
        hang = Hanging(args.hanging)
        daemon = Daemon(root / "isolation-own", extra=extra)
        try:
            daemon.start()
            out["own_traffic"] = asyncio.run(own_traffic_run(daemon, recv, hang, args, timeout))
        finally:
            hang.stop()
            daemon.stop()
        if args.late_events:
            hang = Hanging(args.hanging)
            daemon = Daemon(root / "late-start", extra=extra)
            try:
                daemon.start()
                out["late_start"] = asyncio.run(late_start_run(daemon, recv, hang, args, window=10.0))
            finally:
                hang.stop()
                daemon.stop()
    finally:
        recv.stop()
    out["ratio"] = round(out["with_hanging_deliveries_per_s"] / out["solo_deliveries_per_s"], 3)
    out["fanout_only_ratio"] = round(out["fanout_only_deliveries_per_s"] / out["solo_deliveries_per_s"], 3)
    out["hanging_vs_fanout_only_ratio"] = round(
        out["with_hanging_deliveries_per_s"] / out["fanout_only_deliveries_per_s"], 3)
    out["drain_ratio"] = round(out["with_hanging_drain_deliveries_per_s"] / out["solo_drain_deliveries_per_s"], 3)
    out["target_ratio"] = TARGET_ISOLATION_RATIO
    out["met"] = out["ratio"] >= TARGET_ISOLATION_RATIO
    # issue 14, target 5: the figure beside its floor (the solo rate) and its target
    out["figure"] = {"isolation.ratio": out["ratio"], "floor_solo_deliveries_per_s": out["solo_deliveries_per_s"],
                     "with_hanging_deliveries_per_s": out["with_hanging_deliveries_per_s"],
                     "target": TARGET_ISOLATION_RATIO, "met": out["met"]}
    print(f"bench: isolation.ratio {out['ratio']:.3f} ({out['with_hanging_deliveries_per_s']}/s beside "
          f"{args.hanging} hanging webhooks vs {out['solo_deliveries_per_s']}/s solo; fan-out only "
          f"{out['fanout_only_ratio']:.3f})  target: {TARGET_ISOLATION_RATIO}  met: {'yes' if out['met'] else 'no'}",
          file=sys.stderr, flush=True)
    results["isolation"] = out


# -- batched ------------------------------------------------------------------------------------------------
async def batched_rate(daemon: Daemon, recv: Receiver, n: int, first: int, timeout: float = 600.0) -> dict[str, float]:
    """Submit n events (pipelined) and wait until the receiver has counted n more events
    (inside batches); events/s end to end, and the POSTs it took."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        before = await recv.count(session)
        posts_before = await recv.posts(session)
        started = time.perf_counter()
        submit_s = await pipelined_submit(daemon.intake, n, first=first)
        if not await recv.wait_count(session, before + n, timeout):
            raise SystemExit(f"receiver got {await recv.count(session) - before} of {n} events in {timeout:g}s")
        elapsed = time.perf_counter() - started
        posts = await recv.posts(session) - posts_before
    return {"events_per_s": n / elapsed, "submit_events_per_s": n / submit_s, "posts": posts}


def phase_batched(root: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Batched delivery beside intake, measured in the same run in alternating rounds: intake
    on a daemon without webhooks (as the intake phase measures it: the target's floor), and
    end to end on a daemon with one webhook batching up to --batch-max-events: from the first
    event submitted until the receiver has counted every event inside the batch bodies. For
    context, intake on a daemon whose one webhook is disabled (every event still makes its
    delivery row, paused, but nothing is delivered): what the rows alone cost."""
    n = args.batched_events
    recv = Receiver()
    intake_rates: list[float] = []
    rows_rates: list[float] = []
    intake_cpu: list[float] = []
    rows_cpu: list[float] = []
    rounds: list[dict[str, float]] = []
    daemons: list[Daemon] = []
    try:
        plain, rows, batched = Daemon(root / "intake"), Daemon(root / "rows"), Daemon(root / "batched")
        for d in (plain, rows, batched):
            daemons.append(d)
            d.start()
        for d in (rows, batched):
            hook = d.cli("webhooks", "create", "--url", recv.url, "--batch-max-events", str(args.batch_max_events),
                         "--batch-linger", args.batch_linger, "--json")
            assert hook.returncode == 0, hook.stderr
        [row_hook] = json.loads(rows.cli("webhooks", "list", "--json").stdout)["webhooks"]
        off = rows.cli("webhooks", "disable", row_hook["id"])
        assert off.returncode == 0, off.stderr
        asyncio.run(batched_rate(batched, recv, 2000, first=10_000_000))  # warm-up
        for r in range(args.rounds):
            for d, rates, cpu in ((plain, intake_rates, intake_cpu), (rows, rows_rates, rows_cpu)):
                before = thread_cpu(d.pid)
                elapsed = asyncio.run(pipelined_submit(d.intake, n, first=r * n))
                rates.append(n / elapsed)
                cpu.append(round(cpu_us(d.pid, before, n), 1))
            cpu_before = thread_cpu(batched.pid)
            with profiled(batched.pid, args.profile if r == 0 else None, "batched"):
                figure = asyncio.run(batched_rate(batched, recv, n, first=r * n))
            figure["daemon_cpu_us_per_event"] = round(cpu_us(batched.pid, cpu_before, n), 1)
            rounds.append(figure)
    finally:
        for d in daemons:
            d.stop()
        recv.stop()
    intake, best = max(intake_rates), max(rounds, key=lambda f: f["events_per_s"])
    ratio = best["events_per_s"] / intake
    results["batched"] = {
        "events": n,
        "rounds": args.rounds,
        "batch_max_events": args.batch_max_events,
        "batch_linger": args.batch_linger,
        "intake_events_per_s": round(intake),
        "end_to_end_batched_events_per_s": round(best["events_per_s"]),
        "ratio_to_intake": round(ratio, 3),
        "target": TARGET_BATCHED_RATIO,
        "met": ratio >= TARGET_BATCHED_RATIO,
        "submit_events_per_s_with_delivery": round(best["submit_events_per_s"]),
        "events_per_post": round(n / best["posts"], 1) if best["posts"] else None,
        # context: intake when each event also makes its (paused) delivery row
        "intake_with_delivery_rows_events_per_s": round(max(rows_rates)),
        "ratio_to_intake_with_delivery_rows": round(best["events_per_s"] / max(rows_rates), 3),
        "rounds_intake": [round(x) for x in intake_rates],
        "rounds_intake_with_delivery_rows": [round(x) for x in rows_rates],
        "rounds_end_to_end": [round(f["events_per_s"]) for f in rounds],
        # the daemon's CPU per event (all threads), each round: intake alone, intake making
        # delivery rows, and intake plus batched delivery
        "intake_daemon_cpu_us_per_event": intake_cpu,
        "intake_with_delivery_rows_cpu_us_per_event": rows_cpu,
        "daemon_cpu_us_per_event": [f["daemon_cpu_us_per_event"] for f in rounds],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PHASES), help=f"comma-separated phases (default: all: {PHASES})")
    ap.add_argument("--events", type=int, default=50_000, help="intake: events")
    ap.add_argument("--deliveries", type=int, default=5_000, help="delivery: deliveries per round")
    ap.add_argument("--rounds", type=int, default=3, help="delivery: alternating rounds of daemon and bare client")
    ap.add_argument("--latency-rate", type=float, default=500.0, help="latency: events/s")
    ap.add_argument("--latency-seconds", type=float, default=5.0, help="latency: seconds at that rate, each round")
    ap.add_argument("--latency-rounds", type=int, default=3,
                    help="latency: rounds of daemon, floors and bare client, alternating")
    ap.add_argument("--backlog", type=int, default=1_000_000, help="backlog: deliveries queued")
    ap.add_argument("--backlog-connections", type=int, default=4, help="backlog: pipelining connections")
    ap.add_argument("--backlog-timeout", type=float, default=1800.0, help="backlog: give up submitting after")
    ap.add_argument("--isolation-events", type=int, default=3_000, help="isolation: events measured")
    ap.add_argument("--isolation-backlog", type=int, default=200,
                    help="isolation: events submitted to give every webhook its backlog")
    ap.add_argument("--late-events", type=int, default=1_000,
                    help="isolation: events for the late-start case (0: skip it)")
    ap.add_argument("--hanging", type=int, default=50, help="isolation: hanging webhooks")
    ap.add_argument("--batched-events", type=int, default=50_000, help="batched: events per round")
    ap.add_argument("--batch-max-events", type=int, default=100, help="batched: the webhook's batch_max_events")
    ap.add_argument("--batch-linger", default="20ms", help="batched: the webhook's batch_linger")
    ap.add_argument("--profile", type=Path, help="write py-spy raw profiles of the daemon here")
    ap.add_argument("--log-level", default=LOG_LEVEL, choices=("debug", "info", "warning", "error"),
                    help=f"the daemon's log level (default: {LOG_LEVEL}; info writes a line per attempt)")
    ap.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"),
                    help="postgresql: intake and delivery also on a private PostgreSQL cluster, beside SQLite")
    ap.add_argument("--instances", type=int, default=1,
                    help="postgresql: the delivery phase also runs this many daemons on one database")
    args = ap.parse_args()
    Daemon.log_level = args.log_level
    cluster: Any = None
    if args.backend == "postgresql":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.pg import start_cluster

        cluster = Daemon.pg_cluster = start_cluster()
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(only) - set(PHASES)
    if unknown:
        ap.error(f"unknown phase(s) {', '.join(sorted(unknown))}; expected some of {', '.join(PHASES)}")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "kernel": platform.release()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    pin_self(LOAD_CORE)
    runners = {"intake": phase_intake, "delivery": phase_delivery, "latency": phase_latency,
               "backlog": phase_backlog, "isolation": phase_isolation, "batched": phase_batched}
    try:
        with tempfile.TemporaryDirectory(prefix="webhookd-bench-") as tmp:
            for phase in PHASES:
                if phase in only:
                    started = time.perf_counter()
                    (Path(tmp) / phase).mkdir()
                    load_before = loadavg()
                    runners[phase](Path(tmp) / phase, args, results)
                    results[phase]["loadavg_1m_before_after"] = [load_before, loadavg()]
                    results[phase]["phase_s"] = round(time.perf_counter() - started, 1)
                    print(f"bench: {phase} done in {results[phase]['phase_s']}s", file=sys.stderr, flush=True)
    finally:
        if cluster is not None:
            cluster.stop("fast")
            shutil.rmtree(cluster.root, ignore_errors=True)
    results["targets"] = targets(results)
    print(json.dumps(results, indent=2))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's figures in one list, each beside its floor and its target (from the phases run)."""
    rows: list[dict[str, Any]] = []

    def row(name: str, figure: Any, floor: Any, ratio: Any, target: str, met: bool) -> None:
        rows.append({"target": name, "figure": figure, "floor": floor, "ratio": ratio, "goal": target, "met": met})

    if "latency" in results:
        t = results["latency"]["target"]
        a, e = t["ack_p50_ms_vs_commit_p50"], t["intake_to_receiver_p50_ms_vs_commit_plus_post_p50"]
        row("1. ack p50 ms vs bare SQLite commit p50", a["figure"], a["floor"], a["ratio"], "ratio <= 3", a["met"])
        row("1. intake->receiver p50 ms vs commit p50 + bare POST p50", e["figure"], e["floor"], e["ratio"],
            "ratio <= 2", e["met"])
        p99 = t["intake_to_receiver_p99_ms"]
        row("1. intake->receiver p99 ms", p99["figure"], None, None, "<= 25 ms", p99["met"])
    if "intake" in results:
        i = results["intake"]["target"]["intake_vs_sqlite_batched_insert"]
        row("2. intake events/s vs SQLite batched inserts", i["figure"], i["floor"], i["ratio"], "ratio >= 0.6",
            i["met"])
    if "delivery" in results:
        d = results["delivery"]
        row("3. single-event deliveries/s vs bare aiohttp client", d["end_to_end_deliveries_per_s"],
            d["bare_aiohttp_posts_per_s"], d["ratio"], f"ratio >= {d['target_ratio']}", d["met"])
    if "batched" in results:
        b = results["batched"]
        row("4. batched events/s end to end vs intake", b["end_to_end_batched_events_per_s"],
            b["intake_events_per_s"], b["ratio_to_intake"], f"ratio >= {b['target']}", b["met"])
    if "isolation" in results:
        o = results["isolation"]
        row("5. healthy webhook beside 50 hanging (all subscribed) vs solo", o["with_hanging_deliveries_per_s"],
            o["solo_deliveries_per_s"], o["ratio"], f"ratio >= {o['target_ratio']}", o["met"])
    return rows


if __name__ == "__main__":
    main()
