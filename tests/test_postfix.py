"""The Postfix log follower: the parser on a fixture of log lines, rotation, resume."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import pytest

from webhookd.postfix import Follower, parse_lines

FIXTURE = Path(__file__).parent / "fixtures" / "postfix" / "mail.log"


def events() -> list[dict[str, Any]]:
    return list(parse_lines(FIXTURE.read_text().splitlines()))


def test_parser_on_real_log_lines() -> None:
    got = [(e["event"], e["data"]["to"], e["data"].get("bounce_type")) for e in events()]
    assert got == [
        ("delivered", "ann@example.org", None),
        ("bounced", "nobody@example.org", "hard"),
        ("bounced", "full@example.net", "soft"),   # deferred, mailbox full
        ("bounced", "full@example.net", "soft"),   # the same deferral again: same idempotency key
        ("bounced", "spam@example.com", "soft"),   # 5.7.1 policy block: soft, reason kept
        ("delivered", "full@example.net", None),
        ("failed", "bob@example.com", None),       # expired while still deferred
    ]
    evs = events()
    assert evs[2]["id"] == evs[3]["id"]
    assert evs[0]["data"]["message_id"] == "<order-1@shop.example>"
    assert evs[0]["data"]["from"] == "orders@shop.example"
    assert "550 5.1.1" in evs[1]["data"]["error_message"]
    assert "Client host blocked" in evs[4]["data"]["error_message"]
    assert "Connection timed out" in evs[6]["data"]["error_message"]
    assert len({e["id"] for e in evs}) == 6


def test_postfix_notifications_are_skipped() -> None:
    assert all(e["data"]["to"] != "orders@shop.example" for e in events())


class Collect:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail_next = 0

    def __call__(self, batch: list[dict[str, Any]]) -> bool:
        if self.fail_next:
            self.fail_next -= 1
            return False
        self.events.extend(batch)
        return True


def test_follower_resumes_from_its_saved_position(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    lines = FIXTURE.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:6]))
    first = Collect()
    Follower(log, state, first).run(once=True)
    assert [e["data"]["to"] for e in first.events] == ["ann@example.org", "nobody@example.org"]
    with log.open("a") as f:
        f.write("".join(lines[6:]))
    second = Collect()  # a restart: correlation state (message-id, sender) comes back too
    Follower(log, state, second).run(once=True)
    assert [e["event"] for e in second.events] == ["bounced", "bounced", "bounced", "delivered", "failed"]
    assert second.events[0]["data"]["message_id"] == "<order-1@shop.example>"


def test_unreachable_daemon_is_retried_not_skipped(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    log.write_text(FIXTURE.read_text())
    sink = Collect()
    sink.fail_next = 2
    Follower(log, state, sink, sleep=lambda _s: None).run(once=True)
    assert len(sink.events) == 7


def test_partial_last_line_waits_for_its_end(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    lines = FIXTURE.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:4]) + lines[4][:40])
    sink = Collect()
    Follower(log, state, sink).run(once=True)
    assert sink.events == []
    with log.open("a") as f:
        f.write(lines[4][40:])
    Follower(log, state, sink).run(once=True)
    assert [e["data"]["to"] for e in sink.events] == ["ann@example.org"]


def test_rotation_by_rename_and_by_truncate(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    lines = FIXTURE.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:5]))
    sink = Collect()
    follower = Follower(log, state, sink, poll=0.01)
    ticks = 0

    def rotate_on_idle(_seconds: float) -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 1:  # logrotate: rename, then a new file; one more line lands in the old one
            with log.open("a") as f:
                f.write(lines[5])
            os.rename(log, tmp_path / "mail.log.1")
            log.write_text("".join(lines[6:12]))
        elif ticks == 3:  # copytruncate: the same file, emptied, then written again
            log.write_text("")
            log.write_text("".join(lines[12:]))

    follower.sleep = rotate_on_idle
    follower.run(max_idle=0.2)
    tos = [(e["event"], e["data"]["to"]) for e in sink.events]
    assert tos == [
        ("delivered", "ann@example.org"),
        ("bounced", "nobody@example.org"),     # written to the old file after the rename
        ("bounced", "full@example.net"),
        ("bounced", "full@example.net"),
        ("bounced", "spam@example.com"),
        ("delivered", "full@example.net"),
        ("failed", "bob@example.com"),
    ]


async def test_follow_postfix_once_submits_to_the_daemon(start_daemon: Any, make_receiver: Any,
                                                        tmp_path: Path) -> None:
    import asyncio

    import structlog.testing

    from webhookd.cli import main

    receiver = await make_receiver()
    h = await start_daemon()
    await h.create_webhook(receiver.url)
    config = tmp_path / "cli.toml"
    config.write_text(f'environment = "development"\nstate_dir = "{h.config.state_dir}"\n'
                      f'runtime_dir = "{h.config.runtime_dir}"\n')
    args = ["follow", "postfix", "--log", str(FIXTURE), "--once", "--config", str(config)]
    with structlog.testing.capture_logs():
        assert await asyncio.to_thread(main, args) == 0
        await receiver.wait_for(6)
        # read again from the start (lost state file): idempotency keys make it harmless
        (h.config.state_dir / "postfix-follow.json").unlink()
        assert await asyncio.to_thread(main, args) == 0
        await asyncio.sleep(0.2)
    kinds = sorted((r.json["event"], r.json["data"]["to"]) for r in receiver.requests)
    assert kinds == sorted([
        ("delivered", "ann@example.org"), ("bounced", "nobody@example.org"), ("bounced", "full@example.net"),
        ("bounced", "spam@example.com"), ("delivered", "full@example.net"), ("failed", "bob@example.com"),
    ])


def test_long_recipients_keep_distinct_idempotency_keys() -> None:
    rcpt = "x" * 300 + "@example.org"
    lines = [
        "Nov 28 10:00:01 mx1 postfix/qmgr[880]: ABCDE12345: from=<a@shop.example>, size=1, nrcpt=1 (queue active)",
        f"Nov 28 10:00:02 mx1 postfix/smtp[1]: ABCDE12345: to=<{rcpt}>, relay=x, dsn=4.2.2, status=deferred "
        "(host x said: 452 4.2.2 Mailbox full)",
        f"Nov 28 10:00:03 mx1 postfix/smtp[1]: ABCDE12345: to=<{rcpt}>, relay=x, dsn=2.0.0, status=sent (250 ok)",
    ]
    a, b = parse_lines(lines)
    assert len(a["id"]) <= 255 and len(b["id"]) <= 255
    assert a["id"] != b["id"] and a["id"].endswith(":mailbox-full") and b["id"].endswith(":sent")


def _stopped_then_rotated(tmp_path: Path, rotate: Any, name: str = "mail.log") -> list[tuple[str, str]]:
    """Follow part of a log, stop; more lines land in it; it is rotated (by `rotate`) and a
    new log begins; a restarted follower must read both, each line once."""
    log, state = tmp_path / name, tmp_path / "state.json"
    lines = FIXTURE.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:5]))
    sink = Collect()
    Follower(log, state, sink).run(once=True)  # ann@ delivered
    with log.open("a") as f:
        f.write("".join(lines[5:9]))  # written while nobody follows
    rotate(log)
    log.write_text("".join(lines[9:]))
    Follower(log, state, sink).run(once=True)
    return [(e["event"], e["data"]["to"]) for e in sink.events]


ALL_EVENTS = [
    ("delivered", "ann@example.org"),
    ("bounced", "nobody@example.org"),
    ("bounced", "full@example.net"),
    ("bounced", "full@example.net"),
    ("bounced", "spam@example.com"),
    ("delivered", "full@example.net"),
    ("failed", "bob@example.com"),
]


def test_rotated_while_stopped_by_rename(tmp_path: Path) -> None:
    assert _stopped_then_rotated(tmp_path, lambda log: os.rename(log, tmp_path / "mail.log.1")) == ALL_EVENTS


def test_rotated_while_stopped_and_compressed(tmp_path: Path) -> None:
    """What `postfix logrotate` does: rename with a date, then gzip (a new inode)."""

    def rotate(log: Path) -> None:
        with log.open("rb") as src, gzip.open(tmp_path / "mail.log.20261128-101500.gz", "wb") as dst:
            dst.write(src.read())
        log.unlink()

    (tmp_path / "mail.log.20261121-101500.gz").write_bytes(gzip.compress(b"an older log\n" * 100))
    assert _stopped_then_rotated(tmp_path, rotate) == ALL_EVENTS


def test_rotated_while_stopped_by_copytruncate(tmp_path: Path) -> None:
    def rotate(log: Path) -> None:
        (tmp_path / "mail.log-20261128").write_bytes(log.read_bytes())
        log.write_text("")

    assert _stopped_then_rotated(tmp_path, rotate) == ALL_EVENTS


def test_rotated_copy_not_found_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = _stopped_then_rotated(tmp_path, lambda log: log.unlink())
    assert got == [ALL_EVENTS[0], *ALL_EVENTS[3:]]  # the lines of the lost file cannot be read
    assert "no rotated copy" in capsys.readouterr().err


def test_interrupted_reading_of_a_rotated_copy_resumes(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    lines = FIXTURE.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:5]))
    sink = Collect()
    Follower(log, state, sink).run(once=True)
    with log.open("a") as f:
        f.write("".join(lines[5:12]))
    os.rename(log, tmp_path / "mail.log.1")
    log.write_text("".join(lines[12:]))

    class Crash(Exception):
        pass

    def crash_after_first(batch: list[dict[str, Any]]) -> bool:
        sink(batch)
        raise Crash

    with pytest.raises(Crash):
        Follower(log, state, crash_after_first).run(once=True)
    Follower(log, state, sink).run(once=True)
    # every event arrived; the batch taken just before the crash may come again (its
    # position was not saved), which the idempotency keys make harmless
    ids = [e["id"] for e in sink.events]
    assert set(ids) == {e["id"] for e in parse_lines(lines)}


def test_follower_waits_for_a_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    log, state = tmp_path / "mail.log", tmp_path / "state.json"
    lines = FIXTURE.read_text().splitlines(keepends=True)
    sink = Collect()
    naps = 0

    def nap(_seconds: float) -> None:
        nonlocal naps
        naps += 1
        if naps == 3:
            log.write_text("".join(lines))

    Follower(log, state, sink, poll=0.01, sleep=nap).run(max_idle=0.05)
    assert len(sink.events) == 7


def test_rotated_copy_found_for_a_log_name_with_glob_characters(tmp_path: Path) -> None:
    got = _stopped_then_rotated(tmp_path, lambda log: os.rename(log, tmp_path / "mail[1].log.1"), name="mail[1].log")
    assert got == ALL_EVENTS
