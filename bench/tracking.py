"""The tracking listener under load, against a bare aiohttp server on the same machine. Prints JSON.

    .venv/bin/python bench/tracking.py [--seconds 5] [--concurrency 64] [--links 20000]

Starts a real `webhookd serve` (development mode, tracking on a loopback port, one
webhook subscribed to opened/clicked, disabled, so each hit makes an event and a paused delivery row
and no attempts compete for the daemon's core),
signs --links distinct click links and as many pixels with `webhookd tracking url`'s
code (the same key file), then for --seconds each:

- `click`: GET /c/TOKEN with --concurrency connections (keep-alive), redirects not followed;
- `pixel`: GET /o/TOKEN.gif likewise;
- `ceiling`: the same client against a bare aiohttp app that answers 302 with a fixed
  Location, served by the same interpreter build on the same core: what the listener
  would do with no verification, no queue and no recording.

For each: requests/s, latency p50/p99 (ms), and for click/pixel how many hits were
recorded as events by the end (the recorder keeps up, or drops with a count:
`dropped`). The daemon is pinned to core 0 and the client to core 1 when there are two.

`rewrite`: the MIME rewriter in this process on a multipart/alternative mail with a
quoted-printable HTML part of --rewrite-links links: milliseconds per message, beside
the ceiling of the standard library's html.parser merely reading the same HTML (the
least any rewriter that locates tags with it can cost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import Daemon, admin_call, free_port, loadavg, pin, pin_self, wait_port

from webhookd.tracking.links import Links
from webhookd.tracking.tokens import KeyRing

CEILING_APP = """
import sys
from aiohttp import web
async def go(request):
    return web.Response(status=302, headers={"Location": "https://shop.example/p/1", "Cache-Control": "no-store"})
app = web.Application()
app.router.add_get("/c/{token}", go)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def hammer(urls: list[str], seconds: float, concurrency: int) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker(start: int) -> None:
            i = start
            while time.perf_counter() < deadline:
                url = urls[i % len(urls)]
                i += concurrency
                t0 = time.perf_counter()
                async with session.get(url, allow_redirects=False) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "statuses": statuses,
    }


async def recorded(daemon: Daemon, kind: str, want: int, wait: float = 30.0) -> dict[str, int]:
    """The tracking counters for `kind` once the recorder has handled `want` hits (or after `wait`)."""
    deadline = time.perf_counter() + wait
    while True:
        hits = (await admin_call(daemon, "GET", "/v1/tracking"))["hits"].get(kind, {})
        if sum(hits.values()) >= want or time.perf_counter() > deadline:
            return dict(hits)
        await asyncio.sleep(0.2)


def rewrite_figures(n_links: int, runs: int = 200) -> dict[str, Any]:
    import html.parser
    import quopri

    from webhookd.tracking.rewrite import rewrite_message

    links = Links(KeyRing.generate(), "https://t.example.com")
    html_text = "<html><body>" + "".join(
        f'<p>Paragraph {i}: some text to read, and <a href="https://shop.example/p/{i}?utm_source=mail&amp;x={i}">'
        "a link</a>.</p>\n" for i in range(n_links)) + "</body></html>\n"
    body = quopri.encodestring(html_text.encode()).decode()
    msg = ("From: a@shop.example\nTo: b@example.org\nMessage-ID: <m1@shop.example>\nMIME-Version: 1.0\n"
           'Content-Type: multipart/alternative; boundary="b"\n\n--b\nContent-Type: text/plain\n\nhello\n'
           "--b\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
           + body + "--b--\n").encode()

    def timed(fn: Any) -> float:
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return round(statistics.median(samples) * 1000, 3)

    def parse_only() -> None:
        p = html.parser.HTMLParser()
        p.feed(html_text)
        p.close()

    result = rewrite_message(msg, links, to="b@example.org")
    return {"message_bytes": len(msg), "links": result.links, "pixel": result.pixel,
            "rewrite_ms": timed(lambda: rewrite_message(msg, links, to="b@example.org")),
            "ceiling_html_parser_ms": timed(parse_only)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--links", type=int, default=20000)
    parser.add_argument("--rewrite-links", type=int, default=40)
    args = parser.parse_args()
    pin_self("1")
    rewrite = rewrite_figures(args.rewrite_links)

    root = Path(tempfile.mkdtemp(prefix="webhookd-bench-tracking-"))
    port = free_port()
    daemon = Daemon(root, extra=(
        f'[tracking]\nenabled = true\nlisten = "127.0.0.1:{port}"\nbase_url = "http://127.0.0.1:{port}"\n'
        f'bad_tokens_per_minute = 1000000\n'
    ))
    result: dict[str, Any] = {"bench": "tracking", "seconds": args.seconds, "concurrency": args.concurrency,
                              "links": args.links, "cpus": os.cpu_count(), "loadavg_before": loadavg()}
    ceiling_port = free_port()
    ceiling = subprocess.Popen(pin([sys.executable, "-c", CEILING_APP, str(ceiling_port)], "0"))
    try:
        daemon.start()
        hook = await admin_call(daemon, "POST", "/v1/webhooks",
                                {"url": "http://127.0.0.1:9/hook", "events": ["opened", "clicked"]})
        # disabled: every hit still becomes an event with a (paused) delivery row, but no
        # attempts compete with the listener for the daemon's core
        await admin_call(daemon, "POST", f"/v1/webhooks/{hook['id']}/disable")
        links = Links(KeyRing.load(root / "state" / "tracking-keys.json"), f"http://127.0.0.1:{port}")
        clicks = [links.click(f"<m{i}@bench.example>", f"https://shop.example/p/{i}", f"r{i}@example.org")
                  for i in range(args.links)]
        pixels = [links.pixel(f"<m{i}@bench.example>", f"r{i}@example.org") for i in range(args.links)]
        wait_port(ceiling_port)
        for name, urls in (("click", clicks), ("pixel", pixels)):
            kind = "click" if name == "click" else "open"
            await hammer(urls[:200], 0.5, args.concurrency)  # warm-up (recorded too)
            await asyncio.sleep(1.0)  # the recorder finishes the warm-up's hits
            before = sum((await recorded(daemon, kind, 0, 0)).values())
            run = await hammer(urls, args.seconds, args.concurrency)
            after = await recorded(daemon, kind, before + run["requests"])
            run["recorded"] = after.get("recorded", 0) - before
            run["dropped"] = {k: v for k, v in after.items() if k != "recorded"}
            result[name] = run
        result["ceiling"] = await hammer([f"http://127.0.0.1:{ceiling_port}/c/x"], args.seconds, args.concurrency)
        result["click_vs_ceiling"] = round(result["click"]["requests_per_s"] / result["ceiling"]["requests_per_s"], 2)
        result["daemon_rss_mib"] = round(daemon.proc_status().get("VmHWM", 0) / 2**20, 1)
    finally:
        ceiling.terminate()
        daemon.stop()
    result["rewrite"] = rewrite
    result["loadavg_after"] = loadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
