"""webhookd crash-safety soak: SIGKILL the daemon under load, again and again, then prove that
every acknowledged event reached the receiver. Prints JSON; exits 1 if an acknowledged event was lost.

    .venv/bin/python bench/soak.py --cycles 20 [--seed N] [--rate 5000] [--clients 2] [--fail-rate 0.1]
                                   [--fanout N] [--batch] [--backend postgresql [--instances N]]

Each cycle starts a real `webhookd serve` process (durability "full"), runs pipelining load
generators against its intake Unix socket and SIGKILLs the daemon at a random moment (seeded)
while events are being committed and deliveries, some of them retries after a 503, are in flight.
An event counts as acknowledged only when its `{"ok":true,...}` answer line was read; lines sent
but not answered when the connection broke are not. After the last cycle the daemon is started
once more and the soak waits (bounded) until every acknowledged `data.message_id` has arrived,
at every webhook that subscribes to it (`--fanout N`: several webhooks, one of them for bounces
only and one disabled, whose deliveries must stay paused). With `--batch` every webhook batches
(batch_max_events 50, batch_linger 20ms): the receiver counts each event inside the JSON array
bodies, a 503 refuses the whole batch, and every element must carry its event `id` (the same id
for the same event, whichever batch brings it again).

With `--backend postgresql` the daemons keep their queue in a private PostgreSQL cluster
started for the soak (initdb/pg_ctl in a temporary directory on a Unix socket, as the tests
do: tests/pg.py). With `--instances N` (N >= 2), N daemons share that one database (one
queue, docs/scaling.md; `[storage] lease = "1s"`): each cycle loads all of them and
SIGKILLs one (seeded) while the others keep running and take over what it held once its
lease ends; it is started again at the next cycle. An event counts as acknowledged by
whichever daemon answered it.

Only loopback: the receiver listens on 127.0.0.1, the intake is a Unix socket, the HTTP intake is
off. Every wait is bounded; the script stops by itself. The daemon is pinned to core 0 and this
process (load generators and receiver) to core 1 when there are two cores, as in bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DAEMON_CORE, LOAD_CORE = "0", "1"
READY_TIMEOUT = 30.0  # seconds for `webhookd status` to answer after a start
LOAD_GRACE = 10.0  # seconds the clients may take to notice the kill
EVENT_TYPES = ("delivered", "bounced", "opened", "clicked", "complained", "failed")


# -- helpers -------------------------------------------------------------------------------------
def pin(cmd: list[str], core: str, enabled: bool) -> list[str]:
    if enabled and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", core, *cmd]
    return cmd


def pin_self(core: str, enabled: bool) -> None:
    if enabled and hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(core)})


def message_id(seed: int, n: int) -> str:
    return f"<soak-{seed}-{n:07d}@soak.example.com>"


def event_type(mid: str) -> str:
    """The type event_line gave the event with this message id."""
    n = int(mid.split("-")[2].split("@")[0])
    return EVENT_TYPES[n % len(EVENT_TYPES)]


@dataclass
class Hook:
    """A webhook of the soak: its receiver path, what it subscribes to, whether it is enabled."""

    path: str
    events: tuple[str, ...] = ("*",)
    enabled: bool = True

    def wants(self, mid: str) -> bool:
        return self.enabled and ("*" in self.events or event_type(mid) in self.events)


def hooks_for(fanout: int) -> list[Hook]:
    """One webhook; or, with --fanout N (N >= 3), N - 2 taking every event, one taking bounces
    only, and a disabled one second in the list (its deliveries stay paused: none may arrive)."""
    if fanout <= 1:
        return [Hook("/hook")]
    hooks = [Hook(f"/hook/{k}") for k in range(fanout - 2)]
    hooks.insert(1, Hook("/hook/disabled", enabled=False))
    hooks.append(Hook("/hook/bounces", events=("bounced",)))
    return hooks


def key(path: str, mid: str) -> str:
    """What the receiver counts: one delivery of one event to one webhook."""
    return f"{path} {mid}"


def mid_of(k: str) -> str:
    """The message id of a `key`."""
    return k.split(" ", 1)[1]


def event_line(mid: str, n: int) -> bytes:
    kind = EVENT_TYPES[n % len(EVENT_TYPES)]
    data: dict[str, Any] = {"message_id": mid, "from": "shop@example.com", "to": f"customer{n}@example.org",
                            "subject": "Order Confirmation", "tags": ["soak"], "metadata": {"n": str(n)}}
    if kind == "bounced":
        data.update(bounce_type="hard", error_message="550 5.1.1 User unknown")
    elif kind == "clicked":
        data["url"] = f"https://example.com/o/{n}"
    return json.dumps({"event": kind, "data": data}, separators=(",", ":")).encode() + b"\n"


# -- the receiver --------------------------------------------------------------------------------
class Receiver:
    """ThreadingHTTPServer on 127.0.0.1: records the path and `data.message_id` of every body
    answered 200 (`key(path, mid)`) and answers 503 to a seeded random fraction of requests so
    that retries are pending at each kill."""

    def __init__(self, fail_rate: float, seed: int) -> None:
        self.fail_rate = fail_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.delivered: Counter[str] = Counter()
        self.webhook_ids: dict[str, set[str]] = {}
        self.awaiting_retry: set[str] = set()  # last answer was 503, no 200 yet
        self.requests = 0
        self.answered_503 = 0
        self.incomplete = 0  # bodies cut short (the daemon died mid-request) or not parseable
        self.batches = 0  # requests whose body was a JSON array (answered 200)
        self.events_in_batches = 0  # events inside them
        self.event_ids: dict[str, set[str]] = {}  # key -> the event ids its elements carried
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                batch = body[:1] == b"["
                # (key, event id) of each event the body carries: one, or each element of a batch
                events: list[tuple[str, str]] | None
                try:
                    doc = json.loads(body) if len(body) == length else None
                    if doc is None:
                        events = None
                    elif batch:
                        events = [(key(self.path, e["data"]["message_id"]), e["id"]) for e in doc]
                    else:
                        events = [(key(self.path, doc["data"]["message_id"]), self.headers.get("webhook-id", ""))]
                except (ValueError, KeyError, TypeError):
                    events = None
                hook_id = self.headers.get("webhook-id", "")
                with outer.lock:
                    outer.requests += 1
                    if not events:
                        outer.incomplete += 1
                        status = 400
                    elif outer.rng.random() < outer.fail_rate:
                        outer.answered_503 += 1
                        outer.awaiting_retry.update(mid for mid, _ in events)
                        status = 503
                    else:
                        if batch:
                            outer.batches += 1
                            outer.events_in_batches += len(events)
                        for mid, event_id in events:
                            outer.delivered[mid] += 1
                            outer.awaiting_retry.discard(mid)
                            outer.webhook_ids.setdefault(mid, set()).add(hook_id)
                            outer.event_ids.setdefault(mid, set()).add(event_id)
                        status = 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # connections the killed daemon left half-way

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def snapshot(self) -> tuple[set[str], int, int]:
        with self.lock:
            return set(self.delivered), sum(self.delivered.values()), self.answered_503

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- the daemon ----------------------------------------------------------------------------------
class Daemon:
    def __init__(self, root: Path, pinned: bool, storage: str = '[storage]\ndurability = "full"\n') -> None:
        self.root = root
        self.pinned = pinned
        root.mkdir(parents=True, exist_ok=True)
        # sun_path is ~107 bytes: keep the sockets in a short directory of their own
        self.run_dir = Path(tempfile.mkdtemp(prefix="whs", dir="/tmp"))
        self.state = root / "state"
        self.config = root / "config.toml"
        self.config.write_text(
            f'environment = "development"\nstate_dir = "{self.state}"\nruntime_dir = "{self.run_dir}"\n'
            + storage +
            '[intake]\nhttp_listen = ""\n'
            "[delivery]\n"
            'retry_base = "50ms"\nretry_max = "500ms"\nmax_attempts = 1000\ndisable_after = 1000000\n'
            'timeout = "5s"\nconnect_timeout = "2s"\nshutdown_grace = "2s"\n'
            '[log]\nlevel = "warning"\nformat = "json"\n'
        )
        self.env = {**os.environ, "WEBHOOKD_CONFIG": str(self.config)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None

    @property
    def intake(self) -> str:
        return str(self.run_dir / "intake.sock")

    @property
    def db(self) -> Path:
        return self.state / "webhookd.db"

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "webhookd", *args], env=self.env, capture_output=True,
                              timeout=timeout)

    def start(self, log: Path) -> float:
        """Start `webhookd serve`; seconds until `webhookd status` answers."""
        self.log = log
        started = time.monotonic()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(pin([sys.executable, "-m", "webhookd", "serve"], DAEMON_CORE, self.pinned),
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = started + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"webhookd serve exited with {self.proc.returncode}; log: {log}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.cli("status", timeout=10).returncode == 0:
                    return time.monotonic() - started
            time.sleep(0.02)
        self.kill()
        raise SystemExit(f"webhookd status did not answer within {READY_TIMEOUT} s; log: {log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def terminate(self) -> int | None:
        """SIGTERM, as systemd stops it; the exit status (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def status(self) -> dict[str, Any] | None:
        try:
            p = self.cli("status", "--json", timeout=10)
        except subprocess.TimeoutExpired:
            return None
        if p.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(p.stdout)
        return doc

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)


# -- the load generators ---------------------------------------------------------------------------
@dataclass
class ClientResult:
    sent: int = 0
    acked: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # answered ok:false (the answer line)
    unanswered: list[str] = field(default_factory=list)
    connect_error: str | None = None


class IdSource:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.n = 0

    def take(self) -> tuple[str, int]:
        self.n += 1
        return message_id(self.seed, self.n), self.n


async def client(path: str, ids: IdSource, rate: float, stop: asyncio.Event, deadline: float) -> ClientResult:
    """Pipeline events at `rate`/s on one connection while reading the answers concurrently."""
    res = ClientResult()
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
    except OSError as exc:
        res.connect_error = repr(exc)
        return res
    waiting: deque[str] = deque()  # sent, in order, not answered yet

    async def send() -> None:
        t0 = loop.time()
        with contextlib.suppress(OSError):
            while not stop.is_set() and loop.time() < deadline:
                due = int((loop.time() - t0) * rate) + 1
                batch = []
                while res.sent < due:
                    mid, n = ids.take()
                    waiting.append(mid)  # queued before it is written: its answer cannot come first
                    batch.append(event_line(mid, n))
                    res.sent += 1
                if batch:
                    writer.write(b"".join(batch))
                    await writer.drain()
                await asyncio.sleep(0.005)
            writer.write_eof()  # done: a daemon still running answers what it read, then closes

    async def receive() -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    return  # EOF (the daemon died), or a partial line: not an answer
                mid = waiting.popleft()
                if line.startswith(b'{"ok":true'):
                    res.acked.append(mid)
                else:
                    res.rejected.append(line.decode(errors="replace").strip())

    sender = asyncio.create_task(send())
    receiver = asyncio.create_task(receive())
    _done, pending = await asyncio.wait({sender, receiver}, timeout=max(0.0, deadline - loop.time()) + LOAD_GRACE,
                                        return_when=asyncio.ALL_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(sender, receiver, return_exceptions=True)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    res.unanswered = list(waiting)
    return res


async def load_and_kill(daemons: list[Daemon], victim: Daemon, ids: IdSource, clients: int, rate: float,
                        kill_at: float) -> list[ClientResult]:
    """Load every daemon (`clients` connections each, `rate` in all), SIGKILL `victim` at
    `kill_at` and stop the load then (the others answer what they read)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    deadline = loop.time() + kill_at + LOAD_GRACE  # the kill comes first; this bounds a client that hangs

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        stop.set()

    kill_task = asyncio.create_task(killer())
    each = rate / (clients * len(daemons))
    results = await asyncio.gather(*(client(d.intake, ids, each, stop, deadline)
                                     for d in daemons for _ in range(clients)))
    await kill_task
    return list(results)


# -- diagnostics for a loss --------------------------------------------------------------------------
def lookup(db: Path, mids: list[str]) -> list[dict[str, Any]]:
    """What the database says about lost ids (read-only, after the daemon stopped)."""
    out: list[dict[str, Any]] = []
    if not db.exists():
        return [{"error": f"no SQLite database at {db}"}]
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return [{"error": repr(exc)}]
    with contextlib.closing(conn):
        for mid in mids:
            rows = conn.execute(
                "SELECT e.uid, e.created_at, d.id, d.status, d.attempts, d.last_status_code, d.last_error"
                " FROM events e LEFT JOIN deliveries d ON d.event_id = e.id"
                " WHERE instr(CAST(e.body AS TEXT), ?) > 0", (json.dumps(mid),)).fetchall()
            out.append({"message_id": mid, "rows": [list(r) for r in rows]})
    return out


def lookup_pg(cluster: Any, schema: str, mids: list[str]) -> list[dict[str, Any]]:
    """What the PostgreSQL queue says about lost ids: each event row with its deliveries, who
    claimed them and until when, beside each instance's lease (before the cluster stops)."""
    out: list[dict[str, Any]] = []
    try:
        leases = cluster.psql(f"SELECT id, lease_until FROM {schema}.instances ORDER BY id")
        out.append({"instances": leases.splitlines()})
        for mid in mids:
            rows = cluster.psql(
                "SELECT e.uid, e.created_at, d.id, d.webhook_id, d.status, d.attempts, d.last_status_code,"
                f" d.last_error, d.claimed_by, d.lease_until FROM {schema}.events e"
                f" LEFT JOIN {schema}.deliveries d ON d.event_id = e.id"
                " WHERE e.message_id = '" + mid.replace("'", "''") + "'")
            out.append({"message_id": mid, "rows": [r.split("|") for r in rows.splitlines()]})
    except (AssertionError, OSError, subprocess.SubprocessError) as exc:
        out.append({"error": repr(exc)})
    return out


def log_lines(path: Path, limit: int = 40) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-limit:]
    except OSError:
        return []


# -- main ------------------------------------------------------------------------------------------
def versions(cpus_allowed: int | None) -> dict[str, Any]:
    import aiohttp
    import aiosqlite

    import webhookd

    return {
        "webhookd": webhookd.__version__, "python": platform.python_version(), "aiohttp": aiohttp.__version__,
        "aiosqlite": aiosqlite.__version__, "sqlite": sqlite3.sqlite_version,
        "nproc": cpus_allowed, "cpu_count": os.cpu_count(), "kernel": platform.release(), "machine": platform.machine(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20, help="daemon lifetimes ended by SIGKILL (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="seeds kill moments and 503 choices (default 1)")
    ap.add_argument("--rate", type=float, default=5000.0, help="events/s submitted, all clients together")
    ap.add_argument("--clients", type=int, default=2, help="concurrent pipelining intake connections")
    ap.add_argument("--fail-rate", type=float, default=0.10, help="fraction of requests answered 503")
    ap.add_argument("--kill-min", type=float, default=0.05, help="earliest kill, seconds into the load")
    ap.add_argument("--kill-max", type=float, default=0.8, help="latest kill, seconds into the load")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="final wait for every acknowledged id")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (kept anyway on a loss)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin daemon and load to cores")
    ap.add_argument("--fanout", type=int, default=1,
                    help="webhooks (default 1; N >= 3: N - 2 for every event, one for bounces, one disabled)")
    ap.add_argument("--batch", action="store_true",
                    help="every webhook batches (batch_max_events 50, batch_linger 20ms)")
    ap.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"),
                    help="the daemons' storage (postgresql: a private cluster started for the soak)")
    ap.add_argument("--instances", type=int, default=1,
                    help="postgresql: daemons sharing the one database; each cycle kills one of them")
    args = ap.parse_args()
    if args.instances != 1 and (args.backend != "postgresql" or not 2 <= args.instances <= 8):
        ap.error("--instances N (2..8) needs --backend postgresql")
    if not (1 <= args.cycles <= 10_000 and 1 <= args.clients <= 64 and args.rate > 0
            and 0 <= args.fail_rate < 1 and 0 < args.kill_min <= args.kill_max <= 60
            and (args.fanout == 1 or 3 <= args.fanout <= 100)):
        ap.error("out-of-range argument")

    began = time.monotonic()
    cpus_allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rng = random.Random(args.seed)
    pin_self(LOAD_CORE, args.pin)
    root = Path(tempfile.mkdtemp(prefix="webhookd-soak-"))
    receiver = Receiver(args.fail_rate, args.seed)
    hooks = hooks_for(args.fanout)
    cluster: Any = None
    schema = ""
    storage = '[storage]\ndurability = "full"\n'
    if args.backend == "postgresql":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.pg import start_cluster

        cluster = start_cluster()
        schema = f"soak_{os.getpid()}"
        cluster.psql(f"CREATE SCHEMA {schema}")
        storage = f'[storage]\nbackend = "postgresql"\ndsn = "{cluster.dsn(schema=schema)}"\nlease = "1s"\n'
    # one daemon (SQLite) on core 0; several share the machine
    daemons = [Daemon(root / f"d{i}" if args.instances > 1 else root, args.pin and args.instances == 1, storage)
               for i in range(args.instances)]
    daemon = daemons[0]
    kills: Counter[int] = Counter()
    ids = IdSource(args.seed)
    acked_in: dict[str, int] = {}  # message_id -> cycle in which it was acknowledged
    unanswered: set[str] = set()
    rejected: list[str] = []
    per_cycle: list[dict[str, Any]] = []
    lost: list[str] = []
    summary: dict[str, Any] = {}
    try:
        daemon.start(root / "daemon-setup.log")
        webhook_ids = []
        for hook in hooks:
            made = daemon.cli("webhooks", "create", "--url", receiver.base + hook.path, "--events",
                              ",".join(hook.events) if hook.events != ("*",) else "all", "--description", "soak",
                              *(["--batch-max-events", "50", "--batch-linger", "20ms"] if args.batch else []),
                              "--json")
            if made.returncode != 0:
                raise SystemExit(f"webhooks create failed: {made.stderr.decode(errors='replace')}")
            webhook_ids.append(json.loads(made.stdout)["id"])
            if not hook.enabled:
                off = daemon.cli("webhooks", "disable", webhook_ids[-1])
                if off.returncode != 0:
                    raise SystemExit(f"webhooks disable failed: {off.stderr.decode(errors='replace')}")
        daemon.kill()
        for d in daemons[1:]:  # the others run throughout; only each cycle's victim restarts
            d.start(d.root / "daemon-setup.log")

        def wanted(mids: set[str]) -> set[str]:
            return {key(h.path, m) for m in mids for h in hooks if h.wants(m)}

        for cycle in range(1, args.cycles + 1):
            ready_s = 0.0
            for d in daemons:  # the last cycle's victim (all of them, the first time)
                if d.proc is None or d.proc.poll() is not None:
                    ready_s = d.start(d.root / f"daemon-{cycle:03d}.log")
            victim_i = rng.randrange(len(daemons))
            kills[victim_i] += 1
            victim = daemons[victim_i]
            kill_at = rng.uniform(args.kill_min, args.kill_max)
            results = asyncio.run(load_and_kill(daemons, victim, ids, args.clients, args.rate, kill_at))
            victim.kill()
            with receiver.lock:
                delivered_at_kill = set(receiver.delivered)
                awaiting_retry = len(receiver.awaiting_retry)
            errors = [r.connect_error for r in results if r.connect_error]
            if errors:
                raise SystemExit(f"cycle {cycle}: could not connect to the intake: {errors}")
            row = {"cycle": cycle, "ready_s": round(ready_s, 2), "kill_at_ms": round(kill_at * 1000),
                   "sent": 0, "acked": 0, "unacked": 0, "rejected": 0}
            if len(daemons) > 1:
                row["killed"] = victim_i
            for r in results:
                row["sent"] += r.sent
                row["acked"] += len(r.acked)
                row["unacked"] += len(r.unanswered)
                row["rejected"] += len(r.rejected)
                for mid in r.acked:
                    acked_in[mid] = cycle
                unanswered.update(r.unanswered)
                rejected.extend(r.rejected)
            # what the kill interrupted: acknowledged events not delivered yet, and those waiting for a retry
            row["backlog_at_kill"] = len(wanted(set(acked_in)) - delivered_at_kill)
            row["awaiting_retry_at_kill"] = awaiting_retry
            per_cycle.append(row)

        # the last start: everything acknowledged must now arrive
        drain_started = time.monotonic()
        for d in daemons:
            if d.proc is None or d.proc.poll() is not None:
                d.start(d.root / "daemon-final.log")
        expected = wanted(set(acked_in))
        deadline = drain_started + args.drain_timeout
        status: dict[str, Any] | None = None
        all_arrived_s: float | None = None
        while time.monotonic() < deadline:
            delivered, _, _ = receiver.snapshot()
            if all_arrived_s is None and expected <= delivered:
                all_arrived_s = time.monotonic() - drain_started
            if all_arrived_s is not None:
                # and the events committed but never answered: let the queue empty too
                status = daemon.status()
                if status is not None and not status.get("deliveries", {}).get("pending"):
                    break
                time.sleep(0.25)
            else:
                time.sleep(0.05)
        drain_s = time.monotonic() - drain_started
        status = daemon.status() or status
        exit_status = daemon.terminate()
        for d in daemons[1:]:
            d.terminate()

        delivered, deliveries_received, answered_503 = receiver.snapshot()
        lost = sorted(expected - delivered)
        with receiver.lock:
            dup_counts = [c for c in receiver.delivered.values() if c > 1]
            mixed_ids = sum(1 for s in receiver.webhook_ids.values() if len(s) > 1)
            mixed_event_ids = sum(1 for s in receiver.event_ids.values() if len(s) > 1)
            requests, incomplete = receiver.requests, receiver.incomplete
            batches, events_in_batches = receiver.batches, receiver.events_in_batches
        sent_ids = expected | wanted(unanswered)
        summary = {
            "ok": not lost,
            "cycles": args.cycles,
            "seed": args.seed,
            "backend": args.backend,
            "instances": args.instances,
            "settings": {"rate_events_per_s": args.rate, "clients": args.clients, "fail_rate": args.fail_rate,
                         "fanout": args.fanout, "batch": args.batch,
                         "kill_window_ms": [round(args.kill_min * 1000), round(args.kill_max * 1000)],
                         "durability": "full", "retry_base": "50ms", "retry_max": "500ms"},
            "events_sent": ids.n,
            "events_acknowledged": len(acked_in),
            "deliveries_expected": len(expected),
            "events_rejected": len(rejected),
            "events_unacknowledged_at_kill": len(unanswered),
            "unacknowledged_but_delivered": len(wanted(unanswered) & delivered),
            "delivered_unique": len(delivered),
            "lost": len(lost),
            "duplicates": sum(c - 1 for c in dup_counts),
            "duplicate_events": len(dup_counts),
            "duplicate_rate": round(len(dup_counts) / len(delivered), 5) if delivered else 0.0,
            # for batches the webhook-id names the batch: an event sent again in another batch (re-formed
            # after a restart) has another; the event id inside must be the same
            "duplicates_with_different_webhook_id": mixed_ids,
            "duplicates_with_different_event_id": mixed_event_ids,
            "unexpected_deliveries": len(delivered - sent_ids),
            "receiver": {"requests": requests, "answered_200": deliveries_received, "answered_503": answered_503,
                         "cut_short": incomplete, "batches_answered_200": batches,
                         "events_in_batches_answered_200": events_in_batches},
            "final_drain_s": round(drain_s, 2),
            "all_acknowledged_arrived_after_s": None if all_arrived_s is None else round(all_arrived_s, 2),
            "final_status_deliveries": (status or {}).get("deliveries"),
            "final_sigterm_exit": exit_status,
            "webhooks": [{"id": i, "path": h.path, "events": list(h.events), "enabled": h.enabled}
                         for i, h in zip(webhook_ids, hooks, strict=True)],
            **({"kills_by_instance": [kills[i] for i in range(len(daemons))]} if len(daemons) > 1 else {}),
            "per_cycle": "@PER_CYCLE@",
            "duration_s": round(time.monotonic() - began, 1),
            "machine": versions(cpus_allowed),
            "pinned": args.pin and (os.cpu_count() or 1) > 1,
        }
        if rejected:
            summary["rejected_examples"] = rejected[:5]
        if lost:
            summary["lost_ids"] = lost[:100]
            summary["lost_acknowledged_in_cycle"] = dict(Counter(acked_in[mid_of(m)] for m in lost))
            lost_mids = [mid_of(m) for m in lost[:20]]
            summary["lost_in_database"] = (lookup_pg(cluster, schema, lost_mids) if cluster is not None
                                           else lookup(daemon.db, lost_mids))
            summary["logs"] = str(root)
            summary["final_log_tail"] = log_lines(daemon.root / "daemon-final.log")
            cycles_hit = sorted({acked_in[mid_of(m)] for m in lost})[:3]
            summary["cycle_log_tails"] = {c: log_lines(d.root / f"daemon-{c:03d}.log") for c in cycles_hit
                                          for d in daemons if (d.root / f"daemon-{c:03d}.log").exists()}
        elif args.keep:
            summary["logs"] = str(root)
    finally:
        for d in daemons:
            d.kill()
            d.cleanup()
        receiver.close()
        if cluster is not None:
            cluster.stop("immediate")
            if summary and not lost and not args.keep:
                shutil.rmtree(cluster.root, ignore_errors=True)
        if summary and not lost and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif not summary:
            print(f"webhookd-soak: stopped early; logs kept in {root}", file=sys.stderr)
    rows = ",\n    ".join(json.dumps(r) for r in per_cycle)  # one line per cycle
    print(json.dumps(summary, indent=2).replace('"@PER_CYCLE@"', f"[\n    {rows}\n  ]"))
    return 1 if lost or not summary or summary.get("duplicates_with_different_event_id") else 0


if __name__ == "__main__":
    sys.exit(main())
