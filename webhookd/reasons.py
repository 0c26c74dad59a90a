"""Why something did not go through: one enum for intake rejections and attempt failures.

Every refusal and every failed attempt carries a `Reason`. The metric label is the
member's value; whether a client should try again (`tempfail`) is a property of the
member; the text a person reads is built from the member and the details of the case
where the text is made (`webhookd.intake`, `webhookd.events`, and
`webhookd.dispatcher.classify_status` / `classify_exception`). Nothing parses a message
to find out what kind of failure it was, with one exception that the wire format forces:
an intake client only sees the answer text, so the leading words of intake answers are
written once, in `Lead`, and `Reason.of_intake_message` reads them back.
Rewording a message cannot move its metric label.

Only the standard library is imported: `webhookd submit` (webhookd.cli) uses this module.
"""

from __future__ import annotations

from enum import Enum, StrEnum


class Reason(StrEnum):
    """A failure's kind; the value is its metric label."""

    # -- intake: why an event was not acknowledged -----------------------------------
    INVALID_JSON = "invalid_json"  # not JSON / not UTF-8 / empty line
    INVALID_EVENT = "invalid_event"  # JSON, but not a valid event
    TOO_LONG = "too_long"  # longer than intake.max_event_bytes
    UNAUTHORIZED = "unauthorized"  # HTTP intake without the right token
    TOO_MANY_CONNECTIONS = "too_many_connections"  # past intake.max_connections
    STORAGE = "storage"  # a commit failed (disk full, I/O error)
    UNAVAILABLE = "unavailable"  # shutting down
    INTERNAL = "internal"  # a bug in webhookd, never the event's fault

    # -- delivery: why an attempt failed ---------------------------------------------
    HTTP_STATUS = "http_status"  # the receiver answered, but not 2xx (nor 3xx)
    REDIRECT = "redirect"  # 3xx: redirects are never followed
    TIMEOUT = "timeout"  # no complete response within delivery.timeout
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within delivery.connect_timeout
    CONNECTION = "connection"  # refused, reset, unreachable
    TLS = "tls"  # handshake or certificate failure
    REFUSED = "refused"  # the target address is not allowed (private network)
    PROTOCOL = "protocol"  # not HTTP, a broken body, a disconnect mid-response
    INVALID_URL = "invalid_url"
    OTHER = "other"  # anything else (logged with its exception type)

    @property
    def tempfail(self) -> bool:
        """An intake rejection the client should retry later: the event was not at fault."""
        return self in _TEMPFAIL

    @classmethod
    def of_intake_message(cls, text: str) -> Reason:
        """The reason of an intake answer's error text (what a Unix-socket client sees).

        The wire answer is ``{"ok": false, "error": text}`` and nothing else (SPEC), so a
        client finds the reason by the text's leading words (`Lead`, case aside); a text
        that starts with none of them is an event the daemon refused: `INVALID_EVENT`.
        Exact for every text the socket intake produces; HTTP intake clients have the
        status code (400/401/413/503) instead.
        """
        folded = text.lower()
        # Longest first: "temporarily unavailable: too many connections" before
        # "temporarily unavailable". Sorted per call so that a reworded `Lead` is followed.
        for lead in sorted(Lead, key=lambda m: len(m.words), reverse=True):
            if folded.startswith(lead.words.lower()):
                return lead.reason
        return cls.INVALID_EVENT


_TEMPFAIL = frozenset({Reason.TOO_MANY_CONNECTIONS, Reason.STORAGE, Reason.UNAVAILABLE, Reason.INTERNAL})

INTAKE_REASONS = (
    Reason.INVALID_JSON, Reason.INVALID_EVENT, Reason.TOO_LONG, Reason.UNAUTHORIZED,
    Reason.TOO_MANY_CONNECTIONS, Reason.STORAGE, Reason.UNAVAILABLE, Reason.INTERNAL,
)
ATTEMPT_REASONS = (
    Reason.HTTP_STATUS, Reason.REDIRECT, Reason.TIMEOUT, Reason.CONNECT_TIMEOUT, Reason.CONNECTION,
    Reason.TLS, Reason.REFUSED, Reason.PROTOCOL, Reason.INVALID_URL, Reason.OTHER,
)


class Lead(Enum):
    """The leading words of an intake answer's error text, and the reason they stand for.

    The one place these words are written: intake and events build their answers with
    `Lead.X.text(...)` (the store's `StoreError` texts start with STORAGE and UNAVAILABLE's
    words), and `Reason.of_intake_message` maps an answer back, so rewording happens here
    and moves both sides. docs/behaviour.md
    promises that commit failures start with "storage" and shutdown / too many connections
    with "temporarily unavailable"; `webhookd submit` exits 75 for those (`Reason.tempfail`).
    `INVALID_EVENT` has no lead: any other text is the event's fault.
    """

    NOT_JSON = ("invalid JSON", Reason.INVALID_JSON)
    NOT_UTF8 = ("invalid UTF-8", Reason.INVALID_JSON)
    EMPTY_LINE = ("empty line", Reason.INVALID_JSON)
    TOO_LONG = ("line longer than intake.max_event_bytes", Reason.TOO_LONG)
    UNAUTHORIZED = ("missing or wrong bearer token", Reason.UNAUTHORIZED)
    TOO_MANY_CONNECTIONS = ("temporarily unavailable: too many connections", Reason.TOO_MANY_CONNECTIONS)
    UNAVAILABLE = ("temporarily unavailable", Reason.UNAVAILABLE)
    STORAGE = ("storage", Reason.STORAGE)
    INTERNAL = ("internal error", Reason.INTERNAL)

    def __init__(self, words: str, reason: Reason) -> None:
        self.words = words
        self.reason = reason

    def text(self, rest: str = "") -> str:
        """The answer text: these leading words, then `rest` exactly as given."""
        return self.words + rest
