"""Property tests (hypothesis) for event parsing, and a live daemon fed generated garbage.

`parse_event` must either return an Event whose body is valid JSON with the keys event, timestamp,
data in that order, or raise EventError, whatever it is given. Valid events round-trip their `data`.
All runs are derandomized and keep no example database, so they are deterministic and leave no files.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Harness, event
from webhookd.events import BOUNCE_TYPES, EVENT_TYPES, Event, EventError, parse_event

NOW = 1_771_842_602.0  # 2026-02-23T10:30:02Z
TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")

FUZZ = settings(max_examples=100, deadline=None, database=None, derandomize=True)

# -- strategies: junk ------------------------------------------------------------------------------
# st.characters() never yields surrogates; add lone ones explicitly.
ODD_CHARS = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("\x00\r\n\t\"\\\u2028\ufeff"))
odd_text = st.text(ODD_CHARS, max_size=24)
texts = st.one_of(st.text(max_size=24), odd_text)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2),  # around the i64/u64 edges
    st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2),
    st.integers(min_value=10**400, max_value=10**401),  # very long literals
    st.floats(),  # incl. NaN and infinities, which json.dumps writes as non-JSON
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
jsonish = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)


def dump(value: Any, ascii_only: bool) -> bytes:
    """JSON text via the stdlib (it writes huge ints, NaN and lone surrogates), as raw bytes."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


RFC3339_ISH = r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
timestamps = st.one_of(
    texts,
    st.from_regex(RFC3339_ISH, fullmatch=True),
    jsonish,
)
data_shaped = st.fixed_dictionaries(
    {"message_id": st.one_of(st.text(max_size=24), jsonish)},
    optional={
        "bounce_type": st.one_of(st.sampled_from(BOUNCE_TYPES), jsonish),
        "tags": st.one_of(st.lists(texts, max_size=3), jsonish),
        "metadata": st.one_of(st.dictionaries(texts, jsonish, max_size=3), jsonish),
        "to": texts | jsonish,
        "url": texts | jsonish,
        "extra": jsonish,
    },
)


# -- valid events, and valid events with junk in them ----------------------------------------------
safe_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
safe_json = st.recursive(
    safe_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=6,
)
RESERVED = {"message_id", "from", "to", "subject", "tags", "metadata", "bounce_type", "error_message",
            "user_agent", "ip", "url"}
message_ids = st.text(min_size=1, max_size=40).filter(lambda s: not s.isspace())
optional_common = {
    "from": st.text(max_size=30), "to": st.text(max_size=30), "subject": st.text(max_size=60),
    "tags": st.lists(st.text(max_size=10), max_size=4),
    "metadata": st.dictionaries(st.text(max_size=8), safe_json, max_size=4),
}
optional_by_type: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "delivered": {},
    "bounced": {"error_message": st.text(max_size=60)},
    "opened": {"user_agent": st.text(max_size=40), "ip": st.ip_addresses().map(str)},
    "clicked": {"url": st.text(max_size=40), "user_agent": st.text(max_size=40), "ip": st.ip_addresses().map(str)},
    "complained": {},
    "failed": {"error_message": st.text(max_size=60)},
}


def data_for(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    required: dict[str, st.SearchStrategy[Any]] = {"message_id": message_ids}
    if kind == "bounced":
        required["bounce_type"] = st.sampled_from(BOUNCE_TYPES)
    base = st.fixed_dictionaries(required, optional={**optional_common, **optional_by_type[kind]})
    extras = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in RESERVED), safe_json, max_size=3)
    return st.builds(lambda d, x: {**x, **d}, base, extras)


DATA_BY_TYPE = {kind: data_for(kind) for kind in EVENT_TYPES}
offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)
local_times = st.datetimes(min_value=datetime.datetime(1900, 1, 1), max_value=datetime.datetime(9000, 12, 31))


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    kind = draw(st.sampled_from(EVENT_TYPES))
    obj: dict[str, Any] = {"event": kind, "data": draw(DATA_BY_TYPE[kind])}
    expected = "2026-02-23T10:30:02Z"  # NOW
    if draw(st.booleans()):
        local, minutes = draw(local_times), draw(offsets)
        sign = "+" if minutes >= 0 else "-"
        text = local.isoformat(timespec=draw(st.sampled_from(["seconds", "milliseconds", "microseconds"])))
        obj["timestamp"] = f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
        utc = local - datetime.timedelta(minutes=minutes)
        expected = f"{utc.year:04d}-{utc:%m-%dT%H:%M:%S}Z"
    if draw(st.booleans()):
        obj["id"] = draw(st.text(min_size=1, max_size=255))
    return obj, expected


loose_events = st.fixed_dictionaries(
    {"event": st.one_of(st.sampled_from(EVENT_TYPES), texts, jsonish)},
    optional={
        "timestamp": timestamps,
        "id": st.one_of(st.text(max_size=300), jsonish),
        "data": st.one_of(data_shaped, jsonish),
        "extra": jsonish,
    },
)


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event with up to three fields replaced by junk, removed or added."""
    obj = copy.deepcopy(draw(valid_events())[0])
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        data = obj.get("data")
        if isinstance(data, dict) and draw(st.booleans()):
            target, names = data, [*sorted(RESERVED), "extra"]
        else:
            target, names = obj, ["event", "timestamp", "id", "data", "extra"]
        name = draw(st.sampled_from(names))
        if draw(st.booleans()):
            target.pop(name, None)
        else:
            target[name] = draw(st.one_of(texts, jsonish, timestamps))
    return obj


event_shaped = st.one_of(loose_events, mutated_events())


# -- the property ----------------------------------------------------------------------------------
def check(raw: bytes | str) -> Event | None:
    """parse_event returns a well-formed Event or raises EventError with a reason; nothing else."""
    try:
        ev = parse_event(raw, now=NOW)
    except EventError as exc:
        assert str(exc), "an EventError always carries a reason"
        return None
    doc = orjson.loads(ev.body)
    assert json.loads(ev.body) == doc  # strict JSON for the stdlib parser too
    assert list(doc) == ["event", "timestamp", "data"]
    assert doc["event"] == ev.type and ev.type in EVENT_TYPES
    assert doc["timestamp"] == ev.timestamp and TIMESTAMP.fullmatch(ev.timestamp)
    assert isinstance(doc["data"], dict)
    message_id = doc["data"]["message_id"]
    assert isinstance(message_id, str) and message_id.strip()
    return ev


def same_data_as_the_stdlib_reads(raw: bytes, ev: Event) -> None:
    """What the receiver gets is what the client sent (as an independent parser reads it)."""
    assert orjson.loads(ev.body)["data"] == json.loads(raw)["data"]


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(raw: bytes) -> None:
    check(raw)
    check(raw.strip())


@FUZZ
@given(odd_text)
def test_arbitrary_text_with_lone_surrogates(text: str) -> None:
    check(text)
    check(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(jsonish, st.booleans())
def test_jsonish_values(value: Any, ascii_only: bool) -> None:
    raw = dump(value, ascii_only)
    ev = check(raw)
    if ev is not None:
        same_data_as_the_stdlib_reads(raw, ev)


@FUZZ
@given(st.integers(min_value=0, max_value=1500), st.sampled_from([b"[", b'{"k":', b'[{"k":']),
       st.sampled_from([b"1", b"12345678901234567890123", b'"x"', b"null"]))
def test_deep_nesting(depth: int, opener: bytes, leaf: bytes) -> None:
    closer = {b"[": b"]", b'{"k":': b"}", b'[{"k":': b"}]"}[opener]
    nested = opener * depth + leaf + closer * depth
    check(nested)  # at the top level: never an object
    raw = b'{"event":"clicked","data":{"message_id":"m","x":' + nested + b"}}"
    ev = check(raw)
    levels = depth * len(closer)  # containers inside `data`, which is one level itself
    big = leaf == b"12345678901234567890123"
    assert (ev is not None) == (levels <= 252 and not big), (levels, leaf)  # data: at most 253 levels
    if ev is None:
        with pytest.raises(EventError, match=r"nested|depth|64 bits"):
            parse_event(raw, now=NOW)
    else:
        same_data_as_the_stdlib_reads(raw, ev)


@pytest.mark.parametrize("depth", [10_000, 1_000_000])
def test_pathological_nesting_is_refused_quickly(depth: int) -> None:
    for raw in (b"[" * depth, b"[" * depth + b"]" * depth,
                b'{"event":"failed","data":{"message_id":"m","x":' + b"[" * depth + b"]" * depth + b"}}"):
        with pytest.raises(EventError):
            parse_event(raw, now=NOW)


@FUZZ
@given(odd_text)
def test_odd_unicode_in_a_field(text: str) -> None:
    """Lone surrogates are refused with a precise reason; every other string is kept exactly."""
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    obj = {"event": "opened", "data": {"message_id": "m", "user_agent": text}}

    # raw UTF-8 (surrogates as CESU-style bytes, which are not UTF-8)
    raw = dump(obj, ascii_only=False)
    ev = check(raw)
    if has_surrogate:
        first = next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF).encode("utf-8", "surrogatepass")
        with pytest.raises(EventError, match=f"^invalid UTF-8 at byte {raw.index(first)}$"):
            parse_event(raw, now=NOW)
    else:
        assert ev is not None
        assert orjson.loads(ev.body)["data"]["user_agent"] == text

    # the same as a Python str (as the HTTP intake never sees it, but callers may pass str)
    as_str = raw.decode("utf-8", "surrogatepass")
    ev = check(as_str)
    assert (ev is None) == has_surrogate

    # \uXXXX escapes: a high+low pair is one character; a lone half is refused
    escaped = dump(obj, ascii_only=True)
    try:
        expected = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        expected = None
    ev = check(escaped)
    if expected is None:
        assert ev is None
    else:
        assert ev is not None
        assert orjson.loads(ev.body)["data"]["user_agent"] == expected


@settings(FUZZ, max_examples=100)
@given(valid_events())
def test_valid_events_round_trip(case: tuple[dict[str, Any], str]) -> None:
    obj, timestamp = case
    ev = parse_event(orjson.dumps(obj), now=NOW)
    assert orjson.loads(ev.body)["data"] == obj["data"]
    assert ev.body == orjson.dumps({"event": obj["event"], "timestamp": timestamp, "data": obj["data"]})
    assert (ev.type, ev.timestamp, ev.idempotency_key) == (obj["event"], timestamp, obj.get("id"))


@settings(FUZZ, max_examples=150)
@given(event_shaped, st.booleans())
def test_event_shaped_values(value: dict[str, Any], ascii_only: bool) -> None:
    raw = dump(value, ascii_only)
    ev = check(raw)
    if ev is not None:
        same_data_as_the_stdlib_reads(raw, ev)
        assert ev.type == value["event"]


# -- a live daemon ---------------------------------------------------------------------------------
MAX_LINE = 1024
lines = st.one_of(
    st.binary(max_size=1300),
    jsonish.map(lambda v: dump(v, ascii_only=False)),
    event_shaped.map(lambda v: dump(v, ascii_only=False)),
    valid_events().map(lambda case: orjson.dumps(case[0])),
).map(lambda line: line.replace(b"\n", b""))  # one generated line is one intake line


def expected_answer(line: bytes) -> dict[str, Any] | None:
    """The error the daemon must answer for `line`, or None when it must accept it."""
    if len(line) > MAX_LINE:
        return {"ok": False, "error": f"line longer than intake.max_event_bytes ({MAX_LINE} bytes); skipped"}
    try:
        parse_event(line, now=NOW)
    except EventError as exc:
        return {"ok": False, "error": str(exc)}
    return None


@pytest.fixture
def shared() -> dict[str, Harness]:
    """One daemon for all the examples of a test (a function-scoped fixture outlives its examples)."""
    return {}


@settings(
    max_examples=30, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=st.lists(lines, min_size=6, max_size=16))
async def test_live_daemon_answers_every_generated_line(
    start_daemon: Any, shared: dict[str, Harness], batch: list[bytes]
) -> None:
    if "h" not in shared:
        shared["h"] = await start_daemon(intake={"max_event_bytes": MAX_LINE}, storage={"durability": "normal"})
    h = shared["h"]
    good = orjson.dumps(event("delivered", 7))
    answers = await h.submit_raw(b"\n".join([*batch, good]) + b"\n")  # a fresh connection per example
    assert len(answers) == len(batch) + 1, "exactly one answer per line"
    for line, answer in zip(batch, answers, strict=False):
        wanted = expected_answer(line)
        if wanted is None:
            assert answer["ok"] is True and answer["id"].startswith("evt_"), (line, answer)
        else:
            assert answer == wanted, line
    assert answers[-1]["ok"] is True, "a good event after the garbage is accepted on the same connection"
    status, body = await h.api("GET", "/healthz")
    assert (status, body) == (200, {"ok": True})
