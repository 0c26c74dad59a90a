"""Diagnostic: run `webhookd serve` under tracemalloc and dump where its Python memory is.

    WEBHOOKD_CONFIG=... python bench/memprobe.py OUT.txt [--every 0.5] [--seconds 60]

Every --every seconds (for at most --seconds) a background thread appends the traced
current and peak sizes to OUT.txt; when the traced size reaches a new high it also
appends the top allocation sites of that moment. tracemalloc slows the daemon
down (roughly 2x), so use it to find *where* memory goes, not how fast things are.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import tracemalloc
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--every", type=float, default=0.5)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    tracemalloc.start(1)
    started = time.monotonic()

    def watch() -> None:
        high = 0
        with args.out.open("a") as out:
            while time.monotonic() - started < args.seconds:
                time.sleep(args.every)
                current, peak = tracemalloc.get_traced_memory()
                out.write(f"t={time.monotonic() - started:.1f}s current={current / 2**20:.1f}MiB"
                          f" peak={peak / 2**20:.1f}MiB\n")
                if current > high * 1.05:
                    high = current
                    stats = tracemalloc.take_snapshot().statistics("lineno")
                    for stat in stats[: args.top]:
                        out.write(f"    {stat.size / 2**20:7.2f} MiB {stat.count:8d} blocks  {stat.traceback}\n")
                out.flush()

    threading.Thread(target=watch, daemon=True).start()
    from webhookd.cli import main as webhookd_main

    sys.exit(webhookd_main(["serve"]))


if __name__ == "__main__":
    main()
