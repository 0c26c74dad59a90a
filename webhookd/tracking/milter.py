"""The Postfix milter: tracked links and the pixel put into HTML mail as Postfix accepts it.

`webhookd tracking milter` serves the milter protocol (pymilter, on libmilter's threaded
runtime) on `tracking.milter_socket` (``inet:PORT@HOST`` or ``unix:/PATH``). For each
message it collects the envelope recipients, the header fields as Postfix hands them
over and the body, then runs the same rewriter as `webhookd tracking rewrite`
(rewrite.py) on the reassembled message and, when that changed anything, replaces the
body. The rewriter leaves the top-level header block byte for byte as it was, so the
body is all there is to replace: this milter asks for CHGBODY and no other action.

List it *before* the DKIM milter in smtpd_milters / non_smtpd_milters: Postfix gives
each milter the message as the milters before it left it, so the signer signs the
tracked body (docs/mta/postfix-tracking.md; tests/test_mta_tracking.py proves it with
OpenDKIM and dkimpy).

It fails open. Any error in a callback is logged (never the message's content, never a
token) and the message is accepted unchanged; `milter_default_action = accept` in
Postfix does the same when the milter is down. What it leaves alone: mail from the null
sender (bounces and other notices), messages over 50 MiB, and whatever the rewriter
skips (an opt-out header, signed or encrypted parts, no HTML). A recipient goes into the
tokens only when the message has exactly one envelope recipient; otherwise the links
carry the message id alone.

The key ring is read at start (created when there is none, as the daemon does) and
re-read when `webhookd tracking rotate-key` changes the file.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from webhookd.config import Config, TrackingConfig
from webhookd.tracking.links import Links
from webhookd.tracking.tokens import KeyFileError, KeyRing

NAME = "webhookd-tracking"
MAX_MESSAGE_BYTES = 50 * 1024 * 1024  # past it the message passes unchanged
TIMEOUT = 600  # seconds libmilter waits on Postfix before giving up a connection
SOCKET_MODE = 0o660  # a unix socket: the owner and its group (grant Postfix by group)

EX_OK, EX_FAIL, EX_USAGE, EX_CONFIG = 0, 1, 2, 78

log = structlog.get_logger("webhookd.tracking.milter")

_SOCKET = re.compile(r"(?P<inet>inet6?):(?P<port>[0-9]{1,5})@(?P<host>[^\s@]+)|(?:unix|local):(?P<path>/\S+)")
_F = TypeVar("_F", bound=Callable[..., Any])


class MilterSetupError(Exception):
    """Why the milter cannot start; `status` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_socket(spec: str) -> str:
    """A socket spec libmilter accepts: ``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/PATH``
    (``local:/PATH`` is the same). ValueError otherwise."""
    text = spec.strip()
    m = _SOCKET.fullmatch(text)
    if not m or (m.group("port") is not None and not 0 < int(m.group("port")) < 65536):
        raise ValueError(f"bad milter socket {spec!r}: expected inet:PORT@HOST or unix:/PATH "
                         "(e.g. inet:8892@127.0.0.1; Postfix then names it inet:127.0.0.1:8892)")
    return text


def socket_path(spec: str) -> Path | None:
    """The file of a unix socket spec, None for inet."""
    m = _SOCKET.fullmatch(spec)
    return Path(m.group("path")) if m and m.group("path") else None


def _crlf(data: bytes) -> bytes:
    """Line ends as CRLF: libmilter hands folded header values over with bare LF."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def _address(value: str | bytes) -> str:
    """An envelope address without its angle brackets; "" for the null sender or bytes
    that are not UTF-8 (left out of tokens rather than guessed)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes from pymilter: not UTF-8
        return ""
    text = value.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


class Message:
    """One message as the milter receives it: envelope, header fields in order, body.

    Collecting stops past `limit` bytes (`too_big`): the message then passes unchanged."""

    def __init__(self, sender: str, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.sender = sender
        self.limit = limit
        self.recipients: list[str] = []
        self.headers: list[bytes] = []  # each a whole field, CRLF-terminated
        self.chunks: list[bytes] = []
        self.size = 0
        self.too_big = False

    def _take(self, n: int) -> bool:
        self.size += n
        if self.size > self.limit:
            self.too_big = True
            self.headers, self.chunks = [], []
        return not self.too_big

    def add_recipient(self, address: str | bytes) -> None:
        self.recipients.append(_address(address))

    def add_header(self, name: str | bytes, value: str | bytes, *, leading_space: bool) -> bool:
        """A header field as libmilter gives it: the value without the space after the colon
        unless `leading_space` (SMFIP_HDR_LEADSPC was negotiated), continuation lines joined
        by bare LF. Returns False once the message is too big."""
        raw_name = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        raw_value = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        field = raw_name + b":" + (raw_value if leading_space else b" " + raw_value)
        field = _crlf(field) + b"\r\n"
        if not self._take(len(field)):
            return False
        self.headers.append(field)
        return True

    def add_body(self, chunk: bytes) -> bool:
        """A body chunk (CRLF line ends, as Postfix sends it). False once too big."""
        if not self._take(len(chunk)):
            return False
        self.chunks.append(chunk)
        return True

    @property
    def recipient(self) -> str:
        """The recipient for the tokens: the one envelope recipient, or "" when there are
        several (each would get the others' links)."""
        return self.recipients[0] if len(self.recipients) == 1 else ""

    def head(self) -> bytes:
        """The header block and the blank line after it."""
        return b"".join(self.headers) + b"\r\n"

    def body(self) -> bytes:
        return b"".join(self.chunks)


class Tracker:
    """What every connection shares: the key ring, the settings, the rewriter call."""

    def __init__(self, ring: KeyRing, settings: TrackingConfig) -> None:
        self.ring = ring
        self.settings = settings
        self._lock = threading.Lock()

    def links(self) -> Links:
        """Links signed with the keys as they are now: the key file is re-read when it
        changed (a rotation), and each message signs with a snapshot of the ring, so a
        rotation in another thread cannot mix one key's id with another key's MAC."""
        with self._lock:
            self.ring.refresh()
            ring = KeyRing(dict(self.ring.keys), self.ring.current, self.ring.salt)
        return Links(ring, self.settings.base_url, include_recipient=self.settings.include_recipient)

    def new_body(self, message: Message) -> tuple[bytes | None, Any]:
        """The rewritten body, or None when nothing changed; and the rewriter's result."""
        from webhookd.tracking.rewrite import rewrite_message

        head = message.head()
        result = rewrite_message(
            head + message.body(), self.links(), to=message.recipient,
            track_opens=self.settings.track_opens, track_clicks=self.settings.track_clicks,
        )
        if not result.changed:
            return None, result
        data = bytes(result.data)
        if not data.startswith(head):  # the rewriter promises not to; never send half a change
            raise RuntimeError("the rewriter changed the header block")
        return data[len(head):], result


def _import_milter() -> Any:
    try:
        import Milter  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:
        raise MilterSetupError(
            f"pymilter is not installed ({exc}): pip install 'webhookd[milter]' "
            "(it builds against libmilter: Debian's libmilter-dev)", EX_FAIL,
        ) from None
    return Milter


def milter_class(tracker: Tracker, *, limit: int = MAX_MESSAGE_BYTES) -> type:
    """The Milter.Base subclass libmilter instantiates for each SMTP connection."""
    _import_milter()  # a clear error when pymilter is missing
    import Milter  # type: ignore[import-untyped, import-not-found, unused-ignore]

    def typed(decorator: Any) -> Callable[[_F], _F]:
        return cast(Callable[[_F], _F], decorator)

    noreply, as_bytes = typed(Milter.noreply), typed(Milter.decode("bytes"))

    class TrackingMilter(Milter.Base):  # type: ignore[misc]
        """One SMTP connection. Callbacks not defined here (connect, helo, data, eoh,
        unknown) are not even sent by Postfix: Milter.Base marks them @nocallback."""

        def __init__(self) -> None:
            self.message: Message | None = None  # None: this message passes as it is

        def _give_up(self, where: str, exc: BaseException) -> None:
            # the exception's type and text, never the message or a token
            log.error("milter error; message passed unchanged", callback=where, queue_id=self._queue_id(),
                      error=f"{type(exc).__name__}: {exc}"[:300])
            self.message = None

        def _queue_id(self) -> str:
            try:
                value = self.getsymval("i")
            except Exception:
                return ""
            return value if isinstance(value, str) else ""

        def negotiate(self, opts: list[int]) -> Any:
            rc = super().negotiate(opts)
            if rc == Milter.CONTINUE:  # ask for CHGBODY only (Base leaves every offered action on)
                opts[0] = self._actions = opts[0] & Milter.CHGBODY
            return rc

        def envfrom(self, sender: str, *params: str) -> int:
            try:
                self.message = None
                if sender.strip() in ("", "<>"):  # the null sender: a bounce or another notice, never tracked
                    return cast(int, Milter.ACCEPT)
                self.message = Message(_address(sender), limit)
                return cast(int, Milter.CONTINUE)
            except Exception as exc:
                self._give_up("envfrom", exc)
                return cast(int, Milter.ACCEPT)

        @noreply
        def envrcpt(self, to: str, *params: str) -> int:
            try:
                if self.message is not None:
                    self.message.add_recipient(to)
            except Exception as exc:
                self._give_up("envrcpt", exc)
            return cast(int, Milter.CONTINUE)  # @noreply: CONTINUE, always

        @noreply
        @as_bytes
        def header(self, name: str, value: bytes) -> int:
            try:
                if self.message is not None:
                    self.message.add_header(name, value, leading_space=bool(self._protocol & Milter.P_HDR_LEADSPC))
            except Exception as exc:
                self._give_up("header", exc)
            return cast(int, Milter.CONTINUE)

        def body(self, chunk: bytes) -> int:
            try:
                if self.message is None:
                    return cast(int, Milter.ACCEPT)
                if not self.message.add_body(chunk):
                    log.info("message over the size limit; passed unchanged", queue_id=self._queue_id(),
                             limit=limit)
                    self.message = None
                    return cast(int, Milter.ACCEPT)
                return cast(int, Milter.CONTINUE)
            except Exception as exc:
                self._give_up("body", exc)
                return cast(int, Milter.ACCEPT)

        def eom(self) -> int:
            message, self.message = self.message, None
            if message is None:
                return cast(int, Milter.ACCEPT)
            try:
                body, result = tracker.new_body(message)
                if body is not None:
                    self.replacebody(body)
                log.debug("message tracked" if body is not None else "message not changed",
                          queue_id=self._queue_id(), links=result.links, pixel=result.pixel,
                          skipped=result.skipped or None, recipients=len(message.recipients))
            except Exception as exc:
                self._give_up("eom", exc)
            return cast(int, Milter.ACCEPT)

        def abort(self) -> int:
            self.message = None
            return cast(int, Milter.CONTINUE)

        def close(self) -> int:
            self.message = None
            return cast(int, Milter.CONTINUE)

    # the raw bytes of folded header fields, leading space included, when the MTA offers it
    return cast(type, Milter.header_leading_space(TrackingMilter))


def serve(spec: str, tracker: Tracker, *, timeout: int = TIMEOUT) -> None:
    """Serve until SIGTERM or SIGINT (libmilter's signal thread stops its main loop).
    Raises MilterSetupError when the socket cannot be opened.

    Milter.runmilter's steps, with the socket opened (and a unix socket's mode set)
    before the main loop, so that a socket that cannot be opened is an error at start."""
    _import_milter()
    import Milter  # type: ignore[import-untyped, import-not-found, unused-ignore]
    import milter as lowlevel  # type: ignore[import-untyped, import-not-found, unused-ignore]

    Milter.factory = milter_class(tracker)
    lowlevel.set_flags(Milter.CHGBODY)  # for an MTA that does not negotiate
    lowlevel.set_exception_policy(Milter.CONTINUE)  # an exception that escaped anyway: fail open
    lowlevel.set_connect_callback(Milter.connect_callback)
    lowlevel.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    lowlevel.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    lowlevel.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    lowlevel.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    lowlevel.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    lowlevel.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    lowlevel.set_close_callback(Milter.close_callback)
    path = socket_path(spec)
    if path is not None and not path.parent.is_dir():
        raise MilterSetupError(f"cannot listen on {spec}: no directory {path.parent}", EX_FAIL)
    try:
        lowlevel.setconn(spec)
        lowlevel.settimeout(timeout)
        lowlevel.register(NAME, negotiate=Milter.negotiate_callback)
        lowlevel.opensocket(True)  # True: remove a stale unix socket first
    except lowlevel.error as exc:
        raise MilterSetupError(f"cannot listen on {spec}: {exc}", EX_FAIL) from None
    made: int | None = None
    if path is not None:
        try:
            os.chmod(path, SOCKET_MODE)
            made = path.stat().st_ino
        except OSError as exc:
            raise MilterSetupError(f"cannot set the mode of {path}: {exc.strerror}", EX_FAIL) from None
    log.info("tracking milter started", socket=spec, base_url=tracker.settings.base_url,
             key=tracker.ring.current, pid=os.getpid())
    try:
        lowlevel.main()
    except lowlevel.error as exc:
        raise MilterSetupError(f"the milter stopped: {exc}", EX_FAIL) from None
    finally:
        if path is not None and made is not None:
            with contextlib.suppress(OSError):
                if path.stat().st_ino == made:  # ours still, not a newer instance's
                    path.unlink()
    log.info("tracking milter stopped")


def run(config: Config, socket: str | None = None) -> int:
    """`webhookd tracking milter`: serve until SIGTERM/SIGINT; the exit status.

    Refuses to start (one line on stderr) on a bad socket spec (2), tracking not enabled
    or no base_url (78), or a key file that cannot be read or created (1)."""
    from webhookd import logs

    settings = config.tracking
    try:
        spec = check_socket(settings.milter_socket if socket is None else socket)
    except ValueError as exc:
        print(f"webhookd: tracking milter: {exc}", file=sys.stderr)
        return EX_USAGE
    logs.configure(config.log.level, config.log.format)
    try:
        if not settings.enabled or not settings.base_url:
            raise MilterSetupError(
                "tracking is not enabled ([tracking] enabled = true, with base_url): the milter would put "
                "links into mail that no listener answers", EX_CONFIG,
            )
        path = config.tracking_key_file
        try:
            ring = KeyRing.load(path, create=True)
        except KeyFileError as exc:
            raise MilterSetupError(str(exc), EX_FAIL) from None
        serve(spec, Tracker(ring, settings))
    except MilterSetupError as exc:
        print(f"webhookd: tracking milter: {exc}", file=sys.stderr)
        return exc.status
    return EX_OK
