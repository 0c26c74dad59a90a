"""Hanging receivers for the isolation benchmark: N raw asyncio TCP servers on loopback that
accept connections, read whatever arrives and never write a byte.

    python bench/hang.py N [--lifetime 600]

Prints one JSON line {"ports": [...], "control": PORT} once listening. Connecting to the
control port returns one JSON line {"open": N, "total": N, "per_port": {PORT: N}}
(connections held open now, accepted so far, held open per port), then closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("--lifetime", type=float, default=600.0)
    args = ap.parse_args()
    held = {"open": 0, "total": 0}
    per_port: Counter[int] = Counter()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        held["open"] += 1
        held["total"] += 1
        per_port[port] += 1
        try:
            while await reader.read(65536):
                pass  # read the request and never answer
        except OSError:
            pass
        finally:
            held["open"] -= 1
            per_port[port] -= 1
            writer.close()

    async def control(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps({**held, "per_port": {str(p): per_port[p] for p in ports}}).encode() + b"\n")
        await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(hang, "127.0.0.1", 0, backlog=1024) for _ in range(args.n)]
    ctl = await asyncio.start_server(control, "127.0.0.1", 0)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(json.dumps({"ports": ports, "control": ctl.sockets[0].getsockname()[1]}), flush=True)
    await asyncio.sleep(args.lifetime)


if __name__ == "__main__":
    asyncio.run(main())
