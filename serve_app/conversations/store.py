"""The responses store: SQLite from the standard library (WAL), one row per response, bounded by
age and total size. The size is shared fairly between owners (client keys): past the bound,
the oldest responses of the owners over their share (the bound over the owners stored) go
first, so one key's writes evict its own, never another's within its share. A key sees only
its own responses, and a stored response is never replaced by another owner's; `owner=None`
(the admin token) sees all. The file is created readable by its owner only (0600).

Several processes may hold one file at once: the store actor, and the ingress replicas on its
node, which read and write it directly rather than through the actor (SQLite serialises the
writers; the size total lives in the file, so each writer evicts for all). Pure: no Ray, no
HTTP.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app.conversations.chain import RUNNING, StoredResponse

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_created ON responses (created);
CREATE TABLE IF NOT EXISTS totals (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    bytes INTEGER NOT NULL,
    count INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    bytes INTEGER NOT NULL
);
"""
# A file written before the owners' totals were kept: made from its rows, once.
_OWNERS_FROM_ROWS = """
INSERT INTO owners SELECT owner, SUM(size) FROM responses
WHERE NOT EXISTS (SELECT 1 FROM owners) GROUP BY owner
"""
# How long a writer waits for another process's write to end.
BUSY_TIMEOUT_MS = 5000

NO_ROOM = {
    "code": "server_error",
    "message": "the answer did not fit this key's share of the responses store",
}
LOST = {
    "code": "server_error",
    "message": "the router lost this background response (the replica running it stopped); "
    "create it again",
}


class ResponseStore:
    def __init__(
        self,
        path: str | Path,
        ttl_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        owner: bool = True,
    ) -> None:
        """`path`: the database file (created with its folder). `owner`: this connection copies
        the write-ahead log into the file (SQLite's checkpoints); the others leave it to the
        owner's `checkpoint()`, so that a request never pays for one (they are most of a
        write's cost otherwise)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _private(Path(path))
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1e3
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if not owner:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
        with self._write():
            self._db.execute(_OWNERS_FROM_ROWS)
        self._clock = clock
        self.ttl_s, self.max_bytes = ttl_s, max_bytes

    def limit(self, ttl_s: float, max_bytes: int) -> None:
        """New bounds (a config change); the size bound applies at the next write."""
        self.ttl_s, self.max_bytes = ttl_s, max_bytes

    @property
    def total_bytes(self) -> int:
        return int(self._db.execute("SELECT bytes FROM totals").fetchone()[0])

    @property
    def count(self) -> int:
        return int(self._db.execute("SELECT count FROM totals").fetchone()[0])

    def put(self, record: StoredResponse) -> bool:
        """Stores (or replaces) a response; False when it alone is over `max_bytes`, when its
        id is another owner's, or when it does not fit its owner's share of a full store."""
        blob = record.model_dump_json().encode()
        if len(blob) > self.max_bytes:
            return False
        try:
            with self._write():
                old = self._db.execute(
                    "SELECT owner, size FROM responses WHERE id = ?", (record.id,)
                ).fetchone()
                if old is not None and old[0] != record.owner:
                    return False
                self._db.execute(
                    "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                    (record.id, record.owner, record.created, len(blob), blob),
                )
                grown = len(blob) - (old[1] if old else 0)
                self._owned(record.owner, grown)
                row = self._db.execute(
                    "UPDATE totals SET bytes = bytes + ?, count = count + ? RETURNING bytes",
                    (grown, 0 if old else 1),
                ).fetchone()
                if row[0] > self.max_bytes:
                    self._evict_fairly(row[0] - self.max_bytes, keep=record.id)
        except _NoRoom:
            return False
        return True

    def end(self, record: StoredResponse) -> StoredResponse:
        """Stores a background response as it ended, as stored: failed when there is no room
        for its answer in its owner's share (it is not left to read as running)."""
        if self.put(record):
            return record
        failed = finished(record, "failed", error=NO_ROOM)
        failed.response["output"] = []
        self.put(failed)
        return failed

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The response, if it is stored, not expired and `owner`'s; a background response
        whose runner is gone reads as failed."""
        row = self._db.execute(
            "SELECT owner, created, record FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        now = self._clock()
        if row is None or (owner is not None and row[0] != owner) or row[1] < now - self.ttl_s:
            return None
        record = StoredResponse.model_validate_json(row[2])
        if record.status in RUNNING and record.expires is not None and record.expires < now:
            return self._lost(record)
        return record

    def _lost(self, record: StoredResponse) -> StoredResponse:
        """A background response whose runner is gone, failed, unless it has just ended (read
        again inside the write)."""
        with self._write():
            row = self._db.execute(
                "SELECT record FROM responses WHERE id = ?", (record.id,)
            ).fetchone()
            if row is None:
                return finished(record, "failed", error=LOST)
            current = StoredResponse.model_validate_json(row[0])
            if current.status not in RUNNING:
                return current
            lost = finished(current, "failed", error=LOST)
            blob = lost.model_dump_json().encode()
            self._db.execute(
                "UPDATE responses SET record = ?, size = ? WHERE id = ?", (blob, len(blob), lost.id)
            )
            grown = len(blob) - len(row[0])
            self._db.execute("UPDATE totals SET bytes = bytes + ?", (grown,))
            self._owned(lost.owner, grown)
        return lost

    def delete(self, response_id: str, owner: str | None) -> bool:
        if self.get(response_id, owner) is None:
            return False
        with self._write():
            self._remove("id = ?", (response_id,))
        return True

    def evict(self) -> int:
        """Drops the responses older than the TTL, then the oldest while over `max_bytes`."""
        with self._write():
            removed = self._remove("created < ?", (self._clock() - self.ttl_s,))
            excess = self.total_bytes - self.max_bytes
            return removed + (self._evict_fairly(excess) if excess > 0 else 0)

    def checkpoint(self) -> None:
        """Copies the write-ahead log into the file, without waiting for readers or writers."""
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _evict_fairly(self, excess: int, keep: str = "") -> int:
        """Drops the oldest responses of the owners over their share of `max_bytes` (never
        `keep`, the one just written) until `excess` bytes are gone; _NoRoom if they cannot
        be without taking another owner's within its share."""
        owned = dict(self._db.execute("SELECT owner, bytes FROM owners"))
        share = self.max_bytes // max(1, len(owned))
        over = [o for o, size in owned.items() if size > share]
        oldest: list[str] = []
        marks = ",".join("?" * len(over))
        for response_id, owner, size in self._db.execute(
            f"SELECT id, owner, size FROM responses WHERE owner IN ({marks}) AND id != ? "
            "ORDER BY created",
            (*over, keep),
        ):
            if owned[owner] <= share:
                continue
            oldest.append(response_id)
            owned[owner] -= size
            excess -= size
            if excess <= 0:
                break
        if excess > 0:
            raise _NoRoom
        return sum(self._remove("id = ?", (i,)) for i in oldest)

    def _owned(self, owner: str, grown: int) -> None:
        """An owner's bytes grew (or shrank); an owner with none left is no longer counted."""
        self._db.execute(
            "INSERT INTO owners VALUES (?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET bytes = bytes + excluded.bytes",
            (owner, grown),
        )
        self._db.execute("DELETE FROM owners WHERE owner = ? AND bytes <= 0", (owner,))

    def _remove(self, where: str, args: tuple[Any, ...]) -> int:
        """Deletes rows and takes their sizes off the totals (no scan of the table)."""
        rows = list(
            self._db.execute(f"DELETE FROM responses WHERE {where} RETURNING owner, size", args)
        )
        if rows:
            self._db.execute(
                "UPDATE totals SET bytes = bytes - ?, count = count - ?",
                (sum(size for _, size in rows), len(rows)),
            )
            for owner, size in rows:
                self._owned(owner, -size)
        return len(rows)

    def _write(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()


class _NoRoom(Exception):
    """A write that would take another owner's share: rolled back."""


def _private(path: Path) -> None:
    """The database file (and SQLite's -wal and -shm beside it, which take its mode) readable
    by its owner only: it holds every key's conversations."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class _Transaction:
    """One write transaction, taken at once (BEGIN IMMEDIATE: no upgrade deadlock between
    processes), rolled back on an error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if kind is not None else "COMMIT")


def finished(
    record: StoredResponse, status: str, error: dict[str, Any] | None = None
) -> StoredResponse:
    """The record with its response ended as `status` (a cancel, a lost runner)."""
    response = {**record.response, "status": status, "error": error}
    return record.model_copy(update={"response": response, "expires": None})
