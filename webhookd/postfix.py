"""`webhookd follow postfix`: turn Postfix's log into webhookd events.

Correlates a queue id's `message-id=` (cleanup) and `from=` (qmgr) with each
delivery line (`to=<...>, ..., dsn=X.Y.Z, status=...`):

- `status=sent` → `delivered`;
- `status=bounced` → `bounced`, hard or soft by `webhookd.dsn`;
- `status=deferred` with a mailbox-full code → `bounced` soft, once per message and
  recipient;
- `status=expired` (qmgr) → `failed` for every recipient still pending;
- Postfix's own notifications (`from=<>`) are skipped.

Every event carries an idempotency key made of the queue id, the recipient and the
outcome, so reading the same lines again (after a crash, or from the start of a log)
creates nothing new. Standard library only.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from webhookd.dsn import classify

_LINE = re.compile(
    r"\spostfix(?:-[\w.-]+)?/(?P<service>[\w/.-]+)\[\d+\]:\s(?P<qid>[0-9A-Za-z]{5,20}):\s(?P<rest>.*)$"
)
_KV = re.compile(r"(\w+)=(<[^>]*>|[^,\s]*)")
_STATUS = re.compile(r"\bstatus=(\w+)(?:\s\((?P<text>.*)\)\s*$)?")
MAX_QUEUE_IDS = 100_000  # correlation state kept for at most this many queue ids


@dataclass
class Queued:
    """What is known about one queue id."""

    message_id: str = ""
    sender: str | None = None
    pending: dict[str, str] = field(default_factory=dict)  # recipient → last deferral text
    seen: float = field(default_factory=time.time)


def _strip(value: str) -> str:
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


class Tracker:
    """Feeds on log lines; yields event objects."""

    def __init__(self) -> None:
        self.queues: dict[str, Queued] = {}

    def _queue(self, qid: str) -> Queued:
        q = self.queues.get(qid)
        if q is None:
            if len(self.queues) >= MAX_QUEUE_IDS:  # forget the oldest
                oldest = min(self.queues, key=lambda k: self.queues[k].seen)
                del self.queues[oldest]
            q = self.queues[qid] = Queued()
        return q

    def feed(self, line: str) -> list[dict[str, Any]]:
        m = _LINE.search(line)
        if m is None:
            return []
        qid, rest = m.group("qid"), m.group("rest")
        if rest.startswith("message-id="):
            self._queue(qid).message_id = rest[len("message-id="):].strip()
            return []
        if rest == "removed":
            self.queues.pop(qid, None)
            return []
        fields = dict(_KV.findall(rest))
        status_m = _STATUS.search(rest)
        if "from" in fields and "to" not in fields:
            q = self._queue(qid)
            q.sender = _strip(fields["from"])
            if status_m and status_m.group(1) == "expired":
                return self._expired(qid, q)
            return []
        if "to" not in fields or status_m is None:
            return []
        q = self._queue(qid)
        if q.sender == "":
            return []  # Postfix's own bounce or delay notification
        rcpt = _strip(fields["to"])
        status, text = status_m.group(1), (status_m.group("text") or "").strip()
        dsn = fields.get("dsn")
        data = self._data(qid, q, rcpt)
        if status == "sent":
            q.pending.pop(rcpt, None)
            return [self._event("delivered", f"{qid}:{rcpt}:sent", data)]
        if status == "bounced":
            q.pending.pop(rcpt, None)
            kind = classify(text, enhanced=dsn)
            data.update(bounce_type=kind.bounce_type, error_message=text or f"dsn={dsn}")
            return [self._event("bounced", f"{qid}:{rcpt}:bounced", data)]
        if status == "deferred":
            q.pending[rcpt] = text
            kind = classify(text, enhanced=dsn)
            if kind.mailbox_full:
                data.update(bounce_type="soft", error_message=text or f"dsn={dsn}")
                return [self._event("bounced", f"{qid}:{rcpt}:mailbox-full", data)]
            return []
        if status == "expired":  # some Postfix versions log it per recipient
            q.pending.pop(rcpt, None)
            data["error_message"] = text or "message expired in the queue"
            return [self._event("failed", f"{qid}:{rcpt}:expired", data)]
        return []

    def _expired(self, qid: str, q: Queued) -> list[dict[str, Any]]:
        if q.sender == "":
            return []
        out = []
        for rcpt, last in sorted(q.pending.items()):
            data = self._data(qid, q, rcpt)
            data["error_message"] = f"expired in the queue; last error: {last}" if last else "expired in the queue"
            out.append(self._event("failed", f"{qid}:{rcpt}:expired", data))
        q.pending.clear()
        return out

    @staticmethod
    def _data(qid: str, q: Queued, rcpt: str) -> dict[str, Any]:
        data: dict[str, Any] = {"message_id": q.message_id or f"postfix-queue-id:{qid}"}
        if q.sender:
            data["from"] = q.sender
        data["to"] = rcpt
        data["postfix_queue_id"] = qid
        return data

    @staticmethod
    def _event(kind: str, key: str, data: dict[str, Any]) -> dict[str, Any]:
        ident = f"postfix:{key}"
        if len(ident) > 255:  # a very long recipient: hash it, keep queue id and outcome readable
            qid, _, rest = key.partition(":")
            rcpt, _, outcome = rest.rpartition(":")
            ident = f"postfix:{qid}:sha256-{hashlib.sha256(rcpt.encode()).hexdigest()}:{outcome}"
        return {"event": kind, "id": ident, "data": data}

    # -- persistence -----------------------------------------------------------------------
    def dump(self) -> dict[str, Any]:
        return {qid: {"message_id": q.message_id, "sender": q.sender, "pending": q.pending, "seen": q.seen}
                for qid, q in self.queues.items()}

    def load(self, state: dict[str, Any]) -> None:
        for qid, q in state.items():
            self.queues[qid] = Queued(q.get("message_id", ""), q.get("sender"), dict(q.get("pending", {})),
                                      float(q.get("seen", time.time())))


# -- following a file ----------------------------------------------------------------------------
@dataclass
class Position:
    inode: int
    offset: int
    head: bytes = b""  # the file's first bytes: a rewritten (copytruncate) file has others


HEAD_BYTES = 128


def _head(fd: int) -> bytes:
    return os.pread(fd, HEAD_BYTES, 0)


class Follower:
    """Reads a log file from a saved position, surviving rename and truncate rotation."""

    def __init__(self, path: Path, state_file: Path, submit: Callable[[list[dict[str, Any]]], bool],
                 *, poll: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self.state_file = state_file
        self.submit = submit
        self.poll = poll
        self.sleep = sleep
        self.tracker = Tracker()
        self.position: Position | None = None
        self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        self.position = Position(int(saved["inode"]), int(saved["offset"]), bytes.fromhex(saved.get("head", "")))
        self.tracker.load(saved.get("queues", {}))

    def _save(self) -> None:
        assert self.position is not None
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inode": self.position.inode, "offset": self.position.offset,
                                   "head": self.position.head.hex(), "queues": self.tracker.dump()}))
        os.replace(tmp, self.state_file)

    def _open(self, *, once: bool = False) -> Any:
        """Open the log at the saved position; if it was rotated while nobody followed it,
        finish the rotated file first (found beside it, compressed or not)."""
        while True:
            try:
                f = open(self.path, "rb")  # noqa: SIM115 - kept open across reads
                break
            except FileNotFoundError:
                if once:
                    raise
                # not there yet (Postfix's maillog_file appears with its first line after
                # `postfix logrotate`; a log not yet written): wait for it
                self.sleep(self.poll)
        try:
            st = os.fstat(f.fileno())
            pos = self.position
            if pos is not None and pos.inode == st.st_ino and pos.offset <= st.st_size and self._same_head(f, pos):
                f.seek(pos.offset)
            else:
                if pos is not None:
                    self._finish_rotated(pos)
                self.position = Position(st.st_ino, 0)  # a new file, or rewritten: from its start
        except BaseException:
            f.close()
            raise
        return f

    def _rotated_copies(self) -> list[Path]:
        """Files beside the log named after it (`mail.log.1`, `mail.log.2.gz`,
        `postfix.log.20261128-101500.gz`, `mail.log-20261128`), newest first."""
        found = []
        name = self.path.name
        try:
            siblings = os.listdir(self.path.parent)  # not glob: the name may hold [ or *
        except OSError:
            return []
        for sibling in siblings:
            p = self.path.parent / sibling
            if len(sibling) > len(name) + 1 and sibling.startswith(name) and sibling[len(name)] in ".-_" \
                    and p != self.state_file:
                with contextlib.suppress(OSError):
                    if p.is_file():
                        found.append((p.stat().st_mtime, p))
        return [p for _mtime, p in sorted(found, reverse=True)]

    def _finish_rotated(self, pos: Position) -> None:
        """The log was rotated while the follower was stopped: read the rest of the file
        it was reading, from the saved offset, if a rotated copy of it is found (same
        inode, or same first bytes: renamed, copied, or compressed). Without one, the
        lines written between the stop and the rotation cannot be read; say so."""
        for candidate in self._rotated_copies():
            compressed = candidate.suffix == ".gz"
            try:
                opened: Any = gzip.open(candidate, "rb") if compressed else open(candidate, "rb")  # noqa: SIM115
            except OSError:
                continue
            with opened as g:
                try:
                    head = g.read(HEAD_BYTES)
                    if pos.head:
                        if head[: len(pos.head)] != pos.head:
                            continue
                    elif compressed or os.fstat(g.fileno()).st_ino != pos.inode:
                        continue  # nothing to recognise it by but its inode
                    g.seek(pos.offset)
                    self._read_rest(g)
                except (OSError, EOFError, zlib.error):
                    continue  # unreadable, or a truncated .gz: try the next one
            print(f"webhookd: finished the rotated log {candidate} from byte {pos.offset}", file=sys.stderr)
            return
        if pos.offset:
            print(f"webhookd: {self.path} was rotated while not followed and no rotated copy starting as it"
                  " did was found beside it; lines written after the last saved position may be missing",
                  file=sys.stderr)

    def _read_rest(self, g: Any) -> None:
        """Submit every line of a finished file from its current position, saving progress."""
        rest = b""
        while True:
            chunk = g.read(1 << 20)
            data = rest + chunk
            if not chunk:
                if data:
                    self._submit_lines(data)  # a last line without its newline: complete now
                return
            end = data.rfind(b"\n")
            if end < 0:
                rest = data
                continue
            rest = data[end + 1 :]
            self._submit_lines(data[: end + 1])

    def _submit_lines(self, data: bytes) -> None:
        """Submit the events of these complete lines (retrying until the daemon takes
        them), then advance the saved position past them."""
        assert self.position is not None
        events: list[dict[str, Any]] = []
        for raw in data.splitlines():
            events.extend(self.tracker.feed(raw.decode("utf-8", "replace")))
        while events and not self.submit(events):
            self.sleep(min(5.0, max(self.poll, 1.0)))  # daemon unreachable: retry, do not skip
        self.position.offset += len(data)
        self._save()

    @staticmethod
    def _same_head(f: Any, pos: Position) -> bool:
        return not pos.head or _head(f.fileno())[: len(pos.head)] == pos.head

    def run(self, *, once: bool = False, max_idle: float | None = None) -> None:
        """Process lines until EOF (`once`) or forever; submit and save after each batch."""
        f = self._open(once=once)
        idle = 0.0
        try:
            while True:
                if self._drain(f):
                    idle = 0.0
                    continue
                if once:
                    return
                rotated = self._rotated(f)
                if rotated:
                    self._drain(f)  # the rest of the old file first
                    f.close()
                    self.position = None
                    f = self._open()
                    continue
                if max_idle is not None and idle >= max_idle:
                    return
                self.sleep(self.poll)
                idle += self.poll
        finally:
            f.close()

    def _rotated(self, f: Any) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed away and not recreated yet: keep the old one
        mine = os.fstat(f.fileno())
        if st.st_ino != mine.st_ino:
            return True
        assert self.position is not None
        if st.st_size < f.tell() or not self._same_head(f, self.position):  # truncated in place
            f.seek(0)
            self.position.offset = 0
            self.position.head = b""
        return False

    def _drain(self, f: Any) -> bool:
        """Read complete lines available now; True if any were read."""
        assert self.position is not None
        if not self._same_head(f, self.position):  # rewritten in place (copytruncate)
            f.seek(0)
            self.position.offset = 0
            self.position.head = b""
        chunk = f.read(1 << 20)
        if not chunk:
            return False
        end = chunk.rfind(b"\n")
        if end < 0:
            f.seek(-len(chunk), os.SEEK_CUR)  # a partial line: wait for the rest
            return False
        if end + 1 < len(chunk):
            f.seek(-(len(chunk) - end - 1), os.SEEK_CUR)
        if len(self.position.head) < HEAD_BYTES:
            self.position.head = _head(f.fileno())
        self._submit_lines(chunk[: end + 1])
        return True


def parse_lines(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Events for a sequence of log lines (for tests and one-off imports)."""
    tracker = Tracker()
    for line in lines:
        yield from tracker.feed(line)
