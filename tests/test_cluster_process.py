"""Several daemons, one queue: two real `webhookd serve` processes on one (private)
PostgreSQL database (webhookd/store/postgres_cluster.py).

- both deliver, and no delivery is sent twice in normal operation;
- the failure gate holds across the two: a failing receiver disables the webhook at exactly
  `disable_after`, the notify command runs once, and after the first failure there is never
  more than one attempt in flight, whichever daemon sends it (one probe at a time);
- a webhook disabled (or rotated, or enabled) through one daemon is so on the other;
- kill -9 one daemon with deliveries it claimed: the other delivers them once the lease ends.

They take half a minute, so they run in a phase of their own in `.ci/run` (with
WEBHOOKD_CLUSTER=1, which also makes a missing PostgreSQL a failure); the README's test
command lists them as skipped, saying so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.pg import Cluster, new_schema
from tests.test_process import Proc, ThreadReceiver, lines, wait_until

LEASE = "1s"

if os.environ.get("WEBHOOKD_CLUSTER") != "1":
    pytest.skip("two daemons on one PostgreSQL: run with WEBHOOKD_CLUSTER=1 (.ci/run's cluster phase)",
                allow_module_level=True)


def delivered(r: ThreadReceiver) -> list[str]:
    """The message ids the receiver answered 200, in arrival order (repeats kept)."""
    with r.lock:
        return [json.loads(b)["data"]["message_id"] for b in r.bodies]


@pytest.fixture
def recorder(thread_receiver: ThreadReceiver) -> ThreadReceiver:
    """The receiver: answers `status` after `delay`; `spans` times every request."""
    return thread_receiver


@pytest.fixture
def pair(pg_cluster: Cluster, tmp_path: Path, short_dir: Path) -> Iterator[tuple[Proc, Proc, Path]]:
    """Two daemons' configs (not started) on one fresh schema, and a file the notify command
    appends to (the webhook id and its failure count, one line per run)."""
    dsn = asyncio.run(new_schema(pg_cluster))
    notified = tmp_path / "notified"
    command = f"sh -c {shlex.quote(f'echo $WEBHOOKD_WEBHOOK_ID $WEBHOOKD_CONSECUTIVE_FAILURES >> {notified}')}"
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (short_dir / name).mkdir()
        p = Proc(tmp_path / name, short_dir / name)
        p.tables = (f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\nlease = "{LEASE}"\n'  # type: ignore[attr-defined]
                    f"[notify]\ncommand = {json.dumps(command)}\n")
        p.write_config(tables=p.tables)  # type: ignore[attr-defined]
        procs.append(p)
    yield procs[0], procs[1], notified
    for p in procs:
        p.stop()


def configure(p: Proc, delivery: dict[str, Any]) -> None:
    p.write_config(delivery, tables=p.tables)  # type: ignore[attr-defined]


def known_on(p: Proc, webhook_id: str) -> dict[str, Any] | None:
    for w in p.json("webhooks", "list")["webhooks"]:
        if w["id"] == webhook_id:
            return dict(w)
    return None


def started(a: Proc, b: Proc, url: str) -> dict[str, Any]:
    """Both daemons running, and a webhook created through a that b has heard of."""
    a.start()
    b.start()
    hook: dict[str, Any] = a.json("webhooks", "create", "--url", url)
    wait_until(lambda: known_on(b, hook["id"]) is not None, what="b to hear of the webhook a created")
    return hook


def kill_9_while_delivering(p: Proc, recorder: ThreadReceiver) -> None:
    """SIGKILL the daemon once it has delivered two (the rest claimed by it, most still
    pending); the receiver answers at once from then on."""
    wait_until(lambda: len(delivered(recorder)) >= 2, what="the daemon to start delivering")
    assert p.proc is not None
    p.proc.kill()
    p.proc.wait(10)
    recorder.delay = 0.0


def submit(p: Proc, n: int, prefix: str) -> None:
    done = p.cli("submit", stdin=lines(n, prefix))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(b'"ok":true') == n


def test_two_daemons_both_deliver_and_nothing_is_sent_twice(
    pair: tuple[Proc, Proc, Path], recorder: ThreadReceiver
) -> None:
    a, b, _ = pair
    hook = started(a, b, recorder.url)
    submit(a, 150, "a")
    submit(b, 150, "b")
    wait_until(lambda: len(delivered(recorder)) >= 300, timeout=60, what="300 deliveries")
    time.sleep(0.5)  # anything sent twice would arrive meanwhile
    got = delivered(recorder)
    assert sorted(got) == sorted([f"<a-{i}@x>" for i in range(150)] + [f"<b-{i}@x>" for i in range(150)])
    for body, headers in zip(recorder.bodies, recorder.headers, strict=True):
        assert Webhook(hook["secret"]).verify(body, headers)
    for p in (a, b):
        assert p.json("status")["deliveries"]["succeeded"] == 300  # both read the one queue


def test_the_failure_gate_holds_across_two_daemons(pair: tuple[Proc, Proc, Path], recorder: ThreadReceiver) -> None:
    a, b, notified = pair
    for p in (a, b):
        configure(p, {"disable_after": 15, "retry_base": "20ms", "retry_max": "60ms", "max_attempts": 100})
    recorder.status, recorder.delay = 503, 0.1
    hook = started(a, b, recorder.url)
    submit(a, 20, "a")
    submit(b, 20, "b")
    for p in (a, b):
        wait_until(lambda p=p: (known_on(p, hook["id"]) or {}).get("enabled") is False, timeout=60,
                   what="the webhook disabled on both daemons")
    time.sleep(1.0)  # a second disable, or a second notify, would happen meanwhile
    assert notified.read_text().split("\n") == [f"{hook['id']} 15", ""]  # once, at exactly disable_after
    shown = [known_on(p, hook["id"]) for p in (a, b)]
    assert all(w is not None and w["consecutive_failures"] == 15 for w in shown), shown
    disabled_logs = a.logged('"webhook disabled"') + b.logged('"webhook disabled"')
    assert len(disabled_logs) == 1, disabled_logs
    # Once both daemons know of the first failure, one attempt at a time across both. The first
    # burst is what started before that: before the first answer, plus the time to commit it and
    # notify the other daemon (milliseconds; 1 s here, far more than that on a loaded machine).
    with recorder.lock:
        requests = sorted(recorder.spans)
    first_end = min(end for _, end, _ in requests)
    burst_end = max(end for start, end, _ in requests if start <= first_end + 1.0)
    probes = [(s, e) for s, e, _ in requests if s > burst_end]
    assert probes, "probes after the first burst"
    for (_, end), (start, _) in itertools.pairwise(probes):
        spans = [(round(s - first_end, 3), round(e - first_end, 3)) for s, e in probes]
        assert start >= end - 0.005, f"two probes overlapped: {spans}"
    statuses = b.json("status")["deliveries"]
    assert statuses["pending"] == 0 and statuses["paused"] == 40, statuses


def test_a_webhook_disabled_rotated_or_enabled_through_one_daemon_is_so_on_the_other(
    pair: tuple[Proc, Proc, Path], recorder: ThreadReceiver
) -> None:
    a, b, _ = pair
    hook = started(a, b, recorder.url)
    assert a.cli("webhooks", "disable", hook["id"]).returncode == 0
    wait_until(lambda: (known_on(b, hook["id"]) or {}).get("enabled") is False, what="b to see it disabled")
    submit(b, 5, "paused")
    time.sleep(0.5)
    assert delivered(recorder) == []
    assert b.json("status")["deliveries"]["paused"] == 5
    rotated = a.json("webhooks", "rotate-secret", hook["id"])
    assert b.cli("webhooks", "enable", hook["id"]).returncode == 0  # enabled through the other one
    wait_until(lambda: len(delivered(recorder)) >= 5, what="the paused deliveries sent after enable")
    submit(b, 3, "after")
    wait_until(lambda: len(delivered(recorder)) >= 8, what="three more")
    new_secret = rotated["secret"]
    for body, headers in list(zip(recorder.bodies, recorder.headers, strict=True))[5:]:
        assert json.loads(body)["data"]["message_id"].startswith("<after-")  # signed by b with a's new secret
        assert Webhook(new_secret).verify(body, headers)
    assert sorted(delivered(recorder)) == sorted([f"<paused-{i}@x>" for i in range(5)]
                                                  + [f"<after-{i}@x>" for i in range(3)])


def test_kill_9_one_daemon_and_the_other_delivers_what_it_held_after_the_lease(
    pair: tuple[Proc, Proc, Path], recorder: ThreadReceiver
) -> None:
    a, b, _ = pair
    configure(a, {"per_webhook_concurrency": 1})
    recorder.delay = 0.2  # a delivers slowly: most of its deliveries are still pending, claimed by it
    started(a, b, recorder.url)
    submit(a, 40, "held")
    kill_9_while_delivering(a, recorder)
    killed_at = time.monotonic()
    wait_until(lambda: set(delivered(recorder)) == {f"<held-{i}@x>" for i in range(40)}, timeout=30,
               what="b to deliver every delivery a held")
    assert time.monotonic() - killed_at >= 0.5  # not before a's lease could end
    took = b.logged("took over from instances whose lease ended")
    assert took and took[0]["webhooks"] == 1
    repeats = len(delivered(recorder)) - 40
    # at most what a had in flight when it died (per_webhook_concurrency 1) and the one before it,
    # answered but not yet committed: sent again, as at-least-once allows
    assert repeats <= 2
    status = b.json("status")
    assert status["deliveries"]["pending"] == 0
    assert status["storage"]["takeovers"] == 1 and status["storage"]["instance"] not in took[0]["instances"]


def test_a_backlog_beyond_one_daemons_window_is_shared_with_the_other(
    pair: tuple[Proc, Proc, Path], recorder: ThreadReceiver
) -> None:
    """Intake's rows go to the daemon that took them in; those beyond its window are released
    to the fleet (NOTIFY webhookd_work), so an idle daemon helps with another's backlog."""
    a, b, _ = pair
    configure(a, {"per_webhook_concurrency": 1})  # a delivers one at a time: its backlog grows
    recorder.delay = 0.02
    started(a, b, recorder.url)
    submit(a, 400, "backlog")
    wait_until(lambda: len(set(delivered(recorder))) == 400, timeout=60, what="all 400 delivered")
    time.sleep(0.5)
    assert sorted(delivered(recorder)) == sorted(f"<backlog-{i}@x>" for i in range(400))  # each once
    by_b = [x for x in b.logged('"attempt"') if x.get("event") == "attempt" and x.get("outcome") == "succeeded"]
    assert len(by_b) >= 100, len(by_b)  # b took a large part of what a was given


def test_a_daemon_restarted_after_kill_9_takes_over_its_previous_life_at_once(
    pair: tuple[Proc, Proc, Path], recorder: ThreadReceiver
) -> None:
    """The same daemon (host and state_dir) started again after a crash does not wait out its
    previous life's lease (30 s here) for the deliveries that life had claimed."""
    a, _, _ = pair
    a.tables = a.tables.replace(f'lease = "{LEASE}"', 'lease = "30s"')  # type: ignore[attr-defined]
    configure(a, {"per_webhook_concurrency": 1})
    a.start()
    recorder.delay = 0.2
    a.json("webhooks", "create", "--url", recorder.url)
    submit(a, 20, "again")
    kill_9_while_delivering(a, recorder)
    restarted_at = time.monotonic()
    a.start()
    wait_until(lambda: set(delivered(recorder)) == {f"<again-{i}@x>" for i in range(20)}, timeout=20,
               what="the restarted daemon to deliver what its previous life held")
    assert time.monotonic() - restarted_at < 20  # far less than the 30 s lease
    assert a.logged("took over from this daemon's previous life")
