"""`webhookd tracking ...`: keys, opt-outs, tracked URLs, the rewriter and the milter.

Signing commands (`url`, `pixel`, `rewrite`, `milter`) read the key file themselves
(tracking.key_file; the daemon need not run); `status`, `opt-out` and `opt-in` ask the
daemon through the admin socket. The heavy imports happen inside each command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from webhookd.cli import EX_CONFIG, EX_OK, EX_USAGE, CliError, _call
from webhookd.config import Config

MAX_REWRITE_BYTES = 50 * 1024 * 1024

Leaf = Callable[..., argparse.ArgumentParser]


def add_commands(sub: Any, common: argparse.ArgumentParser, leaf: Leaf) -> None:
    parser = sub.add_parser("tracking", parents=[common], help="opens and clicks: keys, opt-outs, tracked links")
    tr = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    leaf(tr, "status", cmd_status, "tracking settings, key ids, opt-outs and hit counts (from the daemon)")
    leaf(tr, "rotate-key", cmd_rotate_key, "add a signing key and sign with it; older keys still verify")
    p = leaf(tr, "opt-out", cmd_opt, "stop recording opens and clicks of an address (stored as a keyed hash)")
    p.add_argument("address", metavar="ADDRESS")
    p = leaf(tr, "opt-in", cmd_opt, "record an opted-out address's opens and clicks again")
    p.add_argument("address", metavar="ADDRESS")
    for name, text in (("url", "print the tracked form of a link"), ("pixel", "print a tracking pixel URL")):
        p = leaf(tr, name, cmd_sign, text)
        p.add_argument("--message-id", required=True, metavar="ID",
                       help="the mail's Message-ID, e.g. '<a1@shop.example>'")
        p.add_argument("--to", default="", metavar="ADDRESS", help="the recipient (one per tracked copy)")
        if name == "url":
            p.add_argument("--url", required=True, help="the http(s) link to redirect to")
    p = leaf(tr, "rewrite", cmd_rewrite, "rewrite a MIME message on standard input for tracking (links and a "
             "pixel in its HTML), to standard output; fails open: on any problem the message passes unchanged")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--to", default="", metavar="ADDRESS", help="the one recipient of this copy")
    who.add_argument("--to-header", default="", metavar="NAME",
                     help="take the recipient from this header (the last one) and remove every such header "
                          "from the output: Exim's `headers_add = X-Webhookd-To: $local_part@$domain`, since "
                          "Exim refuses tainted values in a filter's command line")
    p.add_argument("--message-id", default=None, metavar="ID", help="default: the message's Message-ID header")
    p.set_defaults(on_config_error=rewrite_despite_config)
    p = leaf(tr, "milter", cmd_milter, "run the Postfix milter that rewrites outgoing HTML mail for tracking")
    p.add_argument("--socket", default=None, metavar="SPEC",
                   help="inet:PORT@HOST or unix:/PATH (default: tracking.milter_socket)")


def _links(config: Config) -> Any:
    from webhookd.tracking.links import Links
    from webhookd.tracking.tokens import KeyRing

    cfg = config.tracking
    if not cfg.base_url:
        raise CliError("tracking.base_url is not set: there is no address for tracked links", EX_CONFIG)
    ring = KeyRing.load(config.tracking_key_file)  # never made here: a key only this process knew would sign dead links
    return Links(ring, cfg.base_url, include_recipient=cfg.include_recipient)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    from webhookd.cli_output import _text

    def show(data: dict[str, Any]) -> None:
        state = "on" if data.get("enabled") else "off"
        print(f"tracking: {state}, listening on {_text(data.get('listen'))}, links under {_text(data.get('base_url'))}")
        print(f"emit: {_text(data.get('emit'))}, recipient in tokens: {_text(data.get('include_recipient'))}")
        print(f"keys: {', '.join(str(k) for k in data.get('key_ids', []))} (signing with {data.get('current_key')})")
        print(f"opted-out addresses: {data.get('opt_outs')}")
        for kind, outcomes in sorted((data.get("hits") or {}).items()):
            print(f"{kind} hits: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))

    return _call(args, config, "GET", "/v1/tracking", None, show)


def cmd_opt(args: argparse.Namespace, config: Config) -> int:
    method = "PUT" if args.action == "opt-out" else "DELETE"

    def show(data: dict[str, Any]) -> None:
        verb = "opted out" if data.get("opted_out") else "opted in"
        print(f"{args.address}: {verb}" + ("" if data.get("changed") else " (already)"))

    return _call(args, config, method, f"/v1/tracking/opt-outs/{quote(args.address, safe='@')}", None, show)


def cmd_rotate_key(args: argparse.Namespace, config: Config) -> int:
    from webhookd.tracking.tokens import KeyFileError, KeyRing

    path = config.tracking_key_file
    try:
        ring = KeyRing.load(path, create=True)
        new = ring.rotate()
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    print(f"key {new} now signs new links; keys {', '.join(map(str, sorted(ring.keys)))} verify ({path})")
    return EX_OK


def cmd_sign(args: argparse.Namespace, config: Config) -> int:
    from webhookd.tracking.tokens import KeyFileError

    try:
        links = _links(config)
        print(links.click(args.message_id, args.url, args.to) if args.action == "url"
              else links.pixel(args.message_id, args.to))
    except KeyFileError as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:
        raise CliError(f"cannot sign: {exc}", EX_USAGE) from None
    return EX_OK


def cmd_rewrite(args: argparse.Namespace, config: Config | None, problem: str = "") -> int:
    """Fail open: whatever goes wrong (a bad config included), the message goes out as it
    came in, less the --to-header header, and the exit status is 0."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    raw = stdin.read(MAX_REWRITE_BYTES + 1)
    big = len(raw) > MAX_REWRITE_BYTES
    to = args.to
    if args.to_header:
        try:
            raw, to = take_header(raw, args.to_header)
        except Exception as exc:  # never lose the message over the header
            print(f"webhookd: tracking rewrite: cannot read {args.to_header}: {type(exc).__name__}",
                  file=sys.stderr)
    out = raw
    if config is None:
        print(f"webhookd: tracking rewrite: {problem}; message passed unchanged", file=sys.stderr)
    elif big:
        print("webhookd: tracking rewrite: message over 50 MiB, passed unchanged", file=sys.stderr)
    else:
        try:
            from webhookd.tracking.rewrite import rewrite_message

            result = rewrite_message(raw, _links(config), to=to, message_id=args.message_id,
                                     track_opens=config.tracking.track_opens,
                                     track_clicks=config.tracking.track_clicks)
            out = result.data
        except CliError as exc:
            print(f"webhookd: tracking rewrite: {exc}; message passed unchanged", file=sys.stderr)
        except Exception as exc:
            print(f"webhookd: tracking rewrite: {type(exc).__name__}: {exc}; message passed unchanged",
                  file=sys.stderr)
    stdout.write(out)
    if big:
        while chunk := stdin.read(1 << 20):
            stdout.write(chunk)
    stdout.flush()
    return EX_OK


def rewrite_despite_config(args: argparse.Namespace, error: Exception) -> int:
    """`tracking rewrite` with a config that does not load: pass the message through."""
    return cmd_rewrite(args, None, f"config error: {error}")


def take_header(raw: bytes, name: str) -> tuple[bytes, str]:
    """The message without any `name:` header field (folded lines included) in its top
    header block, and the last such field's value (unfolded, stripped; "" if none)."""
    lf = raw.find(b"\n\n")
    crlf = raw.find(b"\r\n\r\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        end = crlf + 2
    elif lf != -1:
        end = lf + 1
    else:
        end = len(raw)
    head, rest = raw[:end], raw[end:]
    want = name.strip().lower().encode("ascii") + b":"
    kept: list[bytes] = []
    value = b""
    dropping = False
    for line in head.splitlines(keepends=True):
        if line[:1] not in (b" ", b"\t"):  # a new field (a continuation line belongs to the last)
            dropping = line.lower().startswith(want)
            if dropping:
                value = b""
                line = line[len(want):]
        if dropping:
            value += line
        else:
            kept.append(line)
    text = b" ".join(value.split()).decode("utf-8", "replace").strip()
    return b"".join(kept) + rest, text


def cmd_milter(args: argparse.Namespace, config: Config) -> int:
    from webhookd.tracking.milter import run

    status: int = run(config, args.socket)
    return status
