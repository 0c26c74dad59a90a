"""Event validation, normalisation and payload bytes (webhookd.events)."""

from __future__ import annotations

import calendar
import json
import random
import re
from typing import Any

import orjson
import pytest

from webhookd.events import (
    BOUNCE_TYPES,
    EVENT_TYPES,
    Event,
    EventError,
    decode_json,
    format_timestamp,
    normalise_timestamp,
    parse_event,
    synthetic_event,
    validate_event,
)

NOW = 1771842602.75  # 2026-02-23T10:30:02.75Z
NOW_TS = "2026-02-23T10:30:02Z"
CANONICAL = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def data(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "message_id": "<abc@example.com>",
        "from": "shop@example.com",
        "to": "x@example.org",
        "subject": "Order Confirmation",
        "tags": ["order"],
        "metadata": {"order_id": "12345"},
    }
    base.update(extra)
    return base


def line(event: str = "delivered", **top: Any) -> bytes:
    extra = {"bounce_type": "hard"} if event == "bounced" else {}
    obj: dict[str, Any] = {"event": event, "data": data(**extra)}
    obj.update(top)
    return orjson.dumps(obj)


def reason(raw: bytes | str) -> str:
    with pytest.raises(EventError) as info:
        parse_event(raw, now=NOW)
    return str(info.value)


# -- accepted events --------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_accepted(event_type: str) -> None:
    ev = parse_event(line(event_type), now=NOW)
    assert isinstance(ev, Event)
    assert ev.type == event_type
    assert ev.timestamp == NOW_TS
    assert ev.idempotency_key is None


def test_body_is_exactly_event_timestamp_data_in_that_order() -> None:
    d = data(bounce_type="soft", error_message="452 4.2.2 Mailbox full")
    raw = orjson.dumps({"data": d, "id": "k1", "timestamp": "2026-02-23T10:30:02Z", "event": "bounced"})
    ev = parse_event(raw, now=0)
    assert ev.body == orjson.dumps({"event": "bounced", "timestamp": "2026-02-23T10:30:02Z", "data": d})
    assert list(json.loads(ev.body)) == ["event", "timestamp", "data"]
    assert ev.body.startswith(b'{"event":"bounced","timestamp":"2026-02-23T10:30:02Z","data":{')
    assert ev.idempotency_key == "k1"


@pytest.mark.parametrize(
    "d",
    [
        data(),
        data(x_custom={"a": [1, 2]}, zzz=None, aaa=True, n=-12.5, big=18446744073709551615, neg=-(2**63)),
        data(metadata={"nested": {"deep": [{"k": "v"}, [], {}]}, "empty": ""}),
        data(tags=[]),
        data(subject="Grüße 🎉 \u2028 \"quoted\" \\ back\tslash \u0000 nul"),
        {"message_id": "m", "unknown_first": 1, "from": "a@b", "z": [None, False, 0, 0.25]},
        data(bounce_type="hard", error_message="550 5.1.1 User unknown", url="https://x.test/?a=1&b=2"),
    ],
)
def test_data_passes_through_unchanged_and_in_order(d: dict[str, Any]) -> None:
    ev = parse_event(orjson.dumps({"event": "failed", "data": d}), now=NOW)
    out = orjson.loads(ev.body)["data"]
    assert out == d
    assert list(out) == list(d)
    assert json.loads(ev.body)["data"] == d  # the stdlib agrees


def test_unicode_escapes_in_the_input_are_decoded_once() -> None:
    raw = rb'{"event":"delivered","data":{"message_id":"\u00e9\ud83d\ude00","subject":"caf\u00e9 \"x\""}}'
    ev = parse_event(raw, now=NOW)
    assert orjson.loads(ev.body)["data"] == {"message_id": "é😀", "subject": 'café "x"'}
    assert "é😀".encode() in ev.body


def test_str_input_is_accepted_like_bytes() -> None:
    raw = line("opened")
    assert parse_event(raw.decode(), now=NOW) == parse_event(raw, now=NOW)


@pytest.mark.parametrize(
    "wrap",
    [b" %s ", b"\t%s\r", b"%s\r", b"\r\n%s\r\n", b"  \t %s\n"],
)
def test_surrounding_whitespace_and_trailing_cr_are_fine(wrap: bytes) -> None:
    assert parse_event(wrap % line(), now=NOW).type == "delivered"


def test_timestamp_defaults_to_now_truncated() -> None:
    assert parse_event(line(), now=NOW).timestamp == NOW_TS
    assert parse_event(line(timestamp=None), now=NOW).timestamp == NOW_TS


def test_id_is_the_idempotency_key() -> None:
    assert parse_event(line(id="x" * 255), now=NOW).idempotency_key == "x" * 255
    assert parse_event(line(id="é"), now=NOW).idempotency_key == "é"
    assert parse_event(line(id=None), now=NOW).idempotency_key is None


@pytest.mark.parametrize("bounce_type", BOUNCE_TYPES)
def test_bounce_types(bounce_type: str) -> None:
    raw = orjson.dumps({"event": "bounced", "data": {"message_id": "m", "bounce_type": bounce_type}})
    assert orjson.loads(parse_event(raw, now=NOW).body)["data"]["bounce_type"] == bounce_type


def test_validate_event_takes_decoded_objects() -> None:
    obj = {"event": "clicked", "data": {"message_id": "m", "url": "https://e.test/"}}
    ev = validate_event(obj, now=NOW)
    assert ev == parse_event(orjson.dumps(obj), now=NOW)
    assert obj == {"event": "clicked", "data": {"message_id": "m", "url": "https://e.test/"}}  # not mutated


def test_event_is_frozen() -> None:
    ev = parse_event(line(), now=NOW)
    with pytest.raises(AttributeError):
        ev.type = "bounced"  # type: ignore[misc]


# -- refused events ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m"}', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m"}} trailing', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": NaN}}', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m", "x": Infinity}}', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m", "x": -Infinity}}', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m", "x": 1e999}}', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "\\ud800"}}', "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m"},}', "invalid JSON: "),
        (b"\xef\xbb\xbf{}", "invalid JSON: "),
        (b'{"event": "delivered", "data": {"message_id": "m\x01"}}', "invalid JSON: "),
        (b"", "empty line"),
        (b"   ", "empty line"),
        (b"\t \r", "empty line"),
        ("  ", "empty line"),
        (b'{"event": "delivered", "data": {"message_id": "\xff"}}', "invalid UTF-8 at byte 47"),
        (b"\xc3", "invalid UTF-8 at byte 0"),
        (b'{"a": "\xed\xa0\x80"}', "invalid UTF-8 at byte 7"),
        ('{"event": "\ud800"}', "invalid Unicode (lone surrogate) at character 11"),
        (b'["delivered"]', "event must be a JSON object, got array"),
        (b'"delivered"', "event must be a JSON object, got string"),
        (b"42", "event must be a JSON object, got number"),
        (b"null", "event must be a JSON object, got null"),
        (b"true", "event must be a JSON object, got boolean"),
    ],
)
def test_bad_json_reasons(raw: bytes | str, expected: str) -> None:
    assert reason(raw).startswith(expected)


D = {"message_id": "m"}
ID_RULE = "id must be a non-empty string of at most 255 characters"
BOUNCE_RULE = "data.bounce_type must be one of hard, soft, complaint"


def E(event: Any = "delivered", data: Any = D, **top: Any) -> dict[str, Any]:
    return {"event": event, "data": data, **top}


def Ed(event: str = "delivered", **fields: Any) -> dict[str, Any]:
    return {"event": event, "data": {**D, **fields}}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (E("exploded"), 'unknown event "exploded" (expected one of delivered, bounced, opened, clicked, '
                        'complained, failed)'),
        (E("Delivered"), 'unknown event "Delivered" (expected one of '),
        (E(""), 'unknown event "" (expected one of '),
        ({"data": D}, 'missing "event"'),
        (E(None), "event must be a string, got null"),
        (E(3), "event must be a string, got number"),
        (E(["delivered"]), "event must be a string, got array"),
        ({"event": "delivered"}, 'missing "data"'),
        (E(data=None), "data must be an object, got null"),
        (E(data=[]), "data must be an object, got array"),
        (E(data="m"), "data must be an object, got string"),
        (E(data={}), "data.message_id is required"),
        (E(data={"to": "x@example.org"}), "data.message_id is required"),
        (Ed(message_id=""), "data.message_id must be a non-empty string"),
        (Ed(message_id="  "), "data.message_id must be a non-empty string"),
        (Ed(message_id=None), "data.message_id must be a non-empty string"),
        (Ed(message_id=12), "data.message_id must be a non-empty string"),
        (E("bounced"), "data.bounce_type is required for bounced events"),
        (Ed("bounced", bounce_type="permanent"), BOUNCE_RULE),
        (Ed("bounced", bounce_type=None), BOUNCE_RULE),
        (Ed("bounced", bounce_type="HARD"), BOUNCE_RULE),
        (Ed("failed", bounce_type="x"), BOUNCE_RULE),
        (Ed(tags="order"), "data.tags must be a list of strings"),
        (Ed(tags=["a", 1]), "data.tags must be a list of strings"),
        (Ed(tags=[None]), "data.tags must be a list of strings"),
        (Ed(tags=None), "data.tags must be a list of strings"),
        (Ed(metadata=[]), "data.metadata must be an object, got array"),
        (Ed(metadata="x"), "data.metadata must be an object, got string"),
        (Ed(metadata=None), "data.metadata must be an object, got null"),
        (E(data={**D, "from": 1}), "data.from must be a string, got number"),
        (Ed(to=["a@b"]), "data.to must be a string, got array"),
        (Ed(subject=None), "data.subject must be a string, got null"),
        (Ed("failed", error_message={}), "data.error_message must be a string, got object"),
        (Ed("opened", user_agent=1), "data.user_agent must be a string, got number"),
        (Ed("opened", ip=True), "data.ip must be a string, got boolean"),
        (Ed("clicked", url=1.5), "data.url must be a string, got number"),
        (E(timestamp="yesterday"), 'timestamp must be an RFC 3339 time, got "yesterday"'),
        (E(timestamp=1771842602), "timestamp must be an RFC 3339 time string, got number"),
        (E(id=""), ID_RULE),
        (E(id=7), ID_RULE),
        (E(id="x" * 256), ID_RULE),
        (E(foo=1), 'unknown top-level field "foo" (allowed: event, timestamp, id, data)'),
        ({"type": "delivered", "data": D}, 'unknown top-level field "type" (allowed: '),
        (E(message_id="m"), 'unknown top-level field "message_id"'),
    ],
)
def test_reasons_name_the_problem(obj: dict[str, Any], expected: str) -> None:
    assert reason(orjson.dumps(obj)).startswith(expected)
    with pytest.raises(EventError) as info:
        validate_event(obj, now=NOW)
    assert str(info.value).startswith(expected)


def test_event_error_is_a_value_error() -> None:
    assert issubclass(EventError, ValueError)


def test_long_client_values_are_shortened_in_reasons() -> None:
    r = reason(orjson.dumps({"event": "x" * 10_000, "data": D}))
    assert len(r) < 200 and r.startswith('unknown event "xxxx')


def test_validate_event_refuses_python_objects_json_cannot_carry() -> None:
    with pytest.raises(EventError, match="does not fit in 64 bits"):
        validate_event({"event": "delivered", "data": {**D, "n": 2**64}}, now=NOW)
    with pytest.raises(EventError, match="data cannot be encoded as JSON"):
        validate_event({"event": "delivered", "data": {**D, 1: 2}}, now=NOW)
    with pytest.raises(EventError, match="data cannot be encoded as JSON"):
        validate_event({"event": "delivered", "data": {**D, "x": object()}}, now=NOW)
    with pytest.raises(EventError, match="event must be a JSON object, got set"):
        validate_event({1, 2}, now=NOW)


# -- big integers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "literal",
    ["18446744073709551616", "-9223372036854775809", "123456789012345678901234567890", "9" * 300,
     "-" + "1" * 40],
)
@pytest.mark.parametrize("template", ['{"event":"delivered","data":{"message_id":"m","n":%s}}',
                                      '{"event":"delivered","data":{"message_id":"m","n":[1, \n %s]}}',
                                      '{"event":"delivered","data":{"message_id":"m","n":{"k":\t%s}}}'])
def test_integers_wider_than_64_bits_are_refused_not_altered(literal: str, template: str) -> None:
    r = reason((template % literal).encode())
    assert "does not fit in 64 bits" in r and literal[:20] in r
    assert len(r) < 120
    assert "does not fit in 64 bits" in reason(template % literal)  # str input too


@pytest.mark.parametrize(
    "literal",
    ["18446744073709551615", "-9223372036854775808", "9223372036854775807", "0", "-0", "1.5e300",
     "12345678901234567890.5", "-12345678901234567890123e-3", "1E+30"],
)
def test_numbers_orjson_keeps_exactly_or_that_are_floats_anyway_pass(literal: str) -> None:
    raw = '{"event":"delivered","data":{"message_id":"m","n":' + literal + "}}"
    ev = parse_event(raw, now=NOW)
    assert orjson.loads(ev.body)["data"]["n"] == json.loads(literal)


def test_integers_beyond_double_range_are_invalid_json() -> None:
    # orjson refuses these itself (they would be infinity as floats); the reason still says why.
    assert reason('{"event":"delivered","data":{"message_id":"m","n":%s}}' % ("9" * 5000)) == (
        "invalid JSON: number is infinity when parsed as double: line 1 column 51 (char 50)"
    )


def test_long_digit_runs_inside_strings_are_not_numbers() -> None:
    d = {"message_id": "<msg-1-1740306602123456789@mail>", "x": "-123456789012345678901234567890",
         "y": ": 123456789012345678901234567890", "z": "[ -99999999999999999999"}
    ev = parse_event(orjson.dumps({"event": "delivered", "data": d}), now=NOW)
    assert orjson.loads(ev.body)["data"] == d


def test_decode_json_refuses_a_bare_big_number() -> None:
    with pytest.raises(EventError, match="does not fit in 64 bits"):
        decode_json(b"  123456789012345678901234567890")
    assert decode_json(b"[1, 2]") == [1, 2]


# -- nesting ----------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b'{"event":"delivered","data":{"message_id":"m","x":' + b"[" * depth + b"]" * depth + b"}}"


@pytest.mark.parametrize("depth", [1, 100, 252])
def test_reasonable_nesting_passes(depth: int) -> None:
    ev = parse_event(nested(depth), now=NOW)
    assert ev.body.count(b"[") == depth


@pytest.mark.parametrize("depth", [253, 300, 1000, 1022, 1023, 1024, 5000, 200_000])
def test_deep_nesting_is_an_event_error(depth: int) -> None:
    r = reason(nested(depth))
    assert "nested too deeply" in r or r.startswith("invalid JSON: ")


def test_deep_nesting_with_a_long_digit_run_is_an_event_error() -> None:
    raw = b'{"event":"delivered","data":{"message_id":"m","x":' + b"[" * 1020 + b"12345678901234567890123"
    raw += b"]" * 1020 + b"}}"
    assert "nested too deeply" in reason(raw) or "64 bits" in reason(raw)


def test_unclosed_deep_nesting() -> None:
    assert reason(b"[" * 100_000).startswith("invalid JSON: ")
    assert reason(b'{"a":' * 50_000).startswith("invalid JSON: ")


# -- never anything but EventError ------------------------------------------------------------------


def test_random_bytes_only_ever_raise_event_error() -> None:
    rng = random.Random(20260223)
    alphabet = b'{}[]":,0123456789-+.eE \t\r\nabcdefnulltruefalse\\u\xff\xc3\xa9\x00'
    good = line("bounced", timestamp="2026-02-23T10:30:02+02:00", id="k")
    outcomes = {"ok": 0, "error": 0}
    for i in range(3000):
        kind = i % 3
        if kind == 0:
            raw = rng.randbytes(rng.randrange(0, 64))
        elif kind == 1:
            raw = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 64)))
        else:  # mutate a valid line
            buf = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            raw = bytes(buf)
        try:
            ev = parse_event(raw, now=NOW)
        except EventError as exc:
            assert str(exc)
            outcomes["error"] += 1
        else:
            assert CANONICAL.fullmatch(ev.timestamp)
            outcomes["ok"] += 1
    assert outcomes["error"] > 2000 and outcomes["ok"] > 0


@pytest.mark.parametrize(
    "obj",
    [None, 1, "x", [], E({}), Ed(tags={"a": 1}), E(timestamp=[]), E(data=1.5), E(id=["k"]), {("t",): 1}],
)
def test_odd_objects_only_raise_event_error(obj: object) -> None:
    with pytest.raises(EventError):
        validate_event(obj, now=NOW)


# -- timestamps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-02-23T10:30:02Z", "2026-02-23T10:30:02Z"),
        ("2026-02-23t10:30:02z", "2026-02-23T10:30:02Z"),
        ("2026-02-23 10:30:02Z", "2026-02-23T10:30:02Z"),
        ("2026-02-23T10:30:02.999999999Z", "2026-02-23T10:30:02Z"),
        ("2026-02-23T10:30:02.5+00:00", "2026-02-23T10:30:02Z"),
        ("2026-02-23T10:30:02-00:00", "2026-02-23T10:30:02Z"),
        ("2026-02-23T12:30:02+02:00", "2026-02-23T10:30:02Z"),
        ("2026-02-23T12:30:02.123+02:00", "2026-02-23T10:30:02Z"),
        ("2026-02-23T05:00:02-05:30", "2026-02-23T10:30:02Z"),
        ("2026-02-23T00:15:00+01:00", "2026-02-22T23:15:00Z"),
        ("2026-12-31T23:30:00-01:00", "2027-01-01T00:30:00Z"),
        ("2024-02-29T23:59:59-23:59", "2024-03-01T23:58:59Z"),
        ("2026-03-01T00:00:00+14:00", "2026-02-28T10:00:00Z"),
        ("2016-12-31T23:59:60Z", "2016-12-31T23:59:59Z"),
        ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"),
    ],
)
def test_normalise_timestamp(value: str, expected: str) -> None:
    assert normalise_timestamp(value) == expected
    assert parse_event(line(timestamp=value), now=NOW).timestamp == expected


@pytest.mark.parametrize(
    "value",
    [
        "2026-02-23T10:30:02",  # naive: no offset
        "2026-02-23T10:30:02.123",
        "2026-02-23",
        "10:30:02Z",
        "2026-02-23T10:30Z",
        "2026-02-23T10:30:02+0200",
        "2026-02-23T10:30:02+02",
        "2026-02-23T10:30:02 Z",
        "2026-02-23T10:30:02.Z",
        "2026-02-23T10:30:02Z ",
        " 2026-02-23T10:30:02Z",
        "2026-02-23T10:30:02Z\n",
        "2026-02-23_10:30:02Z",
        "2026-13-01T00:00:00Z",
        "2026-02-30T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2026-02-23T24:00:00Z",
        "2026-02-23T10:60:00Z",
        "2026-02-23T10:30:61Z",
        "2026-02-23T10:30:02+24:00",
        "2026-02-23T10:30:02+02:60",
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",  # before year 1 once in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 once in UTC
        "٢٠٢٦-02-23T10:30:02Z",  # non-ASCII digits
        "20260223T103002Z",
        "2026-W08-1T10:30:02Z",
        "",
        "now",
    ],
)
def test_not_rfc3339_is_refused(value: str) -> None:
    with pytest.raises(EventError) as info:
        normalise_timestamp(value)
    assert str(info.value).startswith("timestamp must be an RFC 3339 time, got ")
    assert json.dumps(value, ensure_ascii=False) in str(info.value)
    assert reason(line(timestamp=value)) == str(info.value)


def test_naive_time_reason_says_what_is_missing() -> None:
    with pytest.raises(EventError, match=r"no UTC offset"):
        normalise_timestamp("2026-02-23T10:30:02")


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (0.999, "1970-01-01T00:00:00Z"),
        (NOW, NOW_TS),
        (1771842602, NOW_TS),
        (-0.5, "1969-12-31T23:59:59Z"),
        (951782400, "2000-02-29T00:00:00Z"),
        (253402300799, "9999-12-31T23:59:59Z"),
    ],
)
def test_format_timestamp(epoch: float, expected: str) -> None:
    assert format_timestamp(epoch) == expected


def test_format_timestamp_round_trips_through_normalise() -> None:
    for epoch in range(0, 4_000_000_000, 99_999_937):
        ts = format_timestamp(epoch)
        assert normalise_timestamp(ts) == ts
        fields = [int(part) for part in re.split(r"[-T:Z]", ts)[:6]]
        assert calendar.timegm((*fields, 0, 0, 0)) == epoch


# -- synthetic events -------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_synthetic_event_is_valid_and_plausible(event_type: str) -> None:
    ev = synthetic_event(event_type, now=NOW)
    assert ev.type == event_type and ev.timestamp == NOW_TS and ev.idempotency_key is None
    body = orjson.loads(ev.body)
    assert list(body) == ["event", "timestamp", "data"]
    d = body["data"]
    assert re.fullmatch(r"test-[0-9a-f]+", d["message_id"])
    assert d["tags"] == ["test"]
    assert all(isinstance(d[k], str) and d[k] for k in ("from", "to", "subject"))
    assert parse_event(ev.body, now=0) == ev  # passes validation itself, unchanged
    if event_type == "bounced":
        assert d["bounce_type"] == "hard" and d["error_message"]
    if event_type == "clicked":
        assert d["url"].startswith("https://")


def test_synthetic_message_ids_differ() -> None:
    ids = {orjson.loads(synthetic_event("delivered", now=NOW).body)["data"]["message_id"] for _ in range(50)}
    assert len(ids) == 50


def test_synthetic_event_refuses_unknown_types() -> None:
    with pytest.raises(EventError, match='unknown event "exploded"'):
        synthetic_event("exploded", now=NOW)
