"""The `webhookd` command line: `serve`, `submit`, `check-config`, and clients of the admin API.

Only the standard library (and the stdlib-only `webhookd.config` and `webhookd.reasons`)
is imported here: MTA hooks run `webhookd submit` once per message, so start-up must
stay fast. The daemon (aiohttp, asyncio, structlog) is imported by `serve` alone, and
the clients when a command needs them.

Exit status: 0 ok; 1 refused by the daemon (4xx/5xx) or an unexpected error; 2 usage;
65 some events rejected; 69 daemon not running; 75 try later (submit); 78 bad config;
130 interrupted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from webhookd.cli_output import (
    _one_line,
    _text,
    show_count,
    show_deleted,
    show_deliveries,
    show_delivery,
    show_replay,
    show_retried,
    show_revoked,
    show_secret,
    show_stats,
    show_status,
    show_test,
    show_token,
    show_tokens,
    show_webhook,
    show_webhooks,
)
from webhookd.config import Config, ConfigError, load_config
from webhookd.reasons import Reason

if TYPE_CHECKING:
    from webhookd.client import AdminClient

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 2
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_CONFIG = 78
EX_INTERRUPTED = 130

Renderer = Callable[[Any], None]


class CliError(Exception):
    """A one-line failure with its exit status."""

    def __init__(self, message: str, status: int = EX_FAIL) -> None:
        super().__init__(message)
        self.status = status


# -- admin API commands -----------------------------------------------------------------------
def _client(config: Config) -> AdminClient:
    from webhookd.client import AdminClient

    if config.admin.socket is None:
        raise CliError("admin.socket is disabled in the config; the CLI talks to the daemon through it", EX_CONFIG)
    return AdminClient(config.admin.socket)


def _call(args: argparse.Namespace, config: Config, method: str, path: str, body: dict[str, Any] | None,
          render: Renderer) -> int:
    client = _client(config)
    status, data = client.request(method, path, body)
    if status >= 400:
        message = data.get("error") if isinstance(data, dict) else None
        raise CliError(_one_line(str(message)) if message else f"the daemon answered HTTP {status}")
    if args.json:  # exactly the API's JSON, byte for byte
        sys.stdout.buffer.write(client.last_body.strip() + b"\n")
        sys.stdout.flush()
    elif isinstance(data, dict):
        render(data)
    else:
        print(_text(data))
    return EX_OK


def _segment(value: str) -> str:
    return quote(value, safe="")


def _event_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    return ["*"] if "all" in names or "*" in names else names


def _comma_values(values: list[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated flag values; None when the flag was not given
    (`--tag ''` gives [], which clears that field)."""
    if values is None:
        return None
    return list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def _metadata_pairs(values: list[str] | None) -> dict[str, str] | None:
    if values is None:
        return None
    pairs: dict[str, str] = {}
    for value in values:
        if value == "":
            continue  # --metadata '' clears the field
        key, eq, val = value.partition("=")
        if not eq or not key.strip():
            raise CliError(f"--metadata takes KEY=VALUE, got {value!r}", EX_USAGE)
        pairs[key.strip()] = val
    return pairs


def _filter_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The filter fields given on the command line (only those)."""
    given = {
        "from_domains": _comma_values(args.from_domain),
        "to_domains": _comma_values(args.to_domain),
        "tags": _comma_values(args.tag),
        "metadata": _metadata_pairs(args.metadata),
    }
    return {k: v for k, v in given.items() if v is not None}


def _batch_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The batch settings given on the command line (only those; the daemon validates them)."""
    given = {"batch_max_events": args.batch_max_events, "batch_max_bytes": args.batch_max_bytes,
             "batch_linger": args.batch_linger}
    return {k: v for k, v in given.items() if v is not None}


def cmd_webhooks(args: argparse.Namespace, config: Config) -> int:
    action: str = args.action
    if action == "create":
        body: dict[str, Any] = {"url": args.url, "events": _event_list(args.events)}
        if args.description is not None:
            body["description"] = args.description
        fields = _filter_flags(args)
        if fields:
            body["filter"] = fields
        body.update(_batch_flags(args))
        return _call(args, config, "POST", "/v1/webhooks", body, show_webhook)
    if action == "list":
        return _call(args, config, "GET", "/v1/webhooks", None, show_webhooks)
    base = f"/v1/webhooks/{_segment(args.id)}"
    if action == "show":
        return _call(args, config, "GET", base, None, show_webhook)
    if action == "update":
        body = {}
        if args.url is not None:
            body["url"] = args.url
        if args.events is not None:
            body["events"] = _event_list(args.events)
        if args.description is not None:
            body["description"] = args.description
        fields = _filter_flags(args)
        if args.clear_filter:
            body["filter"] = fields  # only what is given along with it
        elif fields:  # the fields given replace theirs; the others are kept (the API replaces the whole filter)
            status, current = _client(config).request("GET", base, None)
            if status >= 400:
                message = current.get("error") if isinstance(current, dict) else None
                raise CliError(_one_line(str(message)) if message else f"the daemon answered HTTP {status}")
            body["filter"] = {**(current.get("filter") or {}), **fields}
        body.update(_batch_flags(args))
        if not body:
            raise CliError("nothing to update: give --url, --events, --description, a filter flag, --clear-filter"
                           " or a --batch-... flag", EX_USAGE)
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
    if action == "replay":
        body = {"since": _since(args.since), "status": [s.strip() for s in args.status.split(",") if s.strip()],
                "dry_run": args.dry_run}
        return _call(args, config, "POST", f"{base}/replay", body, show_replay)
    raise CliError(f"unknown action {action!r}", EX_USAGE)


def _since(value: str) -> str:
    """An RFC 3339 time as given, or a duration ago ("2h", "7d") as an RFC 3339 time."""
    import time

    from webhookd.config import parse_duration

    try:
        seconds = parse_duration(value, "--since")
    except ConfigError:
        return value
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds))


def cmd_deliveries(args: argparse.Namespace, config: Config) -> int:
    action: str = args.action
    if action in ("list", "count", "retry-failed"):
        given = (
            ("webhook_id", args.webhook), ("status", args.status), ("event", args.event),
            ("message_id", args.message_id), ("to", args.to),
            ("since", _since(args.since) if args.since else None),
            ("until", _since(args.until) if args.until else None),
            ("before", args.before), ("limit", args.limit), ("batch", args.batch),
        )
        chosen = [(k, v) for k, v in given if v is not None]
        if action == "retry-failed":
            return _call(args, config, "POST", "/v1/deliveries/retry-failed", dict(chosen), show_retried)
        query = urlencode(chosen)
        path = "/v1/deliveries" + ("/count" if action == "count" else "") + (f"?{query}" if query else "")
        return _call(args, config, "GET", path, None, show_count if action == "count" else show_deliveries)
    base = f"/v1/deliveries/{_segment(args.id)}"
    if action == "show":
        return _call(args, config, "GET", base, None, show_delivery)
    if action == "retry":
        return _call(args, config, "POST", f"{base}/retry", None, show_delivery)
    raise CliError(f"unknown action {action!r}", EX_USAGE)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    return _call(args, config, "GET", "/v1/status", None, show_status)


def cmd_stats(args: argparse.Namespace, config: Config) -> int:
    return _call(args, config, "GET", "/v1/stats", None, show_stats)


def cmd_dashboard(args: argparse.Namespace, config: Config) -> int:
    def show(data: Any) -> None:
        path = _text(data.get("path"))
        if config.admin.http_listen is not None:
            host, port = config.admin.http_listen
            host = f"[{host}]" if ":" in host else host
            print(f"http://{host}:{port}{path}")
        else:
            print(f"http://localhost:8026{path}")
            print(f"  (through an SSH tunnel to the admin socket: ssh -L 8026:{config.admin.socket} THIS-HOST)")
        print(f"one use, valid until {_text(data.get('expires_at'))}")

    return _call(args, config, "POST", "/v1/dashboard/links", None, show)


def cmd_tokens(args: argparse.Namespace, config: Config) -> int:
    action: str = args.action
    if action == "create":
        domains = _comma_values(args.domains) or []
        body: dict[str, Any] = {"domains": domains, "read_only": args.read_only}
        if args.description is not None:
            body["description"] = args.description
        return _call(args, config, "POST", "/v1/tokens", body, show_token)
    if action == "list":
        return _call(args, config, "GET", "/v1/tokens", None, show_tokens)
    return _call(args, config, "DELETE", f"/v1/tokens/{_segment(args.id)}", None, show_revoked)


# -- local commands -------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    source = str(config.source) if config.source is not None else None
    if args.plan:
        return _plan(args, config, source)
    if args.json:
        print(json.dumps({"ok": True, "config": source}))
    else:
        print(f"config OK: {source or 'built-in defaults'}")
    return EX_OK


def _plan(args: argparse.Namespace, config: Config, source: str | None) -> int:
    """What a sync of the declared webhooks would change, read from the database file
    without writing to it (the daemon may be running)."""
    from webhookd import declared
    from webhookd.store import StoreError, read_webhooks

    try:
        stored = read_webhooks(config.storage.path)
    except StoreError as exc:
        raise CliError(str(exc), EX_FAIL) from None
    changes = declared.plan(config.webhooks, stored)
    if args.json:
        print(json.dumps({"ok": True, "config": source, "declared": len(config.webhooks),
                          "changes": declared.to_json(changes)}))
    else:
        print(f"config OK: {source or 'built-in defaults'}; {len(config.webhooks)} declared webhooks")
        for line in declared.render(changes):
            print(line)
    return EX_OK


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from webhookd.daemon import run

    return run(config)


def _answer_verdict(answer: bytes) -> str:
    """"ok", "rejected" or "tempfail" for one intake answer line."""
    try:
        doc = json.loads(answer)
    except ValueError:
        return "tempfail"  # a garbled answer: nothing says the event was committed
    if not isinstance(doc, dict):
        return "tempfail"
    if doc.get("ok") is True:
        return "ok"
    # "not committed, try later" (a commit failed, shutting down, too many connections, an
    # internal error: never the event's fault) or "this event is bad": see Reason.tempfail
    reason = Reason.of_intake_message(str(doc.get("error") or ""))
    return "tempfail" if reason.tempfail else "rejected"


def _argument_lines(values: Sequence[str]) -> list[bytes]:
    # os.fsencode gives back the exact bytes of the argument; a pretty-printed JSON
    # argument is flattened (a raw newline can only be whitespace between JSON tokens).
    lines = [os.fsencode(v).replace(b"\r", b" ").replace(b"\n", b" ") for v in values]
    return [line for line in lines if line.strip()]


def _stdin_lines() -> Iterator[bytes]:
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        return
    for line in stream:
        line = line.rstrip(b"\r\n")
        if line.strip():
            yield line


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    from webhookd.client import ConnectionBroken, DaemonUnreachable, submit_lines

    if config.intake.socket is None:
        raise CliError("intake.socket is disabled in the config; submit needs it", EX_CONFIG)
    lines: Iterable[bytes]
    if args.events:
        lines = _argument_lines(args.events)
    else:
        if sys.stdin is not None and sys.stdin.isatty():
            print("webhookd: reading events from standard input, one JSON object a line (end with Ctrl-D)",
                  file=sys.stderr)
        stdin = _stdin_lines()
        first = next(stdin, None)
        lines = itertools.chain([first], stdin) if first is not None else []
    if not lines:
        return EX_OK

    out = getattr(sys.stdout, "buffer", None)
    verdicts: set[str] = set()
    try:
        for answer in submit_lines(config.intake.socket, lines):
            if out is not None:
                out.write(answer + b"\n")
                out.flush()
            else:
                print(answer.decode("utf-8", "replace"), flush=True)
            verdicts.add(_answer_verdict(answer))
    except (DaemonUnreachable, ConnectionBroken) as exc:
        raise CliError(str(exc), EX_TEMPFAIL) from None
    if "tempfail" in verdicts:
        return EX_TEMPFAIL
    return EX_DATAERR if "rejected" in verdicts else EX_OK


MAX_REPORT_BYTES = 10 * 1024 * 1024


def cmd_follow(args: argparse.Namespace, config: Config) -> int:
    """Follow an MTA's log and submit its events (Postfix)."""
    from pathlib import Path

    from webhookd.client import ConnectionBroken, DaemonUnreachable, submit_lines
    from webhookd.postfix import Follower

    intake = config.intake.socket
    if intake is None:
        raise CliError("intake.socket is disabled in the config; follow needs it", EX_CONFIG)
    state = Path(args.state) if args.state else config.state_dir / "postfix-follow.json"

    def submit(events: list[dict[str, Any]]) -> bool:
        lines = [json.dumps(e, ensure_ascii=False).encode() for e in events]
        try:
            answers = list(submit_lines(intake, lines))
        except (DaemonUnreachable, ConnectionBroken) as exc:
            print(f"webhookd: {_one_line(str(exc))}; retrying", file=sys.stderr)
            return False
        if len(answers) < len(lines) or any(_answer_verdict(a) == "tempfail" for a in answers):
            return False  # not committed: submit again (idempotency keys make that harmless)
        for answer in answers:
            if _answer_verdict(answer) == "rejected":
                print(f"webhookd: event refused: {answer.decode('utf-8', 'replace')}", file=sys.stderr)
        return True

    try:
        Follower(Path(args.log), state, submit).run(once=args.once)
    except OSError as exc:
        what = exc.filename or args.log
        raise CliError(f"cannot read or write {what}: {exc.strerror or exc}", EX_FAIL) from None
    return EX_OK


def cmd_submit_arf(args: argparse.Namespace, config: Config) -> int:
    """A spam-complaint report (RFC 5965) on stdin → one `complained` event."""
    from webhookd.arf import ArfError, parse_report

    raw = sys.stdin.buffer.read(MAX_REPORT_BYTES + 1)
    if len(raw) > MAX_REPORT_BYTES:
        raise CliError(f"feedback report larger than {MAX_REPORT_BYTES} bytes", EX_DATAERR)
    try:
        event = parse_report(raw)
    except ArfError as exc:
        raise CliError(f"submit-arf: {exc}", EX_DATAERR) from None
    args.events = [json.dumps(event, ensure_ascii=False)]
    return cmd_submit(args, config)


# -- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    # --config and --json are accepted anywhere: before the command or after its own
    # options. SUPPRESS keeps a later parser from resetting a value given earlier.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $WEBHOOKD_CONFIG, else /etc/webhookd/config.toml "
                             "if it exists, else built-in defaults)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the admin API's JSON document instead of text")

    from webhookd import __version__

    parser = argparse.ArgumentParser(prog="webhookd", parents=[common],
                                     description="Durable webhook dispatcher for mail-server events.")
    parser.add_argument("--version", action="version", version=f"webhookd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def leaf(group: Any, name: str, func: Callable[[argparse.Namespace, Config], int], text: str,
             *, with_id: bool = False) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, parents=[common], help=text, description=text)
        if with_id:
            p.add_argument("id", metavar="ID")
        p.set_defaults(func=func)
        return p

    p = leaf(sub, "serve", cmd_serve, "run the daemon in the foreground")
    p.add_argument("--dev", action="store_true",
                   help='development mode (environment = "development": http:// and private receivers allowed)')
    p = leaf(sub, "submit", cmd_submit, "submit events: each argument, or each line of standard input; "
             "exit 0 all accepted, 65 some rejected, 75 try later")
    p.add_argument("events", nargs="*", metavar="JSON", help="one event object per argument")
    follow = sub.add_parser("follow", parents=[common], help="follow an MTA's log and submit its events")
    mta = follow.add_subparsers(dest="mta", required=True, metavar="MTA")
    p = leaf(mta, "postfix", cmd_follow, "follow Postfix's log (syslog format or maillog_file)")
    p.add_argument("--log", default="/var/log/mail.log", help="the log file (default: /var/log/mail.log)")
    p.add_argument("--once", action="store_true", help="read to the end of the log, then exit")
    p.add_argument("--state", metavar="FILE",
                   help="position and correlation state (default: STATE_DIR/postfix-follow.json)")
    leaf(sub, "submit-arf", cmd_submit_arf, "read a spam-complaint feedback report (RFC 5965) on standard "
         "input, e.g. from an alias pipe, and submit a complained event for the original message")
    p = leaf(sub, "check-config", cmd_check_config, "validate the config file and exit (78 if it is bad)")
    p.add_argument("--plan", action="store_true",
                   help="also print what the next start or reload would change in the declared webhooks "
                        "([[webhooks]], webhooks.d/), without changing anything")
    leaf(sub, "status", cmd_status, "daemon version, uptime, deliveries by status, webhooks by state")
    leaf(sub, "stats", cmd_stats, "per-webhook health: last attempt, 24 h success rate, backlog")
    leaf(sub, "dashboard", cmd_dashboard, "print a one-time log-in link to the web dashboard")
    tk_parser = sub.add_parser("tokens", parents=[common], help="scoped API tokens (for hosting panels)")
    tk = tk_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(tk, "create", cmd_tokens, "make a token scoped to sender domains; prints it once")
    p.add_argument("--domains", action="append", required=True, metavar="A,B",
                   help="the sender domains it may manage (comma-separated; *.example.com for subdomains)")
    p.add_argument("--read-only", action="store_true", help="it may only read (no writes, no secrets)")
    p.add_argument("--description", help="who it is for")
    leaf(tk, "list", cmd_tokens, "list the tokens with their last use (never the tokens themselves)")
    leaf(tk, "revoke", cmd_tokens, "revoke a token (at once, for good)", with_id=True)

    wh_parser = sub.add_parser("webhooks", parents=[common], help="manage webhooks")
    wh = wh_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    def batch_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("batched delivery (a JSON array of events per POST; see docs/behaviour.md)")
        g.add_argument("--batch-max-events", type=int, metavar="N",
                       help="up to N events per POST (0 or 1: off, one event per POST; at most 1000)")
        g.add_argument("--batch-max-bytes", type=int, metavar="BYTES",
                       help="at most this many bytes of body per POST (1024 to 4194304; default 1048576)")
        g.add_argument("--batch-linger", metavar="DURATION",
                       help="wait up to this long for more events before sending a partial batch (e.g. 50ms;"
                            " at most 5s; default 0ms)")

    def filter_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("filter (an event must match every field given; see docs/behaviour.md)")
        g.add_argument("--from-domain", action="append", metavar="DOMAIN",
                       help="only events whose data.from is at DOMAIN; *.DOMAIN for its subdomains "
                            "(repeatable, or comma-separated)")
        g.add_argument("--to-domain", action="append", metavar="DOMAIN",
                       help="only events whose data.to is at DOMAIN (same forms)")
        g.add_argument("--tag", action="append", metavar="TAG",
                       help="only events with at least one of these tags (repeatable, or comma-separated)")
        g.add_argument("--metadata", action="append", metavar="KEY=VALUE",
                       help="only events whose data.metadata has KEY set to the string VALUE (repeatable: all)")

    p = leaf(wh, "create", cmd_webhooks, "create a webhook; prints its signing secret")
    p.add_argument("--url", required=True, help="https:// endpoint (http:// only in development)")
    p.add_argument("--events", default="all", help="comma-separated event names, or all (default)")
    p.add_argument("--description", help="free text for operators")
    filter_flags(p)
    batch_flags(p)
    leaf(wh, "list", cmd_webhooks, "list webhooks")
    leaf(wh, "show", cmd_webhooks, "show one webhook", with_id=True)
    p = leaf(wh, "update", cmd_webhooks, "change a webhook's url, events, description or filter", with_id=True)
    p.add_argument("--url")
    p.add_argument("--events", help="comma-separated event names, or all")
    p.add_argument("--description")
    filter_flags(p)
    batch_flags(p)
    p.add_argument("--clear-filter", action="store_true",
                   help="remove the filter (every event of its types); filter flags given with it make the new one. "
                        "Without it, each filter flag given replaces that field only ('' empties it)")
    leaf(wh, "delete", cmd_webhooks, "delete a webhook and its deliveries", with_id=True)
    p = leaf(wh, "enable", cmd_webhooks, "enable a webhook; its paused deliveries resume", with_id=True)
    p.add_argument("--drop-backlog", action="store_true", help="mark its paused deliveries failed instead")
    leaf(wh, "disable", cmd_webhooks, "disable a webhook; its deliveries are kept as paused", with_id=True)
    p = leaf(wh, "test", cmd_webhooks, "send one signed synthetic event now and show the answer", with_id=True)
    p.add_argument("--event", default="delivered", metavar="TYPE", help="event type (default: delivered)")
    leaf(wh, "rotate-secret", cmd_webhooks, "generate a new signing secret", with_id=True)
    leaf(wh, "secret", cmd_webhooks, "show the signing secret", with_id=True)
    p = leaf(wh, "replay", cmd_webhooks, "send a webhook's deliveries again (bulk retry)", with_id=True)
    p.add_argument("--since", required=True, metavar="TIME",
                   help='created at or after TIME: RFC 3339 ("2026-02-23T10:00:00Z") or a duration ago ("6h")')
    p.add_argument("--status", default="failed",
                   help="which deliveries: failed, paused, succeeded (comma-separated; default failed)")
    p.add_argument("--dry-run", action="store_true", help="only count what would be sent again")

    dl_parser = sub.add_parser("deliveries", parents=[common], help="inspect and retry deliveries")
    dl = dl_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    def filters(p: argparse.ArgumentParser, *, statuses: bool = True, pages: bool = True) -> None:
        p.add_argument("--webhook", metavar="ID", help="only this webhook's")
        if statuses:
            p.add_argument("--status", help="pending, paused, succeeded or failed (comma-separated)")
        p.add_argument("--event", metavar="TYPE", help="only events of this type (delivered, bounced, ...)")
        p.add_argument("--message-id", metavar="ID", help="only the deliveries of this message (exact Message-ID)")
        p.add_argument("--to", metavar="ADDRESS", help="only the deliveries of events for this recipient")
        p.add_argument("--since", metavar="TIME", help="created at or after TIME (RFC 3339, or 6h, 30m, 2d ago)")
        p.add_argument("--until", metavar="TIME", help="created before TIME (same forms as --since)")
        p.add_argument("--batch", metavar="BATCH_ID", help="only the deliveries attempted in this batch (batch_...)")
        p.set_defaults(status=None, before=None, limit=None)
        if pages:
            p.add_argument("--before", metavar="DLV_ID", help="the page after this delivery (keyset pagination)")
            p.add_argument("--limit", type=int, metavar="N", help="at most N (the daemon's default otherwise)")

    from webhookd.cli_tracking import add_commands as tracking_commands

    tracking_commands(sub, common, leaf)
    filters(leaf(dl, "list", cmd_deliveries, "list deliveries, newest first"))
    filters(leaf(dl, "count", cmd_deliveries, "count the deliveries that match"), pages=False)
    filters(leaf(dl, "retry-failed", cmd_deliveries, "queue again every failed delivery that matches"),
            statuses=False, pages=False)
    leaf(dl, "show", cmd_deliveries, "show a delivery with its attempt log", with_id=True)
    leaf(dl, "retry", cmd_deliveries, "attempt a delivery again now", with_id=True)
    return parser


# -- entry point ----------------------------------------------------------------------------------
def _fail(message: str, status: int) -> int:
    print(f"webhookd: {_one_line(message)}", file=sys.stderr)
    return status


def _quiet_stdout() -> None:
    """After EPIPE on stdout (`webhookd ... | head`), keep the interpreter's final flush quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _parse(argv: list[str] | None) -> argparse.Namespace | int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help/--version (0)
        return exc.code if isinstance(exc.code, int) else (EX_OK if exc.code is None else EX_USAGE)
    args.config = getattr(args, "config", None)
    args.json = getattr(args, "json", False)
    return args


def _run(args: argparse.Namespace) -> int:
    from webhookd.client import ConnectionBroken, DaemonUnreachable

    try:
        # only serve and check-config read the declared webhooks (and their secret files)
        config = load_config(args.config, dev=getattr(args, "dev", False),
                             declared=args.command in ("serve", "check-config"))
    except ConfigError as exc:
        fallback = getattr(args, "on_config_error", None)
        if fallback is not None:  # `tracking rewrite` fails open, whatever the config says
            status: int = fallback(args, exc)
            return status
        return _fail(f"config error: {exc}", EX_CONFIG)
    try:
        status = args.func(args, config)
    except CliError as exc:
        return _fail(str(exc), exc.status)
    except (DaemonUnreachable, ConnectionBroken) as exc:
        return _fail(str(exc), EX_UNAVAILABLE)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (`raise SystemExit(main())`)."""
    parsed = _parse(argv)
    if isinstance(parsed, int):
        return parsed
    try:
        return _run(parsed)
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EX_FAIL
    except Exception as exc:
        if os.environ.get("WEBHOOKD_DEBUG"):
            raise
        return _fail(f"unexpected error: {type(exc).__name__}: {exc}", EX_FAIL)
