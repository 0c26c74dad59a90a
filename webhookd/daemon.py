"""Wiring and lifecycle: start → serve → staged shutdown; signals; systemd notify."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import grp
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from webhookd import __version__, logs
from webhookd.admin import AdminApi
from webhookd.config import Config, ConfigError, load_config
from webhookd.dispatcher import Dispatcher
from webhookd.events import Event
from webhookd.fleetsync import FleetSync
from webhookd.intake import IntakeStats, LineProtocol, http_app
from webhookd.metrics import Metrics
from webhookd.netguard import TargetGuard
from webhookd.scheduler import Scheduler
from webhookd.store import StoreError
from webhookd.store.backends import make_storage
from webhookd.tracking.api import TrackingApi
from webhookd.tracking.listener import Recorder, TrackingListener, TrackingStats
from webhookd.tracking.tokens import KeyFileError, KeyRing
from webhookd.ui import Dashboard
from webhookd.webhooks import Webhook

log = structlog.get_logger("webhookd")

STATUS_INTERVAL = 10.0  # seconds between STATUS= updates to systemd
PRUNE_INTERVAL = 60.0  # seconds between retention passes
PRUNE_BATCH = 1000  # rows per retention transaction
# What a reload does not change: the connector, the TLS context, the target guard, the
# global slots, the database and the sockets are made at start.
RESTART_ONLY_DELIVERY = ("concurrency", "ca_file", "allow_targets")
STATUS_READ_TIMEOUT = 2.0  # seconds the systemd status line waits for the pending count
RESTART_ONLY = ("storage", "intake", "admin", "dashboard", "tracking", "environment", "state_dir", "runtime_dir")


class StartupError(Exception):
    """The daemon cannot start; the message says why, in one line."""


def sd_notify(message: str) -> bool:
    """Send a state line to systemd's $NOTIFY_SOCKET (abstract '@' names included)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed", error=str(exc))
        return False


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _prepare_socket_path(path: Path) -> None:
    if len(str(path).encode()) > 107:
        raise StartupError(f"socket path too long for a Unix socket (max 107 bytes): {path}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if _socket_in_use(path):
            raise StartupError(f"another webhookd is already listening on {path}")
        path.unlink()


def _secure_socket(path: Path, mode: int, group: str = "") -> None:
    os.chmod(path, mode)
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"intake.socket_group: no group named {group!r}") from None
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            raise StartupError(
                f"intake.socket_group: cannot give {path} to group {group!r} ({exc.strerror}); "
                "the daemon must be a member of that group"
            ) from None


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        cfg = config.delivery
        # Data flows one way: intake → storage → scheduler → dispatcher → storage. The
        # storage hands what each commit made due to the scheduler (push_fresh); intake
        # submits each event with the scheduler's subscriber list for its type.
        try:
            self.store, self.store_health = make_storage(
                config.storage, clock=clock, on_fresh=lambda events: self.scheduler.push_fresh(events),
            )
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        guard = None if config.dev else TargetGuard(cfg.allow_targets)
        self.dispatcher = Dispatcher(cfg, guard=guard)
        self.metrics = Metrics()
        self.fleet = getattr(self.store, "fleet", None)  # PostgreSQL: daemons sharing the queue
        self.scheduler = Scheduler(
            self.store, self.dispatcher, cfg, clock=clock, on_disabled=self._notify_disabled, metrics=self.metrics,
            fleet=self.fleet,
        )
        self.fleet_sync = FleetSync(self.fleet, self.scheduler) if self.fleet is not None else None
        self.stats = IntakeStats()
        self.metrics.received = self.store.received
        self.metrics.rejected = lambda: self.stats.rejected
        self.metrics.failed_commits = lambda: self.store.failed_commits
        self.admin = AdminApi(self.scheduler, self.store, production=not config.dev)
        self.admin.metrics = self.metrics
        self.admin.gauges = lambda: {"intake_connections": self.stats.connections}
        self.metrics.store_health = self.store_health
        self.admin.extra_status = lambda: {
            "intake": {"connections": self.stats.connections}, "storage": self._storage_status(),
        }
        if config.dashboard.enabled:
            self.dashboard: Dashboard | None = Dashboard(
                self.admin.ops, self.store, config.dashboard, production=not config.dev,
                admin_token=config.admin.token, clock=clock,
            )
            self.dashboard.tokens = self.admin.tokens
            self.admin.ui = self.dashboard.app
            self.admin.login_link = self.dashboard.create_login_link
        else:
            self.dashboard = None
        self.tracking_stats = TrackingStats()
        self.metrics.tracking = lambda: self.tracking_stats.counts
        self.admin.tracking = TrackingApi(
            self.store, lambda: self.config.tracking, self.key_ring, stats=self.tracking_stats, clock=clock
        )
        self._ring: KeyRing | None = None
        self.recorder: Recorder | None = None
        self._tracking_runner: web.AppRunner | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._protocols: set[LineProtocol] = set()
        self._runners: list[web.AppRunner] = []
        self._socket_paths: list[Path] = []
        # Set by the signal handlers, acted on by serve(): a handler only sets state.
        self._should_exit = False
        self._force_exit = False
        self._reload_requested = False
        self._wake = asyncio.Event()
        self._forced = False  # the in-flight attempts were abandoned
        self._stopped = False
        self._watchdog: asyncio.Task[None] | None = None
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self._pruner: asyncio.Task[None] | None = None
        self.prune_interval = PRUNE_INTERVAL

    def _storage_status(self) -> dict[str, Any]:
        """/v1/status's storage: the backend, where (never a password) and its connection."""
        health = self.store_health()
        return {"backend": health.backend, "database": health.database, "connected": health.connected,
                "reconnects": health.reconnects, **self._fleet_status()}

    def _fleet_status(self) -> dict[str, Any]:
        """On PostgreSQL: this daemon's id in the fleet (the `instances` table, and the ids the
        others log when they take over from it) and how many ended leases it took over."""
        if self.fleet is None:
            return {}
        return {"instance": self.fleet.instance_id, "takeovers": self.fleet.takeovers}

    # -- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StartupError(f"cannot create state_dir {cfg.state_dir}: {exc.strerror}") from exc
        try:
            await self.store.open()
            await self.scheduler.load()  # a stored filter it cannot read, say
            if self.fleet_sync is not None:
                await self.fleet_sync.start()
            await self.sync_webhooks(cfg)  # [[webhooks]] and webhooks.d/ (webhookd/declared.py)
        except StoreError as exc:
            raise StartupError(str(exc)) from exc
        await self.dispatcher.start()
        await self._start_intake()
        await self._start_admin()
        await self._start_tracking()
        self._pruner = asyncio.create_task(self._prune_forever(), name="retention")
        log.info(
            "webhookd started",
            version=__version__,
            environment=cfg.environment,
            storage=cfg.storage.backend,
            database=self.store_health().database,
            intake_socket=str(cfg.intake.socket) if cfg.intake.socket else None,
            intake_http=_fmt_listen(cfg.intake.http_listen),
            admin_socket=str(cfg.admin.socket) if cfg.admin.socket else None,
            webhooks=len(self.scheduler.webhooks),
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],
        )

    async def _start_intake(self) -> None:
        cfg = self.config.intake
        loop = asyncio.get_running_loop()
        if cfg.socket is not None:
            _prepare_socket_path(cfg.socket)

            def factory() -> LineProtocol:
                proto = _TrackedProtocol(
                    self._protocols, self.submit, max_line=cfg.max_event_bytes,
                    max_connections=cfg.max_connections, stats=self.stats, clock=self.clock,
                )
                return proto

            old = os.umask(0o177)
            try:
                server = await loop.create_unix_server(factory, str(cfg.socket), backlog=1024)
            finally:
                os.umask(old)
            _secure_socket(cfg.socket, cfg.socket_mode, cfg.socket_group)
            self._servers.append(server)
            self._socket_paths.append(cfg.socket)
        if cfg.http_listen is not None:
            app = http_app(
                self.submit, token=cfg.http_token, max_event_bytes=cfg.max_event_bytes, stats=self.stats,
                clock=self.clock,
            )
            await self._serve_tcp(app, cfg.http_listen, "intake.http_listen")

    async def _start_admin(self) -> None:
        cfg = self.config.admin
        if cfg.socket is not None:
            _prepare_socket_path(cfg.socket)
            runner = web.AppRunner(self.admin.app(), access_log=None, handle_signals=False)
            await runner.setup()
            self._runners.append(runner)
            old = os.umask(0o177)
            try:
                await web.UnixSite(runner, str(cfg.socket)).start()
            finally:
                os.umask(old)
            _secure_socket(cfg.socket, cfg.socket_mode)
            self._socket_paths.append(cfg.socket)
        if cfg.http_listen is not None:
            await self._serve_tcp(self.admin.app(token=cfg.token), cfg.http_listen, "admin.http_listen")

    def key_ring(self) -> KeyRing:
        """The tracking key ring, created in state_dir on first use; re-read when rotated."""
        if self._ring is None:
            self._ring = KeyRing.load(self.config.tracking_key_file, create=True)
        else:
            self._ring.refresh()
        return self._ring

    async def _start_tracking(self) -> None:
        cfg = self.config.tracking
        if not cfg.enabled or cfg.listen is None:
            return
        try:
            ring = self.key_ring()
        except KeyFileError as exc:
            raise StartupError(f"tracking: {exc}") from exc
        self.recorder = Recorder(self.store, self.submit, ring, cfg, clock=self.clock, stats=self.tracking_stats)
        self.recorder.start()
        listener = TrackingListener(ring, self.recorder, cfg, clock=self.clock)
        self._tracking_runner = await self._serve_tcp(listener.app(), cfg.listen, "tracking.listen", keep=False)
        log.info("tracking listener started", listen=_fmt_listen(cfg.listen), base_url=cfg.base_url,
                 key_ids=sorted(ring.keys))

    async def _serve_tcp(
        self, app: web.Application, listen: tuple[str, int], key: str, *, keep: bool = True
    ) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, listen[0], listen[1], backlog=1024).start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"{key}: cannot listen on {_fmt_listen(listen)}: {exc.strerror}") from exc
        if keep:
            self._runners.append(runner)
        return runner

    def submit(self, event: Event) -> asyncio.Future[str]:
        """Intake's way in: the event with the webhooks it fans out to (type and filters), to storage."""
        return self.store.submit(event, self.scheduler.fan_out(event))

    def _notify_disabled(self, wh: Webhook) -> None:
        """Run `[notify] command` for an automatically disabled webhook."""
        command = self.config.notify.command
        if not command:
            return
        env = {
            **os.environ,
            "WEBHOOKD_EVENT": "webhook_disabled",
            "WEBHOOKD_WEBHOOK_ID": wh.id,
            "WEBHOOKD_WEBHOOK_URL": wh.url,
            "WEBHOOKD_WEBHOOK_DESCRIPTION": wh.description,
            "WEBHOOKD_REASON": wh.disabled_reason or "",
            "WEBHOOKD_CONSECUTIVE_FAILURES": str(wh.consecutive_failures),
        }

        async def run_command() -> None:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *shlex.split(command), env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                )
                _, err = await asyncio.wait_for(proc.communicate(), 60)
            except (OSError, ValueError, TimeoutError) as exc:
                log.error("notify command failed", webhook_id=wh.id, error=str(exc))
                return
            if proc.returncode:
                log.error("notify command failed", webhook_id=wh.id, exit_status=proc.returncode,
                          stderr=err.decode(errors="replace")[-500:])

        task = asyncio.create_task(run_command())
        self._notify_tasks.add(task)
        task.add_done_callback(self._notify_tasks.discard)

    # -- run --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """SIGTERM/SIGINT (and callers that want the same): the first request drains, a
        second one abandons the attempts in flight. Only sets state; serve() does the work."""
        if self._should_exit:
            self._force_exit = True
        self._should_exit = True
        self._wake.set()

    def request_reload(self) -> None:
        """SIGHUP: only sets state; serve() calls reload()."""
        self._reload_requested = True
        self._wake.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.start()
            sd_notify(f"READY=1\nSTATUS={await self._status_line()}\nMAINPID={os.getpid()}")
            self._watchdog = self._start_watchdog()
            await self._main_loop()
        finally:
            await self._shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _main_loop(self) -> None:
        """Until a stop is requested: perform the reloads the handlers asked for."""
        while True:
            self._wake.clear()  # before the checks: a request from now on wakes the wait below
            if self._should_exit:
                return
            if self._reload_requested:
                self._reload_requested = False
                await self._reload_now()
                continue
            await self._wake.wait()

    async def _reload_now(self) -> None:
        try:
            await self.reload()
        except Exception:  # a bug in reload must not stop the daemon (as in a signal callback)
            log.exception("config reload raised")

    async def _shutdown(self) -> None:
        """stop(), and meanwhile: a second stop request abandons the attempts in flight."""
        stopping = asyncio.ensure_future(self.stop())
        try:
            while True:
                self._wake.clear()
                if self._force_exit and not self._forced:
                    self._forced = True
                    log.warning("second stop signal: not waiting for in-flight deliveries")
                    self.scheduler.cancel_attempts()
                if self._reload_requested:  # as before: a SIGHUP during the drain still reloads
                    self._reload_requested = False
                    await self._reload_now()
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait((stopping, woken), return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if stopping.done():
                    break
        finally:
            if not stopping.done():
                stopping.cancel()
        await stopping

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        """WATCHDOG=1 at half of $WATCHDOG_USEC, STATUS= with the queue depth every 10 s."""
        if not os.environ.get("NOTIFY_SOCKET"):
            return None
        usec = os.environ.get("WATCHDOG_USEC", "")
        watchdog = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None
        interval = min(watchdog or STATUS_INTERVAL, STATUS_INTERVAL)

        async def beat() -> None:
            last_status = 0.0
            while True:
                lines = ["WATCHDOG=1"] if watchdog is not None else []
                now = time.monotonic()
                if now - last_status >= STATUS_INTERVAL:
                    last_status = now
                    lines.append(f"STATUS={await self._status_line()}")
                if lines:
                    sd_notify("\n".join(lines))
                await asyncio.sleep(interval)

        return asyncio.create_task(beat(), name="watchdog")

    async def prune_once(self) -> int:
        """Delete what is older than storage.retention, in small transactions."""
        cutoff = self.clock() - self.config.storage.retention
        total = 0
        while True:
            n = await self.store.prune(cutoff, PRUNE_BATCH)
            total += n
            if n < PRUNE_BATCH:
                break
            await asyncio.sleep(0.01)  # let intake commits in between
        remembered = self.clock() - self.config.tracking.remember
        for _ in range(1000):  # at most a million marks a pass
            if await self.store.prune_tracking(remembered, PRUNE_BATCH) < PRUNE_BATCH:
                break
            await asyncio.sleep(0.01)
        return total

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                pruned = await self.prune_once()
            except StoreError as exc:
                log.error("retention pass failed", error=str(exc))
                continue
            if pruned:
                log.info("retention pass", pruned=pruned, retention_s=self.config.storage.retention)

    async def _status_line(self) -> str:
        # Bounded: the watchdog's beat waits for this line, and a remote database that does
        # not answer (a partition) must not get the daemon killed by systemd's WatchdogSec.
        try:
            pending = str((await asyncio.wait_for(self.store.count_by_status(), STATUS_READ_TIMEOUT))["pending"])
        except (StoreError, TimeoutError):
            pending = "?"
        return (
            f"{pending} deliveries pending, {self.scheduler.in_flight} in flight, "
            f"{len(self.scheduler.webhooks)} webhooks, {self.stats.connections} intake connections"
        )

    async def sync_webhooks(self, cfg: Config) -> dict[str, int]:
        """Bring the stored webhooks in line with the declared ones; how many of each change."""
        changes = await self.admin.ops.sync(cfg.webhooks)
        counts = {kind: sum(1 for c in changes if c.kind == kind) for kind in ("create", "update", "disable")}
        if changes:
            log.info("declared webhooks synced", declared=len(cfg.webhooks), **counts)
        return counts

    async def reload(self) -> None:
        """Re-read the config (SIGHUP, through serve()); sync the declared webhooks, apply
        what can change live, keep and log what needs a restart. A config that does not
        load changes nothing."""
        try:
            new = load_config(self.config.source, dev=self.config.dev)
        except ConfigError as exc:
            log.error("config reload failed; keeping the running config", error=str(exc))
            return
        try:
            synced: dict[str, int] | str = await self.sync_webhooks(new)
        except StoreError as exc:  # the rest of the reload still applies; the next SIGHUP tries again
            log.error("declared webhooks sync failed", error=str(exc))
            synced = f"failed: {exc}"
        old = self.config
        logs.configure(new.log.level, new.log.format)
        restart_only = {name: getattr(old.delivery, name) for name in RESTART_ONLY_DELIVERY}
        kept = {key: getattr(old, key) for key in RESTART_ONLY}
        needs_restart = [f"delivery.{name}" for name, value in restart_only.items()
                         if getattr(new.delivery, name) != value]
        needs_restart += [key for key, value in kept.items() if getattr(new, key) != value]
        delivery = dataclasses.replace(new.delivery, **restart_only)
        self.dispatcher.cfg = delivery
        self.scheduler.reconfigure(delivery)
        # what runs: a later reload names a key that still differs from the file again
        self.config = dataclasses.replace(new, delivery=delivery, **kept)
        log.info("config reloaded", source=str(new.source) if new.source else None, needs_restart=needs_restart,
                 webhooks=synced)

    # -- stop --------------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop intake, let in-flight deliveries finish, record outcomes, close. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        sd_notify("STOPPING=1")
        log.info("stopping", in_flight=self.scheduler.in_flight)
        for server in self._servers:
            server.close()
        if self._pruner is not None:
            self._pruner.cancel()
        for proto in list(self._protocols):
            proto.stop_reading()
        # Answer what was already read: those events commit with the next batch.
        for _ in range(100):
            if not any(p.pending for p in self._protocols):
                break
            await asyncio.sleep(0.01)
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        if self._tracking_runner is not None:  # no new hits; record the queued ones
            await self._tracking_runner.cleanup()
        if self.recorder is not None:
            await self.recorder.stop()
        grace = 0.0 if self._force_exit else self.config.delivery.shutdown_grace
        abandoned = await self.scheduler.drain(grace)
        if self.fleet_sync is not None:
            await self.fleet_sync.stop()
        await self.store.close()
        await self.dispatcher.close()
        for runner in self._runners:
            await runner.cleanup()
        for server in self._servers:
            await server.wait_closed()
        if self._watchdog is not None:
            self._watchdog.cancel()
        for path in self._socket_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        log.info("stopped", abandoned_attempts=abandoned)


class _TrackedProtocol(LineProtocol):
    def __init__(self, registry: set[LineProtocol], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._registry = registry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._registry.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(exc)


def _fmt_listen(listen: tuple[str, int] | None) -> str | None:
    if listen is None:
        return None
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(config: Config) -> int:
    """`webhookd serve`: run until SIGTERM/SIGINT; returns the exit status."""
    logs.configure(config.log.level, config.log.format)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        runner: Callable[..., Any] = asyncio.run
    else:  # pragma: no cover - optional speed-up
        runner = uvloop.run

    async def main() -> None:
        await Daemon(config).serve()

    try:
        runner(main())
    except StartupError as exc:
        log.error("cannot start", error=str(exc))
        print(f"webhookd: {exc}", file=sys.stderr)
        return 1
    return 0
