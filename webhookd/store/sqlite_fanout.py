"""The SQLite backend's deferred fan-out: no delivery row for a webhook that cannot take it now.

A webhook is *lagging* while it is disabled, or once its backlog of pending rows passes
`DEFER_AFTER` (it could not take new deliveries into memory anyway). An event submitted
while a subscriber lags gets no delivery row for it: the event's `deferred` column lists
the lagging subscribers' small integer keys (",3,7,"), and the webhook's row in `fanout`
keeps its *cursor* (the id of its first deferred event not yet made a row) and how many
deliveries are deferred. Everything here runs in the writer's transaction order, so a
switch between eager and deferred cannot race with queued events.

A deferred delivery becomes a row (*materialised*), in event order, when
- its webhook's pump refills (`take_due`) and the webhook's rows run out: the next chunk;
- someone reads or changes the webhook's deliveries as rows (a listing, a count, a replay,
  an enable that drops the backlog): all of them, in chunks of `CHUNK` per transaction.
The row gets a new delivery id (ids are allocated when rows are made), `created_at` of
its event (what it would have had), `updated_at` and `next_attempt_at` of the moment it is
made. A webhook whose cursor reaches the head goes back to eager rows.

A deferred delivery has the status its webhook's deliveries have: pending while the
webhook is enabled, paused while it is disabled. Its counts are in the backend's
`Counts` (so `count_by_status` and `webhook_stats` are exact without reading anything);
`oldest_pending` is the created_at of the event at the cursor; retention never deletes an
event at or above a cursor.

The in-memory state is copied on the first change in a transaction and replaces the
committed one only when the transaction commits (`begin`, `commit`, `rollback`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from webhookd.store.model import FAILED, PAUSED, PENDING, DueItem, Subscriber
from webhookd.store.sqlite_rows import Counts

DEFER_AFTER = 256
"""Pending rows past which an enabled webhook's new deliveries are deferred: it has more
than a window's worth waiting already (the scheduler holds at most a few hundred of a
webhook's deliveries in memory; the rest are read back in order). A webhook whose refills
ask for more (a larger window) defers past twice what it asks for."""

CHUNK = 10_000
"""Deliveries made rows per transaction when a whole backlog is materialised."""

DROPPED = "backlog dropped when the webhook was re-enabled"

def status_of(enabled: bool) -> str:
    """The status of a webhook's deferred deliveries."""
    return PENDING if enabled else PAUSED


@dataclass(slots=True)
class Split:
    """A subscriber list divided by who lags: the eager ones (the same list object when none
    lags, so events still share it downstream) and the deferred ones' keys as stored."""

    eager: Sequence[Subscriber]
    deferred: tuple[str, ...]
    text: str | None
    subs: Sequence[Subscriber]  # kept: the cache is keyed by its id()


@dataclass(slots=True)
class State:
    keys: dict[str, int] = field(default_factory=dict)  # every webhook's fanout key
    enabled: dict[str, bool] = field(default_factory=dict)
    cursor: dict[str, int] = field(default_factory=dict)  # only webhooks with deferred deliveries
    deferred: dict[str, int] = field(default_factory=dict)  # ... and how many
    lagging: frozenset[str] = frozenset()
    next_key: int = 1

    def copy(self) -> State:
        return State(dict(self.keys), dict(self.enabled), dict(self.cursor), dict(self.deferred), self.lagging,
                     self.next_key)


class Fanout:
    """The deferred fan-out state of one SQLite backend, and its statements."""

    def __init__(self, counts: Counts, defer_after: int = DEFER_AFTER) -> None:
        self.counts = counts
        self.defer_after = defer_after
        self.state = State()  # committed
        self._work: State | None = None  # this transaction's, once changed
        self._changed: set[str] = set()
        self._splits: dict[tuple[int, frozenset[str]], Split] = {}
        self.windows: dict[str, int] = {}  # the last refill size asked per webhook (a hint, not state)

    # -- transactions --------------------------------------------------------------------
    @property
    def work(self) -> State:
        """The state as this transaction sees it (read only: change it through `_own`)."""
        return self._work if self._work is not None else self.state

    def _own(self) -> State:
        if self._work is None:
            self._work = self.state.copy()
        return self._work

    def begin(self) -> None:
        self._work = None
        self._changed = set()

    def commit(self) -> None:
        if self._work is not None:
            self.state = self._work
        self.begin()

    def rollback(self) -> None:
        self.begin()

    # -- open ----------------------------------------------------------------------------
    def load(self, conn: sqlite3.Connection) -> None:
        """The committed state, and the deferred deliveries' counts (called after Counts.load)."""
        s = State()
        for wid, enabled in conn.execute("SELECT id, enabled FROM webhooks"):
            s.enabled[str(wid)] = bool(enabled)
        for wid, key, cursor, deferred in conn.execute("SELECT webhook_id, key, cursor, deferred FROM fanout"):
            wid = str(wid)
            s.keys[wid] = int(key)
            s.next_key = max(s.next_key, int(key) + 1)
            if cursor is not None and deferred:
                s.cursor[wid], s.deferred[wid] = int(cursor), int(deferred)
                self.counts.by[(wid, status_of(s.enabled.get(wid, True)))] += int(deferred)
        s.lagging = frozenset(w for w in s.keys if not s.enabled.get(w, True) or w in s.deferred)
        self.state = s
        self.begin()

    # -- intake (Events.execute) ---------------------------------------------------------
    def start_batch(self) -> list[str]:
        """Before a run of events: an enabled webhook whose pending rows passed `defer_after`
        starts lagging (its deliveries of this run on are deferred). Returns those webhooks:
        the scheduler must read their windows again (what it holds may be all it will get)."""
        by = self.counts.by
        return self._past([w for (w, status) in by if status == PENDING], lambda w: by[(w, PENDING)])

    def during_batch(self, made: Mapping[Subscriber, int]) -> list[str]:
        """Every few events of a long run: the same, counting the rows the run made so far."""
        by = self.counts.by
        return self._past([w for (w, enabled) in made if enabled],
                          lambda w: by.get((w, PENDING), 0) + made[(w, True)])

    def _past(self, candidates: list[str], pending: Callable[[str], int]) -> list[str]:
        s = self.work
        limit, windows = self.defer_after, self.windows
        # and past two of its windows: a webhook that has just caught up (its pending rows are
        # then less than half a window in memory, its attempts, at most a quarter of a window,
        # and less than a window stored) must not start lagging again at once
        newly = [w for w in candidates
                 if w not in s.lagging and w in s.keys and pending(w) > max(limit, 2 * windows.get(w, 0))]
        if newly:
            self._lag(newly)
        return newly

    def split(self, subs: Sequence[Subscriber]) -> Split:
        lagging = self.work.lagging
        key = (id(subs), lagging)
        found = self._splits.get(key)
        if found is not None:
            return found
        keys = self.work.keys
        deferred = tuple(w for w, _ in subs if w in lagging)
        if deferred:
            eager: Sequence[Subscriber] = [s for s in subs if s[0] not in lagging]
            text: str | None = "," + ",".join(str(keys[w]) for w in deferred) + ","
        else:
            eager, text = subs, None
        if len(self._splits) > 4096:
            self._splits.clear()
        found = self._splits[key] = Split(eager, deferred, text, subs)
        return found

    def deferred_events(self, first: dict[str, int], made: dict[str, int]) -> None:
        """A run deferred `made[w]` deliveries of each webhook, the first in event `first[w]`."""
        s = self._own()
        counts = self.counts
        for w, n in made.items():
            s.deferred[w] = s.deferred.get(w, 0) + n
            s.cursor.setdefault(w, first[w])
            counts.move(w, None, status_of(s.enabled.get(w, True)), n)
            self._changed.add(w)

    # -- webhook state -------------------------------------------------------------------
    def _lag(self, webhooks: Iterable[str]) -> None:
        s = self._own()
        s.lagging = s.lagging | frozenset(webhooks)

    def created(self, webhook_id: str, enabled: bool) -> int:
        """A new webhook: its key (the caller stores it in `fanout`)."""
        s = self._own()
        key = s.keys[webhook_id] = s.next_key
        s.next_key += 1
        s.enabled[webhook_id] = enabled
        if not enabled:
            self._lag([webhook_id])
        return key

    def set_enabled(self, webhook_id: str, enabled: bool) -> int:
        """The stored enabled flag changed: the deferred deliveries follow (pending while
        enabled, paused while not); a disabled webhook lags. Returns how many moved."""
        s = self.work
        if webhook_id not in s.keys or s.enabled.get(webhook_id) == enabled:
            return 0
        s = self._own()
        s.enabled[webhook_id] = enabled
        n = s.deferred.get(webhook_id, 0)
        self.counts.move(webhook_id, status_of(not enabled), status_of(enabled), n)
        if not enabled:
            self._lag([webhook_id])
        elif not n:
            s.lagging = s.lagging - {webhook_id}
        return n

    def deleted(self, webhook_id: str) -> None:
        """A webhook is gone, and its deferred deliveries with it (Counts.drop_webhook drops their counts)."""
        s = self._own()
        for d in (s.keys, s.enabled, s.cursor, s.deferred):
            d.pop(webhook_id, None)
        s.lagging = s.lagging - {webhook_id}
        self._changed.discard(webhook_id)

    def has_deferred(self, webhook_id: str) -> bool:
        return webhook_id in self.work.deferred

    def deferred_in(self, webhook_ids: Iterable[str] | None) -> list[str]:
        """Of these webhooks (None: all), those with deferred deliveries (committed state)."""
        deferred = self.state.deferred
        if webhook_ids is None:
            return sorted(deferred)
        return [w for w in webhook_ids if w in deferred]

    def min_cursor(self) -> int | None:
        cursors = self.work.cursor
        return min(cursors.values()) if cursors else None

    # -- materialising ------------------------------------------------------------------
    def materialise(self, conn: sqlite3.Connection, webhook_id: str, limit: int, *, now: float, next_id: int,
                    status: str | None = None, bodies: bool = False) -> tuple[list[Any], int]:
        """Make up to `limit` of the webhook's deferred deliveries rows, in event order, with
        ids from `next_id`; `status` defaults to its deliveries' status (failed: the dropped
        backlog). Returns the rows made (as DueItem when `bodies`, else ids) and the next free
        delivery id. Advances the cursor; a webhook with none left that is enabled stops lagging."""
        s = self.work
        cursor = s.cursor.get(webhook_id)
        if cursor is None or limit <= 0:
            return [], next_id
        key = f",{s.keys[webhook_id]},"
        enabled = s.enabled.get(webhook_id, True)
        virtual = status_of(enabled)
        status = status or virtual
        cols = "id, created_at, uid, type, body" if bodies else "id, created_at"
        found = conn.execute(
            f"SELECT {cols} FROM events WHERE id >= ? AND instr(deferred, ?) > 0 ORDER BY id LIMIT ?",  # noqa: S608
            (cursor, key, limit + 1),
        ).fetchall()
        take, rest = found[:limit], found[limit:]
        pending = status == PENDING
        rows = []
        made: list[Any] = []
        for i, r in enumerate(take):
            did = next_id + i
            rows.append((did, r[0], webhook_id, status, now if pending else None, r[1], now,
                         DROPPED if status == FAILED else None))
            made.append(DueItem(did, webhook_id, now, 0, r[2], r[3], bytes(r[4])) if bodies else did)
        conn.executemany(
            "INSERT INTO deliveries (id, event_id, webhook_id, status, next_attempt_at, created_at, updated_at,"
            " last_error) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
        s = self._own()
        left = s.deferred[webhook_id] - len(take)
        self.counts.move(webhook_id, virtual, status, len(take))
        self._changed.add(webhook_id)
        if rest:
            s.cursor[webhook_id], s.deferred[webhook_id] = int(rest[0][0]), left
            if left <= 0:  # the count disagrees with the events (cannot happen): the events are the truth
                self._repair(conn, webhook_id)
        else:
            if left:  # as above: nothing is left, whatever the count said
                self.counts.move(webhook_id, virtual, None, left)
            del s.cursor[webhook_id], s.deferred[webhook_id]
            if enabled:
                s.lagging = s.lagging - {webhook_id}
        return made, next_id + len(take)

    def _repair(self, conn: sqlite3.Connection, webhook_id: str) -> None:
        s = self._own()
        key = f",{s.keys[webhook_id]},"
        (n,) = conn.execute("SELECT count(*) FROM events WHERE id >= ? AND instr(deferred, ?) > 0",
                            (s.cursor[webhook_id], key)).fetchone()
        virtual = status_of(s.enabled.get(webhook_id, True))
        self.counts.move(webhook_id, None, virtual, int(n) - s.deferred[webhook_id])
        s.deferred[webhook_id] = int(n)

    def refills(self, webhook_id: str) -> bool:
        """A refill (take_due) found fewer rows than it asked for: should it make deferred ones rows?
        Yes for an enabled webhook that has some; an enabled one that lags with none left
        stops lagging here (its window will hold everything: new rows must reach it)."""
        s = self.work
        if not s.enabled.get(webhook_id, True):
            return False
        if webhook_id in s.deferred:
            return True
        if webhook_id in s.lagging:
            own = self._own()
            own.lagging = own.lagging - {webhook_id}
        return False

    # -- writing the state ---------------------------------------------------------------
    def flush(self, conn: sqlite3.Connection) -> None:
        """Write the cursor and count of every webhook changed in this transaction so far."""
        if not self._changed:
            return
        s = self.work
        conn.executemany(
            "UPDATE fanout SET cursor = ?, deferred = ? WHERE webhook_id = ?",
            [(s.cursor.get(w), s.deferred.get(w, 0), w) for w in sorted(self._changed)],
        )
        self._changed = set()


def oldest_deferred(conn: sqlite3.Connection, webhook_id: str) -> float | None:
    """The created_at of the event at the webhook's cursor, if its deferred deliveries are
    pending (it is enabled); on the reader, inside its read transaction."""
    row = conn.execute(
        "SELECT e.created_at FROM fanout f JOIN events e ON e.id = f.cursor JOIN webhooks w ON w.id = f.webhook_id"
        " WHERE f.webhook_id = ? AND f.deferred > 0 AND w.enabled = 1",
        (webhook_id,),
    ).fetchone()
    return None if row is None else float(row[0])
