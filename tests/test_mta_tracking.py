"""Postfix + the tracking milter + OpenDKIM → the SMTP sink; then the pixel and a link.

Everything is real and private to the test: Debian's Postfix as a `postfix -c` instance
(tests/test_mta_postfix.py's Postfix: its own queue and log in a temporary directory,
an smtpd on a free loopback port, relayhost = the SMTP sink of tests/mta.py), OpenDKIM
in signing mode on a loopback port with a key made by opendkim-genkey, `webhookd serve`
with its tracking listener, and `webhookd tracking milter`. Postfix runs the milters in
the order of smtpd_milters: webhookd's first, then OpenDKIM's, so OpenDKIM signs the
body the tracking milter rewrote. The delivered message's DKIM-Signature is checked with
dkimpy against the generated public key (a dnsfunc instead of DNS), then the pixel and a
link from it are fetched from the listener, and the `opened` and `clicked` webhooks that
follow are checked, signatures and fields.

Postfix's master starts as root, hence root. CI (.ci/run) installs postfix, opendkim,
opendkim-tools and pymilter and sets WEBHOOKD_REQUIRE_MTA=postfix: then a missing piece
fails the collection instead of skipping.
"""

from __future__ import annotations

import email
import email.policy
import grp
import http.client
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.mta import HAVE_AIOSMTPD, WEBHOOKD, Sink, Webhookd, assert_signed, find_program, required
from tests.test_mta_postfix import POSTCONF, POSTFIX, POSTQUEUE, Postfix
from tests.test_process import ThreadReceiver, wait_until

try:
    import Milter  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401  (what the milter runs on)

    HAVE_PYMILTER = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_PYMILTER = False
try:
    import dkim  # type: ignore[import-untyped, import-not-found, unused-ignore]

    HAVE_DKIMPY = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_DKIMPY = False

OPENDKIM, GENKEY = find_program("opendkim"), find_program("opendkim-genkey")
required("postfix", None if POSTFIX and POSTCONF and POSTQUEUE else "Postfix is not installed")
required("postfix", None if OPENDKIM and GENKEY else "opendkim and opendkim-tools are not installed")
required("postfix", None if HAVE_PYMILTER else "pymilter is not installed (pip install 'pymilter>=1.0.5')")
required("postfix", None if HAVE_DKIMPY else "dkimpy is not installed (pip install 'dkimpy>=1.1')")
required("postfix", None if HAVE_AIOSMTPD else "aiosmtpd is not installed")

pytestmark = [
    pytest.mark.skipif(POSTFIX is None, reason="Postfix is not installed (Debian: apt-get install postfix)"),
    pytest.mark.skipif(OPENDKIM is None or GENKEY is None,
                       reason="OpenDKIM is not installed (Debian: apt-get install opendkim opendkim-tools)"),
    pytest.mark.skipif(not HAVE_PYMILTER, reason="pymilter is not installed (pip install 'webhookd[milter]')"),
    pytest.mark.skipif(not HAVE_DKIMPY, reason="dkimpy is not installed (pip install dkimpy)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master starts as root"),
    pytest.mark.skipif(not HAVE_AIOSMTPD, reason="aiosmtpd is not installed (pip install aiosmtpd)"),
    pytest.mark.timeout(120),
]

ROOT = Path(__file__).resolve().parent.parent
DOMAIN, SELECTOR = "shop.example", "s1"
RCPT = "reader@example.org"
ORDER_URL = "https://shop.example/orders/7?ref=mail"
HELP_URL = "https://shop.example/help"
USER_AGENT = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
CLIENT_IP = "203.0.113.7"  # what the reverse proxy in front of the listener would say

TEXT_PART = (
    "--b1\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    f"Thanks for your order! See {ORDER_URL}\r\n"
)
HTML_PART = (
    "--b1\r\n"
    "Content-Type: text/html; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n"
    "\r\n"
    "<!DOCTYPE html>\r\n"
    "<html><head><meta charset=3D\"utf-8\"></head><body>\r\n"
    "<p>Thanks for your order! <a href=3D\"https://shop.example/orders/7?ref=3Dmail\">=\r\n"
    "See it here</a>.</p>\r\n"
    "<p><a href=3D\"https://shop.example/help\">Help</a> or <a href=3D\"mailto:help@=\r\n"
    "shop.example\">write to us</a>.</p>\r\n"
    "</body></html>\r\n"
)


def html_mail(message_id: str, *, sender: str = f"a@{DOMAIN}") -> bytes:
    return (
        f"From: Shop <{sender}>\r\n"
        f"To: <{RCPT}>\r\n"
        "Subject: Your order\r\n"
        f"Message-ID: {message_id}\r\n"
        "Date: Mon, 23 Feb 2026 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n'
        "\r\n"
        + TEXT_PART + HTML_PART
        + "--b1--\r\n"
    ).encode()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Links(HTMLParser):
    """The href of each <a> and the src of each <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "a" and values.get("href"):
            self.hrefs.append(str(values["href"]))
        if tag == "img" and values.get("src"):
            self.images.append(str(values["src"]))


def html_of(raw: bytes) -> Links:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    part = msg.get_body(preferencelist=("html",))
    assert part is not None, raw
    parser = Links()
    parser.feed(part.get_content())
    return parser


# -- the processes ------------------------------------------------------------------------------
class Daemon(Webhookd):
    """`webhookd serve` with tracking on: a listener on a free port, links under it."""

    def __init__(self, state: Path, run_dir: Path) -> None:
        super().__init__(state, run_dir)
        self.tracking_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.tracking_port}"
        self.key_file = state / "keys" / "tracking-keys.json"
        with open(self.config, "a") as f:
            f.write(f'[tracking]\nenabled = true\nlisten = "127.0.0.1:{self.tracking_port}"\n'
                    f'base_url = "{self.base_url}"\nkey_file = "{self.key_file}"\n')

    def get(self, url: str) -> http.client.HTTPResponse:
        """GET a URL of the listener as a mail client behind the proxy would; no redirects followed."""
        assert url.startswith(self.base_url + "/"), url
        conn = http.client.HTTPConnection("127.0.0.1", self.tracking_port, timeout=15)
        conn.request("GET", url[len(self.base_url):], headers={"User-Agent": USER_AGENT,
                                                              "X-Forwarded-For": CLIENT_IP})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp


class MilterProc:
    """`webhookd tracking milter` as a process, on a loopback port or a unix socket."""

    def __init__(self, daemon: Daemon, out: Path, unix: Path | None = None) -> None:
        self.port = free_port()
        self.unix = unix
        spec = f"unix:{unix}" if unix else f"inet:{self.port}@127.0.0.1"
        self.args = [*WEBHOOKD, "tracking", "milter", "--config", str(daemon.config), "--socket", spec]
        self.env = daemon.env
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the milter exited {self.proc.returncode}: {self.out.read_text()[-2000:]}")
            return self.unix.is_socket() if self.unix else port_open(self.port)

        wait_until(ready, timeout=30, what="the tracking milter's socket")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM, as systemd stops it: the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - shown by the assertion that follows
                self.kill()
                raise AssertionError(f"the milter ignored SIGTERM: {self.out.read_text()[-2000:]}") from None
        return self.proc.returncode


def private_base() -> Path:
    """A directory for OpenDKIM's files: it refuses a configuration or key under a path
    others may write to (such as /tmp, sticky bit or not)."""
    for base in (Path("/run"), Path("/var/lib"), Path.home()):
        chain = [base, *base.parents]
        if base.is_dir() and all(p.stat().st_uid == 0 and not p.stat().st_mode & 0o022 for p in chain):
            return base
    raise AssertionError("no directory without group or other write access for OpenDKIM's files")


class OpenDKIM:
    """OpenDKIM signing for shop.example with a fresh key, as a private foreground process."""

    def __init__(self) -> None:
        self.path = path = Path(tempfile.mkdtemp(prefix="webhookd-test-dkim-", dir=private_base()))
        self.port = free_port()
        subprocess.run([GENKEY, "-D", str(path), "-d", DOMAIN, "-s", SELECTOR, "-b", "2048"],  # type: ignore[list-item]
                       check=True, capture_output=True, timeout=60)
        # s1.txt: the TXT record in zone-file form, split into quoted strings
        zone = (path / f"{SELECTOR}.txt").read_text()
        self.txt = "".join(re.findall(r'"([^"]*)"', zone)).encode()
        assert self.txt.startswith(b"v=DKIM1;") and b"p=" in self.txt, zone
        self.conf = path / "opendkim.conf"
        self.conf.write_text(f"""\
Syslog                  no
Mode                    s
Domain                  {DOMAIN}
Selector                {SELECTOR}
KeyFile                 {path / f"{SELECTOR}.private"}
Canonicalization        relaxed/relaxed
InternalHosts           127.0.0.1
Socket                  inet:{self.port}@127.0.0.1
PidFile                 {path / "opendkim.pid"}
UMask                   007
""")
        self.out = path / "opendkim.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(self.conf)],  # type: ignore[list-item]
                                         stdout=out, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"opendkim exited {self.proc.returncode}: {self.out.read_text()[-2000:]}")
            return port_open(self.port)

        wait_until(ready, timeout=30, what="OpenDKIM's socket")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # a private instance with nothing to save (SIGTERM takes libmilter's 5 s)
            self.proc.wait(10)

    def log(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's dnsfunc: the generated record for s1._domainkey.shop.example, nothing else."""
        return self.txt if name.rstrip(b".").lower() == f"{SELECTOR}._domainkey.{DOMAIN}".encode() else None

    def verifies(self, raw: bytes) -> bool:
        return bool(dkim.verify(raw, dnsfunc=self.dns))


def send(pf: Postfix, raw: bytes, *, sender: str = f"a@{DOMAIN}", rcpts: tuple[str, ...] = (RCPT,)) -> None:
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=30) as s:
        s.sendmail(sender, list(rcpts), raw)


def delivered(sink: Sink, message_id: str) -> bytes:
    """The message the sink accepted with this Message-ID (waits for it)."""
    def find() -> bytes | None:
        with sink.lock:
            for _, _, content in sink.messages:
                if f"Message-ID: {message_id}".encode() in content:
                    return content
        return None

    found: bytes = wait_until(find, timeout=30, what=f"{message_id} at the sink")
    return found


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def daemon(tmp_path: Path, short_dir: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "state", short_dir)
    d.start()
    yield d
    d.kill()


@pytest.fixture
def tracking_milter(daemon: Daemon, tmp_path: Path) -> Iterator[MilterProc]:
    m = MilterProc(daemon, tmp_path / "milter.log")
    m.start()
    yield m
    m.kill()
    print("-- milter:\n" + m.out.read_text()[-4000:])


@pytest.fixture
def opendkim() -> Iterator[OpenDKIM]:
    o = OpenDKIM()
    try:
        o.start()
        yield o
    finally:
        o.stop()
        print("-- opendkim:\n" + o.log()[-4000:])
        shutil.rmtree(o.path, ignore_errors=True)


def make_postfix(relay_port: int, milters: list[int | str], default_action: str = "accept") -> Postfix:
    """A private Postfix whose smtpd_milters are these, in this order: a loopback port, or
    a milter entry as main.cf spells it."""
    path = Path(tempfile.mkdtemp(prefix="whdt", dir="/tmp"))  # Postfix wants a root-owned path
    path.chmod(0o755)
    pf = Postfix(path, relay_port)
    listed = ", ".join(f"inet:127.0.0.1:{m}" if isinstance(m, int) else m for m in milters)
    with open(pf.etc / "main.cf", "a") as f:
        f.write(f"smtpd_milters = {listed}\nnon_smtpd_milters = $smtpd_milters\n"
                f"milter_default_action = {default_action}\nmilter_protocol = 6\n")
    return pf


@pytest.fixture
def postfix_factory(smtp_sink: tuple[Sink, int]) -> Iterator[Any]:
    made: list[Postfix] = []

    def make(milters: list[int | str], default_action: str = "accept") -> Postfix:
        pf = make_postfix(smtp_sink[1], milters, default_action)
        made.append(pf)
        pf.start()
        return pf

    yield make
    for pf in made:
        print("-- postfix:\n" + pf.log()[-6000:])
        pf.stop()
        shutil.rmtree(pf.path, ignore_errors=True)


# -- the tests -----------------------------------------------------------------------------------
def test_tracked_mail_is_dkim_signed_and_its_pixel_and_link_become_webhooks(
    smtp_sink: tuple[Sink, int], daemon: Daemon, tracking_milter: MilterProc, opendkim: OpenDKIM,
    postfix_factory: Any, thread_receiver: ThreadReceiver,
) -> None:
    sink, _ = smtp_sink
    hook = daemon.json("webhooks", "create", "--url", thread_receiver.url, "--events", "all")
    pf = postfix_factory([tracking_milter.port, opendkim.port])  # the tracking milter first
    message_id = "<track-1@shop.example>"
    sent = html_mail(message_id)
    send(pf, sent)
    raw = delivered(sink, message_id)

    # signed by OpenDKIM after the rewrite: the signature covers the tracked body
    assert b"DKIM-Signature:" in raw, raw
    sig = email.message_from_bytes(raw)["DKIM-Signature"]
    assert re.search(r"\bd=shop\.example;", sig) and re.search(r"\bs=s1;", sig), sig
    assert opendkim.verifies(raw), raw

    # the HTML part: both links tracked, the mailto left alone, the pixel added
    html = html_of(raw)
    tracked = [h for h in html.hrefs if h.startswith(daemon.base_url + "/c/")]
    assert len(tracked) == 2, html.hrefs
    assert "mailto:help@shop.example" in html.hrefs
    assert ORDER_URL not in html.hrefs and HELP_URL not in html.hrefs
    pixels = [src for src in html.images if re.fullmatch(re.escape(daemon.base_url) + r"/o/[A-Za-z0-9_-]+\.gif", src)]
    assert len(pixels) == 1, html.images
    # the text/plain part and the header fields the sender wrote, byte for byte
    assert TEXT_PART.encode() in raw
    head = sent.split(b"\r\n\r\n", 1)[0]
    assert head in raw

    # the visitor: the pixel answers the GIF, the link redirects to the URL it was made for
    gif = daemon.get(pixels[0])
    assert gif.status == 200 and gif.getheader("Content-Type") == "image/gif"
    click = daemon.get(tracked[0])
    assert click.status == 302, click.status
    assert click.getheader("Location") == ORDER_URL

    def events() -> dict[str, dict[str, Any]]:
        return {p["event"]: p for p in thread_receiver.payloads()}

    wait_until(lambda: {"opened", "clicked"} <= set(events()), timeout=30, what="opened and clicked webhooks")
    got = events()
    opened, clicked = got["opened"]["data"], got["clicked"]["data"]
    for data in (opened, clicked):
        assert data["message_id"] == message_id, data
        assert data["to"] == RCPT, data
        assert data["first"] is True, data
        assert data["user_agent"] == USER_AGENT, data
        assert data["ip"] == CLIENT_IP, data
        assert "machine" in data and "bot" in data and "bot_reasons" in data, data
    assert clicked["url"] == ORDER_URL
    assert "url" not in opened or not opened["url"]
    assert len(thread_receiver.payloads()) == 2, thread_receiver.payloads()
    assert_signed(thread_receiver, hook["secret"])

    # SIGTERM stops the milter cleanly, as systemd does
    assert tracking_milter.stop() == 0


@pytest.mark.parametrize("per_milter", [False, True], ids=["milter_default_action", "per-milter-default_action"])
def test_a_stopped_milter_does_not_block_mail(
    smtp_sink: tuple[Sink, int], daemon: Daemon, tracking_milter: MilterProc, opendkim: OpenDKIM,
    postfix_factory: Any, per_milter: bool,
) -> None:
    """milter_default_action = accept; or (Postfix 3.0+) accept for the tracking milter
    alone, while a stopped DKIM signer would still hold mail back (tempfail)."""
    sink, _ = smtp_sink
    if per_milter:
        entry = f"{{ inet:127.0.0.1:{tracking_milter.port}, default_action=accept }}"
        pf = postfix_factory([entry, opendkim.port], default_action="tempfail")
    else:
        pf = postfix_factory([tracking_milter.port, opendkim.port])
    tracking_milter.kill()
    assert not port_open(tracking_milter.port)
    sent = html_mail("<untracked-1@shop.example>")
    send(pf, sent)
    raw = delivered(sink, "<untracked-1@shop.example>")
    assert opendkim.verifies(raw), raw  # still signed: OpenDKIM ran without it
    html = html_of(raw)
    assert html.hrefs == [ORDER_URL, HELP_URL, "mailto:help@shop.example"] and html.images == []
    assert (TEXT_PART + HTML_PART).encode() in raw  # untouched
    assert pf.logged(f"127.0.0.1:{tracking_milter.port}")  # Postfix said why (and went on)
    if per_milter:  # the control: without its own default_action, the global tempfail holds mail back
        pf.set(smtpd_milters=f"inet:127.0.0.1:{tracking_milter.port}, inet:127.0.0.1:{opendkim.port}")
        with pytest.raises(smtplib.SMTPException, match=re.escape("4.7.1")):
            send(pf, html_mail("<held-1@shop.example>"))


def test_notices_and_opted_out_mail_pass_untracked(
    smtp_sink: tuple[Sink, int], daemon: Daemon, tracking_milter: MilterProc, postfix_factory: Any,
) -> None:
    sink, _ = smtp_sink
    pf = postfix_factory([tracking_milter.port])
    send(pf, html_mail("<notice-1@shop.example>"), sender="")  # MAIL FROM:<>, as a bounce
    send(pf, b"X-Webhookd-Track: no\r\n" + html_mail("<optout-1@shop.example>"))
    send(pf, html_mail("<normal-1@shop.example>"))  # the same milter tracks the next one
    assert (TEXT_PART + HTML_PART).encode() in delivered(sink, "<notice-1@shop.example>")
    assert (TEXT_PART + HTML_PART).encode() in delivered(sink, "<optout-1@shop.example>")
    tracked = html_of(delivered(sink, "<normal-1@shop.example>"))
    assert sum(h.startswith(daemon.base_url + "/c/") for h in tracked.hrefs) == 2, tracked.hrefs


def test_dkim_milter_listed_first_signs_a_body_the_tracker_then_breaks(
    smtp_sink: tuple[Sink, int], daemon: Daemon, tracking_milter: MilterProc, opendkim: OpenDKIM,
    postfix_factory: Any,
) -> None:
    """Why the order in smtpd_milters matters: each milter sees the message as the ones
    before it left it, so a signer listed first signs the original body, and the tracker
    then changes it under the signature (docs/mta/postfix-tracking.md)."""
    sink, _ = smtp_sink
    pf = postfix_factory([opendkim.port, tracking_milter.port])  # the wrong order
    send(pf, html_mail("<wrong-order@shop.example>"))
    raw = delivered(sink, "<wrong-order@shop.example>")
    assert b"DKIM-Signature:" in raw
    assert any(h.startswith(daemon.base_url + "/c/") for h in html_of(raw).hrefs)  # tracked after signing
    assert not opendkim.verifies(raw)  # body hash mismatch


def test_a_unix_socket_inside_postfix_chroot(smtp_sink: tuple[Sink, int], daemon: Daemon, tmp_path: Path) -> None:
    """The unix-socket set-up of docs/mta/postfix-tracking.md: smtpd chrooted in the queue
    directory, the socket in a directory there owned by group postfix with the setgid
    bit (so the socket, mode 0660, takes that group), and smtpd_milters naming it
    relative to the queue directory."""
    sink, _ = smtp_sink
    pf = make_postfix(smtp_sink[1], ["unix:webhookd/milter.sock"])
    master = (pf.etc / "master.cf").read_text().splitlines()
    assert master[0].endswith(" inet n - n - - smtpd")
    master[0] = master[0].replace(" inet n - n - - smtpd", " inet n - y - - smtpd")  # chroot = y, as Debian's
    (pf.etc / "master.cf").write_text("\n".join(master) + "\n")
    sockdir = pf.spool / "webhookd"
    sockdir.mkdir(parents=True)
    shutil.chown(sockdir, group="postfix")
    sockdir.chmod(0o2750)
    m = MilterProc(daemon, tmp_path / "milter-unix.log", unix=sockdir / "milter.sock")
    try:
        m.start()
        st = (sockdir / "milter.sock").stat()
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == grp.getgrnam("postfix").gr_gid
        pf.start()
        try:
            send(pf, html_mail("<unix-1@shop.example>"))
            tracked = html_of(delivered(sink, "<unix-1@shop.example>"))
            assert sum(h.startswith(daemon.base_url + "/c/") for h in tracked.hrefs) == 2, pf.log()
        finally:
            print("-- postfix:\n" + pf.log()[-6000:])
            pf.stop()
            shutil.rmtree(pf.path, ignore_errors=True)
    finally:
        m.kill()
        print("-- milter:\n" + m.out.read_text()[-4000:])


def test_mail_from_sendmail_goes_through_non_smtpd_milters(
    smtp_sink: tuple[Sink, int], daemon: Daemon, tracking_milter: MilterProc, opendkim: OpenDKIM,
    postfix_factory: Any,
) -> None:
    """An application that pipes to /usr/sbin/sendmail: pickup → cleanup, non_smtpd_milters."""
    sink, _ = smtp_sink
    pf = postfix_factory([tracking_milter.port, opendkim.port])
    sendmail = find_program("sendmail")
    assert sendmail is not None
    raw = html_mail("<sendmail-1@shop.example>").replace(b"\r\n", b"\n")  # a local program writes LF
    p = subprocess.run([sendmail, "-C", str(pf.etc), "-f", f"a@{DOMAIN}", RCPT], input=raw,
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = delivered(sink, "<sendmail-1@shop.example>")
    assert opendkim.verifies(out), out
    tracked = html_of(out)
    assert sum(h.startswith(daemon.base_url + "/c/") for h in tracked.hrefs) == 2, tracked.hrefs
    assert len(tracked.images) == 1


def test_the_set_up_of_docs_tracking_md_tracks_submitted_mail_only(
    smtp_sink: tuple[Sink, int], daemon: Daemon, tracking_milter: MilterProc, opendkim: OpenDKIM,
) -> None:
    """docs/tracking.md, step 4, as written: `tracking_milters` in main.cf (the tracker with
    its own default_action=accept, then the DKIM signer), used by non_smtpd_milters and by a
    submission smtpd in master.cf (`-o smtpd_milters=$tracking_milters`), while the
    internet-facing smtpd has no milters: mail it receives is not tracked."""
    sink, _ = smtp_sink
    doc = (ROOT / "docs" / "tracking.md").read_text()
    main_lines = re.search(r"In `/etc/postfix/main.cf`:\n\n   ```\n(.*?)   ```", doc, re.S)
    master_lines = re.search(
        r"in `/etc/postfix/master.cf`, on the submission service:\n\n   ```\n(.*?)   ```", doc, re.S
    )
    assert main_lines and master_lines, "docs/tracking.md step 4 moved: update this test"
    main_cf = "".join(line[3:] + "\n" for line in main_lines.group(1).splitlines() if not line.strip().startswith("#"))
    main_cf = main_cf.replace("8892", str(tracking_milter.port)).replace("8891", str(opendkim.port))
    submission = [line[3:] for line in master_lines.group(1).splitlines()]
    assert submission[0].startswith("submission inet n - y - - smtpd")

    pf = make_postfix(smtp_sink[1], [])  # the port-25 stand-in: no milters
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        submission_port = s.getsockname()[1]
    with open(pf.etc / "main.cf", "a") as f:
        f.write(main_cf)
    with open(pf.etc / "master.cf", "a") as f:  # chroot "n": the private instance runs unchrooted
        f.write(submission[0].replace("submission inet n - y", f"127.0.0.1:{submission_port} inet n - n") + "\n")
        f.write("".join(f"{line}\n" for line in submission[1:]))
    pf.start()
    try:
        with smtplib.SMTP("127.0.0.1", submission_port, timeout=30) as s:
            s.sendmail(f"a@{DOMAIN}", [RCPT], html_mail("<submitted-1@shop.example>"))
        send(pf, html_mail("<inbound-1@shop.example>"))  # "from the internet"
        submitted = delivered(sink, "<submitted-1@shop.example>")
        inbound = delivered(sink, "<inbound-1@shop.example>")
        assert opendkim.verifies(submitted), submitted
        assert sum(h.startswith(daemon.base_url + "/c/") for h in html_of(submitted).hrefs) == 2
        assert len(html_of(submitted).images) == 1
        assert not any(h.startswith(daemon.base_url) for h in html_of(inbound).hrefs)
        assert b"DKIM-Signature:" not in inbound
    finally:
        print("-- postfix:\n" + pf.log()[-6000:])
        pf.stop()
        shutil.rmtree(pf.path, ignore_errors=True)
