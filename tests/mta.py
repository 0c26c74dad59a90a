"""What the real-MTA tests share: an SMTP sink on loopback, a `webhookd serve` process.

The sink plays the remote mail server: it accepts every recipient but two kinds,
refuses `b@` with 550 5.1.1 (user unknown) and defers `c…@` with 452 4.2.2 (mailbox
full), and records what it saw.

CI installs each MTA from Debian's packages (they conflict, so one after the other:
see .ci/run) and sets WEBHOOKD_REQUIRE_MTA to the one it installed, which turns a
missing MTA into an error instead of a skip.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook as StandardWebhook

from tests.test_process import Proc

try:
    from aiosmtpd.controller import Controller

    HAVE_AIOSMTPD = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_AIOSMTPD = False

WEBHOOKD = [sys.executable, "-m", "webhookd"]


def find_program(name: str) -> str | None:
    """An MTA program on PATH or in /usr/sbin (not on every user's PATH)."""
    fallback = f"/usr/sbin/{name}"
    return shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)


def required(mta: str, missing: str | None) -> None:
    """Fail the module's collection if CI asked for this MTA and it is not usable."""
    wanted = os.environ.get("WEBHOOKD_REQUIRE_MTA", "").split(",")
    if mta in wanted and missing:
        raise RuntimeError(f"WEBHOOKD_REQUIRE_MTA={mta} but {missing}")


@dataclass
class Sink:
    """What the 'remote' server saw: RCPT attempts and accepted messages."""

    rcpts: list[str] = field(default_factory=list)
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        with self.lock:
            self.rcpts.append(address)
        local = address.split("@")[0]
        if local == "b":
            return "550 5.1.1 User unknown"
        if local.startswith("c"):
            return "452 4.2.2 Mailbox full"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.content)))
        return "250 2.0.0 Ok: queued"

    def attempts(self, rcpt: str) -> int:
        with self.lock:
            return self.rcpts.count(rcpt)

    def start(self, port: int) -> Any:
        controller = Controller(self, hostname="127.0.0.1", port=port)
        controller.start()
        return controller


def assert_signed(receiver: Any, secret: str) -> None:
    """Every webhook the receiver got verifies with the original documentation's scheme
    and with Standard Webhooks, for the webhook's secret."""
    with receiver.lock:
        pairs = list(zip(receiver.bodies, receiver.headers, strict=True))
    assert pairs
    for body, headers in pairs:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-webhook-signature"], expected)
        StandardWebhook(secret).verify(body, headers)


class Webhookd(Proc):
    """A real `webhookd serve` with its intake socket in `run_dir` (in `socket_group` if
    given, for an MTA that runs as another user), driven by the CLI."""

    def __init__(self, state: Path, run_dir: Path, socket_group: str | None = None) -> None:
        self.root, self.run = state, run_dir
        self.config = state / "webhookd.toml"
        state.mkdir(parents=True, exist_ok=True)
        group = f'socket_group = "{socket_group}"\n' if socket_group else ""
        self.config.write_text(
            f'environment = "development"\nstate_dir = "{state}"\nruntime_dir = "{run_dir}"\n'
            '[storage]\ndurability = "normal"\n'
            f'[intake]\nhttp_listen = ""\n{group}'
            '[log]\nformat = "json"\nlevel = "warning"\n'
            '[delivery]\nretry_base = "50ms"\nretry_max = "200ms"\nshutdown_grace = "1s"\n'
        )
        self.env = {**os.environ, "WEBHOOKD_CONFIG": str(self.config)}
        self.log = state / "daemon.log"
        self.proc = None

    def kill(self) -> None:
        self.stop()  # SIGKILL
