"""The responses store: SQLite from the standard library (WAL), one row per response, bounded by
age and total size (oldest evicted first). A key sees only its own responses; `owner=None`
(the admin token) sees all.

Several processes may hold one file at once: the store actor, and the ingress replicas on its
node, which read and write it directly rather than through the actor (SQLite serialises the
writers; the size total lives in the file, so each writer evicts for all). Pure: no Ray, no
HTTP.
"""

from __future__ import annotations

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
"""
# How long a writer waits for another process's write to end.
BUSY_TIMEOUT_MS = 5000

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
        self._db = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1e3
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if not owner:
            self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._db.executescript(_SCHEMA)
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
        """Stores (or replaces) a response; False when it alone is over `max_bytes`."""
        blob = record.model_dump_json().encode()
        if len(blob) > self.max_bytes:
            return False
        with self._write():
            old = self._db.execute(
                "SELECT size FROM responses WHERE id = ?", (record.id,)
            ).fetchone()
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                (record.id, record.owner, record.created, len(blob), blob),
            )
            grown = len(blob) - (old[0] if old else 0)
            row = self._db.execute(
                "UPDATE totals SET bytes = bytes + ?, count = count + ? RETURNING bytes",
                (grown, 0 if old else 1),
            ).fetchone()
            if row[0] > self.max_bytes:
                self._evict_oldest(row[0] - self.max_bytes, keep=record.id)
        return True

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
            self._db.execute("UPDATE totals SET bytes = bytes + ?", (len(blob) - len(row[0]),))
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
            return removed + (self._evict_oldest(excess) if excess > 0 else 0)

    def checkpoint(self) -> None:
        """Copies the write-ahead log into the file, without waiting for readers or writers."""
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _evict_oldest(self, excess: int, keep: str = "") -> int:
        """Drops the oldest responses (never `keep`, the one just written) until `excess`
        bytes are gone."""
        oldest: list[str] = []
        for response_id, size in self._db.execute(
            "SELECT id, size FROM responses WHERE id != ? ORDER BY created", (keep,)
        ):
            oldest.append(response_id)
            excess -= size
            if excess <= 0:
                break
        return sum(self._remove("id = ?", (i,)) for i in oldest)

    def _remove(self, where: str, args: tuple[Any, ...]) -> int:
        """Deletes rows and takes their sizes off the totals (no scan of the table)."""
        sizes = [
            row[0]
            for row in self._db.execute(f"DELETE FROM responses WHERE {where} RETURNING size", args)
        ]
        if sizes:
            self._db.execute(
                "UPDATE totals SET bytes = bytes - ?, count = count - ?", (sum(sizes), len(sizes))
            )
        return len(sizes)

    def _write(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()


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
