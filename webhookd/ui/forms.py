"""Reading the dashboard's forms and query strings into the admin API's validated values.

The validation rules and their error texts are the API's (webhookd.apimodel); this module
only maps HTML form shapes onto them: repeated checkboxes instead of comma lists, and
`<input type=datetime-local>` values (no offset; the pages say they are UTC) instead of
RFC 3339 times.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

from multidict import MultiMapping

from webhookd.apimodel import ApiError, delivery_filter, parse_rfc3339
from webhookd.events import EventError
from webhookd.store.model import DeliveryFilter

_LOCAL = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})(:\d{2})?(\.\d+)?")
FILTER_NAMES = ("webhook_id", "event", "message_id", "to", "since", "until", "batch")


Query = MultiMapping[str]


def rfc3339(text: str) -> str:
    """A form's time as RFC 3339: a datetime-local value counts as UTC."""
    text = text.strip()
    m = _LOCAL.fullmatch(text)
    if m is not None:
        return f"{m.group(1)}T{m.group(2)}{m.group(3) or ':00'}Z"
    return text


def parse_time(name: str, text: str) -> float:
    """Epoch seconds of a form's time field; ApiError(400) naming the field otherwise."""
    try:
        return parse_rfc3339(rfc3339(text))
    except EventError as exc:
        raise ApiError(400, f"{name}: {exc}") from None


def input_value(ts: float | None) -> str:
    """A time as a datetime-local input's value, in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) if ts is not None else ""


def statuses_of(q: Query) -> list[str]:
    out: list[str] = []
    for value in q.getall("status", []):
        out.extend(s.strip() for s in value.split(",") if s.strip())
    return list(dict.fromkeys(out))


@dataclass
class Filters:
    """The deliveries screen's filters: what they select and what the form shows back."""

    where: DeliveryFilter = field(default_factory=DeliveryFilter)
    values: dict[str, str] = field(default_factory=dict)  # for the inputs, times as datetime-local
    statuses: list[str] = field(default_factory=list)
    error: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """The filters as query parameters (times in RFC 3339), empty ones left out."""
        out = [(k, self.values[k]) for k in FILTER_NAMES if self.values.get(k) and k not in ("since", "until")]
        for name in ("since", "until"):
            if self.values.get(name):
                out.append((name, rfc3339(self.values[name])))
        out.extend(("status", s) for s in self.statuses)
        return out

    def query(self, *extra: tuple[str, str]) -> str:
        pairs = [*self.pairs(), *extra]
        return "?" + urlencode(pairs) if pairs else ""

    @property
    def active(self) -> bool:
        return bool(self.pairs())


def parse_filters(q: Query) -> Filters:
    values = {name: q.get(name, "").strip() for name in FILTER_NAMES}
    statuses = statuses_of(q)
    f = Filters(values=values, statuses=statuses)
    api = {k: v for k, v in values.items() if v}
    for name in ("since", "until"):
        if name in api:
            api[name] = rfc3339(api[name])
    if statuses:
        api["status"] = ",".join(statuses)
    try:
        f.where = delivery_filter(api)
    except ApiError as exc:
        f.error = exc.message
        return f
    for name in ("since", "until"):
        ts = getattr(f.where, name)
        if ts is not None:
            values[name] = input_value(ts)
    return f
