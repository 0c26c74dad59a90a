"""Why something did not go through: one enum for intake rejections and attempt failures.

Every refusal and every failed attempt carries a `Reason`. The metric label is the
member's value; whether a client should try again (`tempfail`) is a property of the
member; the text a person reads is built from the member and the details of the case
(see the ``describe_*`` helpers where the text is made). Nothing parses a message to
find out what kind of failure it was: rewording a message cannot move its metric label.
"""

from __future__ import annotations

from enum import StrEnum


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


_TEMPFAIL = frozenset({Reason.TOO_MANY_CONNECTIONS, Reason.STORAGE, Reason.UNAVAILABLE, Reason.INTERNAL})

INTAKE_REASONS = (
    Reason.INVALID_JSON, Reason.INVALID_EVENT, Reason.TOO_LONG, Reason.UNAUTHORIZED,
    Reason.TOO_MANY_CONNECTIONS, Reason.STORAGE, Reason.UNAVAILABLE, Reason.INTERNAL,
)
ATTEMPT_REASONS = (
    Reason.HTTP_STATUS, Reason.REDIRECT, Reason.TIMEOUT, Reason.CONNECT_TIMEOUT, Reason.CONNECTION,
    Reason.TLS, Reason.REFUSED, Reason.PROTOCOL, Reason.INVALID_URL, Reason.OTHER,
)
