"""Storage faults seen from the outside: a full disk, a corrupt or unwritable database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.conftest import event


async def test_full_disk_answers_errors_and_recovers(start_daemon: Any, make_receiver: Any) -> None:
    receiver = await make_receiver()
    h = await start_daemon()
    await h.create_webhook(receiver.url)
    acked = await h.submit(*[event("delivered", i) for i in range(5)])
    assert all(a["ok"] for a in acked)
    db = h.daemon.store._db  # the writer's own connection: fill its disk
    assert db is not None
    async with db.execute("PRAGMA page_count") as cur:
        row = await cur.fetchone()
    assert row is not None
    await db.execute(f"PRAGMA max_page_count = {row[0]}")  # the "disk" is now full

    big = event("delivered", 99, pad="x" * 200_000)
    [answer] = await h.submit(big)
    assert answer == {"ok": False, "error": answer["error"]} and answer["error"].startswith("storage full")
    host, port = h.config.intake.http_listen
    async with aiohttp.ClientSession() as s, s.post(f"http://{host}:{port}/v1/events", data=orjson.dumps(big)) as r:
        assert r.status == 503 and (await r.json())["error"].startswith("storage full")

    await db.execute("PRAGMA max_page_count = 1073741823")  # space is back: no restart needed
    [again] = await h.submit(big)
    assert again["ok"] is True
    await receiver.wait_for(6)
    got = {r.json["data"]["to"] for r in receiver.requests}
    assert {f"customer{i}@example.org" for i in range(5)} <= got  # nothing acknowledged was lost


def serve_once(tmp_path: Path, state: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.toml"
    config.write_text(f'environment = "development"\nstate_dir = "{state}"\n[intake]\nhttp_listen = ""\n')
    return subprocess.run([sys.executable, "-m", "webhookd", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)


def test_corrupt_database_is_a_one_line_error(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    (state / "webhookd.db").write_bytes(b"garbage, not SQLite" * 1000)
    p = serve_once(tmp_path, state)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot open database" in lines[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr


def test_unwritable_state_dir_is_a_one_line_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere: make the state_dir path a file instead
        state = tmp_path / "not-a-dir"
        state.write_text("")
    else:
        state = tmp_path / "ro"
        state.mkdir(mode=0o500)
    p = serve_once(tmp_path, state / "sub")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "state_dir" in lines[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr
