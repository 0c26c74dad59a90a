"""webhookd submit-arf: RFC 5965 feedback reports → complained events."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from webhookd.arf import ArfError, parse_report

FIXTURES = Path(__file__).parent / "fixtures" / "arf"


def test_rfc5965_example() -> None:
    ev = parse_report((FIXTURES / "rfc5965.eml").read_bytes())
    assert ev["event"] == "complained"
    d = ev["data"]
    assert d["message_id"] == "8787KJKJ3K4J3K4J3K4J3.mail@example.net"
    assert d["from"] == "somespammer@example.net" and d["to"] == "user@example.com"
    assert d["subject"] == "Earn money"
    assert d["feedback_type"] == "abuse" and d["reported_by"] == "SomeGenerator/1.0"
    assert d["source_ip"] == "192.0.2.1"
    assert ev["id"].startswith("arf:8787KJKJ3K4J3K4J3K4J3.mail@example.net:user@example.com")


def test_yahoo_headers_only_report() -> None:
    d = parse_report((FIXTURES / "yahoo_headers_only.eml").read_bytes())["data"]
    assert d["message_id"] == "<order-12345@shop.example>"
    assert d["from"] == "bounces@shop.example"  # the envelope sender from the report
    assert d["to"] == "redacted@yahoo.com"
    assert d["subject"] == "Your order has shipped \u2714"  # RFC 2047 decoded


def test_microsoft_report_without_original_rcpt_to() -> None:
    d = parse_report((FIXTURES / "microsoft_jmrp.eml").read_bytes())["data"]
    assert d["message_id"] == "<news-2026-02@shop.example>"
    assert d["to"] == "someone@outlook.com"  # from the embedded message's To:
    assert d["reported_by"] == "Hotmail FBL"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"From: a@b\nSubject: hi\n\nplain mail\n", "not a feedback report"),
        ((FIXTURES / "rfc5965.eml").read_bytes().replace(b"Message-ID: 8787KJKJ3K4J3K4J3K4J3.mail@example.net\n", b""),
         "no Message-ID"),
        ((FIXTURES / "rfc5965.eml").read_bytes().replace(b"message/feedback-report", b"text/plain"),
         "no message/feedback-report part"),
    ],
)
def test_unusable_reports_are_named(raw: bytes, reason: str) -> None:
    with pytest.raises(ArfError, match=reason):
        parse_report(raw)


async def test_submit_arf_end_to_end(start_daemon: Any, make_receiver: Any, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from webhookd.cli import main

    receiver = await make_receiver()
    h = await start_daemon()
    await h.create_webhook(receiver.url, ["complained"])
    config = tmp_path / "cli.toml"
    config.write_text(f'environment = "development"\nstate_dir = "{h.config.state_dir}"\n'
                      f'runtime_dir = "{h.config.runtime_dir}"\n')
    report = (FIXTURES / "yahoo_headers_only.eml").read_bytes()

    def run(stdin: bytes) -> int:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        return main(["submit-arf", "--config", str(config)])

    assert await asyncio.to_thread(run, report) == 0
    assert await asyncio.to_thread(run, report) == 0  # the provider sent it twice: one event
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"ok"')]
    assert json.loads(out[0])["id"] == json.loads(out[1])["id"]
    [req] = await receiver.wait_for(1)
    assert req.json["event"] == "complained"
    assert req.json["data"]["message_id"] == "<order-12345@shop.example>"
    assert await asyncio.to_thread(run, b"not a report") == 65
    assert "not a feedback report" in capsys.readouterr().err
