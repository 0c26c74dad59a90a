"""DSN classification: one table, enhanced code first, SMTP reply code as fallback."""

from __future__ import annotations

import pytest

from webhookd.dsn import classify, find_codes

CASES = [
    # (text, bounce_type, mailbox_full)
    ("550 5.1.1 <x@example.org>: Recipient address rejected: User unknown", "hard", False),
    ("550-5.1.1 The email account that you tried to reach does not exist", "hard", False),
    ("553 5.1.3 Bad recipient address syntax", "hard", False),
    ("550 5.4.1 Recipient address rejected: Access denied", "hard", False),
    ("554 5.4.4 Unable to route: no mail hosts for domain", "hard", False),
    ("452 4.2.2 Mailbox full", "soft", True),
    ("552 5.2.2 Mailbox full; quota exceeded", "soft", True),
    ("550 5.7.1 Message rejected as spam by Content Filtering", "soft", False),
    ("554 5.7.606 Access denied, banned sending IP", "soft", False),
    ("421 4.7.0 Try again later, closing connection", "soft", False),
    ("451 4.3.0 Temporary lookup failure", "soft", False),
    ("550 5.2.1 Mailbox disabled", "hard", False),
    ("554 5.3.4 Message too big for system", "hard", False),
    ("550 Requested action not taken: mailbox unavailable", "hard", False),
    ("552 Requested mail action aborted: exceeded storage allocation", "soft", True),
    ("450 Requested mail action not taken: mailbox busy", "soft", False),
    ("connection timed out", "soft", False),
    ("", "soft", False),
]


@pytest.mark.parametrize(("text", "bounce_type", "mailbox_full"), CASES)
def test_table(text: str, bounce_type: str, mailbox_full: bool) -> None:
    result = classify(text)
    assert (result.bounce_type, result.mailbox_full) == (bounce_type, mailbox_full), result.reason


def test_enhanced_code_wins_over_reply_code() -> None:
    assert classify("550 4.2.2 over quota").bounce_type == "soft"
    assert classify(enhanced="5.1.1", reply=452).bounce_type == "hard"
    assert classify(reply=550).bounce_type == "hard"


def test_codes_are_found_only_as_whole_tokens() -> None:
    assert find_codes("host 10.5.1.1 said 250 ok") == (None, 250)
    assert find_codes("queued as 12345; 452 4.2.2 full") == ("4.2.2", 452)
    assert find_codes("version 1.5.1.1") == (None, None)
    assert find_codes("host mx[192.0.2.250] said: 550 No such user") == (None, 550)
    assert find_codes("RCPT TO:<user552@example.org>: 550 unknown") == (None, 550)
    assert classify("host mx[192.0.2.250] said: 550 No such user").bounce_type == "hard"
