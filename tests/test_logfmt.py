"""logfmt intake lines: the same validation and answers as JSON lines."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webhookd.events import EventError, parse_event
from webhookd.logfmt import looks_like_logfmt, parse_pairs


def data(line: bytes) -> Any:
    return orjson.loads(parse_event(line, now=0).body)


def test_the_issue_example() -> None:
    line = (b'event=bounced message_id=<a@b> to=x@example.org bounce_type=hard '
            b'error_message="550 5.1.1 User unknown" tags=order,eu metadata.order_id=12345')
    body = data(line)
    assert list(body) == ["event", "timestamp", "data"]
    assert body["event"] == "bounced"
    assert body["data"] == {
        "message_id": "<a@b>", "to": "x@example.org", "bounce_type": "hard",
        "error_message": "550 5.1.1 User unknown", "tags": ["order", "eu"], "metadata": {"order_id": "12345"},
    }


def test_top_level_fields_and_escapes() -> None:
    line = (b'event=delivered id=exim-1 timestamp=2026-02-23T12:30:02+02:00 message_id="<a b@c>" '
            b'subject="say \\"hi\\"\\nback\\\\slash" tags= empty=')
    ev = parse_event(line, now=0)
    assert ev.idempotency_key == "exim-1" and ev.timestamp == "2026-02-23T10:30:02Z"
    d = orjson.loads(ev.body)["data"]
    assert d["message_id"] == "<a b@c>"
    assert d["subject"] == 'say "hi"\nback\\slash'
    assert d["tags"] == [] and d["empty"] == ""


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"event=bounced message_id=<a@b>", "data.bounce_type is required for bounced events"),
        (b"event=exploded message_id=x", 'unknown event "exploded"'),
        (b"event=delivered", "data.message_id is required"),
        (b'event=delivered message_id="abc', "logfmt: message_id: unterminated quoted value"),
        (b"event=delivered message_id=x stray", "logfmt: expected key=value at column 30, got 'stray'"),
        (b"event=delivered message_id=x message_id=y", "logfmt: duplicate key 'message_id'"),
        (b'event=delivered message_id=a"b', "logfmt: message_id: a quote inside a bare value"),
        (b'event=delivered message_id="x\\q"', "logfmt: message_id: unknown escape \\q"),
        (b'event=delivered message_id="x"y', "logfmt: message_id: expected a space after the closing quote"),
        (b"event=delivered message_id=x metadata=1", "logfmt: metadata takes named fields"),
        (b"event=delivered message_id=\xff", "invalid UTF-8 at byte 27"),
    ],
)
def test_errors_name_the_problem(line: bytes, reason: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(line, now=0)
    assert str(info.value).startswith(reason)


def test_json_lines_are_still_json() -> None:
    assert not looks_like_logfmt(b'{"event": "delivered"}')
    assert not looks_like_logfmt(b"null")
    assert not looks_like_logfmt(b"[1]")
    assert looks_like_logfmt(b"  event=delivered")
    with pytest.raises(EventError, match="event must be a JSON object, got null"):
        parse_event(b"null", now=0)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda k: k not in ("event", "timestamp", "id", "tags", "metadata", "message_id")),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20), max_size=5))
def test_quoted_values_round_trip(fields: dict[str, str]) -> None:
    def quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace(
            "\r", "\\r").replace("\t", "\\t") + '"'

    line = "event=delivered message_id=m " + " ".join(f"{k}={quote(v)}" for k, v in fields.items())
    assert data(line.encode())["data"] == {"message_id": "m", **fields}


def test_pairs_accept_tabs_and_trailing_space() -> None:
    assert parse_pairs('a=1\tb="x y"  ') == [("a", "1"), ("b", "x y")]


async def test_logfmt_over_the_socket(start_daemon: Any, make_receiver: Any) -> None:
    from tests.conftest import event

    receiver = await make_receiver()
    h = await start_daemon()
    await h.create_webhook(receiver.url)
    raw = (b"event=delivered message_id=<l1@x> to=a@example.org tags=t1\n"
           b"event=bounced message_id=<l2@x>\n"
           + orjson.dumps(event("opened", 3)) + b"\n"
           + b'event=bounced message_id=<l3@x> bounce_type=soft error_message="452 4.2.2 Mailbox full"')
    acks = await h.submit_raw(raw)
    assert [a["ok"] for a in acks] == [True, False, True, True]
    assert "bounce_type" in acks[1]["error"]
    reqs = await receiver.wait_for(3)
    by_id = {r.json["data"]["message_id"]: r.json for r in reqs}
    assert by_id["<l1@x>"]["data"] == {"message_id": "<l1@x>", "to": "a@example.org", "tags": ["t1"]}
    assert by_id["<l3@x>"]["data"]["error_message"] == "452 4.2.2 Mailbox full"
