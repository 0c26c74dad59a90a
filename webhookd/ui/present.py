"""How webhooks and deliveries are described on the pages: state labels, badges, reasons."""

from __future__ import annotations

from dataclasses import dataclass

from webhookd import policy
from webhookd.apimodel import webhook_stats_json
from webhookd.store.model import WebhookStats
from webhookd.webhooks import Webhook


@dataclass(frozen=True, slots=True)
class State:
    key: str  # "active", "failing" or "disabled": the badge's class
    label: str  # the badge's text
    detail: str  # one sentence, for a highlighted disabled webhook


def state_of(wh: Webhook) -> State:
    if not wh.enabled:
        if wh.disabled_reason == policy.CONSECUTIVE_FAILURES:
            return State("disabled", "disabled",
                         f"Disabled automatically after {wh.consecutive_failures} consecutive failures.")
        return State("disabled", "disabled", "Disabled by hand.")
    if wh.consecutive_failures:
        n = wh.consecutive_failures
        return State("failing", "failing", f"{n} consecutive failure{'s' if n != 1 else ''}; backing off.")
    return State("active", "active", "Delivering.")


def events_text(events: tuple[str, ...]) -> str:
    return "all events" if "*" in events else ", ".join(events)


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the webhooks list."""

    wh: Webhook
    state: State
    stats: WebhookStats
    success_rate: float | None


def webhook_row(wh: Webhook, stats: WebhookStats | None) -> Row:
    st = stats or WebhookStats(wh.id)
    rate = webhook_stats_json(wh, st)["success_rate_24h"]
    return Row(wh, state_of(wh), st, rate)
