"""The tracking listener (webhookd.tracking.listener): the pixel, the redirect, who the
client is, the bad-token limiter, and the recorder that must never make a visitor wait.

Two levels, both on real loopback sockets:

- in-process: TrackingListener's aiohttp app on a free port, a real SqliteStorage in
  tmp_path behind the Recorder (or a storage made to hang or fail), events collected
  where the daemon would submit them, and fake clocks where time matters;
- a real `webhookd serve` subprocess with `[tracking]` enabled, a real aiohttp webhook
  receiver, and the CLI run in-process against its admin socket: the `opened` and
  `clicked` webhooks themselves, opt-outs, key rotation while it runs, status, metrics,
  and a flood of bad tokens.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import Receiver
from webhookd.cli import main
from webhookd.config import TrackingConfig
from webhookd.events import Event
from webhookd.store import SqliteStorage, StoreError
from webhookd.store.model import TrackingFacts, TrackingHit
from webhookd.tracking.links import Links
from webhookd.tracking.listener import GIF, Recorder, TrackingListener, TrackingStats
from webhookd.tracking.tokens import LABEL, MAC_BYTES, Claims, KeyRing, key_file

MID = "<order-7@shop.example>"
RCPT = "reader@example.org"
URL = "https://shop.example/orders/7?ref=mail&utm_source=x#details"
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z

MakeReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[list[dict[str, Any]]]:
    """structlog's lines (the listener's drop and rate-limit warnings), kept out of the output."""
    with capture_logs() as logs:
        yield logs


# -- the in-process rig -------------------------------------------------------------------------------
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Reply:
    status: int
    headers: Any  # CIMultiDictProxy
    body: bytes


@dataclass
class Rig:
    ring: KeyRing
    links: Links
    cfg: TrackingConfig
    storage: Any
    recorder: Recorder
    listener: TrackingListener
    base: str
    session: aiohttp.ClientSession
    wall: Clock
    mono: Clock
    events: list[Event] = field(default_factory=list)
    sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def stats(self) -> dict[tuple[str, str], int]:
        return self.recorder.stats.counts

    async def get(self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                  xff: str | Sequence[str] | None = None, session: aiohttp.ClientSession | None = None) -> Reply:
        hdrs: Any = list({"User-Agent": FIREFOX, **(headers or {})}.items())
        if isinstance(xff, str):
            hdrs.append(("X-Forwarded-For", xff))
        elif xff is not None:
            hdrs.extend(("X-Forwarded-For", x) for x in xff)
        async with (session or self.session).request(
            method, self.base + path, headers=hdrs, allow_redirects=False
        ) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    def pixel_path(self, message_id: str = MID, to: str = RCPT) -> str:
        return "/o/" + self.links.pixel(message_id, to).rsplit("/o/", 1)[1]

    def click_path(self, url: str = URL, message_id: str = MID, to: str = RCPT) -> str:
        return "/c/" + self.links.click(message_id, url, to).rsplit("/c/", 1)[1]

    def session_from(self, address: str) -> aiohttp.ClientSession:
        """A client whose connections come from another loopback address (not a trusted proxy)."""
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0)))
        self.sessions.append(s)
        return s

    def data(self) -> list[dict[str, Any]]:
        return [orjson.loads(e.body) | {"type": e.type} for e in self.events]

    async def settle(self) -> list[dict[str, Any]]:
        await asyncio.wait_for(self.recorder.idle(), 5)
        return self.data()


class HangingStorage:
    """A storage whose track_hits never answers (a writer stuck behind a long transaction)."""

    def __init__(self) -> None:
        self.calls = 0

    def track_hits(self, hits: Sequence[TrackingHit], *, now: float) -> asyncio.Future[list[TrackingFacts]]:
        self.calls += 1
        return asyncio.get_running_loop().create_future()


class FlakyStorage:
    """A real storage whose track_hits fails while `down` (raising, or through the future)."""

    def __init__(self, real: SqliteStorage) -> None:
        self.real = real
        self.down: str = ""  # "", "raise" or "future"

    def track_hits(self, hits: Sequence[TrackingHit], *, now: float) -> asyncio.Future[list[TrackingFacts]]:
        if self.down == "raise":
            raise StoreError("disk I/O error")
        if self.down == "future":
            fut: asyncio.Future[list[TrackingFacts]] = asyncio.get_running_loop().create_future()
            fut.set_exception(StoreError("database is locked"))
            return fut
        return self.real.track_hits(hits, now=now)


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    made: list[tuple[Rig, web.AppRunner, SqliteStorage]] = []

    async def make(*, storage: Any = None, start: bool = True, submit_error: BaseException | None = None,
                   **settings: Any) -> Rig:
        real = SqliteStorage(tmp_path / f"db{len(made)}.sqlite", durability="normal")
        await real.open()
        store = real if storage is None else storage(real) if callable(storage) else storage
        ring = KeyRing.load(key_file(tmp_path), create=True)
        cfg = dataclasses.replace(TrackingConfig(), enabled=True, base_url="https://t.example.com", **settings)
        wall, mono = Clock(NOW), Clock(1000.0)
        events: list[Event] = []

        def submit(event: Event) -> asyncio.Future[str]:
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            if submit_error is not None:
                fut.set_exception(submit_error)
            else:
                events.append(event)
                fut.set_result(f"evt_{len(events)}")
            return fut

        recorder = Recorder(store, submit, ring, cfg, clock=wall, monotonic=mono, stats=TrackingStats())
        if start:
            recorder.start()
        listener = TrackingListener(ring, recorder, cfg, clock=wall, monotonic=mono)
        runner = web.AppRunner(listener.app(), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        rig = Rig(ring, Links(ring, cfg.base_url, include_recipient=cfg.include_recipient, clock=wall), cfg,
                  store, recorder, listener, f"http://127.0.0.1:{port}", aiohttp.ClientSession(), wall, mono, events)
        made.append((rig, runner, real))
        return rig

    yield make
    for rig, runner, real in made:
        for s in [rig.session, *rig.sessions]:
            await s.close()
        await runner.cleanup()
        await rig.recorder.stop(grace=0.1)
        await real.close()


def raw_token(ring: KeyRing, payload: list[Any]) -> str:
    """A token MACed with the ring's real key over any payload (bypassing claims())."""
    head = bytes([1]) + ring.current.to_bytes(2, "big") + orjson.dumps(payload)
    mac = hmac.new(ring.keys[ring.current], LABEL + head, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(head + mac).rstrip(b"=").decode()


def assert_gif(reply: Reply, *, head: bool = False) -> None:
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "image/gif"
    assert "no-store" in reply.headers["Cache-Control"]
    assert reply.headers["Content-Length"] == "43"
    assert "Location" not in reply.headers
    assert reply.body == (b"" if head else GIF)


def assert_refused(reply: Reply) -> None:
    assert reply.status == 404, reply
    assert "Location" not in reply.headers
    assert "no-store" in reply.headers["Cache-Control"]


# -- the pixel ------------------------------------------------------------------------------------------
def test_the_gif_is_a_43_byte_transparent_gif89a() -> None:
    assert len(GIF) == 43
    assert GIF.startswith(b"GIF89a") and GIF.endswith(b";")
    assert GIF[6:10] == b"\x01\x00\x01\x00"  # 1 x 1
    assert b"\x21\xf9\x04\x01" in GIF  # graphic control extension, transparency flag set


async def test_the_pixel_answers_the_gif_for_good_and_bad_tokens_and_head(make_rig: MakeRig) -> None:
    rig = await make_rig()
    good = rig.pixel_path()
    click = rig.click_path()
    bad_paths = [
        "/o/garbage.gif", "/o/.gif", "/o/x.GIF", "/o/" + good[3:-4][:-3] + ".gif",  # truncated
        "/o/" + click[3:] + ".gif",  # a click token on the pixel route
        "/o/" + KeyRing.generate().sign(Claims("open", MID, RCPT)) + ".gif",  # another key
        "/o/" + "A" * 5000 + ".gif", "/o/%00%0d%0a.gif", "/o/..%2f..%2fetc%2fpasswd.gif",
    ]
    assert_gif(await rig.get(good))
    assert_gif(await rig.get(good, method="HEAD"), head=True)
    assert_gif(await rig.get(good[:-4]))  # without the suffix too
    for path in bad_paths:
        assert_gif(await rig.get(path))
        assert_gif(await rig.get(path, method="HEAD"), head=True)
    events = await rig.settle()
    assert [e["type"] for e in events] == ["opened"] * 3  # the bad ones recorded nothing
    assert rig.stats[("open", "bad_token")] == 2 * len(bad_paths)
    assert rig.stats[("open", "recorded")] == 3
    assert [e["data"]["first"] for e in events] == [True, False, False]
    assert events[1]["data"]["bot"] == "head"


async def test_an_opened_event_has_its_fields(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.get(rig.pixel_path(), xff="203.0.113.9")
    [e] = await rig.settle()
    assert e["event"] == "opened" and e["timestamp"] == "2026-01-01T00:00:00Z"
    assert e["data"] == {
        "message_id": MID, "to": RCPT, "user_agent": FIREFOX, "ip": "203.0.113.9", "first": True,
        "seconds_since_delivered": None, "machine": False, "bot": None, "bot_reasons": [],
    }
    assert rig.events[0].message_id == MID and rig.events[0].recipient == RCPT


async def test_hostile_request_headers_are_cut_short_in_the_event(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.get(rig.pixel_path(), headers={"User-Agent": "U" * 5000, "Sec-Purpose": "prefetch" + "x" * 5000,
                                            "X-Other": "y" * 5000})
    [e] = await rig.settle()
    assert e["data"]["user_agent"] == "U" * 512
    assert e["data"]["bot"] == "prefetch" and all(len(r) < 100 for r in e["data"]["bot_reasons"])


# -- the redirect -----------------------------------------------------------------------------------------
async def test_a_good_link_redirects_to_exactly_the_signed_url(make_rig: MakeRig) -> None:
    rig = await make_rig()
    for url in (URL, "http://a.example", "https://a.example/caf\u00e9?q=%2F%0D%0A&x=<y>",
                "https://user@a.example:8443/p;q?r=s#t"):
        for method in ("GET", "HEAD"):
            reply = await rig.get(rig.click_path(url), method=method)
            assert reply.status == 302
            expected = rig.ring.verify(rig.click_path(url)[3:], "click").url
            assert reply.headers["Location"] == expected
            assert "no-store" in reply.headers["Cache-Control"]
            assert reply.headers.getall("Location") == [expected]
    assert (await rig.get(rig.click_path("https://a.example/caf\u00e9"))).headers["Location"] == \
        "https://a.example/caf%C3%A9"
    # a query string after the token changes nothing
    reply = await rig.get(rig.click_path() + "?next=https://evil.example/")
    assert reply.status == 302 and reply.headers["Location"] == URL
    events = await rig.settle()
    assert {e["data"]["url"] for e in events} >= {URL, "http://a.example"}
    assert events[0]["event"] == "clicked" and events[0]["data"]["first"] is True
    assert events[1]["data"]["first"] is False  # the same link again (HEAD)


async def test_a_bad_link_is_404_and_never_a_redirect(make_rig: MakeRig) -> None:
    rig = await make_rig()
    good = rig.click_path()[3:]
    raw = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))
    head, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    payload = orjson.loads(head[3:])
    payload[3] = "https://evil.example/"
    swapped = base64.urlsafe_b64encode(head[:3] + orjson.dumps(payload) + mac).rstrip(b"=").decode()
    signed_but_unsafe = [
        raw_token(rig.ring, ["c", MID, RCPT, url, 0, ""])
        for url in ("javascript:alert(1)", "//evil.example/", "https:evil.example", "http:/evil.example",
                    "https:\\\\evil.example", "https://a.example/\r\nSet-Cookie: a=b", "data:text/html,x", "")
    ]
    # ring.sign itself (not claims()) signs whatever it is given; verify must still refuse
    signed_but_unsafe.append(rig.ring.sign(Claims("click", MID, RCPT, "javascript:alert(1)")))
    tokens = [
        "garbage", good[:-1], good[:-2], good + "A", swapped, rig.pixel_path()[3:-4],
        KeyRing.generate().sign(Claims("click", MID, RCPT, URL)), "A" * 5000, *signed_but_unsafe,
    ]
    for token in tokens:
        for method in ("GET", "HEAD"):
            assert_refused(await rig.get("/c/" + token, method=method))
    for path in ("/c/" + good + "%0d%0aLocation:%20https://evil.example", "/c/" + good + "%2f..",
                 "/c/%2f%2fevil.example", "/c/" + good + "/extra", "/c/", "/c"):
        reply = await rig.get(path)
        assert reply.status == 404 and "Location" not in reply.headers, path
    reply = await rig.get("/c/" + good, method="POST")
    assert reply.status == 405 and "Location" not in reply.headers
    assert await rig.settle() == []


@pytest.mark.parametrize("url", ["javascript:alert(1)", "//evil.example", "https:evil", "https://a.example/\r\nX: y",
                                 "data:text/html,<script>", "https:\\\\evil.example"])
def test_links_refuse_to_sign_unsafe_urls(tmp_path: Path, url: str) -> None:
    links = Links(KeyRing.generate(), "https://t.example.com")
    with pytest.raises(ValueError):
        links.click(MID, url, RCPT)


# -- who the client is ----------------------------------------------------------------------------------
async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(make_rig: MakeRig) -> None:
    rig = await make_rig(trusted_proxies=("127.0.0.1/32", "::1/128", "10.0.0.0/8"))
    outsider = rig.session_from("127.0.0.2")  # loopback, but not a trusted proxy
    cases: list[tuple[str, Any, aiohttp.ClientSession | None, str]] = [
        ("untrusted peer's XFF ignored", "203.0.113.1", outsider, "127.0.0.2"),
        ("no XFF from the proxy", None, None, "127.0.0.1"),
        ("one hop", "203.0.113.2", None, "203.0.113.2"),
        ("rightmost untrusted hop", "198.51.100.1, 203.0.113.3", None, "203.0.113.3"),
        ("past trusted hops", "203.0.113.4, 10.1.2.3, 127.0.0.1", None, "203.0.113.4"),
        ("a spoofed left part is ignored", "1.1.1.1, 203.0.113.5", None, "203.0.113.5"),
        ("two header lines", ["192.0.2.1", "203.0.113.6"], None, "203.0.113.6"),
        ("garbage rightmost hop: the peer", "203.0.113.7, garbage", None, "127.0.0.1"),
        ("garbage behind a trusted hop: the peer", "203.0.113.8, not-an-ip, 10.0.0.1", None, "127.0.0.1"),
        ("garbage left of the client is never reached", "garbage, 203.0.113.9", None, "203.0.113.9"),
        ("a port is garbage", "203.0.113.10:4242", None, "127.0.0.1"),
        ("all trusted: the leftmost", "10.0.0.1, 10.0.0.2", None, "10.0.0.1"),
        ("empty entries", " , ,", None, "127.0.0.1"),
        ("IPv6 client", "2001:db8::5", None, "2001:db8::5"),
    ]
    for n, (_name, xff, session, _ip) in enumerate(cases):
        reply = await rig.get(rig.pixel_path(f"<xff-{n}@x>"), xff=xff, session=session)
        assert_gif(reply)
    events = await rig.settle()
    got = {e["data"]["message_id"]: e["data"]["ip"] for e in events}
    for n, (name, _xff, _session, ip) in enumerate(cases):
        assert got[f"<xff-{n}@x>"] == ip, name


# -- the bad-token limiter ---------------------------------------------------------------------------------
async def test_a_client_sending_bad_tokens_is_limited_and_no_one_else(
    make_rig: MakeRig, quiet_logs: list[dict[str, Any]]
) -> None:
    rig = await make_rig(bad_tokens_per_minute=5)
    attacker, other = "198.51.100.66", "198.51.100.77"
    good_click, good_pixel = rig.click_path(), rig.pixel_path()
    for i in range(5):
        assert_refused(await rig.get(f"/c/bad{i}", xff=attacker))
    # past the budget: 429 even for a valid link, and nothing it sends is verified
    for path in (good_click, "/c/bad-again"):
        reply = await rig.get(path, xff=attacker)
        assert reply.status == 429
        assert "Location" not in reply.headers and reply.headers["Retry-After"] == "60"
        assert "no-store" in reply.headers["Cache-Control"]
    assert_gif(await rig.get(good_pixel, xff=attacker))  # the pixel always answers...
    assert_gif(await rig.get("/o/bad.gif", xff=attacker))
    # ...another client behind the same proxy is not affected
    reply = await rig.get(good_click, xff=other)
    assert reply.status == 302 and reply.headers["Location"] == URL
    events = await rig.settle()
    assert [e["data"]["ip"] for e in events] == [other]  # the limited client's valid hits are not recorded
    assert rig.stats[("click", "bad_token")] == 5
    assert rig.stats[("click", "rate_limited")] == 2
    assert rig.stats[("open", "rate_limited")] == 2
    limited = [x for x in quiet_logs if x["event"] == "tracking: client rate-limited for bad tokens"]
    assert len(limited) == 1 and limited[0]["ip"] == attacker  # logged once, not per request
    # the budget refills at per_minute/60 a second: 12 s buys one more request
    rig.mono.now += 11.9
    assert (await rig.get(good_click, xff=attacker)).status == 429
    rig.mono.now += 0.1
    reply = await rig.get(good_click, xff=attacker)
    assert reply.status == 302 and reply.headers["Location"] == URL
    assert_refused(await rig.get("/c/bad-after", xff=attacker))  # spends it again
    assert (await rig.get(good_click, xff=attacker)).status == 429
    rig.mono.now += 60
    assert (await rig.get(good_click, xff=attacker)).status == 302


async def test_bad_pixel_tokens_count_against_the_budget_too(make_rig: MakeRig) -> None:
    rig = await make_rig(bad_tokens_per_minute=3)
    for i in range(3):
        assert_gif(await rig.get(f"/o/bad{i}.gif", xff="198.51.100.5"))
    assert (await rig.get(rig.click_path(), xff="198.51.100.5")).status == 429


# -- the visitor never waits for storage ------------------------------------------------------------------------
async def test_a_hanging_storage_never_delays_the_answer(make_rig: MakeRig) -> None:
    hanging = HangingStorage()
    rig = await make_rig(storage=hanging)
    for _ in range(3):
        reply = await asyncio.wait_for(rig.get(rig.click_path()), 5)
        assert reply.status == 302 and reply.headers["Location"] == URL
        assert_gif(await asyncio.wait_for(rig.get(rig.pixel_path()), 5))
    await asyncio.sleep(0)
    assert hanging.calls == 1  # the recorder is stuck on the first batch; the visitors are not
    assert rig.events == []


async def test_a_blocked_writer_of_a_real_storage_never_delays_the_answer(make_rig: MakeRig) -> None:
    rig = await make_rig()
    store: SqliteStorage = rig.storage
    gate, inside = asyncio.Event(), asyncio.Event()

    async def long_transaction(db: Any) -> None:
        inside.set()
        await gate.wait()

    blocker = store._writer.run(long_transaction)  # the writer is busy until the gate opens
    await asyncio.wait_for(inside.wait(), 5)
    reply = await asyncio.wait_for(rig.get(rig.click_path()), 5)
    assert reply.status == 302 and reply.headers["Location"] == URL
    assert_gif(await asyncio.wait_for(rig.get(rig.pixel_path()), 5))
    assert rig.events == []
    gate.set()
    await blocker
    events = await rig.settle()
    assert sorted(e["type"] for e in events) == ["clicked", "opened"]


async def test_storage_down_drops_hits_and_the_redirect_still_works(
    make_rig: MakeRig, quiet_logs: list[dict[str, Any]]
) -> None:
    rig = await make_rig(storage=FlakyStorage)
    rig.storage.down = "raise"
    reply = await rig.get(rig.click_path())
    assert reply.status == 302 and reply.headers["Location"] == URL
    assert_gif(await rig.get(rig.pixel_path()))
    await rig.settle()
    rig.storage.down = "future"
    assert (await rig.get(rig.click_path())).status == 302
    await rig.settle()
    assert rig.events == []
    assert rig.stats[("click", "storage")] == 2
    assert rig.stats[("open", "storage")] == 1
    dropped = [x for x in quiet_logs if x["event"] == "tracking hits dropped"]
    assert dropped and dropped[0]["log_level"] == "warning" and "disk I/O error" in dropped[0]["error"]
    # the store is back: recording goes on, nothing crashed
    rig.storage.down = ""
    assert (await rig.get(rig.click_path())).status == 302
    [event] = await rig.settle()
    assert event["type"] == "clicked" and event["data"]["first"] is True  # the dropped hits marked nothing
    assert rig.stats[("click", "recorded")] == 1


async def test_a_submit_that_fails_is_counted_as_a_storage_drop(make_rig: MakeRig) -> None:
    rig = await make_rig(submit_error=StoreError("storage full"))
    assert (await rig.get(rig.click_path())).status == 302
    assert_gif(await rig.get(rig.pixel_path()))
    await rig.settle()
    assert rig.stats[("click", "storage")] == 1 and rig.stats[("open", "storage")] == 1
    assert ("click", "recorded") not in rig.stats


async def test_a_full_queue_drops_hits_and_answers_as_always(make_rig: MakeRig) -> None:
    rig = await make_rig(queue_size=2, start=False)  # nobody takes hits off the queue
    for _ in range(2):
        assert_gif(await rig.get(rig.pixel_path()))
    reply = await rig.get(rig.click_path())
    assert reply.status == 302 and reply.headers["Location"] == URL
    assert_gif(await rig.get(rig.pixel_path()))
    assert rig.stats == {("click", "queue_full"): 1, ("open", "queue_full"): 1}
    rig.recorder.start()  # the two queued hits are still recorded
    events = await rig.settle()
    assert [e["type"] for e in events] == ["opened", "opened"]


async def test_a_signed_token_that_makes_no_valid_event_crashes_nothing(make_rig: MakeRig) -> None:
    """A message id of blanks passes verify (it is not empty) but not the event rules."""
    rig = await make_rig()
    token = raw_token(rig.ring, ["c", "   ", "", URL, 0, ""])
    reply = await rig.get("/c/" + token)
    assert reply.status == 302 and reply.headers["Location"] == URL
    assert await rig.settle() == []
    assert rig.stats[("click", "internal")] == 1
    assert (await rig.get(rig.click_path())).status == 302  # and the recorder still runs
    assert len(await rig.settle()) == 1


async def test_stop_records_what_is_queued(make_rig: MakeRig) -> None:
    rig = await make_rig()
    for i in range(20):
        assert_gif(await rig.get(rig.pixel_path(f"<stop-{i}@x>")))
    await rig.recorder.stop(grace=5)
    assert len(rig.events) == 20


async def test_a_hit_lost_at_shutdown_is_counted(make_rig: MakeRig) -> None:
    rig = await make_rig(storage=HangingStorage())
    assert_gif(await rig.get(rig.pixel_path()))
    await asyncio.sleep(0.01)
    await rig.recorder.stop(grace=0.05)
    assert sum(n for (_kind, outcome), n in rig.stats.items() if outcome != "recorded") == 1


# -- what the recorder learns ------------------------------------------------------------------------------
async def test_first_is_per_recipient_and_per_link(make_rig: MakeRig) -> None:
    rig = await make_rig()
    paths = [rig.pixel_path(), rig.pixel_path(), rig.pixel_path(to="other@example.org"),
             rig.pixel_path(to="READER@example.org"),  # the same person: the address is folded
             rig.click_path(), rig.click_path(), rig.click_path("https://shop.example/help")]
    for path in paths:
        await rig.get(path)
        rig.mono.now += 5  # no fast-click signal here
    events = await rig.settle()
    assert [e["data"]["first"] for e in events] == [True, False, True, False, True, False, True]


async def test_emit_first_sends_only_first_hits(make_rig: MakeRig) -> None:
    rig = await make_rig(emit="first")
    for _ in range(3):
        assert_gif(await rig.get(rig.pixel_path()))
        assert (await rig.get(rig.click_path())).status == 302
    events = await rig.settle()
    assert sorted(e["type"] for e in events) == ["clicked", "opened"]
    assert all(e["data"]["first"] for e in events)
    assert rig.stats[("open", "not_first")] == 2 and rig.stats[("click", "not_first")] == 2


async def test_links_followed_within_a_second_are_flagged(make_rig: MakeRig) -> None:
    rig = await make_rig()
    for url in ("https://shop.example/a", "https://shop.example/b", "https://shop.example/c"):
        await rig.get(rig.click_path(url))
        rig.mono.now += 0.3
    rig.mono.now += 5
    await rig.get(rig.click_path("https://shop.example/d"))
    events = await rig.settle()
    assert [e["data"]["bot"] for e in events] == [None, "scanner", "scanner", None]
    assert events[2]["data"]["bot_reasons"] == ["3 links of this message followed within 1 s"]
    assert events[2]["data"]["machine"] is True


async def test_opted_out_hits_are_served_but_never_recorded(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.storage.set_opt_out(rig.ring.recipient_hash("Reader@Example.org"), opted_out=True, now=NOW)
    assert_gif(await rig.get(rig.pixel_path()))
    reply = await rig.get(rig.click_path())
    assert reply.status == 302 and reply.headers["Location"] == URL
    await rig.get(rig.pixel_path(to="someone@example.org"))
    events = await rig.settle()
    assert [e["data"]["to"] for e in events] == ["someone@example.org"]
    assert rig.stats[("open", "opted_out")] == 1 and rig.stats[("click", "opted_out")] == 1
    # opted in again: recorded, and first (nothing was marked while opted out)
    await rig.storage.set_opt_out(rig.ring.recipient_hash(RCPT), opted_out=False, now=NOW)
    await rig.get(rig.pixel_path())
    events = await rig.settle()
    assert events[-1]["data"]["to"] == RCPT and events[-1]["data"]["first"] is True


async def test_hashed_recipients_honour_opt_outs_and_reveal_nothing(make_rig: MakeRig) -> None:
    rig = await make_rig(include_recipient=False)
    await rig.storage.set_opt_out(rig.ring.recipient_hash(RCPT), opted_out=True, now=NOW)
    await rig.get(rig.pixel_path())
    await rig.get(rig.pixel_path(to="someone@example.org"))
    await rig.get(rig.pixel_path(to="someone@example.org"))
    events = await rig.settle()
    assert len(events) == 2
    assert all("to" not in e["data"] for e in events)
    assert [e["data"]["first"] for e in events] == [True, False]  # first still works on the hash
    assert b"someone" not in b"".join(e.body for e in rig.events)


# -- a real `webhookd serve` ------------------------------------------------------------------------------
@dataclass
class Result:
    code: int
    out: str
    err: str


class Served:
    """`webhookd serve` (tests/test_process.py's Proc) with [tracking] on a free port, its
    links under that port (dev mode allows http://), and the CLI in-process against it."""

    def __init__(self, proc: Any, capsys: pytest.CaptureFixture[str], tracking: str = "") -> None:
        from tests.conftest import free_port

        self.proc = proc
        self.capsys = capsys
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.tracking = tracking
        self.configure(tracking)
        self.session = aiohttp.ClientSession()

    def configure(self, tracking: str) -> None:
        self.proc.write_config(tables=(
            f'[tracking]\nenabled = true\nlisten = "127.0.0.1:{self.port}"\nbase_url = "{self.base}"\n' + tracking
        ))

    async def start(self) -> Served:
        await asyncio.to_thread(self.proc.start)
        return self

    async def cli(self, *args: str) -> Result:
        self.capsys.readouterr()
        code = await asyncio.to_thread(main, ["--config", str(self.proc.config), *args])
        out, err = self.capsys.readouterr()
        return Result(code, out, err)

    async def ok(self, *args: str) -> str:
        r = await self.cli(*args)
        assert r.code == 0 and r.err == "", r
        return r.out

    async def url(self, message_id: str, url: str, to: str = "") -> str:
        return (await self.ok("tracking", "url", "--message-id", message_id, "--to", to, "--url", url)).strip()

    async def pixel(self, message_id: str, to: str = "") -> str:
        return (await self.ok("tracking", "pixel", "--message-id", message_id, "--to", to)).strip()

    async def fetch(self, url: str, *, method: str = "GET", xff: str = "203.0.113.20", ua: str = FIREFOX,
                    session: aiohttp.ClientSession | None = None) -> Reply:
        assert url.startswith(self.base + "/"), url
        headers = {"User-Agent": ua, **({"X-Forwarded-For": xff} if xff else {})}
        async with (session or self.session).request(method, url, headers=headers, allow_redirects=False) as r:
            return Reply(r.status, r.headers, await r.read())

    async def admin(self, path: str) -> bytes:
        connector = aiohttp.UnixConnector(str(self.proc.run / "admin.sock"))
        async with aiohttp.ClientSession(connector=connector) as s, s.get(f"http://admin{path}") as r:
            assert r.status == 200
            return await r.read()

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def served(proc: Callable[..., Any], capsys: pytest.CaptureFixture[str]) -> AsyncIterator[Served]:
    s = Served(proc(), capsys)
    yield s
    await s.close()


def header(received: Any, name: str) -> str:
    return next(v for k, v in received.headers.items() if k.lower() == name.lower())


class Webhooks:
    """The receiver's webhooks, found by what they say."""

    def __init__(self, receiver: Receiver, secret: str) -> None:
        self.receiver = receiver
        self.secret = secret

    def all(self) -> list[dict[str, Any]]:
        return [r.json for r in self.receiver.requests]

    def matching(self, event: str, message_id: str, **data: Any) -> list[dict[str, Any]]:
        return [p for p in self.all() if p["event"] == event and p["data"]["message_id"] == message_id
                and all(p["data"].get(k) == v for k, v in data.items())]

    async def one(self, event: str, message_id: str, n: int = 1, **data: Any) -> dict[str, Any]:
        """Wait for the n-th such webhook; return it."""
        async def enough() -> bool:
            while len(self.matching(event, message_id, **data)) < n:
                self.receiver.arrived.clear()
                await self.receiver.arrived.wait()
            return True

        await asyncio.wait_for(enough(), 15)
        return self.matching(event, message_id, **data)[n - 1]

    def check_signatures(self) -> None:
        assert self.receiver.requests
        for r in self.receiver.requests:
            expected = hmac.new(self.secret.encode(), r.body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(header(r, "X-Webhook-Signature"), expected)
            assert header(r, "X-Webhook-Event") == r.json["event"]


def token_key_id(url: str) -> int:
    token = url.rsplit("/", 1)[1].removesuffix(".gif")
    return int.from_bytes(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[1:3], "big")


@pytest.mark.timeout(60)
async def test_opened_and_clicked_webhooks_from_a_real_daemon(
    served: Served, make_receiver: MakeReceiver
) -> None:
    receiver = await make_receiver()
    await served.start()
    hook = json.loads(await served.ok("webhooks", "create", "--url", receiver.url,
                                      "--events", "opened,clicked", "--json"))
    hooks = Webhooks(receiver, hook["secret"])

    # key rotation while the daemon runs (first, before anything makes the daemon look at the file)
    before = await served.url("<rot-1@shop.example>", URL, "rot@example.org")
    out = await served.ok("tracking", "rotate-key")
    assert out.startswith("key 2 now signs new links; keys 1, 2 verify (") and "tracking-keys.json" in out
    after = await served.url("<rot-2@shop.example>", URL, "rot@example.org")
    assert (token_key_id(before), token_key_id(after)) == (1, 2)
    for link in (after, before):
        reply = await served.fetch(link)
        assert reply.status == 302 and reply.headers["Location"] == URL
    await hooks.one("clicked", "<rot-1@shop.example>")
    await hooks.one("clicked", "<rot-2@shop.example>")

    # an open, again, and as HEAD: first, then not; a HEAD is a machine
    m = "<open-1@shop.example>"
    pixel = await served.pixel(m, "Ann@Example.org")
    assert pixel.startswith(served.base + "/o/") and pixel.endswith(".gif")
    assert_gif(await served.fetch(pixel, xff="203.0.113.21"))
    first = await hooks.one("opened", m)
    assert first["data"] == {
        "message_id": m, "to": "Ann@Example.org", "user_agent": FIREFOX, "ip": "203.0.113.21", "first": True,
        "seconds_since_delivered": None, "machine": False, "bot": None, "bot_reasons": [],
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["timestamp"])
    assert_gif(await served.fetch(pixel, xff="203.0.113.22"))
    assert (await hooks.one("opened", m, 2))["data"]["first"] is False
    assert_gif(await served.fetch(pixel, method="HEAD", ua="curl/8.5.0"), head=True)
    head = (await hooks.one("opened", m, 3))["data"]
    assert (head["machine"], head["bot"], head["first"]) == (True, "head", False)
    assert head["bot_reasons"][0] == "HEAD request" and any("curl" in r for r in head["bot_reasons"])

    # a click: url, and first per link
    link = await served.url(m, URL, "Ann@Example.org")
    assert (await served.fetch(link)).headers["Location"] == URL
    click = (await hooks.one("clicked", m))["data"]
    assert (click["url"], click["to"], click["first"], click["bot"]) == (URL, "Ann@Example.org", True, None)
    assert click["seconds_since_delivered"] is None and click["user_agent"] == FIREFOX
    assert (await served.fetch(link)).status == 302
    assert (await hooks.one("clicked", m, 2))["data"]["first"] is False

    # seconds_since_delivered: from webhookd's own `delivered` event for the message and recipient
    d = "<delivered-1@shop.example>"
    async with served.session.post(f"http://127.0.0.1:{served.proc.port}/v1/events", data=orjson.dumps(
        {"event": "delivered", "data": {"message_id": d, "to": "bea@example.org"}}
    )) as r:
        assert r.status in (200, 202), await r.text()
    assert_gif(await served.fetch(await served.pixel(d, "bea@example.org")))
    opened = (await hooks.one("opened", d))["data"]
    assert isinstance(opened["seconds_since_delivered"], int) and 0 <= opened["seconds_since_delivered"] < 60
    assert (await served.fetch(await served.url(d, URL, "bea@example.org"))).status == 302
    clicked = (await hooks.one("clicked", d))["data"]
    assert isinstance(clicked["seconds_since_delivered"], int) and clicked["seconds_since_delivered"] >= 0
    # a click seconds after delivery is what a scanner does
    assert clicked["machine"] is True and clicked["bot"] == "scanner"
    assert any("after delivery" in r for r in clicked["bot_reasons"])

    # opt-out: served and redirected, never recorded
    out = await served.ok("tracking", "opt-out", "Dan@Example.org")
    assert out == "Dan@Example.org: opted out\n"
    assert await served.ok("tracking", "opt-out", "dan@example.org") == "dan@example.org: opted out (already)\n"
    o = "<optout-1@shop.example>"
    assert_gif(await served.fetch(await served.pixel(o, "dan@example.org")))
    reply = await served.fetch(await served.url(o, URL, "DAN@example.org"))
    assert reply.status == 302 and reply.headers["Location"] == URL
    # the hits are handled in order: once a later hit's webhook is here, the opted-out ones were skipped
    assert_gif(await served.fetch(await served.pixel(o, "eve@example.org")))
    await hooks.one("opened", o, to="eve@example.org")
    assert hooks.matching("opened", o, to="dan@example.org") == []
    assert hooks.matching("clicked", o) == []
    status = json.loads(await served.ok("tracking", "status", "--json"))
    assert status["opt_outs"] == 1
    assert status["hits"]["open"]["opted_out"] == 1 and status["hits"]["click"]["opted_out"] == 1
    # opt-in: recorded again
    assert await served.ok("tracking", "opt-in", "dan@example.org") == "dan@example.org: opted in\n"
    assert_gif(await served.fetch(await served.pixel(o, "dan@example.org")))
    again = await hooks.one("opened", o, to="dan@example.org")
    assert again["data"]["first"] is True  # nothing was remembered while opted out

    # status and metrics
    status = json.loads(await served.ok("tracking", "status", "--json"))
    assert status["enabled"] is True and status["listen"] == f"127.0.0.1:{served.port}"
    assert status["base_url"] == served.base and status["emit"] == "all"
    assert (status["key_ids"], status["current_key"], status["opt_outs"]) == ([1, 2], 2, 0)
    assert status["hits"]["open"]["recorded"] >= 6 and status["hits"]["click"]["recorded"] >= 5
    text = await served.ok("tracking", "status")
    assert text.startswith(f"tracking: on, listening on 127.0.0.1:{served.port}, links under {served.base}\n")
    assert "keys: 1, 2 (signing with 2)\n" in text and "opted-out addresses: 0\n" in text
    assert re.search(r"^open hits: .*opted_out 1.*recorded \d+", text, re.MULTILINE), text
    assert re.search(r"^click hits: .*recorded \d+", text, re.MULTILINE), text
    metrics = (await served.admin("/metrics")).decode()
    assert re.search(r"^# TYPE webhookd_tracking_hits(_total)? counter$", metrics, re.MULTILINE)
    recorded = re.search(r'^webhookd_tracking_hits_total\{kind="open",outcome="recorded"\} (\d+)', metrics,
                         re.MULTILINE)
    assert recorded and int(float(recorded.group(1))) == status["hits"]["open"]["recorded"]
    assert 'webhookd_tracking_hits_total{kind="click",outcome="opted_out"} 1.0' in metrics

    hooks.check_signatures()
    assert {p["event"] for p in hooks.all()} == {"opened", "clicked"}  # --events opened,clicked


@pytest.mark.timeout(60)
async def test_a_flood_of_bad_tokens_is_limited_and_the_daemon_stays_responsive(
    served: Served, make_receiver: MakeReceiver
) -> None:
    receiver = await make_receiver()
    await served.start()
    hook = json.loads(await served.ok("webhooks", "create", "--url", receiver.url, "--events", "clicked", "--json"))
    link = await served.url("<flood@shop.example>", URL, "fay@example.org")
    cap, done = 20000, 0
    statuses: list[int] = []
    locations = 0
    stop = asyncio.Event()

    async def flood() -> None:
        """64 connections sending bad tokens until the real click has its answer."""
        nonlocal done, locations
        connector = aiohttp.TCPConnector(limit=64)
        sent = iter(range(cap))
        async with aiohttp.ClientSession(connector=connector) as s:
            async def worker() -> None:
                nonlocal done, locations
                for i in sent:
                    if stop.is_set():
                        return
                    async with s.get(f"{served.base}/c/bad-token-{i}", allow_redirects=False) as r:
                        statuses.append(r.status)
                        locations += "Location" in r.headers
                        await r.read()
                    done += 1

            await asyncio.gather(*(worker() for _ in range(64)))

    task = asyncio.create_task(flood())
    while done < 200 and not task.done():
        await asyncio.sleep(0.005)
    assert not task.done(), task
    # meanwhile, a person behind the same proxy clicks a real link
    reply = await asyncio.wait_for(served.fetch(link, xff="203.0.113.50"), 10)
    stop.set()
    assert not task.done()  # it was answered while the flood ran
    assert reply.status == 302 and reply.headers["Location"] == URL
    await asyncio.wait_for(task, 30)
    total = done
    assert locations == 0
    assert set(statuses) == {404, 429}
    assert statuses.count(429) > total // 2  # past the budget of 60 a minute (plus what refilled)
    assert statuses.count(404) >= 60
    # the flooding address still gets its pixels; the daemon answers everything else
    assert_gif(await served.fetch(await served.pixel("<flood@shop.example>"), xff=""))
    assert (await served.fetch(link, xff="")).status == 429
    clicked = await Webhooks(receiver, hook["secret"]).one("clicked", "<flood@shop.example>")
    assert clicked["data"]["ip"] == "203.0.113.50"
    status = json.loads(await served.ok("tracking", "status", "--json"))
    assert status["hits"]["click"]["rate_limited"] == statuses.count(429) + 1
    assert status["hits"]["click"]["bad_token"] == statuses.count(404)


@pytest.mark.timeout(60)
async def test_emit_first_in_a_real_daemon(
    proc: Callable[..., Any], capsys: pytest.CaptureFixture[str], make_receiver: MakeReceiver
) -> None:
    receiver = await make_receiver()
    served = await Served(proc(), capsys, 'emit = "first"\n').start()
    try:
        hook = json.loads(await served.ok("webhooks", "create", "--url", receiver.url, "--json"))
        hooks = Webhooks(receiver, hook["secret"])
        m = "<first@shop.example>"
        pixel, link = await served.pixel(m, "gus@example.org"), await served.url(m, URL, "gus@example.org")
        for _ in range(3):
            assert_gif(await served.fetch(pixel))
            assert (await served.fetch(link)).status == 302
        marker = "<first-marker@shop.example>"
        assert_gif(await served.fetch(await served.pixel(marker)))
        await hooks.one("opened", marker)
        assert len(hooks.matching("opened", m)) == 1 and len(hooks.matching("clicked", m)) == 1
        assert all(p["data"]["first"] for p in hooks.all())
        status = json.loads(await served.ok("tracking", "status", "--json"))
        assert status["emit"] == "first"
        assert status["hits"]["open"]["not_first"] == 2 and status["hits"]["click"]["not_first"] == 2
    finally:
        await served.close()


async def test_stopping_the_daemon_records_the_hits_already_answered(start_daemon: Any, tmp_path: Path) -> None:
    """Stop order: the listener closes, then the recorder records its queue, then storage closes."""
    from tests.conftest import db_rows, free_port

    port = free_port()
    h = await start_daemon(tracking={"enabled": True, "listen": f"127.0.0.1:{port}",
                                     "base_url": f"http://127.0.0.1:{port}"})
    links = Links(h.daemon.key_ring(), f"http://127.0.0.1:{port}")
    async with aiohttp.ClientSession() as s:
        for i in range(50):
            async with s.get(links.pixel(f"<stop-{i}@x>"), headers={"User-Agent": FIREFOX}) as r:
                assert r.status == 200
    await h.daemon.stop()
    rows = db_rows(h.config.storage.path, "SELECT count(*) FROM events WHERE type = 'opened'")
    assert rows == [(50,)]
    with pytest.raises(aiohttp.ClientConnectionError):  # and the listener is gone
        async with aiohttp.ClientSession() as s, s.get(links.pixel("<late@x>")):
            pass
