"""The MIME rewriter: tracked hrefs and the open pixel in text/html parts, nothing else.

Byte preservation is the point: a milter may only replace the body, and DKIM signs the
headers (and, usually, the body as it leaves here). So nothing is ever re-serialised:

1. A small byte-level MIME walker finds the *body spans* (start, end offsets into the raw
   message) of the text/html parts worth rewriting. It reads headers itself (the `email`
   package only parses Content-Type / Content-Disposition parameters) and splits multipart
   bodies on delimiter lines exactly as RFC 2046 says: a delimiter starts a line, the line
   break before it belongs to it, ``--boundary--`` closes, transport padding may follow.
   Anything it cannot split cleanly leaves the whole message alone.
2. Each such span is decoded (transfer encoding, then charset), edited as a str and
   encoded back in the part's own charset and transfer encoding (7bit/8bit/binary as is,
   quoted-printable with the part's line ending and lines of at most 76 characters, base64
   with the original's line length). A part whose charset does not round-trip exactly is
   left alone.
3. The HTML is never re-serialised either: `html.parser.HTMLParser` only *locates* tags
   (``getpos()`` + ``get_starttag_text()``, mapped to offsets in the decoded text); the
   href value's span inside the original tag text is found with the parser's own attribute
   grammar, cross-checked against the attributes the parser reported, and replaced. The
   pixel is inserted before the last ``</body>`` the parser saw (not one inside a comment
   or a script).
4. The output is the input with those spans replaced: the top-level header block, every
   boundary, preamble, epilogue, other part and line ending are the input's own bytes.

Any doubt (signed or encrypted content, attachments, unknown charsets or encodings,
malformed MIME, an exception) means: return the input unchanged, saying why.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
from dataclasses import dataclass
from email.message import Message
from html.parser import HTMLParser

from webhookd.tracking.links import Links
from webhookd.tracking.tokens import MAX_MESSAGE_ID_CHARS, check_url

OPT_OUT_HEADER = "X-Webhookd-Track"  # "no"/"off"/"false"/"0": leave the message alone
MAX_MESSAGE_BYTES = 50 * 1024 * 1024
MAX_HTML_BYTES = 4 * 1024 * 1024  # one html part, encoded (html.parser reads ~1 MB/s); bigger ones are left alone
MAX_DEPTH = 32  # multipart nesting
MAX_PARTS = 1000
MAX_PARAM_CHARS = 16384  # a Content-Type longer than this is hostile (the email param parser is quadratic)
MAX_TAIL_WORK = 2_000_000  # see _edit_html
MAX_LINE = 998  # RFC 5322: an 8bit/7bit part is not made to exceed it
PIXEL_TAG = '<img src="{}" width="1" height="1" alt="" style="display:block;width:1px;height:1px;border:0" />'

_NO = frozenset({"no", "off", "false", "0"})
_PLACEHOLDERS = ("{{", "{%", "%%", "*|")
_HTML_SPACE = " \t\n\r\f"
_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.MULTILINE)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# The attribute grammar of Python 3.11's html.parser (tagfind_tolerant, attrfind_tolerant).
# Results are cross-checked against the parser's own attrs, so a different grammar in a
# later Python can only make a tag be left alone, never mis-edited.
_TAG_NAME = re.compile(r"([a-zA-Z][^\t\n\r\f />\x00]*)(?:\s|/(?!>))*")
_ATTR = re.compile(
    r"((?<=['\"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*('[^']*'|\"[^\"]*\"|(?!['\"])[^>\s]*))?(?:\s|/(?!>))*"
)


@dataclass(frozen=True, slots=True)
class Rewritten:
    data: bytes  # the whole message (headers + body), == input when nothing changed
    changed: bool
    links: int  # hrefs rewritten
    pixel: bool  # pixel inserted
    skipped: str = ""  # why the message (or nothing) was left alone


class _Skip(Exception):
    """Leave the whole message alone; the message is the reason."""


class _Unparseable(Exception):
    """Leave this html part alone: html.parser gave up, or would take too long."""


@dataclass(frozen=True, slots=True)
class _HtmlPart:
    start: int  # body span in the raw message
    end: int
    cte: str
    charset: str
    eol: bytes


# -- MIME walker ------------------------------------------------------------------------------
def _head(data: bytes, start: int, end: int) -> tuple[int, dict[str, bytes]]:
    """Where the body starts (-1: no empty line, so no body), and the header fields
    (first occurrence, lower-case name → unfolded value)."""
    if data.startswith(b"\r\n", start, end):
        body = start + 2
    elif data.startswith(b"\n", start, end):
        body = start + 1
    else:
        crlf, lf = data.find(b"\n\r\n", start, end), data.find(b"\n\n", start, end)
        ends = [i + n for i, n in ((crlf, 3), (lf, 2)) if i >= 0]
        body = min(ends) if ends else -1
    fields: dict[str, bytes] = {}
    for m in _FIELD.finditer(data, start, end if body < 0 else body):
        fields.setdefault(m.group(1).decode("ascii").lower(), _FOLD.sub(b"", m.group(2)).strip())
    return body, fields


def _params(name: str, value: bytes) -> Message:
    """A header's value parsed by the email package (for its parameters), never serialised."""
    if len(value) > MAX_PARAM_CHARS:
        raise _Skip("unparseable")
    msg = Message()
    msg[name] = value.decode("ascii", "surrogateescape")
    return msg


def _eol(body: bytes, default: bytes) -> bytes:
    return b"\r\n" if b"\r\n" in body else b"\n" if b"\n" in body else default


class _Walker:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.eol = _eol(data[: data.find(b"\n") + 1], b"\r\n")
        self.parts = 0
        self.html: list[_HtmlPart] = []
        self.notes: list[str] = []  # subtrees left alone, and why

    def walk(self, start: int, end: int, depth: int = 0) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _Skip("too many parts")
        if depth > MAX_DEPTH:
            raise _Skip("too deep")
        body, fields = _head(self.data, start, end)
        if body < 0:
            return  # headers only: nothing to rewrite (and nothing to split)
        ct = _params("Content-Type", fields.get("content-type", b""))
        ctype = ct.get_content_type()
        if ctype == "multipart/signed" or (
            ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime")
            and str(ct.get_param("smime-type", "")).lower() == "signed-data"
        ):
            self.notes.append("signed")
        elif ctype in ("multipart/encrypted", "application/pkcs7-mime", "application/x-pkcs7-mime"):
            self.notes.append("encrypted")
        elif _params("Content-Disposition", fields.get("content-disposition", b"")).get_content_disposition() == (
            "attachment"
        ):
            self.notes.append("attachment")
        elif ct.get_content_maintype() == "multipart":
            boundary = ct.get_boundary()
            if not boundary:
                raise _Skip("unparseable")
            try:
                delimiter = b"--" + boundary.encode("ascii", "surrogateescape")
            except UnicodeError:
                raise _Skip("unparseable") from None
            for s, e in self._split(body, end, delimiter):
                self.walk(s, e, depth + 1)
        elif ctype == "text/html":
            cte = fields.get("content-transfer-encoding", b"7bit").decode("ascii", "replace").strip().lower()
            charset = ct.get_content_charset() or "us-ascii"
            self.html.append(_HtmlPart(body, end, cte, charset, _eol(self.data[body:end], self.eol)))

    def _split(self, start: int, end: int, delimiter: bytes) -> list[tuple[int, int]]:
        """The body parts of a multipart body, as spans (RFC 2046 section 5.1.1)."""
        data, part_start, pos = self.data, -1, start
        parts: list[tuple[int, int]] = []
        while True:
            i = data.find(delimiter, pos, end)
            if i < 0:
                raise _Skip("unparseable")  # no close delimiter: do not guess
            j = pos = i + len(delimiter)
            if i > start and data[i - 1] != 0x0A:
                continue  # not at the start of a line
            close = data.startswith(b"--", j, end)
            j += 2 if close else 0
            while j < end and data[j] in b" \t":
                j += 1  # transport padding
            if data.startswith(b"\r\n", j, end):
                line_end = j + 2
            elif data.startswith(b"\n", j, end) or j == end:
                line_end = min(j + 1, end)
            else:
                continue  # "--boundary" followed by something else is not a delimiter
            if part_start >= 0:  # the line break before the delimiter belongs to the delimiter
                crlf = data[i - 2 : i] == b"\r\n" and i - 2 >= start
                parts.append((part_start, max(part_start, i - (2 if crlf else 1))))
            if close:
                return parts
            part_start = pos = line_end


# -- HTML -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Attr:
    name: str  # lower case
    value: str | None  # unescaped, as the parser reports it
    span: tuple[int, int]  # of the raw value in the tag text, quotes included
    quote: str  # '"', "'" or "" (unquoted)


def _attributes(tag_text: str) -> list[_Attr]:
    m = _TAG_NAME.match(tag_text, 1)
    if not m:
        return []
    attrs: list[_Attr] = []
    k = m.end()
    while k < len(tag_text):
        m = _ATTR.match(tag_text, k)
        if not m:
            break
        raw, quote = m.group(3), ""
        value: str | None = None
        if m.group(2):
            value = raw
            if raw[:1] in ("'", '"') and raw[:1] == raw[-1:] and len(raw) >= 2:
                quote, value = raw[0], raw[1:-1]
            value = html.unescape(value) if value else value
        attrs.append(_Attr(m.group(1).lower(), value, m.span(3), quote))
        k = m.end()
    return attrs


class _Scanner(HTMLParser):
    """Records where the <a>/<area>/<img> start tags and the </body>, </html> end tags are."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text = text
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self.tags: list[tuple[int, str, list[_Attr]]] = []  # offset, tag name, attributes
        self.ends: dict[str, int] = {}  # "body"/"html" → offset of the last such end tag

    def _offset(self) -> int:
        line, col = self.getpos()
        return self.line_starts[line - 1] + col

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in ("a", "area", "img"):
            return
        tag_text, offset = self.get_starttag_text() or "", self._offset()
        parsed = _attributes(tag_text)
        if self.text.startswith(tag_text, offset) and [(a.name, a.value) for a in parsed] == attrs:
            self.tags.append((offset, tag, parsed))  # otherwise: not sure where it is, leave it

    def handle_endtag(self, tag: str) -> None:
        if tag in ("body", "html"):
            offset = self._offset()
            if self.text.startswith("</", offset):
                self.ends[tag] = offset


def _is_no(value: str | None) -> bool:
    return (value or "").strip().lower() in _NO


@dataclass(slots=True)
class _Context:
    links: Links
    message_id: str
    to: str
    clicks: bool

    def under_base(self, url: str) -> bool:
        base, url = self.links.base_url.lower(), url.lower()
        return url == base or url.startswith(base + "/")

    def tracked(self, value: str | None) -> str | None:
        """The tracked form of an href value, or None to leave it alone."""
        url = (value or "").strip(_HTML_SPACE)
        if not url or any(p in url.lower() for p in _PLACEHOLDERS) or self.under_base(url):
            return None
        try:
            return self.links.click(self.message_id, check_url(url), self.to)
        except ValueError:
            return None


def _edit_html(text: str, ctx: _Context, pixel_url: str | None) -> tuple[str, int, bool, bool]:
    """The edited text, hrefs rewritten, pixel inserted, and whether our pixel was already there."""
    scanner = _Scanner(text)
    scanner.feed(text)
    # feed() is linear; close() rescans an unterminated tail once per '<' in it (quadratic in
    # Python 3.11). A real document leaves (almost) nothing unterminated.
    rest = scanner.rawdata
    if rest.count("<") * len(rest) > MAX_TAIL_WORK:
        raise _Unparseable
    scanner.close()
    edits: list[tuple[int, int, str]] = []
    has_pixel = False
    for offset, tag, attrs in scanner.tags:
        if tag == "img":
            src = next((a.value for a in attrs if a.name == "src"), None) or ""
            has_pixel = has_pixel or src.strip(_HTML_SPACE).lower().startswith(ctx.links.base_url.lower() + "/o/")
            continue
        hrefs = [a for a in attrs if a.name == "href"]
        if not ctx.clicks or len(hrefs) != 1 or any(a.name == "data-webhookd-track" and _is_no(a.value) for a in attrs):
            continue
        new = ctx.tracked(hrefs[0].value)
        if new is None:
            continue
        start, end = hrefs[0].span
        if hrefs[0].quote:
            edits.append((offset + start + 1, offset + end - 1, html.escape(new)))
        else:
            edits.append((offset + start, offset + end, f'"{html.escape(new)}"'))
    nlinks = len(edits)
    pixel = pixel_url is not None and not has_pixel
    if pixel and pixel_url is not None:
        at = scanner.ends.get("body", scanner.ends.get("html", len(text.rstrip(_HTML_SPACE))))
        edits.append((at, at, PIXEL_TAG.format(html.escape(pixel_url))))
    out: list[str] = []
    pos = 0
    for start, end, new in sorted(edits):
        out += [text[pos:start], new]
        pos = end
    out.append(text[pos:])
    return "".join(out), nlinks, pixel, has_pixel


# -- transfer encodings -----------------------------------------------------------------------
def _qp_encode(data: bytes, eol: bytes, width: int = 76) -> bytes:
    """Quoted-printable: hard line breaks are `eol`, any other CR/LF is escaped, lines ≤ 76.

    binascii's encoder (C) does each line: with istext=False it escapes CR and LF, the
    only line breaks it writes are its soft ones ("=\\n", since "=" itself is always
    escaped), and it escapes whitespace at the end of a line.
    """
    if width != 76:
        raise ValueError("binascii.b2a_qp writes lines of 76 characters")
    return eol.join(binascii.b2a_qp(line, istext=False).replace(b"=\n", b"=" + eol) for line in data.split(eol))


def _b64_encode(data: bytes, original: bytes, eol: bytes) -> bytes:
    """Base64 with the original's line length (76 when it has a single line or an odd one)."""
    core = original.strip(b" \t\r\n")
    lead = original[: len(original) - len(original.lstrip(b" \t\r\n"))] if core else b""
    trail = original[len(original.rstrip(b" \t\r\n")) :] if core else original
    rows = core.split(b"\n")
    width = len(rows[0].rstrip(b" \t\r")) if len(rows) > 1 else 76
    width = width if 4 <= width <= 76 and width % 4 == 0 else 76
    encoded = base64.b64encode(data)
    return lead + eol.join(encoded[i : i + width] for i in range(0, len(encoded), width)) + trail


def _longest_line(data: bytes) -> int:
    return max(map(len, re.split(rb"\r?\n", data)))


def _rewrite_part(body: bytes, part: _HtmlPart, ctx: _Context, pixel_url: str | None) -> tuple[bytes, int, bool] | str:
    """The new body, hrefs rewritten and pixel inserted; or why the part is left alone."""
    if len(body) > MAX_HTML_BYTES:
        return "html part too large"
    if part.cte in ("7bit", "8bit", "binary"):
        decoded = body
    elif part.cte == "quoted-printable":
        decoded = binascii.a2b_qp(body)
    elif part.cte == "base64":
        try:
            decoded = base64.b64decode(re.sub(rb"[ \t\r\n]+", b"", body), validate=True)
        except binascii.Error:
            return "bad base64"
    else:
        return "unknown transfer encoding"
    charset = "utf-8" if part.charset in ("us-ascii", "ascii") else part.charset
    try:
        text = decoded.decode(charset)
        if text.encode(charset) != decoded:
            return "charset round-trip"
    except LookupError:
        return "unknown charset"
    except UnicodeError:
        return "charset round-trip"
    try:
        new_text, nlinks, pixel, has_pixel = _edit_html(text, ctx, pixel_url)
    except (_Unparseable, AssertionError):  # 3.11's _markupbase asserts on some bogus markup
        return "unparseable html"
    if new_text == text:
        return "already tracked" if has_pixel else "nothing to rewrite"
    new = new_text.encode(charset)
    if part.cte == "quoted-printable":
        return _qp_encode(new, part.eol), nlinks, pixel
    if part.cte == "base64":
        return _b64_encode(new, body, part.eol), nlinks, pixel
    if part.cte != "binary" and _longest_line(new) > MAX_LINE >= _longest_line(body):
        return "line too long"
    return new, nlinks, pixel


# -- the message ------------------------------------------------------------------------------
def rewrite_message(
    raw: bytes, links: Links, *, to: str = "", message_id: str | None = None,
    track_opens: bool = True, track_clicks: bool = True,
) -> Rewritten:
    """`raw` with tracked hrefs and the pixel in its text/html parts; never raises."""
    try:
        return _rewrite(raw, links, to, message_id, track_opens, track_clicks)
    except _Skip as skip:
        return Rewritten(raw, False, 0, False, str(skip))
    except Exception as exc:  # hostile input must never stop the mail
        return Rewritten(raw, False, 0, False, f"error: {type(exc).__name__}")


def _rewrite(
    raw: bytes, links: Links, to: str, message_id: str | None, track_opens: bool, track_clicks: bool
) -> Rewritten:
    if len(raw) > MAX_MESSAGE_BYTES:
        raise _Skip("too large")
    _, top = _head(raw, 0, len(raw))
    if _is_no(top.get(OPT_OUT_HEADER.lower(), b"").decode("ascii", "replace")):
        raise _Skip("opt-out header")
    if message_id is None:
        try:
            message_id = top.get("message-id", b"").decode("utf-8")
        except UnicodeError:
            raise _Skip("bad message-id") from None
    if not message_id:
        raise _Skip("no message-id")
    if len(message_id) > MAX_MESSAGE_ID_CHARS:
        raise _Skip("bad message-id")
    if not (track_opens or track_clicks):
        raise _Skip("tracking disabled")
    walker = _Walker(raw)
    walker.walk(0, len(raw))
    if not walker.html:
        raise _Skip(next((n for n in walker.notes if n != "attachment"), "no html part"))
    ctx = _Context(links, message_id, to, track_clicks)
    pixel_url = links.pixel(message_id, to) if track_opens else None
    out: list[bytes] = []
    notes: list[str] = []
    pos, nlinks, pixel = 0, 0, False
    for part in walker.html:
        result = _rewrite_part(raw[part.start : part.end], part, ctx, pixel_url)
        if isinstance(result, str):
            notes.append(result)
            if result in ("already tracked", "nothing to rewrite"):
                pixel_url = None  # this part was the message body: the pixel belongs here, or nowhere
            continue
        body, n, added = result
        out += [raw[pos : part.start], body]
        pos, nlinks, pixel, pixel_url = part.end, nlinks + n, pixel or added, None
    if not out:
        raise _Skip(notes[0])
    out.append(raw[pos:])
    return Rewritten(b"".join(out), True, nlinks, pixel)
