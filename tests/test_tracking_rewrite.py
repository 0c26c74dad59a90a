"""The MIME rewriter: golden files, link selection, the pixel, charsets, hostile input.

Every rewritten message is checked by an independent checker that does not share code
with the rewriter: the stdlib `email` package decodes both messages, every part must
decode to the same content and headers, except text/html body parts, which may differ
only by href values (each of which must verify as a click token for the original URL)
and one pixel (which must verify as an open token). Separately, the bytes outside the
html body parts (found by a line-based scan) and the top-level header block must be
byte-identical. The golden outputs in fixtures/mime/expected/ are exact (a fixed key and
clock make tokens deterministic); WEBHOOKD_REGEN_GOLDEN=1 rewrites them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email
import email.policy
import html
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from webhookd.tracking.links import Links
from webhookd.tracking.rewrite import OPT_OUT_HEADER, Rewritten, _qp_encode, rewrite_message
from webhookd.tracking.tokens import KeyRing, TokenError

FIXTURES = Path(__file__).parent / "fixtures" / "mime"
EXPECTED = FIXTURES / "expected"
BASE = "https://t.example.com"
RING = KeyRing({1: bytes(range(32))}, 1, bytes(range(32, 64)))
LINKS = Links(RING, BASE, clock=lambda: 1_800_000_000.0)
MID = "<m1@example.com>"
PIXEL = '<img src="{}" width="1" height="1" alt="" style="display:block;width:1px;height:1px;border:0" />'
TRACKED = re.compile(r"""(["']?)https://t\.example\.com/c/([A-Za-z0-9_-]+)\1""")


def tracked(url: str, mid: str = MID, to: str = "") -> str:
    return LINKS.click(mid, url, to)


def pixel(mid: str = MID, to: str = "") -> str:
    return PIXEL.format(LINKS.pixel(mid, to))


# -- the independent checker ------------------------------------------------------------------
def header_block(data: bytes) -> bytes:
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return data[: min(ends)] if ends else data


def skeleton(data: bytes) -> bytes:
    """The message with the body of every non-attachment text/html part replaced by a marker."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    delims = {b"--" + str(p.get_boundary()).encode() for p in msg.walk() if p.is_multipart() and p.get_boundary()}
    out: list[bytes] = []
    state, head = "head", b""
    for line in data.splitlines(keepends=True):
        if line.rstrip(b"\r\n").rstrip(b" \t") in delims | {d + b"--" for d in delims}:
            out += [b"<html body>\n"] if state == "html" else []
            out.append(line)
            state, head = "head", b""
        elif state == "head":
            out.append(line)
            if line.strip(b"\r\n"):
                head += line
                continue
            fields = re.sub(rb"\r?\n[ \t]+", b" ", head).lower()
            is_html = re.search(rb"^content-type:\s*text/html", fields, re.M)
            attached = re.search(rb"^content-disposition:\s*attachment", fields, re.M)
            state = "html" if is_html and not attached else "body"
        elif state == "body":
            out.append(line)
    if state == "html":
        out.append(b"<html body>\n")
    return b"".join(out)


def _href_ok(raw_value: str, url: str) -> bool:
    if len(raw_value) >= 2 and raw_value[0] in "\"'" and raw_value[-1] == raw_value[0]:
        raw_value = raw_value[1:-1]
    elif any(c in raw_value for c in " \t\r\n\"'>"):
        return False
    return html.unescape(raw_value).strip(" \t\r\n\f") == url


def html_diff(old: str, new: str, mid: str, to: str) -> tuple[list[str], int]:
    """The original URLs of the rewritten hrefs, and the pixel count; fails on any other difference."""
    tag = pixel(mid, to)
    token = LINKS.pixel(mid, to).rsplit("/", 1)[1].removesuffix(".gif")
    claims = RING.verify(token, "open")
    assert (claims.message_id, claims.to) == (mid, to)
    pixels = new.count(tag)
    new = new.replace(tag, "")
    literals, urls, raws, pos = [], [], [], 0
    for m in TRACKED.finditer(new):
        try:
            claims = RING.verify(m.group(2), "click")
        except TokenError:
            continue  # not one of ours: ordinary text, compared as such
        assert (claims.message_id, claims.to) == (mid, to)
        literals.append(new[pos : m.start()])
        urls.append(claims.url)
        raws.append(m.group(0))
        pos = m.end()
    literals.append(new[pos:])
    assert old.startswith(literals[0])
    at, changed = len(literals[0]), []
    for i, url in enumerate(urls):
        lit, last = literals[i + 1], i == len(urls) - 1
        k = len(old) - len(lit) if last else old.find(lit, at)
        while k >= at and not (old.startswith(lit, k) and (_href_ok(old[at:k], url) or old[at:k] == raws[i])):
            assert not last, f"html differs after link {i}: {old[at:]!r} vs {lit!r}"
            k = old.find(lit, k + 1)
        assert k >= at, f"html differs around link {i} ({url})"
        if old[at:k] != raws[i]:
            changed.append(url)
        at = k + len(lit)
    assert at == len(old)
    return changed, pixels


def _text(part: Any, payload: Any) -> str:
    assert isinstance(payload, bytes)
    charset = part.get_content_charset() or "us-ascii"
    return payload.decode("utf-8" if charset == "us-ascii" else charset)


def check_message(raw: bytes, out: bytes, mid: str = MID, to: str = "") -> tuple[list[str], int]:
    """The original URLs rewritten and the number of pixels, after checking that nothing else changed."""
    assert header_block(out) == header_block(raw)
    assert skeleton(out) == skeleton(raw)
    old_parts = list(email.message_from_bytes(raw, policy=email.policy.default).walk())
    new_parts = list(email.message_from_bytes(out, policy=email.policy.default).walk())
    assert len(old_parts) == len(new_parts)
    urls: list[str] = []
    pixels = 0
    for a, b in zip(old_parts, new_parts, strict=True):
        assert list(a.raw_items()) == list(b.raw_items())
        if a.is_multipart():
            assert (a.preamble, a.epilogue) == (b.preamble, b.epilogue)
            continue
        before, after = a.get_payload(decode=True), b.get_payload(decode=True)
        if before == after:
            continue
        assert a.get_content_type() == "text/html" and a.get_content_disposition() != "attachment"
        u, p = html_diff(_text(a, before), _text(b, after), mid, to)
        urls += u
        pixels += p
    assert pixels <= 1
    return urls, pixels


def run(raw: bytes, *, mid: str = MID, to: str = "", **kw: Any) -> tuple[Rewritten, list[str]]:
    result = rewrite_message(raw, LINKS, to=to, **kw)
    if not result.changed:
        assert result.data is raw or result.data == raw
        assert result.links == 0 and not result.pixel
        return result, []
    assert result.skipped == ""
    urls, pixels = check_message(raw, result.data, kw.get("message_id") or mid, to)
    assert (result.links, result.pixel) == (len(urls), pixels == 1)
    return result, urls


def html_msg(
    body: str | bytes, *, headers: str = "", ctype: str = "text/html; charset=utf-8", cte: str = "7bit",
    eol: str = "\n", charset: str = "utf-8", encoded: bool = False,
) -> bytes:
    data = body.encode(charset) if isinstance(body, str) else body
    if encoded:
        pass
    elif cte == "quoted-printable":
        data = binascii.b2a_qp(data, istext=False)  # any valid QP will do as input
    elif cte == "base64":
        data = base64.encodebytes(data)
    head = f"From: a@example.com\nTo: b@example.org\nMessage-ID: {MID}\n{headers}MIME-Version: 1.0\n"
    head += f"Content-Type: {ctype}\nContent-Transfer-Encoding: {cte}\n\n"
    return (head.replace("\n", eol)).encode("ascii") + data


def new_html(result: Rewritten) -> str:
    msg = email.message_from_bytes(result.data, policy=email.policy.default)
    part = next(p for p in msg.walk() if p.get_content_type() == "text/html")
    return _text(part, part.get_payload(decode=True))


# -- golden files -----------------------------------------------------------------------------
GOLDEN: dict[str, tuple[str, list[str], bool, str]] = {  # file: to, urls, pixel, skipped
    "quoted_printable.eml": ("alice@example.org", [
        "https://shop.example/produits/veste-impermeable?utm_source=newsletter&utm_medium=email&utm_campaign=automne",
        "https://shop.example/produits/bottes",
        "https://shop.example/unsubscribe?u=42",
    ], True, ""),
    "base64.eml": ("bob@example.org", [
        "https://forum.example.net/t/release-2-0/1234?ref=digest&u=bob", "https://forum.example.net/t/roadmap/1200#post-7",
    ], True, ""),
    "windows1252.eml": ("", [
        "http://cafe-dejavu.example.fr/menu?lang=fr", "http://cafe-dejavu.example.fr/reserver",
    ], True, ""),
    "iso2022jp.eml": ("yamada@example.jp", [
        "https://www.example.co.jp/sale/autumn?id=42&src=mail", "https://www.example.co.jp/unsubscribe",
    ], True, ""),
    "alternative_crlf.eml": ("carol@example.org", [
        "https://billing.example.com/invoices/INV-2024-0042", "https://billing.example.com/account",
    ], True, ""),
    "attachment.eml": ("dave@example.org", ["https://analytics.example/dash?m=2024-10"], True, ""),
    "nested.eml": ("", ["https://studio.example/portfolio?from=mail"], True, ""),
    "signed.eml": ("frank@example.org", [], False, "signed"),
}


def golden(name: str) -> tuple[bytes, Rewritten]:
    raw = (FIXTURES / name).read_bytes()
    to, urls, has_pixel, skipped = GOLDEN[name]
    mid = re.search(rb"^Message-ID:\s*(<[^>]+>)", raw, re.M | re.I)
    assert mid
    result, got = run(raw, mid=mid.group(1).decode(), to=to)
    assert (got, result.pixel, result.skipped) == (urls, has_pixel, skipped)
    return raw, result


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden(name: str) -> None:
    raw, result = golden(name)
    expected = EXPECTED / name
    if not result.changed:
        assert result.data == raw and not expected.exists()
    elif os.environ.get("WEBHOOKD_REGEN_GOLDEN"):
        expected.write_bytes(result.data)
    else:
        assert result.data == expected.read_bytes(), f"{name}: output differs from {expected}"


def _html_body(data: bytes, eol: bytes) -> bytes:
    """The body of the (first) text/html part in a single-part fixture."""
    return data.split(eol + eol, 1)[1]


def test_quoted_printable_fixture() -> None:
    _raw, result = golden("quoted_printable.eml")
    body = _html_body(result.data, b"\r\n")
    assert b"\n" not in body.replace(b"\r\n", b"")  # CRLF only, as the input
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert b"\r\n Bottes" not in body and b"=3D" in body
    # the folded Message-ID header is unfolded for the tokens, brackets kept
    token = TRACKED.search(new_html(result))
    assert token and RING.verify(token.group(2), "click").message_id == "<20241112083000.4XyZ1234@shop.example>"
    assert "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd" in new_html(result)  # not an href


def test_base64_fixture() -> None:
    _raw, result = golden("base64.eml")
    lines = _html_body(result.data, b"\n").split(b"\n")
    assert lines[-1] == b"" and all(len(line) == 76 for line in lines[:-2]) and 0 < len(lines[-2]) <= 76
    assert b"\r" not in result.data
    assert 'href="/t/relative/99"' in new_html(result)
    assert 'href="https://forum.example.net/settings/notifications" data-webhookd-track="no"' in new_html(result)


def test_windows1252_fixture() -> None:
    _raw, result = golden("windows1252.eml")
    body = _html_body(result.data, b"\n")
    assert b"caf\xe9" in body and b"4,50 \x80" in body and b"\x9620" in body and b"l\x92offre" in body
    unquoted = tracked("http://cafe-dejavu.example.fr/reserver", "<1731489300.7788@cafe-dejavu.example.fr>")
    assert f'<a href="{unquoted}">R\xe9server'.encode("cp1252") in body


def test_iso2022jp_fixture() -> None:
    raw, result = golden("iso2022jp.eml")
    assert b"\x1b$B" in raw and b"%;!<%k" in raw  # the JIS bytes of セール contain '<'
    body = _html_body(result.data, b"\r\n")
    assert max(body) < 0x80  # still 7bit
    text = body.decode("iso-2022-jp")
    assert "秋のセール開催中！" in text and "こんにちは、山田太郎様。" in text  # noqa: RUF001
    assert text.count("\r\n") == _html_body(raw, b"\r\n").decode("iso-2022-jp").count("\r\n")


def test_alternative_crlf_fixture() -> None:
    raw, result = golden("alternative_crlf.eml")
    assert b"\n" not in result.data.replace(b"\r\n", b"")
    assert result.data.startswith(raw[: raw.index(b"Content-Type: text/html")])  # everything before the html part
    epilogue = b"------=_Part_12345_678.1731689103--  \r\nThis epilogue is ignored by mail clients.\r\n"
    assert result.data.endswith(epilogue)  # transport padding and epilogue kept


def test_attachment_fixture() -> None:
    raw, result = golden("attachment.eml")
    attached = raw[raw.index(b"--===============8357195428437474592==\nContent-Type: text/html") :]
    assert result.data.endswith(attached)  # the attached .html and the PDF, byte for byte


def test_signed_fixture_is_left_alone() -> None:
    raw, result = golden("signed.eml")
    assert result.data is raw and not result.changed


def test_nested_fixture() -> None:
    raw, result = golden("nested.eml")
    assert '<!-- <a href="https://studio.example/old">old link in a comment</a> -->' in new_html(result)
    assert result.data.endswith(raw[raw.index(b"------=_NextPart_000_001_002--") :])


# -- which links ------------------------------------------------------------------------------
def test_links_left_alone() -> None:
    body = """<html><body>
<a href="mailto:a@b.example">m</a> <a href="tel:+4912345">t</a> <a href="#section">anchor</a>
<a href="/relative/path">rel</a> <a href="relative.html">rel2</a> <a href="//evil.example/x">proto-rel</a>
<a href="javascript:alert(1)">js</a> <a href=" JavaScript:alert(1)">js2</a> <a href="data:text/html,<b>x</b>">data</a>
<a href="{{unsubscribe_url}}">t1</a> <a href="https://example.com/{{token}}">t2</a> <a href="%%unsubscribe%%">t3</a>
<a href="*|UNSUB|*">t4</a> <a href="https://example.com/?u=*|EMAIL|*">t5</a> <a href="{% url 'x' %}">t6</a>
<a href="ftp://files.example/x">ftp</a> <a href="https://no.example/x" data-webhookd-track="NO">opt</a>
<a href="https://t.example.com/c/abc">ours</a> <a href="http:/broken">broken</a> <a href="">empty</a> <a href>none</a>
<a name="x">no href</a> <link href="https://no.example/style.css" rel="stylesheet">
<a href="https://dup.example/1" href="https://dup.example/2">two hrefs</a>
<a href="https://ok.example/1">ok</a> <area shape="rect" coords="0,0,1,1" href="https://ok.example/area">
<a href="HTTPS://OK.EXAMPLE/Upper">upper scheme</a> <a href="  https://ok.example/spaced  ">spaces</a>
<a href="https://ok.example/x" data-webhookd-track="yes">not an opt-out</a>
</body></html>
"""
    _result, urls = run(html_msg(body))
    assert urls == [
        "https://ok.example/1", "https://ok.example/area", "HTTPS://OK.EXAMPLE/Upper", "https://ok.example/spaced",
        "https://ok.example/x",
    ]


def test_attribute_confusion() -> None:
    body = """<body><a data-href="https://no.example/data" hreflang="en" title='see href="https://no.example/t"'
 href="https://ok.example/real">x</a>
<a hreflang="de" data-href="https://no.example/d">no href</a> <a title="href=https://no.example/t2">no href</a>
<a class=href href='https://ok.example/single'>single</a></body>"""
    result, urls = run(html_msg(body))
    assert urls == ["https://ok.example/real", "https://ok.example/single"]
    assert new_html(result) == body.replace(
        "https://ok.example/real", tracked("https://ok.example/real")
    ).replace("https://ok.example/single", tracked("https://ok.example/single")).replace("</body>", pixel() + "</body>")


def test_comments_scripts_and_styles() -> None:
    body = """<html><body><!-- <a href="https://no.example/comment">c</a> </body> -->
<script>document.write('<a href="https://no.example/script">'); var end = "</body>";</script>
<style>a[href="https://no.example/style"] { color: red }</style>
<a href="https://ok.example/real">real</a>
<!--[if mso]><v:roundrect href="https://no.example/vml"></v:roundrect></body><![endif]-->
</body>
<script>var s = "</body>";</script>
</html>"""
    result, urls = run(html_msg(body))
    assert urls == ["https://ok.example/real"]
    expected = body.replace("https://ok.example/real", tracked("https://ok.example/real"))
    expected = expected.replace("\n</body>\n", f"\n{pixel()}</body>\n")
    assert new_html(result) == expected


def test_entities_unescaped_for_signing() -> None:
    body = '<a href="https://ok.example/?a=1&amp;b=2&#38;c=3&quot;d&#x27;">x</a>'
    result, urls = run(html_msg(body), track_opens=False)
    assert urls == ["https://ok.example/?a=1&b=2&c=3\"d'"]
    assert new_html(result) == f'<a href="{html.escape(tracked(urls[0]))}">x</a>'


def test_unquoted_uppercase_and_multiline_tags() -> None:
    body = '<P>x</P>\n<A HREF=https://ok.example/u?x=1&amp;y=2 CLASS=b>u</A>\n<a\n  class="c"\n  href\n =\n \'https://ok.example/nl\'\n>n</a>\n'
    result, urls = run(html_msg(body), track_opens=False)
    assert urls == ["https://ok.example/u?x=1&y=2", "https://ok.example/nl"]
    assert new_html(result) == (
        f'<P>x</P>\n<A HREF="{tracked(urls[0])}" CLASS=b>u</A>\n'
        f"<a\n  class=\"c\"\n  href\n =\n '{tracked(urls[1])}'\n>n</a>\n"
    )


def test_recipient_is_passed_through() -> None:
    result, _urls = run(html_msg('<a href="https://ok.example/">x</a></body>'), to="bob@example.org")
    token = TRACKED.search(new_html(result))
    assert token and RING.verify(token.group(2), "click").to == "bob@example.org"


def test_message_id_argument_wins() -> None:
    _result, urls = run(html_msg('<a href="https://ok.example/">x</a>'), message_id="<other@example.net>")
    assert urls == ["https://ok.example/"]


# -- the pixel --------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "expected"), [
    ("<body>a</body> b </BODY>\n</html>\n", "<body>a</body> b {}</BODY>\n</html>\n"),
    ("<html><p>x</p></html>\n", "<html><p>x</p>{}</html>\n"),
    ("<p>x</p>\n\n", "<p>x</p>{}\n\n"),
    ("", "{}"),
    ("<p>x <!-- </body> --></p>\n", "<p>x <!-- </body> --></p>{}\n"),
])
def test_pixel_placement(body: str, expected: str) -> None:
    result, _ = run(html_msg(body))
    assert result.pixel and new_html(result) == expected.format(pixel())


def test_track_flags() -> None:
    raw = html_msg('<a href="https://ok.example/">x</a></body>')
    assert run(raw, track_opens=False)[0].pixel is False
    result, urls = run(raw, track_clicks=False)
    assert result.pixel and urls == []
    result, _ = run(raw, track_opens=False, track_clicks=False)
    assert result.skipped == "tracking disabled"


def test_one_pixel_for_several_html_parts() -> None:
    raw = b"""Message-ID: <m1@example.com>
Content-Type: multipart/alternative; boundary=b

--b
Content-Type: text/html

<body><a href="https://ok.example/1">1</a></body>
--b
Content-Type: text/html

<body><a href="https://ok.example/2">2</a></body>
--b--
"""
    result, urls = run(raw)
    assert urls == ["https://ok.example/1", "https://ok.example/2"] and result.pixel
    second = result.data.rindex(b"--b\nContent-Type: text/html\n\n<body><a")
    assert result.data.index(LINKS.pixel(MID).encode()) < second


def test_pixel_goes_to_the_first_html_part_that_can_be_rewritten() -> None:
    raw = b"""Message-ID: <m1@example.com>
Content-Type: multipart/mixed; boundary=b

--b
Content-Type: text/html; charset=x-klingon

<body><a href="https://no.example/">1</a></body>
--b
Content-Type: text/html

<body><a href="https://ok.example/2">2</a></body>
--b--
"""
    result, urls = run(raw)
    assert urls == ["https://ok.example/2"] and result.pixel
    assert result.data.index(LINKS.pixel(MID).encode()) > raw.index(b"x-klingon")


def test_api_shape() -> None:
    assert [f.name for f in dataclasses.fields(Rewritten)] == ["data", "changed", "links", "pixel", "skipped"]
    assert Rewritten(b"", False, 0, False).skipped == "" and OPT_OUT_HEADER == "X-Webhookd-Track"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Rewritten(b"", False, 0, False).links = 1  # type: ignore[misc]


def test_rewriting_twice_changes_nothing() -> None:
    first = rewrite_message((FIXTURES / "quoted_printable.eml").read_bytes(), LINKS)
    second = rewrite_message(first.data, LINKS)
    assert first.changed and not second.changed and second.skipped == "already tracked"


def test_lf_only_quoted_printable() -> None:
    body = "<p>" + "é" * 60 + '<a href="https://ok.example/' + "x" * 100 + '">x</a></p>\n</body>\n'
    result, urls = run(html_msg(body, cte="quoted-printable"))
    assert b"\r" not in result.data and urls
    assert max(len(line) for line in result.data.split(b"\n")) <= 76


# -- leaving messages alone -------------------------------------------------------------------
@pytest.mark.parametrize("value", ["no", "OFF", " False ", "0"])
def test_opt_out_header(value: str) -> None:
    raw = html_msg('<a href="https://ok.example/">x</a>', headers=f"{OPT_OUT_HEADER}: {value}\n")
    result = rewrite_message(raw, LINKS)
    assert result.data is raw and result.skipped == "opt-out header"


def test_opt_out_header_yes_tracks() -> None:
    assert run(html_msg('<a href="https://ok.example/">x</a>', headers=f"{OPT_OUT_HEADER}: yes\n"))[0].changed


@pytest.mark.parametrize("raw", [
    b"Content-Type: text/html\n\n<a href='https://ok.example/'>x</a>",
    b"Message-ID:   \nContent-Type: text/html\n\n<a href='https://ok.example/'>x</a>",
    b"",
])
def test_no_message_id(raw: bytes) -> None:
    assert rewrite_message(raw, LINKS).skipped == "no message-id"


@pytest.mark.parametrize(("raw", "skipped"), [
    (html_msg("<a href='https://ok.example/'>x</a>", ctype="text/plain"), "no html part"),
    (html_msg("<a href='https://ok.example/'>x</a>", headers="Content-Disposition: attachment; filename=a.html\n"),
     "no html part"),
    (html_msg(b"Content-Type: text/html\n\n<a href='https://ok.example/'>x</a>", ctype="message/rfc822"),
     "no html part"),
    (html_msg(b"xx", ctype="application/pkcs7-mime; smime-type=enveloped-data"), "encrypted"),
    (html_msg(b"xx", ctype="application/pkcs7-mime; smime-type=signed-data"), "signed"),
    (html_msg(b"--b\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n--b--\n",
              ctype='multipart/encrypted; protocol="application/pgp-encrypted"; boundary=b'), "encrypted"),
    (html_msg("<a href='https://ok.example/'>x</a>", charset="utf-8", ctype="text/html; charset=x-unknown"),
     "unknown charset"),
    (html_msg("<a href='https://ok.example/'>x</a>", ctype="text/html; charset=base64"), "unknown charset"),
    (html_msg(b"<a href='https://ok.example/'>\xff\xfe</a>"), "charset round-trip"),
    (html_msg(b"<a href='https://ok.example/'>\x1b(Jabc\x1b(B</a>", ctype="text/html; charset=iso-2022-jp"),
     "charset round-trip"),
    (html_msg(b"begin 644 x\n`\nend\n", cte="x-uuencode", encoded=True), "unknown transfer encoding"),
    (html_msg(b"PGE+*not base64*\n", cte="base64", encoded=True), "bad base64"),
    (html_msg("<p>" + "x" * 900 + "<a href='https://ok.example/'>x</a></p>"), "line too long"),
    (html_msg("<p>plain</p>", headers=""), ""),  # the pixel alone is a change
])
def test_left_alone(raw: bytes, skipped: str) -> None:
    result = rewrite_message(raw, LINKS, track_opens=skipped != "")
    if skipped:
        assert result.data is raw and not result.changed and result.skipped == skipped
    else:
        assert result.skipped == "nothing to rewrite" and result.data is raw


def test_signed_part_inside_mixed_is_left_alone() -> None:
    raw = b"""Message-ID: <m1@example.com>
Content-Type: multipart/mixed; boundary=outer

--outer
Content-Type: text/html

<a href="https://ok.example/1">1</a></body>
--outer
Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=s

--s
Content-Type: text/html

<a href="https://no.example/signed">2</a></body>
--s
Content-Type: application/pgp-signature

-----BEGIN PGP SIGNATURE-----
--s--
--outer--
"""
    result, urls = run(raw)
    assert urls == ["https://ok.example/1"] and result.data.endswith(raw[raw.index(b"--outer\nContent-Type: multi") :])


@pytest.mark.parametrize(("charset", "cte"), [
    ("shift_jis", "8bit"), ("shift_jis", "base64"), ("iso-8859-1", "quoted-printable"), ("iso-8859-1", "8bit"),
    ("utf-8", "quoted-printable"), ("windows-1252", "base64"), ("iso-2022-jp", "7bit"), ("us-ascii", "7bit"),
])
def test_charsets(charset: str, cte: str) -> None:
    text = {"shift_jis": "ソフト表示", "iso-8859-1": "Grüße, ça va", "utf-8": "Ünïcødé ✓", "windows-1252": "€ “quotes”",
            "iso-2022-jp": "セール", "us-ascii": "plain"}[charset]
    body = f'<html><body><p>{text}</p><a href="https://ok.example/{charset}">{text}</a>\n</body></html>\n'
    result, urls = run(html_msg(body, charset=charset, ctype=f"text/html; charset={charset}", cte=cte))
    assert urls == [f"https://ok.example/{charset}"] and result.pixel
    assert text in new_html(result)


# -- hostile input ----------------------------------------------------------------------------
def _nested(depth: int) -> bytes:
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth))
    tail = b"".join(b"\n--b%d--\n" % i for i in reversed(range(depth)))
    leaf = b"Content-Type: text/html\n\n<a href='https://ok.example/'>x</a>"
    return b"Message-ID: <m1@example.com>\n" + head + leaf + tail


def _siblings(n: int) -> bytes:
    part = b"--b\nContent-Type: text/html\n\n<a href='https://ok.example/'>x</a>\n"
    return b"Message-ID: <m1@example.com>\nContent-Type: multipart/mixed; boundary=b\n\n" + part * n + b"--b--\n"


MULTI = b"""Message-ID: <m1@example.com>
Content-Type: multipart/alternative; boundary="b"

--b
Content-Type: text/html

<a href="https://ok.example/">x</a></body>
--b--
"""
HOSTILE: dict[str, tuple[Callable[[], bytes], set[str]]] = {
    "truncated multipart": (lambda: MULTI[: MULTI.index(b"</body>")], {"unparseable"}),
    "boundary never closed": (lambda: MULTI.replace(b"--b--", b"--b"), {"unparseable"}),
    "boundary never used": (lambda: MULTI.replace(b'boundary="b"', b'boundary="zz"'), {"unparseable"}),
    "no boundary parameter": (lambda: MULTI.replace(b'; boundary="b"', b""), {"unparseable"}),
    "boundary only as a prefix": (lambda: MULTI.replace(b"--b--", b"--bb--"), {"unparseable"}),
    "non-ascii boundary": (lambda: MULTI.replace(b'boundary="b"', b'boundary="\xff\xfe"'), {"unparseable"}),
    "rfc 2231 boundary": (
        lambda: MULTI.replace(b'boundary="b"', b"boundary*0=zz; boundary*1*=utf-8''%FF%FE"), {"unparseable"},
    ),
    "10k siblings": (lambda: _siblings(10_000), {"too many parts"}),
    "10k levels": (lambda: _nested(10_000), {"too deep"}),
    "giant header line": (
        lambda: b"Message-ID: <m1@example.com>\nSubject: " + b"A" * 2_000_000 + b"\n\nbody", {"no html part"},
    ),
    "giant content-type": (lambda: html_msg(b"x", ctype="text/html" + "; a=b" * 100_000), {"unparseable"}),
    "headers only": (
        lambda: b"Message-ID: <m1@example.com>\nContent-Type: text/html\n<a href='https://ok.example/'>",
        {"no html part"},
    ),
    "too large": (lambda: b"Message-ID: <m1@example.com>\n\n" + b"x" * (50 * 1024 * 1024), {"too large"}),
    "html part too large": (lambda: html_msg("<p>" + "x" * 4 * 1024 * 1024), {"html part too large"}),
    "unclosed tags": (lambda: html_msg("<a " * 100_000), {"unparseable html"}),
    "bogus marked sections": (lambda: html_msg("<![" * 1000), {"unparseable html"}),
    "long message id": (lambda: b"Message-ID: <" + b"x" * 2000 + b">\n\n", {"bad message-id"}),
    "non-utf-8 message id": (lambda: b"Message-ID: <\xff@x>\n\n", {"bad message-id"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_left_alone(name: str) -> None:
    make, reasons = HOSTILE[name]
    raw = make()
    result = rewrite_message(raw, LINKS)
    assert result.data is raw and not result.changed and result.skipped in reasons, result.skipped


def test_garbage_never_raises() -> None:
    rnd = random.Random(12)
    pieces = [b"--b\n", b"--b--\n", b"\n", b"\r\n", b"Content-Type: multipart/mixed; boundary=b\n",
              b"Content-Type: text/html; charset=utf-8\n", b"Content-Transfer-Encoding: base64\n", b"<a href='http://x.y/'>",
              b"</body>", b"=\n", b"\xff\xfe\x00", b"Message-ID: <g@x>\n"]
    for _ in range(300):
        raw = b"Message-ID: <g@x>\n" + b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(40)))
        raw += rnd.randbytes(rnd.randrange(50))
        result = rewrite_message(raw, LINKS)
        assert result.data == raw or result.changed
        if result.changed:
            assert header_block(result.data) == header_block(raw)


def test_exceptions_become_skips() -> None:
    class Broken(Links):
        def click(self, message_id: str, url: str, to: str = "") -> str:
            raise RuntimeError("boom")

    raw = html_msg('<a href="https://ok.example/">x</a>')
    result = rewrite_message(raw, Broken(RING, BASE))
    assert result.data is raw and result.skipped == "error: RuntimeError"


# -- properties -------------------------------------------------------------------------------
_text_st = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="<&\x00"), max_size=30)
_url_st = st.one_of(
    st.builds("https://{}.example/{}?q={}".format, st.sampled_from(["a", "b-c", "x1"]),
              st.text("abc/é%-", max_size=10), st.text("1&=é", max_size=5)),
    st.sampled_from(["mailto:x@y.example", "#top", "/rel", "javascript:void(0)", "{{url}}", "HTTP://UP.EXAMPLE/",
                     "https://t.example.com/c/xyz", " https://sp.example/ ", ""]),
)


@st.composite
def _link(draw: st.DrawFn) -> str:
    url = html.escape(draw(_url_st), quote=False)
    quote = draw(st.sampled_from(['"', "'", ""]))
    if not quote and (not url or any(c in url for c in " '\"=<>`")):
        quote = '"'
    attr = draw(st.sampled_from(["href", "HREF", "Href"]))
    extra = draw(st.sampled_from(["", ' class="x"', " data-href='https://no.example/'", ' hreflang=en', "\n"]))
    tag = draw(st.sampled_from(["a", "A", "area"]))
    return f"<{tag}{extra} {attr}={quote}{url}{quote}>{draw(_text_st)}</{tag}>"


_fragment_st = st.one_of(
    _text_st, _link(), st.sampled_from([
        "<p>", "</p>", "<br/>", "\n", "\r\n", "<!-- <a href='https://c.example/'> -->", "</body>", "<BODY>",
        "<script>var a = '<a href=\"https://s.example/\">';</script>", "&amp;", "&nbsp;", "<img src='cid:x'>",
    ]),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_fragment_st, max_size=25), st.sampled_from(["7bit", "8bit", "quoted-printable", "base64"]),
       st.sampled_from(["\n", "\r\n"]), st.sampled_from(["utf-8", "iso-8859-1", "shift_jis"]))
def test_property_only_hrefs_and_pixel_change(fragments: list[str], cte: str, eol: str, charset: str) -> None:
    # 7bit/8bit lines must stay under 998 bytes (or the part is left alone): one fragment a line
    body = ("\n" if cte in ("7bit", "8bit") else "").join(fragments)
    try:
        body.encode(charset)
    except UnicodeEncodeError:
        body = body.encode(charset, "ignore").decode(charset)
    raw = html_msg(body, cte=cte, eol=eol, charset=charset, ctype=f"text/html; charset={charset}")
    result, _urls = run(raw)
    assert result.changed and result.pixel
    if cte == "quoted-printable":
        assert max(len(line.rstrip(b"\r")) for line in result.data.split(b"\n")) <= 76


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"\n", b"\r\n"]))
def test_property_quoted_printable_round_trips(data: bytes, eol: bytes) -> None:
    encoded = _qp_encode(data, eol)
    assert binascii.a2b_qp(encoded) == data
    lines = encoded.split(eol)
    assert all(len(line) <= 76 and b"\r" not in line and b"\n" not in line for line in lines)
    assert all(not line.endswith((b" ", b"\t")) for line in lines)
