"""Exim → webhookd: docs/mta/exim-webhookd.conf in a real Exim, a real daemon, an SMTP sink.

Exim runs as a standalone program with its own configuration (`exim -C`), spool and
logs in a temporary directory, and delivers over SMTP to an aiosmtpd sink on
127.0.0.1 that accepts a@, refuses b@ (550 5.1.1) and defers c@ (452 4.2.2). The
webhooks a real `webhookd serve` sends to a receiver are what is checked.

Debian's Exim keeps its privileges with `-C` only for root, and even then it gives
them up (to Debian-exim) when it re-executes itself to deliver: so these tests run as
root, and Exim's files and webhookd's intake socket are in a directory Debian-exim
can reach, the socket in Debian-exim's group.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mta import HAVE_AIOSMTPD, Sink, assert_signed, find_program, required
from tests.mta import Webhookd as Daemon
from tests.test_process import ThreadReceiver, wait_until
from webhookd.dsn import classify

ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "docs" / "mta" / "exim-webhookd.conf"
SNIPPET_SOCKET = "/run/webhookd/intake.sock"


EXIM = find_program("exim4") or find_program("exim")
required("exim", None if EXIM else "Exim is not installed")

pytestmark = [
    pytest.mark.skipif(EXIM is None, reason="Exim is not installed (Debian: apt-get install exim4-daemon-light)"),
    pytest.mark.skipif(
        os.geteuid() != 0, reason="Exim delivers with a -C configuration, and expands its macros in -be, only for root"
    ),
]
needs_sink = pytest.mark.skipif(not HAVE_AIOSMTPD, reason="aiosmtpd is not installed (pip install aiosmtpd)")


def exim_setting(name: str) -> str:
    assert EXIM is not None
    p = subprocess.run([EXIM, "-bP", name], capture_output=True, text=True, timeout=30)
    m = re.search(rf"^{name} = (.*)$", p.stdout, re.M)
    assert m, p.stdout + p.stderr
    return m.group(1).strip()


# -- a directory Debian-exim can reach: Exim's config and spool, webhookd's socket -------------
@dataclass
class Work:
    path: Path
    uid: int
    gid: int
    group: str

    @property
    def run(self) -> Path:
        return self.path / "run"

    @property
    def socket(self) -> Path:
        return self.run / "intake.sock"

    @property
    def mainlog(self) -> str:
        log = self.path / "spool" / "log" / "mainlog"
        return log.read_text() if log.exists() else ""


@pytest.fixture
def work() -> Iterator[Work]:
    user, group = exim_setting("exim_user"), exim_setting("exim_group")
    path = Path(tempfile.mkdtemp(prefix="whdx", dir="/tmp"))
    try:
        w = Work(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid, group)
        path.chmod(0o755)
        w.run.mkdir(mode=0o755)
        w.run.chmod(0o755)
        (path / "spool").mkdir()
        os.chown(path / "spool", w.uid, w.gid)
        yield w
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the daemon -----------------------------------------------------------------------------
@pytest.fixture
def daemon(tmp_path: Path, work: Work) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state", work.run, work.group)
    yield d
    d.kill()


# -- Exim -----------------------------------------------------------------------------------
def snippet(socket_path: Path) -> str:
    text = SNIPPET.read_text()
    assert text.count(SNIPPET_SOCKET) == 1
    return text.replace(SNIPPET_SOCKET, str(socket_path))


def write_exim_config(work: Work, smtp_port: int) -> Path:
    config = work.path / "exim.conf"
    config.write_text(f"""\
primary_hostname = mta.test.example
qualify_domain = test.example
spool_directory = {work.path}/spool
log_file_path = {work.path}/spool/log/%slog
keep_environment =
# Only -odi submissions and the -qff runs below deliver (no background deliveries).
queue_only = true

{snippet(work.socket)}

begin routers

unrouteable:
  driver = redirect
  domains = nowhere.invalid
  allow_fail
  data = :fail: Unrouteable address

to_sink:
  driver = manualroute
  route_list = * 127.0.0.1
  self = send
  transport = sink_smtp

begin transports

sink_smtp:
  driver = smtp
  port = {smtp_port}
  allow_localhost
  event_action = WEBHOOKD_EVENT_ACTION
  # (initgroups = true, as docs/mta/exim.md asks for, needs a delivery process running
  # as root; with -C Exim has given root up, and the socket is in Exim's own group.)

begin retry

*   *   F,1h,15m
""")
    config.chmod(0o644)
    return config


# The subject: quotes, an RFC 2047 word, and a raw Latin-1 byte (not UTF-8)
MESSAGE = (
    b"From: Shop <sender@example.com>\n"
    b"To: customers\n"
    b'Subject: Order "42" =?UTF-8?Q?f=C3=BCr_dich?= \xa7 1\n'
    b"Message-ID: <order-42@shop.example>\n"
    b"\n"
    b"Thank you.\n"
)


def write_config(path: Path, text: str) -> Path:
    """Exim refuses a configuration file that others than its owner may write."""
    path.write_text(text)
    path.chmod(0o644)
    return path


def exim(config: Path, *args: str, stdin: str | bytes | None = None) -> subprocess.CompletedProcess[str]:
    assert EXIM is not None
    data = stdin.encode() if isinstance(stdin, str) else stdin
    p = subprocess.run([EXIM, "-C", str(config), *args], input=data, capture_output=True, timeout=60)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    assert p.returncode == 0, f"exim {' '.join(args)}: {p.returncode} {out} {err}"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def submit(config: Path, *rcpts: str) -> None:
    """Synchronous delivery: exim returns once it (and the bounce it sent) is done."""
    exim(config, "-odi", "-oi", "-f", "sender@example.com", *rcpts, stdin=MESSAGE)


# -- tests ----------------------------------------------------------------------------------
@needs_sink
def test_exim_reports_deliveries_and_bounces(
    work: Work, smtp_sink: tuple[Sink, int], daemon: Daemon, thread_receiver: ThreadReceiver
) -> None:
    server, port = smtp_sink
    config = write_exim_config(work, port)
    daemon.start()
    hook = daemon.json("webhooks", "create", "--url", thread_receiver.url, "--events", "all")

    submit(config, "a@example.org", "b@example.org", "c@example.org", "x@nowhere.invalid")

    wait_until(lambda: len(thread_receiver.payloads()) >= 4, timeout=15, what="four webhooks")
    # c@ is still queued: two forced queue runs meet the same "mailbox full" again
    exim(config, "-qff")
    exim(config, "-qff")
    assert server.attempts("c@example.org") == 3
    assert work.mainlog.count("== c@example.org") == 3
    time.sleep(0.5)  # anything more would have arrived by now

    got = {(e["data"]["to"], e["event"], e["data"].get("bounce_type")): e for e in thread_receiver.payloads()}
    assert sorted(got) == [
        ("a@example.org", "delivered", None),
        ("b@example.org", "bounced", "hard"),
        ("c@example.org", "bounced", "soft"),  # once, though deferred three times
        ("x@nowhere.invalid", "bounced", "hard"),
    ], thread_receiver.payloads()
    assert len(thread_receiver.payloads()) == 4
    deliveries = daemon.json("deliveries", "list", "--webhook", hook["id"])["deliveries"]
    assert len(deliveries) == 4
    assert_signed(thread_receiver, hook["secret"])

    delivered = got[("a@example.org", "delivered", None)]["data"]
    assert delivered["message_id"] == "<order-42@shop.example>"
    assert delivered["from"] == "sender@example.com"
    assert delivered["subject"] == 'Order "42" für dich ? 1'
    assert re.fullmatch(r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}", delivered["exim_id"])
    assert "error_message" not in delivered
    assert "550 5.1.1 User unknown" in got[("b@example.org", "bounced", "hard")]["data"]["error_message"]
    assert "452 4.2.2 Mailbox full" in got[("c@example.org", "bounced", "soft")]["data"]["error_message"]
    assert got[("x@nowhere.invalid", "bounced", "hard")]["data"]["error_message"] == "Unrouteable address"
    assert {e["data"]["message_id"] for e in thread_receiver.payloads()} == {"<order-42@shop.example>"}

    # Exim's own bounce (empty sender) went out through the same transport, unreported
    bounces = [m for m in server.messages if m[0] == "<>"]
    assert len(bounces) == 1 and bounces[0][1] == ["sender@example.com"]
    assert all(e["data"]["to"] != "sender@example.com" for e in thread_receiver.payloads())
    assert "failed to expand" not in work.mainlog


@needs_sink
def test_mail_flows_while_webhookd_is_down(work: Work, smtp_sink: tuple[Sink, int], daemon: Daemon) -> None:
    """A crashed daemon (socket file left, connection refused) loses events, not mail:
    every send fails, several in each Exim process, and deliveries go on untouched
    (see also test_a_failed_send_leaves_no_stale_descriptor)."""
    server, port = smtp_sink
    config = write_exim_config(work, port)
    daemon.start()
    daemon.kill()
    assert work.socket.exists()

    submit(config, "x@nowhere.invalid", "a@example.org", "b@example.org", "c@example.org",
           "c2@example.org", "d@example.org")
    exim(config, "-qff")

    log = work.mainlog
    assert re.search(r"[=-]> a@example.org", log) and re.search(r"[=-]> d@example.org", log), log
    assert "** b@example.org" in log and "** x@nowhere.invalid" in log
    assert "== c@example.org" in log and "== c2@example.org" in log
    assert "failed to expand" not in log
    accepted = [m for m in server.messages if m[0] == "sender@example.com"]
    assert [sorted(m[1]) for m in accepted] == [["a@example.org", "d@example.org"]]
    assert [m[1] for m in server.messages if m[0] == "<>"] == [["sender@example.com"]]
    for _sender, _rcpts, content in server.messages:
        assert b"event=" not in content


def test_a_failed_send_leaves_no_stale_descriptor(tmp_path: Path) -> None:
    """Exim 4.96 keeps the number of a socket whose connect failed, and its next
    ${readsocket} writes to and closes whatever file has that number by then: here an
    lsearch lookup's, which then cannot read on (its file is larger than one stdio
    buffer). WEBHOOKD_SEND clears the number right after a failure."""
    table = tmp_path / "table"
    table.write_text("k1: v1\n" + "".join(f"pad{i}: {'x' * 60}\n" for i in range(400)) + "k2: v2\n")
    head = f"keep_environment =\nlog_file_path = {tmp_path}/%slog\n"
    config = write_config(tmp_path / "be.conf", head + snippet(tmp_path / "gone.sock"))
    lookup = "${lookup{%s}lsearch{" + str(table) + "}}"
    line = f"[WEBHOOKD_SEND] [{lookup % 'k1'}] [WEBHOOKD_SEND] [{lookup % 'k2'}]\n"
    assert "[] [v1] [] [v2]" in exim(config, "-be", stdin=line).stdout


# Reply texts and what the snippet's classification makes of them: the same as
# webhookd/dsn.py, which classifies the text after Exim's prefix.
CASES = [
    ("SMTP error from remote mail server after RCPT TO:<b@example.org>: 550 5.1.1 User unknown", "hard"),
    ("SMTP error from remote mail server after RCPT TO:<c@example.org>: 452 4.2.2 Mailbox full", "full"),
    ("SMTP error from remote mail server after end of data: 552 5.2.2 Quota exceeded", "full"),
    ("SMTP error from remote mail server after end of data: 552 Message exceeds storage allocation", "full"),
    ("SMTP error from remote mail server after RCPT TO:<c@example.org>: 452 Too many recipients", "soft"),
    ("SMTP error from remote mail server after end of data: 554 5.7.1 Message rejected as spam", "soft"),
    ("SMTP error from remote mail server after RCPT TO:<b@example.org>: 550 5.4.1 Access denied", "hard"),
    ("SMTP error from remote mail server after MAIL FROM:<s@example.com> SIZE=1234: 552 5.3.4 Too big", "hard"),
    ("SMTP error from remote mail server after initial connection: 421 4.7.0 Try again later", "soft"),
    ("SMTP error from remote mail server after RCPT TO:<b@example.org>: 550 Mailbox unavailable", "hard"),
    ("SMTP error from remote mail server after RCPT TO:<b@example.org>: 450 Mailbox busy", "soft"),
    ("SMTP error from remote mail server after RCPT TO:<b@example.org>: 550 2.0.0 odd but permanent", "hard"),
    ("SMTP error from remote mail server after RCPT TO:<user552@example.org>: 550 User unknown", "hard"),
    ("Unrouteable address", "none"),
]


def dsn_class(text: str) -> str:
    c = classify(text.split(": ", 1)[1] if text.startswith("SMTP error") else text)
    if c.mailbox_full:
        return "full"
    return "none" if c.reason == "no status code" else c.bounce_type


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_classification_matches_webhookd_dsn(text: str, expected: str, tmp_path: Path) -> None:
    assert dsn_class(text) == expected
    # -be has no $event_data: the text takes its place
    config = write_config(
        tmp_path / "classify.conf",
        f"keep_environment =\nlog_file_path = {tmp_path}/%slog\nWHDTEST_TEXT = {text}\n"
        + SNIPPET.read_text().replace("$event_data", "WHDTEST_TEXT"),
    )
    out = exim(config, "-be", "WEBHOOKD_DSN_CLASS WEBHOOKD_BOUNCE_TYPE").stdout.split()
    assert out == [expected, "hard" if expected == "hard" else "soft"]


@pytest.mark.skipif(not Path("/etc/exim4/conf.d").is_dir() or shutil.which("update-exim4.conf") is None,
                    reason="Debian's exim4-config is not installed")
def test_debian_setup_steps_give_a_valid_configuration(tmp_path: Path) -> None:
    """The steps of docs/mta/exim.md, on a copy of /etc/exim4: split and unsplit."""
    confdir = tmp_path / "exim4"
    shutil.copytree("/etc/exim4", confdir, symlinks=True)
    add = "  event_action = WEBHOOKD_EVENT_ACTION\n  initgroups = true\n"

    def add_to_transports(path: Path) -> None:
        text, n = re.subn(r"(?m)^  driver = smtp\n", lambda m: m.group(0) + add, path.read_text())
        assert n >= 1
        path.write_text(text)

    def check(generated: Path) -> None:
        for transport in ("remote_smtp", "remote_smtp_smarthost"):
            out = exim(generated, "-bP", "transport", transport).stdout
            assert re.search(r"^event_action = \$\{if and\{.*readsocket", out, re.M), out
            assert re.search(r"^initgroups$", out, re.M), out
        assert "readsocket{/run/webhookd/intake.sock}" in exim(generated, "-bP", "event_action").stdout

    # split: conf.d/main/05_webhookd and the two transport files
    conffile = confdir / "update-exim4.conf.conf"
    conffile.write_text(re.sub(r"(?m)^dc_use_split_config=.*$", "dc_use_split_config='true'", conffile.read_text()))
    shutil.copy(SNIPPET, confdir / "conf.d" / "main" / "05_webhookd")
    for name in ("30_exim4-config_remote_smtp", "30_exim4-config_remote_smtp_smarthost"):
        add_to_transports(confdir / "conf.d" / "transport" / name)
    split = tmp_path / "split.conf"
    subprocess.run(["update-exim4.conf", "-d", str(confdir), "-o", str(split)], check=True, timeout=60)
    check(split)

    # unsplit: the template's transports; exim4.conf.localmacros is read before the
    # template (update-exim4.conf -d only looks for it in /etc/exim4, so it is put first
    # by hand here)
    conffile.write_text(re.sub(r"(?m)^dc_use_split_config=.*$", "dc_use_split_config='false'", conffile.read_text()))
    add_to_transports(confdir / "exim4.conf.template")
    unsplit = tmp_path / "unsplit.conf"
    subprocess.run(["update-exim4.conf", "-d", str(confdir), "-o", str(unsplit)], check=True, timeout=60)
    write_config(unsplit, SNIPPET.read_text() + "\n" + unsplit.read_text())
    check(unsplit)
