"""Tracked URLs: what the rewriter, the milter, the CLI and the admin API put into mail."""

from __future__ import annotations

import time
from collections.abc import Callable

from webhookd.tracking.tokens import KeyRing


class Links:
    """Makes pixel and click URLs under `base_url` (e.g. ``https://t.example.com``)."""

    def __init__(
        self, ring: KeyRing, base_url: str, *, include_recipient: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ring = ring
        self.base_url = base_url.rstrip("/")
        self.include_recipient = include_recipient
        self.clock = clock

    def pixel(self, message_id: str, to: str = "") -> str:
        claims = self.ring.claims(
            "open", message_id, to=to, include_recipient=self.include_recipient, now=self.clock()
        )
        return f"{self.base_url}/o/{self.ring.sign(claims)}.gif"

    def click(self, message_id: str, url: str, to: str = "") -> str:
        """The tracked form of `url`; ValueError if it is not an http(s) URL we may sign."""
        claims = self.ring.claims(
            "click", message_id, to=to, url=url, include_recipient=self.include_recipient, now=self.clock()
        )
        return f"{self.base_url}/c/{self.ring.sign(claims)}"
