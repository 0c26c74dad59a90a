"""Webhook filters: which events of its subscribed types a webhook gets (pure, stdlib only).

A filter has four fields; each one left empty does not narrow anything, and an event
must satisfy every field that is set (AND across fields, OR within one):

- ``from_domains``: the domain of ``data.from`` is one of them;
- ``to_domains``: the domain of ``data.to`` is one of them;
- ``tags``: at least one of ``data.tags`` is one of them (exact, case-sensitive);
- ``metadata``: for every ``key: value`` pair, ``data.metadata[key]`` is that same
  string (exact; numbers, booleans, null and objects never equal a filter's string).

Domains are compared lower-case, in their ASCII (IDNA "xn--") form, without a trailing
dot. A domain entry ``*.shop.example`` matches every subdomain of shop.example at any
depth (eu.shop.example, a.b.shop.example) but not shop.example itself: list both for
both. An address is read with `email.utils.getaddresses`, so ``Name <a@shop.example>``
works; a value that does not hold exactly one address with a domain (garbage, several
addresses, ``<>``, an address literal like ``a@[192.0.2.1]``, more than
`MAX_ADDRESS_CHARS`) has no domain and matches no domain filter.

The empty filter matches every event (a webhook without a filter gets everything it is
subscribed to). A filter is a value (`WebhookFilter`, frozen); `WebhookFilter.compile`
builds the `Matcher` that fan-out runs, once per filter.

Scoped API tokens build on `lies_within`: a filter lies within a set of sender domains
when its ``from_domains`` is non-empty and each of its entries is covered by them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from functools import lru_cache
from typing import Any, Final

__all__ = [
    "EMPTY_FILTER",
    "MAX_DOMAINS",
    "MAX_METADATA",
    "MAX_TAGS",
    "EventFacts",
    "FilterError",
    "Matcher",
    "WebhookFilter",
    "address_domain",
    "lies_within",
    "normalise_domain",
    "parents_of",
    "parse_domains",
]

MAX_DOMAINS: Final = 100  # per domain field
MAX_TAGS: Final = 50
MAX_METADATA: Final = 20
MAX_TAG_CHARS: Final = 128
MAX_KEY_CHARS: Final = 128
MAX_VALUE_CHARS: Final = 1024
MAX_ADDRESS_CHARS: Final = 4096  # a longer data.from / data.to has no domain
FIELDS: Final = ("from_domains", "to_domains", "tags", "metadata")

_LABEL: Final = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"
_DOMAIN: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# The forms MTAs hand over, read without the email package (which takes ~30 µs): a bare
# address, or one angle address after a plain or simply quoted display name. Anything
# else (comments, escapes, groups, lists) goes through getaddresses.
_ATOMS: Final = r"[^\s<>()\[\]\",;:\\@]+"
_SIMPLE: Final = re.compile(
    rf"\s*(?:{_ATOMS}@({_ATOMS})|(?:\"[^\"\\]*\"|[^<>\"(),;:\\@\[\]]*)<{_ATOMS}@({_ATOMS})>)\s*"
)


class FilterError(ValueError):
    """A filter was refused; ``str(e)`` names the field (``filter.tags[2]: ...``)."""


# -- domains ----------------------------------------------------------------------------------
def _ascii_domain(text: str) -> str | None:
    """`text` lower-cased, as ASCII (IDNA) without a trailing dot, if it is a host name."""
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii").lower()
        except (UnicodeError, ValueError):
            return None
    if len(name) > 253 or _DOMAIN.fullmatch(name) is None:
        return None
    return name


def normalise_domain(text: object, where: str = "domain") -> str:
    """A filter's domain entry in its stored form: ``shop.example`` or ``*.shop.example``
    (lower case, IDNA ASCII, no trailing dot). FilterError naming `where` otherwise."""
    if not isinstance(text, str):
        raise FilterError(f"{where} must be a string, got {type(text).__name__}")
    raw = text.strip()
    wildcard = raw.startswith("*.")
    base = raw[2:] if wildcard else raw
    name = _ascii_domain(base) if base and "*" not in base else None
    if name is None:
        shown = raw if len(raw) <= 64 else raw[:63] + "…"
        raise FilterError(
            f"{where}: {shown!r} is not a domain name"
            " (expected e.g. shop.example, or *.shop.example for its subdomains)"
        )
    return "*." + name if wildcard else name


def parse_domains(values: object, where: str) -> tuple[str, ...]:
    """A list of domain entries, normalised and without repeats (order kept)."""
    if values is None:
        return ()
    if not isinstance(values, list | tuple):
        raise FilterError(f"{where} must be a list of domain names")
    if len(values) > MAX_DOMAINS:
        raise FilterError(f"{where}: at most {MAX_DOMAINS} domains, got {len(values)}")
    return tuple(dict.fromkeys(normalise_domain(v, f"{where}[{i}]") for i, v in enumerate(values)))


def address_domain(value: object) -> str | None:
    """The domain of an address (``a@b``, ``Name <a@b>``), lower-case ASCII; None when the
    value does not hold exactly one address with a valid domain."""
    if not isinstance(value, str) or not value or len(value) > MAX_ADDRESS_CHARS:
        return None
    return _address_domain(value)


@lru_cache(maxsize=4096)  # senders repeat: a tenant has a few From addresses
def _address_domain(value: str) -> str | None:
    m = _SIMPLE.fullmatch(value)
    if m is None:
        return _parsed_domain(value)
    return _ascii_domain(m.group(1) or m.group(2))


def _parsed_domain(value: str) -> str | None:
    """The slow path, and the reference the fast one is tested against."""
    found = [addr for _name, addr in getaddresses([value]) if addr]
    if len(found) != 1:
        return None
    local, at, domain = found[0].rpartition("@")
    if not at or not local:
        return None
    return _ascii_domain(domain)


def _covers(scope: str, entry: str) -> bool:
    """Does the domain entry `scope` match everything the entry `entry` matches?"""
    if scope == entry:
        return True
    if not scope.startswith("*."):
        return False
    parent = scope[1:]  # ".shop.example"
    if entry.startswith("*."):  # a wildcard entry: its parent is the scope's, or below it
        name = entry[2:]
        return name == parent[1:] or name.endswith(parent)
    return entry.endswith(parent)  # an exact entry: a subdomain of the scope's parent


def lies_within(f: WebhookFilter, domains: Iterable[str]) -> bool:
    """Can this filter only ever match events sent from `domains` (normalised entries,
    ``*.x`` allowed)? False for a filter without ``from_domains`` (it matches every sender)."""
    scope = tuple(domains)
    return bool(f.from_domains) and all(any(_covers(s, e) for s in scope) for e in f.from_domains)


# -- the filter --------------------------------------------------------------------------------
def _parse_tags(values: object) -> tuple[str, ...]:
    if values is None:
        return ()
    if not isinstance(values, list | tuple):
        raise FilterError("filter.tags must be a list of strings")
    if len(values) > MAX_TAGS:
        raise FilterError(f"filter.tags: at most {MAX_TAGS} tags, got {len(values)}")
    for i, tag in enumerate(values):
        if not isinstance(tag, str) or not tag or len(tag) > MAX_TAG_CHARS:
            raise FilterError(f"filter.tags[{i}] must be a non-empty string of at most {MAX_TAG_CHARS} characters")
    return tuple(dict.fromkeys(values))


def _parse_metadata(values: object) -> tuple[tuple[str, str], ...]:
    if values is None:
        return ()
    if not isinstance(values, Mapping):
        raise FilterError("filter.metadata must be an object of string values")
    if len(values) > MAX_METADATA:
        raise FilterError(f"filter.metadata: at most {MAX_METADATA} pairs, got {len(values)}")
    out: list[tuple[str, str]] = []
    for key, value in values.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise FilterError(f"filter.metadata: keys must be non-empty strings of at most {MAX_KEY_CHARS} characters")
        if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
            raise FilterError(
                f"filter.metadata.{key[:64]}: the value must be a string of at most {MAX_VALUE_CHARS} characters"
                " (events match it only with that exact string)"
            )
        out.append((key, value))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class WebhookFilter:
    """Which events a webhook gets, beyond their type. Build it with `parse`."""

    from_domains: tuple[str, ...] = ()
    to_domains: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, obj: object) -> WebhookFilter:
        """From its JSON object (missing or null fields are empty; `None` is the empty filter)."""
        if obj is None:
            return EMPTY_FILTER
        if not isinstance(obj, Mapping):
            raise FilterError("filter must be an object (or null for none)")
        unknown = [k for k in obj if k not in FIELDS]
        if unknown:
            raise FilterError(f"filter: unknown field {str(unknown[0])!r} (allowed: {', '.join(FIELDS)})")
        f = cls(
            from_domains=parse_domains(obj.get("from_domains"), "filter.from_domains"),
            to_domains=parse_domains(obj.get("to_domains"), "filter.to_domains"),
            tags=_parse_tags(obj.get("tags")),
            metadata=_parse_metadata(obj.get("metadata")),
        )
        return EMPTY_FILTER if f.empty else f

    @property
    def empty(self) -> bool:
        return not (self.from_domains or self.to_domains or self.tags or self.metadata)

    def to_json(self) -> dict[str, Any]:
        """The API's shape, every field present (also what storage keeps)."""
        return {
            "from_domains": list(self.from_domains),
            "to_domains": list(self.to_domains),
            "tags": list(self.tags),
            "metadata": dict(self.metadata),
        }

    def summary(self, limit: int = 3) -> str:
        """A short line for lists: ``from shop.example, *.shop.example; tag vip; +2 more``."""
        if self.empty:
            return ""
        parts: list[str] = []
        for label, items in (("from", self.from_domains), ("to", self.to_domains), ("tag", self.tags),
                             ("metadata", tuple(f"{k}={v}" for k, v in self.metadata))):
            if items:
                shown = ", ".join(items[:limit])
                more = f" +{len(items) - limit}" if len(items) > limit else ""
                parts.append(f"{label} {shown}{more}")
        return "; ".join(parts)

    def compile(self) -> Matcher | None:
        """What fan-out runs; None for the empty filter (it matches everything)."""
        return None if self.empty else Matcher(self)


EMPTY_FILTER: Final = WebhookFilter()


def _domain_test(entries: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    exact = frozenset(e for e in entries if not e.startswith("*."))
    parents = frozenset(e[2:] for e in entries if e.startswith("*."))
    return exact, parents


def parents_of(domain: str) -> Iterator[str]:
    """Each proper parent, nearest first: a.b.shop.example → b.shop.example, shop.example, example."""
    i = domain.find(".")
    while i >= 0:
        yield domain[i + 1:]
        i = domain.find(".", i + 1)


def _domain_matches(domain: str | None, exact: frozenset[str], parents: frozenset[str]) -> bool:
    if domain is None:
        return False
    if domain in exact:
        return True
    return bool(parents) and any(p in parents for p in parents_of(domain))


_UNREAD: Final[Any] = object()


class EventFacts:
    """What filters read of one event, each part worked out at most once however many
    filters ask: its `data` object, and the domains of ``data.from`` and ``data.to``."""

    __slots__ = ("_from", "_to", "data")

    def __init__(self, data: object) -> None:
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        self._from: str | None = _UNREAD
        self._to: str | None = _UNREAD

    @property
    def from_domain(self) -> str | None:
        if self._from is _UNREAD:
            self._from = address_domain(self.data.get("from"))
        return self._from

    @property
    def to_domain(self) -> str | None:
        if self._to is _UNREAD:
            self._to = address_domain(self.data.get("to"))
        return self._to


class Matcher:
    """A compiled filter: sets instead of lists, run on an event's facts. Its sender domains
    are public (`from_exact`, `from_parents`: the x of each ``*.x``; None without a sender
    field), so fan-out can index many webhooks' by domain and call `test_rest` only on the
    ones whose sender matched; `rest` says whether there is anything else to test."""

    __slots__ = ("_meta", "_tags", "_to", "_to_parents", "from_exact", "from_parents", "rest")

    def __init__(self, f: WebhookFilter) -> None:
        self.from_exact: frozenset[str] | None = None
        self.from_parents: frozenset[str] = frozenset()
        self._to: frozenset[str] | None = None
        self._to_parents: frozenset[str] = frozenset()
        if f.from_domains:
            self.from_exact, self.from_parents = _domain_test(f.from_domains)
        if f.to_domains:
            self._to, self._to_parents = _domain_test(f.to_domains)
        self._tags = frozenset(f.tags) if f.tags else None
        self._meta = f.metadata
        self.rest = bool(f.to_domains or f.tags or f.metadata)

    def matches(self, data: object) -> bool:
        """Does an event's `data` object pass? (One filter; fan-out shares `EventFacts`.)"""
        return self.test(EventFacts(data))

    def test(self, facts: EventFacts) -> bool:
        if self.from_exact is not None and not _domain_matches(facts.from_domain, self.from_exact,
                                                               self.from_parents):
            return False
        return self.test_rest(facts)

    def test_rest(self, facts: EventFacts) -> bool:
        """Every field but the sender domains."""
        if self._to is not None and not _domain_matches(facts.to_domain, self._to, self._to_parents):
            return False
        data = facts.data
        if self._tags is not None:
            tags = data.get("tags")
            if not isinstance(tags, list):
                return False
            wanted = self._tags
            if not any(isinstance(t, str) and t in wanted for t in tags):
                return False
        if self._meta:
            meta = data.get("metadata")
            if not isinstance(meta, dict):
                return False
            for key, value in self._meta:
                got = meta.get(key)
                if type(got) is not str or got != value:
                    return False
        return True
