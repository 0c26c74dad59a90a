"""The `webhookd` command line: `serve`, `submit`, `check-config`, and clients of the admin API.

Only the standard library is imported here: MTA hooks run `webhookd submit`
once per message, so start-up must stay fast. `serve` imports the daemon lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from webhookd.client import AdminClient, DaemonUnreachable, submit_lines
from webhookd.config import Config, ConfigError, load_config

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78


class CliError(Exception):
    def __init__(self, message: str, status: int = EX_FAIL) -> None:
        super().__init__(message)
        self.status = status


# -- output -------------------------------------------------------------------------------------
def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _fields(obj: dict[str, Any], skip: Sequence[str] = ()) -> None:
    keys = [k for k in obj if k not in skip]
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        print(f"{key.ljust(width)}  {_text(obj[key])}")


def _webhook_state(wh: dict[str, Any]) -> str:
    return "enabled" if wh.get("enabled") else f"disabled ({wh.get('disabled_reason') or 'manual'})"


def show_webhooks(data: dict[str, Any]) -> None:
    rows = [
        [w["id"], _webhook_state(w), str(w["consecutive_failures"]), _text(w["events"]), w["url"]]
        for w in data["webhooks"]
    ]
    if not rows:
        print("no webhooks yet: webhookd webhooks create --url URL")
        return
    _table(rows, ["ID", "STATE", "FAILURES", "EVENTS", "URL"])


def show_webhook(data: dict[str, Any]) -> None:
    _fields(data, skip=("secret",))
    if data.get("secret"):
        print(f"\nsigning secret: {data['secret']}")
        print("Store it now in the receiving application; `webhookd webhooks secret ID` shows it again.")


def show_deliveries(data: dict[str, Any]) -> None:
    rows = []
    for d in data["deliveries"]:
        last = d["last_error"] or (str(d["last_status_code"]) if d["last_status_code"] else "-")
        rows.append([str(d["id"]), d["status"], str(d["attempts"]), d["event"], d["webhook_id"],
                     _text(d["next_attempt_at"]), last[:60]])
    if not rows:
        print("no deliveries match")
        return
    _table(rows, ["ID", "STATUS", "ATTEMPTS", "EVENT", "WEBHOOK", "NEXT ATTEMPT", "LAST RESULT"])


def show_delivery(data: dict[str, Any]) -> None:
    _fields(data, skip=("attempt_log",))
    log = data.get("attempt_log") or []
    if log:
        print()
        rows = [[a["at"], _text(a["status_code"]), f"{a['duration_ms']:.0f}", _text(a["error"])[:60]] for a in log]
        _table(rows, ["AT", "STATUS", "MS", "ERROR"])


def show_test(data: dict[str, Any]) -> None:
    verdict = "accepted" if data["ok"] else "FAILED"
    code = data["status_code"] if data["status_code"] is not None else "no response"
    print(f"{verdict}: HTTP {code} in {data['duration_ms']:.0f} ms")
    if data.get("error"):
        print(f"error: {data['error']}")
    if data.get("response_body"):
        print(f"response: {data['response_body'][:200]}")


def show_status(data: dict[str, Any]) -> None:
    print(f"webhookd {data.get('version', '?')}, up {data.get('uptime_s', 0):.0f} s")
    d, w = data["deliveries"], data["webhooks"]
    print("deliveries: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    print(f"webhooks: {w['enabled']} enabled, {w['disabled']} disabled")


def show_secret(data: dict[str, Any]) -> None:
    print(data["secret"])


def show_deleted(data: dict[str, Any]) -> None:
    print(f"deleted {data['deleted']}")


# -- commands -----------------------------------------------------------------------------------
def _events_arg(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    return ["*"] if items in (["all"], ["*"]) else items


def _admin(config: Config) -> AdminClient:
    if config.admin.socket is None:
        raise CliError("admin.socket is disabled in the config; the CLI needs it", EX_CONFIG)
    return AdminClient(config.admin.socket)


def _call(args: argparse.Namespace, config: Config, method: str, path: str, body: dict[str, Any] | None,
          show: Callable[[dict[str, Any]], None]) -> int:
    status, data = _admin(config).request(method, path, body)
    if status >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        raise CliError(message or f"HTTP {status}")
    if args.json:
        print(json.dumps(data))
    else:
        show(data)
    return EX_OK


def _id(value: str) -> str:
    return quote(value, safe="")


def cmd_webhooks(args: argparse.Namespace, config: Config) -> int:
    action = args.action
    if action == "create":
        body: dict[str, Any] = {"url": args.url, "events": _events_arg(args.events)}
        if args.description is not None:
            body["description"] = args.description
        return _call(args, config, "POST", "/v1/webhooks", body, show_webhook)
    if action == "list":
        return _call(args, config, "GET", "/v1/webhooks", None, show_webhooks)
    base = f"/v1/webhooks/{_id(args.id)}"
    if action == "show":
        return _call(args, config, "GET", base, None, show_webhook)
    if action == "update":
        body = {}
        if args.url is not None:
            body["url"] = args.url
        if args.events is not None:
            body["events"] = _events_arg(args.events)
        if args.description is not None:
            body["description"] = args.description
        if not body:
            raise CliError("nothing to update: give --url, --events or --description", EX_USAGE)
        return _call(args, config, "PATCH", base, body, show_webhook)
    if action == "delete":
        return _call(args, config, "DELETE", base, None, show_deleted)
    if action == "enable":
        return _call(args, config, "POST", f"{base}/enable", {"drop_backlog": args.drop_backlog}, show_webhook)
    if action == "disable":
        return _call(args, config, "POST", f"{base}/disable", None, show_webhook)
    if action == "test":
        return _call(args, config, "POST", f"{base}/test", {"event": args.event}, show_test)
    if action == "rotate-secret":
        return _call(args, config, "POST", f"{base}/rotate-secret", None, show_webhook)
    if action == "secret":
        return _call(args, config, "GET", f"{base}/secret", None, show_secret)
    raise CliError(f"unknown action {action}", EX_USAGE)


def cmd_deliveries(args: argparse.Namespace, config: Config) -> int:
    if args.action == "list":
        query = {k: v for k, v in (("webhook_id", args.webhook), ("status", args.status), ("limit", args.limit))
                 if v is not None}
        path = "/v1/deliveries" + (f"?{urlencode(query)}" if query else "")
        return _call(args, config, "GET", path, None, show_deliveries)
    base = f"/v1/deliveries/{_id(args.id)}"
    if args.action == "show":
        return _call(args, config, "GET", base, None, show_delivery)
    return _call(args, config, "POST", f"{base}/retry", None, show_delivery)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    return _call(args, config, "GET", "/v1/status", None, show_status)


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    where = str(config.source) if config.source else "built-in defaults"
    if args.json:
        print(json.dumps({"ok": True, "source": config.source and str(config.source)}))
    else:
        print(f"config OK: {where}")
    return EX_OK


def _is_tempfail(answer: bytes) -> bool:
    try:
        error = json.loads(answer).get("error") or ""
    except (ValueError, AttributeError):
        return True
    return str(error).startswith(("storage", "temporarily"))


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    if config.intake.socket is None:
        raise CliError("intake.socket is disabled in the config", EX_CONFIG)
    if args.events:
        lines: list[bytes] = [e.encode() for e in args.events]
    else:
        lines = [line.rstrip(b"\r\n") for line in sys.stdin.buffer if line.strip()]
    if not lines:
        return EX_OK
    rejected = tempfail = False
    answered = 0
    try:
        for answer in submit_lines(config.intake.socket, lines):
            answered += 1
            sys.stdout.buffer.write(answer + b"\n")
            sys.stdout.flush()
            if b'"ok":true' not in answer.replace(b" ", b""):
                rejected = True
                tempfail = tempfail or _is_tempfail(answer)
    except DaemonUnreachable as exc:
        raise CliError(str(exc), EX_TEMPFAIL) from None
    except (ConnectionError, OSError) as exc:
        raise CliError(f"intake connection failed: {exc}", EX_TEMPFAIL) from None
    if answered < len(lines):
        raise CliError(f"only {answered} of {len(lines)} events were answered", EX_TEMPFAIL)
    if tempfail:
        return EX_TEMPFAIL
    return EX_DATAERR if rejected else EX_OK


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from webhookd.daemon import run

    return run(config)


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: $WEBHOOKD_CONFIG, "
                        "else /etc/webhookd/config.toml if present, else built-in defaults)")
    common.add_argument("--json", action="store_true", help="print the admin API's JSON")

    parser = argparse.ArgumentParser(prog="webhookd", description="Durable webhook dispatcher for mail events.")
    from webhookd import __version__

    parser.add_argument("--version", action="version", version=f"webhookd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    p.add_argument("--dev", action="store_true", help="development mode: http:// and loopback receivers allowed")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("submit", parents=[common], help="submit events (arguments, or lines of stdin)")
    p.add_argument("events", nargs="*", metavar="JSON")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("check-config", parents=[common], help="validate the config and exit")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("status", parents=[common], help="deliveries by status, webhooks by state")
    p.set_defaults(func=cmd_status)

    wh = sub.add_parser("webhooks", help="manage webhooks").add_subparsers(dest="action", required=True,
                                                                           metavar="ACTION")
    p = wh.add_parser("create", parents=[common], help="create a webhook (prints its signing secret)")
    p.add_argument("--url", required=True)
    p.add_argument("--events", default="all", help="comma-separated event names, or all (default)")
    p.add_argument("--description")
    wh.add_parser("list", parents=[common], help="list webhooks")
    for name, text in [("show", "show a webhook"), ("delete", "delete a webhook and its deliveries"),
                       ("disable", "disable a webhook (its deliveries are paused)"),
                       ("rotate-secret", "new secret; the old one stays valid for 24 h"),
                       ("secret", "print the signing secret")]:
        wh.add_parser(name, parents=[common], help=text).add_argument("id", metavar="ID")
    p = wh.add_parser("update", parents=[common], help="change url, events or description")
    p.add_argument("id", metavar="ID")
    p.add_argument("--url")
    p.add_argument("--events")
    p.add_argument("--description")
    p = wh.add_parser("enable", parents=[common], help="re-enable; paused deliveries resume")
    p.add_argument("id", metavar="ID")
    p.add_argument("--drop-backlog", action="store_true", help="mark paused deliveries failed instead")
    p = wh.add_parser("test", parents=[common], help="send a synthetic signed event now")
    p.add_argument("id", metavar="ID")
    p.add_argument("--event", default="delivered")
    for action in wh.choices.values():
        action.set_defaults(func=cmd_webhooks)

    dl = sub.add_parser("deliveries", help="inspect and retry deliveries").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = dl.add_parser("list", parents=[common], help="list deliveries, newest first")
    p.add_argument("--webhook", metavar="ID")
    p.add_argument("--status", help="pending, paused, succeeded, failed (comma-separated)")
    p.add_argument("--limit", type=int)
    dl.add_parser("show", parents=[common], help="a delivery with its attempt log").add_argument("id", metavar="ID")
    dl.add_parser("retry", parents=[common], help="attempt a delivery again now").add_argument("id", metavar="ID")
    for action in dl.choices.values():
        action.set_defaults(func=cmd_deliveries)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, dev=getattr(args, "dev", False))
    except ConfigError as exc:
        print(f"webhookd: config error: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        status: int = args.func(args, config)
        return status
    except CliError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return exc.status
    except DaemonUnreachable as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EX_FAIL
    except Exception as exc:
        print(f"webhookd: unexpected error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_FAIL
