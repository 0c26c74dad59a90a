"""Postfix → webhookd: a real Postfix, `webhookd follow postfix` on its log, a real daemon.

Postfix 3.7 (Debian's package) runs as a private instance: its own configuration
directory (`postfix -c`), queue and `maillog_file` in a temporary directory, an smtpd
on a free loopback port, and a relayhost that is the SMTP sink of tests/mta.py
(accepts a@, refuses b@ with 550 5.1.1, defers c@ with 452 4.2.2). Mail goes in over
SMTP; the follower reads the log Postfix writes; the webhooks a real `webhookd serve`
sends to a receiver are what is checked.

Postfix's master starts as root and gives its daemons to the `postfix` user, so these
tests run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.mta import HAVE_AIOSMTPD, WEBHOOKD, Sink, Webhookd, assert_signed, find_program, required
from tests.test_process import ThreadReceiver, wait_until

POSTFIX, POSTCONF, POSTQUEUE = find_program("postfix"), find_program("postconf"), find_program("postqueue")
required("postfix", None if POSTFIX and POSTCONF and POSTQUEUE else "Postfix is not installed")
required("postfix", None if HAVE_AIOSMTPD else "aiosmtpd is not installed")

pytestmark = [
    pytest.mark.skipif(POSTFIX is None, reason="Postfix is not installed (Debian: apt-get install postfix)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master starts as root"),
    pytest.mark.skipif(not HAVE_AIOSMTPD, reason="aiosmtpd is not installed (pip install aiosmtpd)"),
]

MASTER_CF = """\
{smtpd} inet n - n - - smtpd
pickup    unix  n - n 60   1 pickup
cleanup   unix  n - n -    0 cleanup
qmgr      unix  n - n 300  1 qmgr
rewrite   unix  - - n -    - trivial-rewrite
bounce    unix  - - n -    0 bounce
defer     unix  - - n -    0 bounce
trace     unix  - - n -    0 bounce
verify    unix  - - n -    1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -    - proxymap
smtp      unix  - - n -    - smtp
relay     unix  - - n -    - smtp
showq     unix  n - n -    - showq
error     unix  - - n -    - error
retry     unix  - - n -    - error
discard   unix  - - n -    - discard
anvil     unix  - - n -    1 anvil
scache    unix  - - n -    1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class Postfix:
    """A private Postfix instance relaying everything to the sink."""

    def __init__(self, path: Path, relay_port: int) -> None:
        self.path = path
        self.etc, self.spool, self.data = path / "etc", path / "spool", path / "data"
        self.maillog = path / "maillog"
        self.port = free_port()
        for d in (self.etc, self.spool, self.data):
            d.mkdir()
        shutil.chown(self.data, "postfix")
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.spool}
data_directory = {self.data}
maillog_file = {self.maillog}
maillog_file_prefixes = {path}
myhostname = mx.webhookd.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{relay_port}
smtp_tls_security_level = none
local_transport = error:no local delivery here
alias_maps =
biff = no
""")
        (self.etc / "master.cf").write_text(MASTER_CF.format(smtpd=f"127.0.0.1:{self.port}"))

    def command(self, program: str | None, *args: str) -> str:
        assert program is not None
        p = subprocess.run([program, "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"{program} {' '.join(args)}: {p.returncode} {p.stdout} {p.stderr}\n{self.log()}"
        return p.stdout

    def start(self) -> None:
        self.command(POSTFIX, "start")

    def stop(self) -> None:
        subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True, timeout=60)  # type: ignore[list-item]

    def set(self, **settings: str) -> None:
        self.command(POSTCONF, "-e", *(f"{k}={v}" for k, v in settings.items()))
        self.command(POSTFIX, "reload")

    def flush(self) -> None:
        """A queue run now: deferred mail is tried again."""
        self.command(POSTQUEUE, "-f")

    def send(self, *rcpts: str, message_id: str = "<order-7@shop.example>") -> None:
        msg = (f"From: Shop <sender@example.com>\r\nTo: you\r\nMessage-ID: {message_id}\r\n"
               "Subject: your order\r\n\r\nThanks.\r\n")
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as s:
            s.sendmail("sender@example.com", list(rcpts), msg)

    def log(self) -> str:
        return self.maillog.read_text() if self.maillog.exists() else ""

    def logged(self, text: str, count: int = 1) -> bool:
        return self.log().count(text) >= count


class Follower:
    """`webhookd follow postfix` as a process, as its systemd unit runs it."""

    def __init__(self, daemon: Webhookd, postfix: Postfix, state: Path) -> None:
        self.args = [*WEBHOOKD, "follow", "postfix", "--log", str(postfix.maillog), "--state", str(state)]
        self.env = daemon.env
        self.out = state.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover - shown by the assertion below
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"the follower ignored SIGTERM: {self.out.read_text()[-2000:]}") from None


@pytest.fixture
def postfix(smtp_sink: tuple[Sink, int]) -> Iterator[Postfix]:
    path = Path(tempfile.mkdtemp(prefix="whdp", dir="/tmp"))  # Postfix wants a root-owned path
    path.chmod(0o755)
    pf = Postfix(path, smtp_sink[1])
    try:
        pf.start()
        yield pf
    finally:
        print(pf.log())  # pytest shows it when the test failed
        pf.stop()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Webhookd]:
    run = tmp_path / "run"
    run.mkdir()
    d = Webhookd(tmp_path / "state", run).start()
    yield d
    d.kill()


@pytest.fixture
def follower(daemon: Webhookd, postfix: Postfix, tmp_path: Path) -> Iterator[Follower]:
    f = Follower(daemon, postfix, tmp_path / "follow.json")
    yield f
    f.stop()


def test_postfix_deliveries_bounces_deferrals_and_expiry(
    smtp_sink: tuple[Sink, int], postfix: Postfix, daemon: Webhookd, follower: Follower, thread_receiver: ThreadReceiver
) -> None:
    server, _ = smtp_sink
    hook = daemon.json("webhooks", "create", "--url", thread_receiver.url, "--events", "all")
    follower.start()

    postfix.send("a@example.org", "b@example.org", "c@example.org")
    wait_until(lambda: len(thread_receiver.payloads()) >= 3, timeout=20, what="three webhooks")
    # c@ is deferred again on each queue run: "mailbox full" is reported once
    for n in (2, 3):
        # a queue run moves deferred mail only: right after an attempt the message may still
        # be active (the smtp client reporting back), so a flush then does nothing; ask again
        deadline = time.monotonic() + 30
        while server.attempts("c@example.org") < n:
            assert time.monotonic() < deadline, f"timed out waiting for attempt {n} for c@"
            postfix.flush()
            with contextlib.suppress(AssertionError):
                wait_until(lambda n=n: server.attempts("c@example.org") >= n, timeout=1, what=f"attempt {n}")
    wait_until(lambda: postfix.logged("to=<c@example.org>", 3), timeout=10, what="the deferrals in the log")
    # then the message outlives the queue lifetime: qmgr returns it, c@ has failed
    postfix.set(maximal_queue_lifetime="1s", bounce_queue_lifetime="1s")
    for _ in range(40):
        postfix.flush()
        if postfix.logged("status=expired"):
            break
        time.sleep(0.5)
    assert postfix.logged("status=expired"), postfix.log()
    wait_until(lambda: len(thread_receiver.payloads()) >= 4, timeout=20, what="the failed webhook")
    wait_until(lambda: server.attempts("sender@example.com") >= 2, timeout=20, what="the second notice")

    got = {(e["data"]["to"], e["event"], e["data"].get("bounce_type")): e["data"] for e in thread_receiver.payloads()}
    assert sorted(got) == [
        ("a@example.org", "delivered", None),
        ("b@example.org", "bounced", "hard"),
        ("c@example.org", "bounced", "soft"),  # once, though deferred three times
        ("c@example.org", "failed", None),
    ], thread_receiver.payloads()
    assert len(thread_receiver.payloads()) == 4
    assert len(daemon.json("deliveries", "list", "--webhook", hook["id"])["deliveries"]) == 4
    assert_signed(thread_receiver, hook["secret"])

    qids = {d["postfix_queue_id"] for d in got.values()}
    assert len(qids) == 1 and f"{qids.pop()}: message-id=<order-7@shop.example>" in postfix.log()
    assert {d["message_id"] for d in got.values()} == {"<order-7@shop.example>"}
    assert {d["from"] for d in got.values()} == {"sender@example.com"}
    assert "error_message" not in got[("a@example.org", "delivered", None)]
    assert "550 5.1.1 User unknown" in got[("b@example.org", "bounced", "hard")]["error_message"]
    assert "452 4.2.2 Mailbox full" in got[("c@example.org", "bounced", "soft")]["error_message"]
    assert "452 4.2.2 Mailbox full" in got[("c@example.org", "failed", None)]["error_message"]

    # Postfix's own notices (from=<>) went to the sender through the sink, unreported
    notices = [m for m in server.messages if m[0] == "<>"]
    assert [m[1] for m in notices] == [["sender@example.com"], ["sender@example.com"]]
    assert all(e["data"]["to"] != "sender@example.com" for e in thread_receiver.payloads())


def test_postfix_log_rotation_and_follower_restart(
    postfix: Postfix, daemon: Webhookd, follower: Follower, thread_receiver: ThreadReceiver
) -> None:
    hook = daemon.json("webhooks", "create", "--url", thread_receiver.url, "--events", "delivered")
    follower.start()

    def delivered() -> list[str]:
        return sorted(e["data"]["to"] for e in thread_receiver.payloads())

    postfix.send("a1@example.org", message_id="<m1@shop.example>")
    wait_until(lambda: delivered() == ["a1@example.org"], timeout=20, what="a1's webhook")

    # Postfix's own rotation: maillog is renamed aside (and compressed), a new one begins
    postfix.command(POSTFIX, "logrotate")
    first_rotation = time.monotonic()
    rotated = [p for p in postfix.path.iterdir() if p.name.startswith("maillog.")]
    assert rotated, list(postfix.path.iterdir())
    postfix.send("a2@example.org", message_id="<m2@shop.example>")
    wait_until(lambda: delivered() == ["a1@example.org", "a2@example.org"], timeout=20,
               what="a2's webhook after rotation")

    # the follower stops; mail goes on; restarted, it resumes where it stopped
    follower.stop()
    postfix.send("a3@example.org", message_id="<m3@shop.example>")
    wait_until(lambda: postfix.logged("to=<a3@example.org>"), timeout=20, what="a3's delivery in the log")
    follower.start()
    wait_until(lambda: delivered() == ["a1@example.org", "a2@example.org", "a3@example.org"], timeout=20,
               what="a3's webhook after the restart")

    # stopped again, and the log is rotated meanwhile: a4's line is only in the rotated,
    # compressed file, a5's in the new one; restarted, it finishes the old one first
    follower.stop()
    postfix.send("a4@example.org", message_id="<m4@shop.example>")
    wait_until(lambda: postfix.logged("to=<a4@example.org>"), timeout=20, what="a4's delivery in the log")
    # the rotated file is named by the second (maillog.YYYYMMDD-HHMMSS): not the same one twice
    time.sleep(max(0.0, 1.1 - (time.monotonic() - first_rotation)))
    postfix.command(POSTFIX, "logrotate")
    postfix.send("a5@example.org", message_id="<m5@shop.example>")
    wait_until(lambda: postfix.logged("to=<a5@example.org>"), timeout=20, what="a5's delivery in the log")
    assert not postfix.logged("to=<a4@example.org>")  # rotated away
    follower.start()
    wait_until(lambda: delivered() == [f"a{i}@example.org" for i in range(1, 6)], timeout=20,
               what="a4's and a5's webhooks after rotation while stopped")
    follower.stop()
    assert len(thread_receiver.payloads()) == 5
    assert thread_receiver.delivered() == {f"<m{i}@shop.example>" for i in range(1, 6)}
    assert "finished the rotated log" in follower.out.read_text()
    assert_signed(thread_receiver, hook["secret"])
