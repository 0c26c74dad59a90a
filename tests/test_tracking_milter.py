"""The tracking milter without Postfix: its callbacks driven directly, as libmilter would.

pymilter's Milter.Base takes a context object (`_setctx`); a fake one records what the
milter asks of the MTA (replacebody) and answers getsymval. The milter is then fed a
message the way libmilter hands it over: MAIL FROM, RCPT TO, each header field (the
value with its leading space when SMFIP_HDR_LEADSPC was negotiated, folded lines joined
by bare LF), body chunks of at most 64 KiB with CRLF line ends, end of message. The
real-MTA test (tests/test_mta_tracking.py) runs it behind Postfix and OpenDKIM.

`webhookd tracking milter` itself (its refusals and a clean SIGTERM) runs as a process:
libmilter's main loop runs once per process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.mta import required
from tests.test_process import wait_until
from webhookd.config import TrackingConfig
from webhookd.tracking.milter import MAX_MESSAGE_BYTES, Message, Tracker, check_socket, milter_class, socket_path
from webhookd.tracking.tokens import KeyRing

try:
    import Milter  # type: ignore[import-untyped, import-not-found, unused-ignore]

    HAVE_PYMILTER = True
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_PYMILTER = False

required("postfix", None if HAVE_PYMILTER else "pymilter is not installed (pip install 'pymilter>=1.0.5')")
pytestmark = pytest.mark.skipif(not HAVE_PYMILTER, reason="pymilter is not installed (pip install 'webhookd[milter]')")

WEBHOOKD = [sys.executable, "-m", "webhookd"]
BASE = "https://t.example.net"
ALL_PROTOCOL = 0x1FFFFF  # every protocol step and option an MTA (Postfix 3.x) may offer
# libmilter's SMFIP_HDR_LEADSPC and SMFIP_NR_HDR, for parametrize lists that are built
# before the skip applies (the module must collect without pymilter too)
P_HDR_LEADSPC = Milter.P_HDR_LEADSPC if HAVE_PYMILTER else 0x100000
P_NR_HDR = Milter.P_NR_HDR if HAVE_PYMILTER else 0x80

MAIL = (
    b"From: Shop <a@shop.example>\r\n"
    b"To: <reader@example.org>\r\n"
    b"Subject: Your order,\r\n"
    b"  folded\r\n"
    b"Message-ID: <m-1@shop.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"See https://shop.example/orders/7\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b'<html><body><p><a href=3D"https://shop.example/orders/7?ref=3Dmail">your order</a>=\r\n'
    b' <a href=3D"mailto:help@shop.example">help</a></p></body></html>\r\n'
    b"--b1--\r\n"
)
TOKEN = re.compile(rb"https://t\.example\.net/(c|o)/([A-Za-z0-9_-]+)")


class FakeCtx:
    """What libmilter's context does for the milter: private data, macros, replacebody."""

    def __init__(self, *, fail_replace: bool = False) -> None:
        self.priv: Any = None
        self.replaced: list[bytes] = []
        self.fail_replace = fail_replace

    def setpriv(self, priv: Any) -> None:
        self.priv = priv

    def getpriv(self) -> Any:
        return self.priv

    def getsymval(self, name: str) -> str | None:
        return {"i": "4F2A1C0B3D"}.get(name)

    def replacebody(self, data: bytes) -> None:
        if self.fail_replace:
            raise RuntimeError("cannot replace message body")
        self.replaced.append(bytes(data))


def split_headers(head: bytes, *, leading_space: bool) -> list[tuple[str, bytes]]:
    """Header fields as libmilter passes them on."""
    fields: list[tuple[str, bytes]] = []
    for field in re.split(rb"\r\n(?![ \t])", head):
        name, _, value = field.partition(b":")
        value = value.replace(b"\r\n", b"\n")
        if not leading_space and value.startswith(b" "):
            value = value[1:]
        fields.append((name.decode(), value))
    return fields


class Driver:
    """One SMTP connection to the milter class, as libmilter drives it."""

    def __init__(self, tracker: Tracker, *, protocol: int = ALL_PROTOCOL, limit: int = MAX_MESSAGE_BYTES,
                 ctx: FakeCtx | None = None) -> None:
        self.ctx = ctx or FakeCtx()
        self.milter = milter_class(tracker, limit=limit)()
        self.milter._setctx(self.ctx)
        self.opts = [Milter.CURR_ACTS, protocol, 0, 0]
        assert self.milter.negotiate(self.opts) == Milter.CONTINUE
        self.replies: list[int] = []

    @property
    def leading_space(self) -> bool:
        return bool(self.opts[1] & Milter.P_HDR_LEADSPC)

    def send(self, raw: bytes = MAIL, sender: bytes = b"<a@shop.example>",
             rcpts: tuple[bytes, ...] = (b"<reader@example.org>",)) -> bytes:
        """Feed one message; the message as the MTA would have it afterwards."""
        self.replies = []
        self.ctx.replaced = []
        rc = self.milter.envfrom_bytes(sender, b"SIZE=1000")
        self.replies.append(rc)
        if rc == Milter.ACCEPT:
            return raw
        for rcpt in rcpts:
            self.replies.append(self.milter.envrcpt_bytes(rcpt))
        head, body = raw.split(b"\r\n\r\n", 1)
        for name, value in split_headers(head, leading_space=self.leading_space):
            self.replies.append(self.milter.header_bytes(name, value))
        for i in range(0, len(body), 65535):
            rc = self.milter.body(body[i:i + 65535])
            self.replies.append(rc)
            if rc == Milter.ACCEPT:
                return raw
        self.replies.append(self.milter.eom())
        if not self.ctx.replaced:
            return raw
        return head + b"\r\n\r\n" + b"".join(self.ctx.replaced)


@pytest.fixture
def ring_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "tracking-keys.json"


@pytest.fixture
def tracker(ring_path: Path) -> Tracker:
    settings = TrackingConfig(enabled=True, base_url=BASE, key_file=ring_path)
    return Tracker(KeyRing.load(ring_path, create=True), settings)


def tokens(raw: bytes, ring: KeyRing) -> list[Any]:
    """The verified claims of every tracked URL in a message (QP soft breaks removed)."""
    flat = raw.replace(b"=\r\n", b"")
    out = []
    for kind, token in TOKEN.findall(flat):
        out.append(ring.verify(token.decode(), "click" if kind == b"c" else "open"))
    return out


# -- pieces -------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["inet:8892@127.0.0.1", "inet6:8892@::1", "unix:/run/webhookd/milter.sock",
                                  "local:/var/spool/postfix/webhookd/milter", " inet:1@localhost "])
def test_socket_specs_accepted(spec: str) -> None:
    assert check_socket(spec) == spec.strip()


@pytest.mark.parametrize("spec", ["", "8892", "inet:127.0.0.1:8892", "inet:0@127.0.0.1", "inet:65536@127.0.0.1",
                                  "unix:relative.sock", "tcp:8892@127.0.0.1", "inet:8892@"])
def test_socket_specs_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="inet:PORT@HOST or unix:/PATH"):
        check_socket(spec)


def test_socket_path() -> None:
    assert socket_path("unix:/run/x.sock") == Path("/run/x.sock")
    assert socket_path("local:/run/x.sock") == Path("/run/x.sock")
    assert socket_path("inet:8892@127.0.0.1") is None


@pytest.mark.parametrize("leading_space", [True, False])
def test_message_reassembles_the_header_block(leading_space: bool) -> None:
    m = Message("a@shop.example")
    head = MAIL.split(b"\r\n\r\n", 1)[0]
    for name, value in split_headers(head, leading_space=leading_space):
        m.add_header(name, value, leading_space=leading_space)
    # with the leading space negotiated, byte for byte; without it, the same fields
    assert m.head() == head + b"\r\n\r\n"
    m2 = Message("a@shop.example")
    m2.add_header("X-Tab", b"\tvalue\n\tmore", leading_space=True)
    m2.add_header("X-Empty", b"", leading_space=True)
    assert m2.head() == b"X-Tab:\tvalue\r\n\tmore\r\nX-Empty:\r\n\r\n"


def test_message_recipients() -> None:
    m = Message("a@shop.example")
    assert m.recipient == ""
    m.add_recipient("<Reader@Example.org>")
    assert m.recipient == "Reader@Example.org"
    m.add_recipient(b"<second@example.org>")
    assert m.recipient == ""  # several: nobody's address goes into the links
    odd = Message("a@shop.example")
    odd.add_recipient(b"<\xff@example.org>")
    assert odd.recipient == ""  # not UTF-8: left out rather than guessed


def test_message_stops_collecting_past_the_limit() -> None:
    m = Message("a@shop.example", limit=120)
    assert m.add_header("Subject", b"x" * 50, leading_space=False)
    assert m.add_body(b"y" * 40)
    assert not m.add_body(b"z" * 40)
    assert m.too_big and m.chunks == [] and m.headers == []  # memory given back
    assert not m.add_body(b"z")


# -- the milter, driven ------------------------------------------------------------------------
def test_negotiates_chgbody_only_and_skips_what_it_does_not_need(tracker: Tracker) -> None:
    d = Driver(tracker)
    actions, protocol = d.opts[0], d.opts[1]
    assert actions == Milter.CHGBODY
    for step in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NODATA, Milter.P_NOEOH, Milter.P_NOUNKNOWN):
        assert protocol & step, hex(step)  # not sent at all
    for step in (Milter.P_NOMAIL, Milter.P_NORCPT, Milter.P_NOHDRS, Milter.P_NOBODY):
        assert not protocol & step, hex(step)  # needed
    assert protocol & Milter.P_NR_RCPT and protocol & Milter.P_NR_HDR  # no reply awaited
    assert not protocol & Milter.P_NR_MAIL and not protocol & Milter.P_NR_BODY  # these may answer ACCEPT
    assert protocol & Milter.P_HDR_LEADSPC  # header values byte for byte
    assert not protocol & Milter.P_RCPT_REJ  # only the recipients the MTA accepted


@pytest.mark.parametrize("protocol", [ALL_PROTOCOL, ALL_PROTOCOL & ~P_HDR_LEADSPC & ~P_NR_HDR],
                         ids=["leading-space", "no-leading-space"])
def test_tracks_the_html_part_and_replaces_only_the_body(tracker: Tracker, protocol: int) -> None:
    d = Driver(tracker, protocol=protocol)
    out = d.send()
    assert d.replies[0] == Milter.CONTINUE and d.replies[-1] == Milter.ACCEPT
    assert len(d.ctx.replaced) == 1
    head, body = MAIL.split(b"\r\n\r\n", 1)
    assert out.startswith(head + b"\r\n\r\n") and out != MAIL
    assert b"See https://shop.example/orders/7\r\n" in out  # text/plain untouched
    assert b'href=3D"mailto:help@shop.example"' in out
    claims = tokens(out, tracker.ring)
    assert [(c.kind, c.url) for c in claims] == [("click", "https://shop.example/orders/7?ref=mail"), ("open", "")]
    assert {c.message_id for c in claims} == {"<m-1@shop.example>"}
    assert {c.to for c in claims} == {"reader@example.org"}  # the one envelope recipient
    assert body.endswith(b"--b1--\r\n") and out.endswith(b"--b1--\r\n")


def test_several_recipients_leave_the_address_out(tracker: Tracker) -> None:
    out = Driver(tracker).send(rcpts=(b"<one@example.org>", b"<two@example.org>"))
    claims = tokens(out, tracker.ring)
    assert claims and {c.to for c in claims} == {""} and {c.to_hash for c in claims} == {""}


def test_mail_from_the_null_sender_is_accepted_at_once(tracker: Tracker) -> None:
    d = Driver(tracker)
    assert d.send(sender=b"<>") == MAIL
    assert d.replies == [Milter.ACCEPT] and d.ctx.replaced == []
    assert d.send() != MAIL  # the next message on the connection is tracked


def test_the_opt_out_header_leaves_the_message_alone(tracker: Tracker) -> None:
    d = Driver(tracker)
    raw = b"X-Webhookd-Track: no\r\n" + MAIL
    assert d.send(raw) == raw and d.ctx.replaced == []
    assert d.replies[-1] == Milter.ACCEPT


def test_a_message_over_the_limit_passes_unchanged(tracker: Tracker) -> None:
    big = MAIL.replace(b"<html>", b"<html>" + b"<!-- padding -->\r\n" * 10000)
    d = Driver(tracker, limit=len(big) // 2)
    with structlog.testing.capture_logs() as logs:
        assert d.send(big) == big
    assert d.replies[-1] == Milter.ACCEPT and d.ctx.replaced == []  # accepted from the body callback
    assert [e["event"] for e in logs] == ["message over the size limit; passed unchanged"]
    assert d.send() != MAIL  # the next one is tracked


def test_each_message_on_a_connection_starts_afresh(tracker: Tracker) -> None:
    d = Driver(tracker)
    d.milter.envfrom_bytes(b"<a@shop.example>")
    d.milter.envrcpt_bytes(b"<first@example.org>")
    d.milter.header_bytes("Subject", b" aborted")
    assert d.milter.abort() == Milter.CONTINUE  # RSET or a lost client
    out = d.send(rcpts=(b"<second@example.org>",))
    assert {c.to for c in tokens(out, tracker.ring)} == {"second@example.org"}
    assert b"aborted" not in out


def secret_free(logs: Sequence[Mapping[str, Any]]) -> None:
    """No log line carries the message's content or a token."""
    text = repr(logs)
    for needle in ("shop.example/orders", "reader@example.org", "Your order", "<m-1@", BASE):
        assert needle not in text, text


def test_fails_open_when_the_rewriter_raises(tracker: Tracker, monkeypatch: pytest.MonkeyPatch) -> None:
    import webhookd.tracking.rewrite as rewrite

    def boom(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        raise MemoryError(f"cannot rewrite {len(raw)} bytes")

    monkeypatch.setattr(rewrite, "rewrite_message", boom)
    d = Driver(tracker)
    with structlog.testing.capture_logs() as logs:
        assert d.send() == MAIL
    assert d.replies[-1] == Milter.ACCEPT and d.ctx.replaced == []
    assert len(logs) == 1 and logs[0]["callback"] == "eom" and logs[0]["queue_id"] == "4F2A1C0B3D"
    assert logs[0]["error"].startswith("MemoryError: cannot rewrite")
    secret_free(logs)


def test_fails_open_when_the_rewriter_touches_the_header_block(tracker: Tracker,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import webhookd.tracking.rewrite as rewrite

    real = rewrite.rewrite_message

    def sloppy(raw: bytes, *args: Any, **kwargs: Any) -> Any:
        result = real(raw, *args, **kwargs)
        return type(result)(b"X-Added: 1\r\n" + result.data, True, result.links, result.pixel, result.skipped)

    monkeypatch.setattr(rewrite, "rewrite_message", sloppy)
    d = Driver(tracker)
    with structlog.testing.capture_logs() as logs:
        assert d.send() == MAIL
    assert d.ctx.replaced == [] and d.replies[-1] == Milter.ACCEPT
    assert "header block" in logs[0]["error"]
    secret_free(logs)


def test_fails_open_when_replacebody_fails(tracker: Tracker) -> None:
    d = Driver(tracker, ctx=FakeCtx(fail_replace=True))
    with structlog.testing.capture_logs() as logs:
        d.send()
    assert d.replies[-1] == Milter.ACCEPT
    assert [e["callback"] for e in logs] == ["eom"]
    secret_free(logs)


def test_fails_open_when_collecting_fails(tracker: Tracker, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Message, *args: Any, **kwargs: Any) -> bool:
        raise UnicodeError("odd header")

    monkeypatch.setattr(Message, "add_header", broken)
    d = Driver(tracker)
    with structlog.testing.capture_logs() as logs:
        assert d.send() == MAIL
    # header replies are CONTINUE (no reply is even awaited); the body callback then accepts
    assert d.replies[-1] == Milter.ACCEPT and d.ctx.replaced == []
    assert logs[0]["callback"] == "header"
    secret_free(logs)


def test_a_rotated_key_signs_the_next_messages(tracker: Tracker, ring_path: Path) -> None:
    d = Driver(tracker)
    assert {c.kind for c in tokens(d.send(), tracker.ring)} == {"click", "open"}
    first = tracker.ring.current
    other = KeyRing.load(ring_path)  # `webhookd tracking rotate-key`, in another process
    new = other.rotate()
    assert new != first

    def key_ids() -> set[int]:
        flat = d.send().replace(b"=\r\n", b"")
        import base64
        ids = set()
        for _, token in TOKEN.findall(flat):
            raw = base64.urlsafe_b64decode(token + b"=" * (-len(token) % 4))
            ids.add(int.from_bytes(raw[1:3], "big"))
        return ids

    wait_until(lambda: key_ids() == {new}, timeout=10, what="links signed with the new key")
    assert tokens(d.send(), other)  # they verify with the rotated ring


# -- `webhookd tracking milter` as a process ---------------------------------------------------
def write_config(tmp_path: Path, tracking: str) -> Path:
    conf = tmp_path / "webhookd.toml"
    conf.write_text(f'environment = "development"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'runtime_dir = "{tmp_path / "run"}"\n[log]\nformat = "json"\n[tracking]\n{tracking}')
    return conf


ENABLED = f'enabled = true\nbase_url = "{BASE}"\n'


def milter_cli(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WEBHOOKD, "tracking", "milter", "--config", str(conf), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("tracking", "args", "status", "says"), [
    (ENABLED, ["--socket", "inet:127.0.0.1:8892"], 2, "bad milter socket 'inet:127.0.0.1:8892'"),
    (f'base_url = "{BASE}"\n', ["--socket", "inet:1@127.0.0.1"], 78, "tracking is not enabled"),
    (ENABLED, ["--socket", "unix:/nonexistent-dir/milter.sock"], 1, "cannot listen on unix:/nonexistent-dir"),
    (ENABLED + 'key_file = "/dev/null/keys.json"\n', ["--socket", "inet:1@127.0.0.1"], 1,
     "tracking key file /dev/null/keys.json"),
], ids=["bad-socket", "disabled", "no-socket-dir", "key-file"])
def test_milter_refuses_to_start(tmp_path: Path, tracking: str, args: list[str], status: int, says: str) -> None:
    p = milter_cli(write_config(tmp_path, tracking), *args)
    assert p.returncode == status, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("webhookd: tracking milter: ") and says in lines[0], p.stderr


@pytest.fixture
def milter_proc(tmp_path: Path, short_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    conf = write_config(tmp_path, ENABLED)
    sock = short_dir / "milter.sock"
    out = tmp_path / "milter.out"
    with open(out, "wb") as f:
        p = subprocess.Popen([*WEBHOOKD, "tracking", "milter", "--config", str(conf), "--socket", f"unix:{sock}"],
                             stdout=f, stderr=subprocess.STDOUT)
    yield p, sock, out
    if p.poll() is None:
        p.kill()
        p.wait(10)


def test_milter_serves_a_group_socket_and_stops_on_sigterm(
    milter_proc: tuple[subprocess.Popen[bytes], Path, Path], tmp_path: Path,
) -> None:
    p, sock, out = milter_proc
    wait_until(lambda: p.poll() is not None or b"tracking milter started" in out.read_bytes(), timeout=30,
               what="the milter to start")
    assert p.poll() is None, out.read_text()
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o660
    key_file = tmp_path / "state" / "tracking-keys.json"
    assert key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600  # created at start
    # libmilter takes SIGTERM in a signal thread of its own, started as its main loop
    # begins: a SIGTERM sent before that thread exists would end the loop as a failure
    wait_until(lambda: len(os.listdir(f"/proc/{p.pid}/task")) >= 2, timeout=30, what="libmilter's threads")
    p.send_signal(signal.SIGTERM)
    assert p.wait(30) == 0, out.read_text()
    assert b"tracking milter stopped" in out.read_bytes()
    assert not sock.exists()  # removed on the way out
