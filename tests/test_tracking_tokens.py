"""Tracking tokens and the key ring (webhookd.tracking.tokens), and Links: trying to forge,
bend or break them.

Tokens are checked as bytes: decode a real token, change it, encode it again, and the
key ring must refuse it (every byte position, every truncation, a swapped URL). The key
file is a real file in tmp_path: its mode, its atomic write, two rings on one file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path

import orjson
import pytest

from webhookd.tracking.links import Links
from webhookd.tracking.tokens import (
    LABEL,
    MAC_BYTES,
    MAX_URL_CHARS,
    VERSION,
    Claims,
    KeyFileError,
    KeyRing,
    TokenError,
    ascii_url,
    check_url,
    key_file,
)

MID = "<order-7@shop.example>"
RCPT = "Reader@Example.ORG"
URL = "https://shop.example/orders/7?ref=mail&x=1#top"
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z


# -- helpers: tokens as bytes ----------------------------------------------------------------------
def b64d(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def split(token: str) -> tuple[int, int, list[object], bytes]:
    """(version, key id, payload, mac) of a token."""
    raw = b64d(token)
    return raw[0], int.from_bytes(raw[1:3], "big"), orjson.loads(raw[3:-MAC_BYTES]), raw[-MAC_BYTES:]


def forge(key: bytes, key_id: int, payload: bytes, version: int = VERSION) -> str:
    """A token correctly MACed with `key`: for checks that must hold even when the MAC verifies."""
    head = bytes([version]) + key_id.to_bytes(2, "big") + payload
    return b64e(head + hmac.new(key, LABEL + head, hashlib.sha256).digest()[:MAC_BYTES])


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate()


@pytest.fixture
def links(ring: KeyRing) -> Links:
    return Links(ring, "https://t.example.com/", clock=lambda: NOW)


def click_token(links: Links, url: str = URL, to: str = RCPT) -> str:
    return links.click(MID, url, to).rsplit("/", 1)[1]


def open_token(links: Links, to: str = RCPT) -> str:
    name = links.pixel(MID, to).rsplit("/", 1)[1]
    assert name.endswith(".gif")
    return name[:-4]


# -- round trips --------------------------------------------------------------------------------------
def test_open_round_trip(ring: KeyRing, links: Links) -> None:
    url = links.pixel(MID, RCPT)
    assert url.startswith("https://t.example.com/o/") and url.endswith(".gif")  # no double slash
    claims = ring.verify(open_token(links), "open")
    assert claims == Claims("open", MID, RCPT, "", int(NOW), "")
    assert claims.recipient_key == RCPT.lower()


def test_click_round_trip(ring: KeyRing, links: Links) -> None:
    url = links.click(MID, URL, RCPT)
    assert url.startswith("https://t.example.com/c/")
    assert ring.verify(click_token(links), "click") == Claims("click", MID, RCPT, URL, int(NOW), "")


def test_token_layout_is_the_documented_one(ring: KeyRing, links: Links) -> None:
    token = click_token(links)
    assert "=" not in token and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    version, key_id, payload, mac = split(token)
    assert (version, key_id) == (1, ring.current)
    assert payload == ["c", MID, RCPT, URL, int(NOW), ""]
    assert len(mac) == MAC_BYTES == 16  # 128 bits
    head = b64d(token)[:-MAC_BYTES]
    key = ring.keys[ring.current]
    assert mac == hmac.new(key, LABEL + head, hashlib.sha256).digest()[:16]
    # the label separates these MACs from any other use of the key
    assert mac != hmac.new(key, head, hashlib.sha256).digest()[:16]


def test_a_token_without_recipient_verifies(ring: KeyRing, links: Links) -> None:
    claims = ring.verify(links.pixel(MID).rsplit("/", 1)[1][:-4], "open")
    assert (claims.to, claims.to_hash, claims.recipient_key) == ("", "", "")


# -- tampering ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open", "click"])
def test_every_flipped_byte_is_refused(ring: KeyRing, links: Links, kind: str) -> None:
    token = click_token(links) if kind == "click" else open_token(links)
    raw = b64d(token)
    for i in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            bad = b64e(raw[:i] + bytes([raw[i] ^ mask]) + raw[i + 1:])
            with pytest.raises(TokenError):
                ring.verify(bad, kind)  # type: ignore[arg-type]


def test_a_swapped_url_without_a_new_mac_is_refused(ring: KeyRing, links: Links) -> None:
    raw = b64d(click_token(links))
    head, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
    payload = orjson.loads(head[3:])
    for evil in ("https://evil.example/", "https://shop.example.evil.example/orders/7", URL + "x", URL[:-1]):
        payload[3] = evil
        swapped = b64e(head[:3] + orjson.dumps(payload) + mac)
        with pytest.raises(TokenError, match="bad signature"):
            ring.verify(swapped, "click")
    # the same with another recipient or message id: the MAC covers the whole payload
    payload = orjson.loads(head[3:])
    for index, value in ((1, "<other@shop.example>"), (2, "victim@example.org"), (4, 0)):
        changed = list(payload)
        changed[index] = value
        with pytest.raises(TokenError, match="bad signature"):
            ring.verify(b64e(head[:3] + orjson.dumps(changed) + mac), "click")


def test_a_mac_moved_to_another_payload_is_refused(ring: KeyRing, links: Links) -> None:
    a, b = b64d(click_token(links)), b64d(click_token(links, "https://shop.example/other"))
    with pytest.raises(TokenError):
        ring.verify(b64e(b[:-MAC_BYTES] + a[-MAC_BYTES:]), "click")


@pytest.mark.parametrize("kind", ["open", "click"])
def test_every_truncation_is_refused(ring: KeyRing, links: Links, kind: str) -> None:
    token = click_token(links) if kind == "click" else open_token(links)
    for n in range(len(token)):
        with pytest.raises(TokenError):
            ring.verify(token[:n], kind)  # type: ignore[arg-type]
    raw = b64d(token)
    for n in range(len(raw)):  # truncated as bytes, then encoded cleanly
        with pytest.raises(TokenError):
            ring.verify(b64e(raw[:n]), kind)  # type: ignore[arg-type]
    for n in range(1, 8):  # or extended
        with pytest.raises(TokenError):
            ring.verify(b64e(raw + b"\0" * n), kind)  # type: ignore[arg-type]


@pytest.mark.parametrize("decorate", [
    pytest.param(lambda t: t + "=", id="padding"),
    pytest.param(lambda t: t + "==", id="double-padding"),
    pytest.param(lambda t: t + "=" * (-len(t) % 4) if len(t) % 4 else t + "====", id="full-padding"),
    pytest.param(lambda t: " " + t, id="leading-space"),
    pytest.param(lambda t: t + " ", id="trailing-space"),
    pytest.param(lambda t: t + "\n", id="newline"),
    pytest.param(lambda t: t[:10] + "\t" + t[10:], id="tab"),
    pytest.param(lambda t: t[:10] + "\r\n" + t[10:], id="crlf"),
    pytest.param(lambda t: t.replace("-", "+").replace("_", "/") if ("-" in t or "_" in t) else "+" + t,
                 id="standard-alphabet"),
    pytest.param(lambda t: t[:5] + "." + t[5:], id="dot"),
    pytest.param(lambda t: t[:5] + "%41" + t[5:], id="percent"),
    pytest.param(lambda t: t[:5] + "\u00e9" + t[5:], id="non-ascii"),
    pytest.param(lambda t: t[:5] + "\uff21" + t[5:], id="fullwidth-A"),
    pytest.param(lambda t: t[:5] + "\0" + t[5:], id="nul"),
    pytest.param(lambda t: "", id="empty"),
    pytest.param(lambda t: t * 40, id="over-4096"),
])
def test_decorated_tokens_are_refused(ring: KeyRing, links: Links, decorate: object) -> None:
    token = click_token(links)
    bad = decorate(token)  # type: ignore[operator]
    assert bad != token
    with pytest.raises(TokenError):
        ring.verify(bad, "click")


def test_wrong_key(links: Links) -> None:
    other = KeyRing.generate()  # same key id (1), another secret
    with pytest.raises(TokenError, match="bad signature"):
        other.verify(click_token(links), "click")
    with pytest.raises(TokenError, match="bad signature"):
        other.verify(open_token(links), "open")


def test_unknown_version_is_refused_even_with_a_valid_mac(ring: KeyRing) -> None:
    payload = orjson.dumps(["c", MID, "", URL, 0, ""])
    key = ring.keys[ring.current]
    assert ring.verify(forge(key, ring.current, payload), "click").url == URL  # the forge is right
    for version in (0, 2, 255):
        with pytest.raises(TokenError, match=f"unknown version {version}"):
            ring.verify(forge(key, ring.current, payload, version), "click")


def test_unknown_key_id_is_refused(ring: KeyRing) -> None:
    payload = orjson.dumps(["c", MID, "", URL, 0, ""])
    for key_id in (0, 2, 65535):
        with pytest.raises(TokenError, match=f"unknown key id {key_id}"):
            ring.verify(forge(ring.keys[ring.current], key_id, payload), "click")


def test_kind_is_signed_an_open_token_is_no_link_and_back(ring: KeyRing, links: Links) -> None:
    with pytest.raises(TokenError, match="not a click token"):
        ring.verify(open_token(links), "click")
    with pytest.raises(TokenError, match="not a open token"):
        ring.verify(click_token(links), "open")


@pytest.mark.parametrize("payload", [
    b"[]", b"{}", b"null", b'"abcdef"', b"not json", b"",
    b'["c","<m@x>","","https://a.example/",0]',  # five fields
    b'["c","<m@x>","","https://a.example/",0,"",7]',  # seven
    b'["c","<m@x>","","https://a.example/","0",""]',  # issued_at a string
    b'["c","<m@x>",null,"https://a.example/",0,""]',
    b'["c",5,"","https://a.example/",0,""]',
    b'["x","<m@x>","","https://a.example/",0,""]',  # unknown kind
    b'["c","","","https://a.example/",0,""]',  # no message id
    b'["c","<m@x>","","",0,""]',  # a click without a url
    b"[" * 5000 + b"]" * 5000,  # deeper than any parser should go
])
def test_signed_but_malformed_payloads_are_refused(ring: KeyRing, payload: bytes) -> None:
    """What the MAC covers is still checked: a bug (or a leaked key) never becomes a crash."""
    with pytest.raises(TokenError):
        ring.verify(forge(ring.keys[ring.current], ring.current, payload), "click")


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JavaScript://%0aalert(1)", "data:text/html,<script>alert(1)</script>",
    "//evil.example/", "https:evil.example", "http:/evil.example", "https:\\\\evil.example",
    "https://good.example\\@evil.example/", "ftp://files.example/", "https:///evil.example", "https://@evil.example/",
    "https://:443/", "https://a.example/\r\nSet-Cookie: x=1", "https://a.example/\nx", "https://a.example/ x",
    "https://a.example/\x00", "https://a.example/\x7f", "https://a.example/\u00fc", "",
])
def test_a_url_signed_by_our_own_key_is_still_refused_when_unsafe(ring: KeyRing, url: str) -> None:
    """The last line against an open redirect: verify checks the URL even under a good MAC
    (ring.sign bypasses claims(), as a future bug or a leaked key might)."""
    token = ring.sign(Claims("click", MID, "", url, int(NOW)))
    with pytest.raises(TokenError):
        ring.verify(token, "click")


def test_claims_refuse_bad_input(ring: KeyRing) -> None:
    with pytest.raises(ValueError, match="message id"):
        ring.claims("open", "")
    with pytest.raises(ValueError, match="message id"):
        ring.claims("open", "x" * 999)
    for blank in (" ", "\t", " \r\n "):  # such an event would be refused by intake's rules
        with pytest.raises(ValueError, match="message id"):
            ring.claims("click", blank, url=URL)
    assert ring.claims("open", "x" * 998).message_id == "x" * 998
    with pytest.raises(ValueError, match="no url"):
        ring.claims("open", MID, url=URL)
    with pytest.raises(ValueError):
        ring.claims("click", MID)  # a click needs its url
    assert ring.claims("click", MID, url="  https://a.example/  ").url == "https://a.example/"


# -- check_url and ascii_url ---------------------------------------------------------------------------
@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JAVASCRIPT:alert(1)", " javascript:alert(1)", "data:text/html;base64,PHNjcmlwdD4=",
    "vbscript:msgbox", "file:///etc/passwd", "mailto:a@b.example", "//evil.example", "///evil.example",
    "http:/x", "http:x", "https:evil", "https:\\\\evil", "https:\\evil.example", "https://evil.example\\x",
    "https://a.example/ b", "https://a.example/\tb", "https://a.example/\x01", "https://a.example/\x1b[2J",
    "https://a.example/\r\nLocation: https://evil.example", "https://a.example/\rx", "https://a.example/\nx",
    "https://a.example/\u2028", "https://a.example/\u00a0", "https://ex\u00e4mple.com/", "https://a.example/\x7f",
    "https://", "https://?x", "https://#x", "https:///path", "https://@evil", "https://:80", "http//a.example",
    "ht tp://a.example", "https ://a.example", "", "https://a.example/" + "a" * MAX_URL_CHARS,
])
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url)


@pytest.mark.parametrize("url", [
    "https://a.example", "http://a.example/", "HTTPS://A.EXAMPLE/x", "https://a.example:8443/p?q=1#f",
    "https://user:pw@a.example/", "https://[2001:db8::1]/", "https://127.0.0.1/x",
    "https://a.example/%0D%0Aliteral-percent-escapes-are-just-characters",
])
def test_check_url_accepts(url: str) -> None:
    assert check_url(url) == url


def test_check_url_length_limit() -> None:
    base = "https://a.example/"
    assert check_url(base + "a" * (MAX_URL_CHARS - len(base))) is not None
    with pytest.raises(ValueError, match="longer"):
        check_url(base + "a" * (MAX_URL_CHARS - len(base) + 1))


def test_non_ascii_is_percent_encoded_when_signing(ring: KeyRing, links: Links) -> None:
    assert ascii_url("https://a.example/x") == "https://a.example/x"
    assert ascii_url("https://a.example/caf\u00e9?q=\u65e5") == "https://a.example/caf%C3%A9?q=%E6%97%A5"
    claims = ring.verify(click_token(links, "https://shop.example/caf\u00e9?a=\U0001f600"), "click")
    assert claims.url == "https://shop.example/caf%C3%A9?a=%F0%9F%98%80"
    # ASCII that is not allowed is not "fixed": the link is refused
    with pytest.raises(ValueError):
        links.click(MID, "https://shop.example/caf\u00e9 x")
    # the length limit applies to the encoded form (each character here becomes 9)
    with pytest.raises(ValueError, match="longer"):
        links.click(MID, "https://shop.example/" + "\u65e5" * 300)


# -- include_recipient = false -------------------------------------------------------------------------
def test_without_recipient_the_token_carries_only_a_keyed_hash(ring: KeyRing) -> None:
    links = Links(ring, "https://t.example.com", include_recipient=False, clock=lambda: NOW)
    for url in (links.pixel(MID, RCPT), links.click(MID, URL, RCPT)):
        token = url.rsplit("/", 1)[1].removesuffix(".gif")
        raw = b64d(token)
        for form in (RCPT, RCPT.lower(), "reader", "Example.ORG".lower()):
            assert form.encode() not in raw.lower()
        claims = ring.verify(token, "click" if "/c/" in url else "open")
        assert claims.to == ""
        assert claims.to_hash == ring.recipient_hash(RCPT) == ring.recipient_hash("reader@example.org")
        assert claims.to_hash == ring.recipient_hash("  READER@EXAMPLE.ORG ")
        assert len(claims.to_hash) == 32 and int(claims.to_hash, 16) >= 0
        assert claims.recipient_key == claims.to_hash
    # keyed: another ring (another salt) hashes the same address differently
    assert KeyRing.generate().recipient_hash(RCPT) != ring.recipient_hash(RCPT)
    assert ring.recipient_hash(RCPT) != hashlib.sha256(RCPT.lower().encode()).hexdigest()[:32]


def test_without_a_recipient_there_is_no_hash_either(ring: KeyRing) -> None:
    links = Links(ring, "https://t.example.com", include_recipient=False)
    assert ring.verify(links.pixel(MID).rsplit("/", 1)[1][:-4], "open").to_hash == ""


# -- the key file ---------------------------------------------------------------------------------------
def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "tracking-keys.json")


def test_load_without_create_names_the_file(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    with pytest.raises(KeyFileError, match=str(path)):
        KeyRing.load(path)
    assert not path.exists()


def test_created_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    path = key_file(tmp_path / "state")  # the folder is made too
    ring = KeyRing.load(path, create=True)
    assert mode(path) == 0o600
    assert leftovers(path.parent) == []
    again = KeyRing.load(path, create=True)  # exists now: loaded, not replaced
    assert (again.keys, again.current, again.salt) == (ring.keys, ring.current, ring.salt)
    doc = orjson.loads(path.read_bytes())
    assert doc["current"] == 1 and [k["id"] for k in doc["keys"]] == [1]
    assert len(base64.b64decode(doc["keys"][0]["secret"])) == 32


def test_rotation_keeps_old_tokens_and_signs_with_the_new_key(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    ring = KeyRing.load(path, create=True)
    links = Links(ring, "https://t.example.com", clock=lambda: NOW)
    old_click, old_open = click_token(links), open_token(links)
    assert ring.rotate() == 2
    assert ring.current == 2 and sorted(ring.keys) == [1, 2]
    new_click = click_token(links)
    assert split(new_click)[1] == 2 and split(old_click)[1] == 1
    assert ring.verify(old_click, "click").url == URL
    assert ring.verify(old_open, "open").to == RCPT
    assert ring.verify(new_click, "click").url == URL
    assert ring.rotate() == 3
    for token, kind in ((old_click, "click"), (old_open, "open"), (new_click, "click")):
        ring.verify(token, kind)  # type: ignore[arg-type]
    # and from the file
    fresh = KeyRing.load(path)
    assert fresh.current == 3 and sorted(fresh.keys) == [1, 2, 3]
    fresh.verify(old_click, "click")
    fresh.verify(new_click, "click")
    assert fresh.recipient_hash(RCPT) == ring.recipient_hash(RCPT)  # the salt survives rotation
    assert mode(path) == 0o600
    assert leftovers(tmp_path) == []  # the atomic write's temporary file is gone


def test_another_ring_on_the_same_file_sees_the_rotation(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    signer, verifier = KeyRing.load(path, create=True), KeyRing.load(path)
    assert verifier.refresh(every=0) is False  # nothing changed
    signer.rotate()
    token = Links(signer, "https://t.example.com").click(MID, URL).rsplit("/", 1)[1]
    assert verifier.refresh(every=0) is True
    assert verifier.current == 2 and sorted(verifier.keys) == [1, 2]
    assert verifier.verify(token, "click").url == URL
    assert verifier.refresh(every=0) is False


def test_refresh_is_rate_limited(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    signer, verifier = KeyRing.load(path, create=True), KeyRing.load(path)
    assert verifier.refresh(now=100.0, every=5) is False
    signer.rotate()
    assert verifier.refresh(now=104.0, every=5) is False  # not yet looked again
    assert verifier.refresh(now=105.0, every=5) is True


def test_verify_picks_up_a_rotation_by_another_process(tmp_path: Path) -> None:
    """An unknown key id makes verify look at the file again (the daemon after `rotate-key`)."""
    path = key_file(tmp_path)
    signer, verifier = KeyRing.load(path, create=True), KeyRing.load(path)
    signer.rotate()
    token = Links(signer, "https://t.example.com").click(MID, URL).rsplit("/", 1)[1]
    assert verifier.verify(token, "click").url == URL
    assert verifier.current == 2


def test_a_rotated_key_verifies_even_right_after_a_refresh(tmp_path: Path) -> None:
    """The periodic refresh's rate limit must not delay a rotation for an unknown key id."""
    path = key_file(tmp_path)
    signer, verifier = KeyRing.load(path, create=True), KeyRing.load(path)
    verifier.refresh()  # e.g. the daemon's admin API (Daemon.key_ring) just looked
    signer.rotate()
    token = Links(signer, "https://t.example.com").click(MID, URL).rsplit("/", 1)[1]
    assert verifier.verify(token, "click").url == URL


def test_a_group_readable_file_keeps_its_mode_and_group_on_rotate(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    ring = KeyRing.load(path, create=True)
    os.chmod(path, 0o640)
    gid = os.getgid() if os.geteuid() != 0 else 4242  # root can give it any group
    os.chown(path, -1, gid)
    ring.rotate()
    assert mode(path) == 0o640
    assert path.stat().st_gid == gid
    os.chmod(path, 0o666)  # never more than owner rw, group r
    ring.rotate()
    assert mode(path) == 0o640
    assert leftovers(tmp_path) == []


def test_rotate_survives_a_stale_temporary_file(tmp_path: Path) -> None:
    """A crash between writing and renaming leaves `.tracking-keys.json.PID.tmp`; pids are
    reused (containers, boots), so a later rotate in a process with that pid must still work."""
    path = key_file(tmp_path)
    ring = KeyRing.load(path, create=True)
    (tmp_path / f".{path.name}.{os.getpid()}.tmp").write_text("half-written")
    assert ring.rotate() == 2
    assert KeyRing.load(path).current == 2


def test_create_survives_a_stale_temporary_file(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    (tmp_path / f".{path.name}.{os.getpid()}.tmp").write_text("half-written")
    ring = KeyRing.load(path, create=True)
    assert KeyRing.load(path).keys == ring.keys


def test_a_key_file_under_a_file_is_a_key_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match=str(blocker / "keys.json")):
        KeyRing.load(blocker / "keys.json", create=True)  # its folder is a file
    with pytest.raises(KeyFileError, match="no file"):
        KeyRing.generate().save()


CORRUPT: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not json", b"not json at all"),
    ("binary", b"\xff\xfe\x00garbage"),
    ("a list", b"[1, 2, 3]"),
    ("no keys", b'{"current": 1, "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("empty keys", b'{"version": 1, "current": 1, "keys": [], "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("bad base64", b'{"current": 1, "keys": [{"id": 1, "secret": "***"}], "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("short key", b'{"current": 1, "keys": [{"id": 1, "secret": "AAAA"}], "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("short salt", b'{"current": 1, "keys": [{"id": 1, "secret": "AAAAAAAAAAAAAAAAAAAAAA=="}], "opt_out_salt": ""}'),
    ("id 0", b'{"current": 0, "keys": [{"id": 0, "secret": "AAAAAAAAAAAAAAAAAAAAAA=="}],'
             b' "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("id too big", b'{"current": 65536, "keys": [{"id": 65536, "secret": "AAAAAAAAAAAAAAAAAAAAAA=="}],'
                   b' "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("keys a string", b'{"current": 1, "keys": "AAAA", "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("secret a number", b'{"current": 1, "keys": [{"id": 1, "secret": 5}],'
                        b' "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}'),
    ("truncated", b'{"current": 1, "keys": [{"id": 1, "secret": "AAAAAAAAAAAAAAAAAAAAAA=="}], "opt_o'),
]


@pytest.mark.parametrize(("name", "content"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_a_corrupt_key_file_is_a_key_file_error_naming_it(tmp_path: Path, name: str, content: bytes) -> None:
    path = key_file(tmp_path)
    path.write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        KeyRing.load(path, create=True)  # create never overwrites a file that exists
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == content


def test_a_key_file_whose_current_key_is_missing_names_the_file(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    path.write_bytes(b'{"current": 2, "keys": [{"id": 1, "secret": "AAAAAAAAAAAAAAAAAAAAAA=="}],'
                     b' "opt_out_salt": "AAAAAAAAAAAAAAAAAAAAAA=="}')
    with pytest.raises(KeyFileError, match=str(path)):
        KeyRing.load(path)


def test_an_unreadable_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    path.mkdir()  # a directory where the file should be (works as root too)
    with pytest.raises(KeyFileError, match=str(path)):
        KeyRing.load(path, create=True)


def test_refresh_keeps_the_keys_when_the_file_goes_bad(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    ring = KeyRing.load(path, create=True)
    token = click_token(Links(ring, "https://t.example.com"))
    keys = dict(ring.keys)
    path.write_bytes(b"garbage")
    assert ring.refresh(every=0) is False
    assert ring.keys == keys
    ring.verify(token, "click")
    path.unlink()
    assert ring.refresh(every=0) is False
    ring.verify(token, "click")
