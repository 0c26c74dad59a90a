"""What the `webhookd` CLI prints for people (tables and fields); `--json` prints the API's own
bytes instead. Standard library only, like the rest of the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _one_line(text: str, limit: int = 0) -> str:
    flat = " ".join(text.split())
    return flat[: limit - 1] + "…" if limit and len(flat) > limit else flat


def _text(value: Any, limit: int = 0) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return _one_line(",".join(_text(v) for v in value), limit)
    if isinstance(value, dict):
        return _one_line(", ".join(f"{k} {_text(v)}" for k, v in value.items()), limit)
    return _one_line(str(value), limit)


def _events(value: Any) -> str:
    return "all" if value in (["*"], "*") else _text(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


_FILTER_LABELS = (("from_domains", "from"), ("to_domains", "to"), ("tags", "tags"), ("metadata", "metadata"))


def _filter_text(value: Any, limit: int = 0) -> str:
    """A webhook's filter on one line: ``from shop.example,*.shop.example; tags vip``."""
    if not isinstance(value, dict):
        return _text(value, limit)
    parts = []
    for key, label in _FILTER_LABELS:
        items = value.get(key)
        if isinstance(items, dict):
            items = [f"{k}={v}" for k, v in items.items()]
        if items:
            parts.append(f"{label} {','.join(str(i) for i in items)}")
    return _one_line("; ".join(parts), limit) if parts else "-"


def _fields(obj: dict[str, Any], skip: Sequence[str] = ()) -> None:
    items = [(k, v) for k, v in obj.items() if k not in skip]
    width = max((len(k) for k, _ in items), default=0) + 1
    for key, value in items:
        text = _events(value) if key == "events" else _filter_text(value) if key == "filter" else _text(value)
        print(f"{key + ':':<{width}} {text}")


def _state(hook: dict[str, Any]) -> str:
    if hook.get("enabled"):
        return "enabled"
    return f"disabled ({hook.get('disabled_reason') or 'manual'})"


def show_webhooks(data: Any) -> None:
    hooks = data.get("webhooks") or []
    if not hooks:
        print("no webhooks (add one: webhookd webhooks create --url URL)")
        return
    rows = [
        [_text(h.get("id")), _state(h), _text(h.get("consecutive_failures")), _events(h.get("events")),
         _filter_text(h.get("filter"), 40), _text(h.get("url"))]
        for h in hooks
    ]
    _table(["ID", "STATE", "FAILS", "EVENTS", "FILTER", "URL"], rows)


def show_webhook(data: Any) -> None:
    _fields(data, skip=("secret",))
    if data.get("secret"):
        print(f"secret: {data['secret']}")
        print()
        print("Store the secret now in the receiving application: it verifies the signatures.")
        print(f"`webhookd webhooks secret {data.get('id', 'ID')}` shows it again.")


def show_secret(data: Any) -> None:
    _fields(data)


def _last_result(d: dict[str, Any]) -> str:
    code, error = d.get("last_status_code"), d.get("last_error")
    if code is not None and error:
        return _one_line(f"{code} {error}", 60)
    if code is not None:
        return str(code)
    return _text(error, 60)


def show_deliveries(data: Any) -> None:
    deliveries = data.get("deliveries") or []
    if not deliveries:
        print("no deliveries match")
        return
    rows = [
        [_text(d.get("id")), _text(d.get("status")), _text(d.get("attempts")), _text(d.get("event")),
         _text(d.get("webhook_id")), _text(d.get("next_attempt_at")), _last_result(d)]
        for d in deliveries
    ]
    _table(["ID", "STATUS", "ATTEMPTS", "EVENT", "WEBHOOK", "NEXT ATTEMPT", "LAST CODE/ERROR"], rows)
    if data.get("next_before"):
        print(f"more: --before {data['next_before']}")


def _ms(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) and not isinstance(value, bool) else _text(value)


def show_delivery(data: Any) -> None:
    _fields(data, skip=("attempt_log",))
    log = data.get("attempt_log")
    if log is None:
        return
    print()
    if not log:
        print("no attempts yet")
        return
    rows = [
        [_text(a.get("at")), _ms(a.get("duration_ms")), _text(a.get("status_code")), _text(a.get("error"), 50),
         _text(a.get("response_body"), 50)]
        for a in log
    ]
    headers = ["AT", "MS", "CODE", "ERROR", "RESPONSE"]
    if any(a.get("batch_id") for a in log):  # batched: which batch each attempt went in
        headers.append("BATCH")
        for row, a in zip(rows, log, strict=True):
            row.append(_text(a.get("batch_id")) or "-")
    _table(headers, rows)


def show_test(data: Any) -> None:
    verdict = "accepted" if data.get("ok") else "NOT accepted"
    code = data.get("status_code")
    answer = f"HTTP {code}" if code is not None else "no HTTP response"
    print(f"test event {verdict}: {answer} in {_ms(data.get('duration_ms'))} ms")
    if data.get("error"):
        print(f"error: {_text(data['error'])}")
    if data.get("response_body"):
        print(f"response: {_text(data['response_body'], 200)}")


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return _text(seconds)
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    return " ".join(parts[:2]) if parts else f"{s}s"


def show_status(data: Any) -> None:
    print(f"webhookd {_text(data.get('version'))}, up {_duration(data.get('uptime_s'))}")
    deliveries = data.get("deliveries")
    if isinstance(deliveries, dict):
        print("deliveries: " + ", ".join(f"{_text(n)} {status}" for status, n in deliveries.items()))
    hooks = data.get("webhooks")
    if isinstance(hooks, dict):
        print("webhooks: " + ", ".join(f"{_text(n)} {state}" for state, n in hooks.items()))
    _fields(data, skip=("version", "uptime_s", "deliveries", "webhooks"))


def show_count(data: Any) -> None:
    print(_text(data.get("count")))


def show_retried(data: Any) -> None:
    print(f"{_text(data.get('retried'))} failed deliveries queued again")


def show_stats(data: Any) -> None:
    deliveries = data.get("deliveries")
    if isinstance(deliveries, dict):
        print("deliveries: " + ", ".join(f"{_text(n)} {status}" for status, n in deliveries.items()))
    rows = []
    for w in data.get("webhooks") or []:
        rate = w.get("success_rate_24h")
        state = "enabled" if w.get("enabled") else f"disabled ({_text(w.get('disabled_reason'))})"
        last = w.get("last_attempt_at")
        rows.append([_text(w.get("id")), state, _text(w.get("consecutive_failures")),
                     f"{_text(last)} {_last_result(w)}" if last else "-",
                     f"{rate:.0%}" if isinstance(rate, float) else "-",
                     _text(w.get("pending")), _text(w.get("paused"))])
    _table(["WEBHOOK", "STATE", "FAILURES", "LAST ATTEMPT", "24H OK", "PENDING", "PAUSED"], rows)


def show_deleted(data: Any) -> None:
    print(f"deleted {_text(data.get('deleted'))}")


def show_replay(data: Any) -> None:
    if "would_replay" in data:
        print(f"{data['would_replay']} deliveries of {data['id']} would be queued again "
              f"(status {', '.join(data['status'])}, created since {data['since']}); nothing was changed")
        return
    print(f"{data['replayed']} deliveries of {data['id']} queued again "
          f"(status {', '.join(data['status'])}, created since {data['since']})")




def show_token(data: Any) -> None:
    if data.get("token"):
        print(data["token"])
        print("  (shown once: webhookd keeps only its SHA-256; store it now)")
    _fields({k: v for k, v in data.items() if k != "token"})


def show_tokens(data: Any) -> None:
    rows = [
        [_text(t.get("id")), _text(t.get("domains"), 40), "yes" if t.get("read_only") else "no",
         _text(t.get("last_used_at")), "revoked " + _text(t.get("revoked_at")) if t.get("revoked_at") else "active",
         _text(t.get("description"), 30)]
        for t in data.get("tokens", [])
    ]
    _table(["ID", "DOMAINS", "READ-ONLY", "LAST USED", "STATE", "DESCRIPTION"], rows)


def show_revoked(data: Any) -> None:
    print(f"revoked {_text(data.get('revoked'))}")
