"""Exim with the tracking rewriter as its smtp transport's `transport_filter` (docs/tracking.md).

A real Exim (`exim -C`, as in tests/test_mta_exim.py) delivers an HTML mail to the SMTP
sink through a transport that runs `webhookd tracking rewrite --to $local_part@$domain`
and signs with DKIM (Exim signs what the filter wrote). The test checks that the
signature verifies (dkimpy, the key's record given directly instead of DNS), that only
the HTML's links and the pixel changed, fetches the pixel and a link from the delivered
message on a real `webhookd serve`'s tracking listener, and receives the signed `opened`
and `clicked` webhooks, `seconds_since_delivered` found from the `delivered` event that
the docs' event_action reported. A second test makes the key file unreadable: the filter
fails open and the mail goes out untouched, still signed.

Exim's delivery process runs the filter as Debian-exim, which cannot reach this venv's
interpreter (under /root) nor, maybe, the checkout: the filter runs Debian's
/usr/bin/python3 (the same minor version) on a copy of the webhookd package and orjson
in Exim's work directory, as an operator's system install would.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mta import HAVE_AIOSMTPD, Sink, assert_signed, required
from tests.mta import Webhookd as Daemon
from tests.test_mta_exim import EXIM, Work, exim, snippet, write_config
from tests.test_mta_exim import work as work
from tests.test_process import ThreadReceiver, wait_until

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _system_python_problem() -> str | None:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is not installed"
    p = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                       capture_output=True, text=True, timeout=30)
    if p.stdout.strip() != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is Python {p.stdout.strip()}, not {sys.version_info[:2]} (orjson's build)"
    return None


PROBLEM = _system_python_problem()
try:
    import dkim  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - the test extra has it
    dkim = None
    PROBLEM = PROBLEM or "dkimpy is not installed"
for tool in ("openssl",):
    if shutil.which(tool) is None:
        PROBLEM = PROBLEM or f"{tool} is not installed"
if EXIM is not None:
    required("exim", PROBLEM)

pytestmark = [
    pytest.mark.skipif(EXIM is None, reason="Exim is not installed (Debian: apt-get install exim4-daemon-light)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Exim delivers with a -C configuration only for root"),
    pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or ""),
    pytest.mark.skipif(not HAVE_AIOSMTPD, reason="aiosmtpd is not installed (pip install aiosmtpd)"),
]

HTML = (
    '<!DOCTYPE html>\n<html><head><meta charset="utf-8"></head><body>\n'
    '<p>Hello Ana, your order =E2=84=96 42 has shipped.</p>\n'
    '<p><a href=3D"https://shop.example/orders/42?utm_source=3Dmail&amp;x=3D1">Track it</a>\n'
    '<a href=3D"mailto:help@shop.example">Write to us</a></p>\n'
    '</body></html>\n'
)
MESSAGE = (
    "From: Shop <sender@shop.example>\n"
    "To: Ana <a@example.org>\n"
    "Subject: Your order\n"
    "Message-ID: <order-42-tracked@shop.example>\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/alternative; boundary="b1"\n'
    "\n"
    "--b1\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "\n"
    "Your order has shipped: https://shop.example/orders/42\n"
    "--b1\n"
    "Content-Type: text/html; charset=utf-8\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    f"{HTML}"
    "--b1--\n"
).encode()


def dkim_key(directory: Path, gid: int) -> tuple[Path, bytes]:
    """An RSA key Debian-exim can read, and its DKIM record."""
    key = directory / "dkim.key"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True, timeout=60)
    der = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"], check=True,
                         capture_output=True, timeout=60).stdout
    os.chown(key, -1, gid)
    key.chmod(0o640)
    return key, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def python_tree(work: Work) -> Path:
    """webhookd's package and orjson, where Debian-exim can read them."""
    import orjson

    tree = work.path / "py"
    shutil.copytree(ROOT / "webhookd", tree / "webhookd", ignore=shutil.ignore_patterns("__pycache__", "ui"))
    (tree / "webhookd" / "ui").mkdir()
    (tree / "webhookd" / "ui" / "__init__.py").write_text("")  # the rewriter never imports the dashboard
    shutil.copytree(Path(orjson.__file__).parent, tree / "orjson", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return tree


def exim_config(work: Work, smtp_port: int, tree: Path, rewriter_conf: Path, dkim_private: Path) -> Path:
    return write_config(work.path / "exim.conf", f"""\
primary_hostname = mta.test.example
qualify_domain = test.example
spool_directory = {work.path}/spool
log_file_path = {work.path}/spool/log/%slog
keep_environment =
queue_only = true

{snippet(work.socket)}

begin routers

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
  max_rcpt = 1
  headers_add = X-Webhookd-To: $local_part@$domain
  transport_filter = /usr/bin/env PYTHONPATH={tree} {SYSTEM_PYTHON} -m webhookd tracking rewrite \\
    --config {rewriter_conf} --to-header X-Webhookd-To
  transport_filter_timeout = 30s
  dkim_domain = shop.example
  dkim_selector = s1
  dkim_private_key = {dkim_private}
  dkim_canon = relaxed
  event_action = WEBHOOKD_EVENT_ACTION

begin retry

*   *   F,1h,15m
""")


@pytest.fixture
def setup(work: Work, tmp_path: Path, smtp_sink: tuple[Sink, int]) -> Iterator[dict[str, Any]]:
    sink, smtp_port = smtp_sink
    keys = work.path / "keys"
    keys.mkdir(mode=0o750)
    os.chown(keys, -1, work.gid)
    key_file = keys / "tracking-keys.json"
    with socketserver_port() as port:
        tracking = (f'[tracking]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
                    f'base_url = "http://127.0.0.1:{port}"\nkey_file = "{key_file}"\n')
    daemon = Daemon(tmp_path / "state", work.run, work.group)
    daemon.config.write_text(daemon.config.read_text() + tracking)
    daemon.start()  # writes the key file (0600, root)
    os.chown(key_file, -1, work.gid)  # the docs' recipe: the Exim user's group may read it
    key_file.chmod(0o640)
    rewriter_conf = write_config(work.path / "webhookd.toml", f'environment = "development"\n'
                                 f'state_dir = "{work.path / "state"}"\n' + tracking)
    private, record = dkim_key(work.path, work.gid)
    config = exim_config(work, smtp_port, python_tree(work), rewriter_conf, private)
    try:
        yield {"sink": sink, "daemon": daemon, "config": config, "record": record, "key_file": key_file,
               "port": port}
    finally:
        daemon.kill()


class socketserver_port:
    """A free loopback port (closed again before use, as the other tests' free ports)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def send(config: Path) -> None:
    exim(config, "-odi", "-oi", "-f", "sender@shop.example", "a@example.org", stdin=MESSAGE)


def delivered_message(sink: Sink, work: Work) -> bytes:
    try:
        wait_until(lambda: sink.messages, timeout=30, what="the message at the sink")
    except AssertionError:
        logs = sorted((work.path / "spool" / "log").glob("*"))
        raise AssertionError("no message at the sink; Exim's logs:\n"
                             + "\n".join(f"{p.name}: {p.read_text()[-3000:]}" for p in logs)) from None
    assert len(sink.messages) == 1
    return sink.messages[0][2]


def verify_dkim(raw: bytes, record: bytes) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return record if name == b"s1._domainkey.shop.example." else b""

    assert dkim is not None
    return bool(dkim.verify(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), dnsfunc=dns))


def parts(raw: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    return {p.get_content_type(): p.get_content().replace("\r\n", "\n") for p in msg.walk() if not p.is_multipart()}


def test_exim_transport_filter_tracks_links_and_dkim_still_verifies(
    setup: dict[str, Any], work: Work, thread_receiver: ThreadReceiver,
) -> None:
    daemon: Daemon = setup["daemon"]
    hook = daemon.json("webhooks", "create", "--url", thread_receiver.url, "--events", "all")
    send(setup["config"])
    raw = delivered_message(setup["sink"], work)
    assert b"DKIM-Signature:" in raw, raw[:2000]
    assert verify_dkim(raw, setup["record"])
    assert b"x-webhookd-to" not in raw.lower()  # the transport's header carried the recipient, then went
    assert "failed to expand" not in work.mainlog and "transport filter" not in work.mainlog.lower()

    got = parts(raw)
    sent = parts(MESSAGE)
    assert got["text/plain"] == sent["text/plain"]  # untouched
    html = got["text/html"]
    base = f"http://127.0.0.1:{setup['port']}"
    links = re.findall(r'href="([^"]+)"', html)
    assert links[1] == "mailto:help@shop.example"
    assert links[0].startswith(f"{base}/c/")
    pixel = re.findall(r'<img src="([^"]+)"', html)
    assert len(pixel) == 1 and pixel[0].startswith(f"{base}/o/")
    # the html differs from what was sent only in the tracked href and the pixel
    assert re.sub(r'<img src="[^"]+"[^>]*>', "", html.replace(links[0], "X")) == \
        sent["text/html"].replace("https://shop.example/orders/42?utm_source=mail&amp;x=1", "X")

    # a person opens the mail and follows the link
    with urllib.request.urlopen(pixel[0].replace("&amp;", "&"), timeout=10) as resp:
        assert resp.status == 200 and len(resp.read()) == 43

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(links[0], timeout=10)
        raise AssertionError("expected a 302")
    except urllib.error.HTTPError as exc:
        assert exc.code == 302
        assert exc.headers["Location"] == "https://shop.example/orders/42?utm_source=mail&x=1"

    def tracking_events() -> list[dict[str, Any]]:
        return [p for p in thread_receiver.payloads() if p["event"] in ("opened", "clicked")]

    wait_until(lambda: len(tracking_events()) >= 2, timeout=20, what="opened and clicked webhooks")
    events = {p["event"]: p["data"] for p in tracking_events()}
    for kind in ("opened", "clicked"):
        data = events[kind]
        assert data["message_id"] == "<order-42-tracked@shop.example>"
        assert data["to"] == "a@example.org"
        assert data["first"] is True
        assert data["ip"] == "127.0.0.1" and data["user_agent"].startswith("Python-urllib")
        assert isinstance(data["seconds_since_delivered"], int) and data["seconds_since_delivered"] >= 0
        assert data["machine"] is True and data["bot"] == "scanner"  # urllib names itself
    assert events["clicked"]["url"] == "https://shop.example/orders/42?utm_source=mail&x=1"
    delivered = [p for p in thread_receiver.payloads() if p["event"] == "delivered"]
    assert [d["data"]["to"] for d in delivered] == ["a@example.org"]
    assert_signed(thread_receiver, hook["secret"])


def test_exim_transport_filter_fails_open_without_its_key(setup: dict[str, Any], work: Work) -> None:
    setup["key_file"].chmod(0o600)  # Debian-exim can no longer read it
    send(setup["config"])
    raw = delivered_message(setup["sink"], work)
    assert verify_dkim(raw, setup["record"])
    assert parts(raw) == parts(MESSAGE)  # nothing tracked, nothing lost
    assert b"x-webhookd-to" not in raw.lower()  # removed even so
    body = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    assert body == MESSAGE.split(b"\n\n", 1)[1]
