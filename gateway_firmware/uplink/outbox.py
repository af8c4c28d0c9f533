"""A durable outbox for scan events (SQLite, WAL, synchronous=FULL).

Every ScanEvent is written here BEFORE its first publish and stays until the central service
answers it (a GateCommand or an EventAck naming its ``event_id``), so a power cut or a broker
outage loses nothing: on reconnect :meth:`Outbox.pending` is replayed in order. The same
database keeps the gateway's boot counter (incremented at every open), its event
sequence number, which is monotonic across restarts, the lot's deny-list, the answers
to the most recent gate commands (so a command redelivered after a restart gets the same
answer and is not executed twice), and the nonces of codes used up at this lane until
they expire (so a screenshot shown again after a reboot is still refused offline).

>>> from datetime import UTC, datetime
>>> from parking_protocol.types import Direction
>>> box = Outbox(":memory:")
>>> event = box.add(lambda seq, boot: ScanEvent(event_id="e-000001", lot_id="lot1",
...     gate_id="in1", seq=seq, boot=boot, direction=Direction.ENTRY, code="QP1.x",
...     scanned_at=datetime(2026, 1, 1, tzinfo=UTC)))
>>> (event.seq, event.boot, box.depth)
(1, 1, 1)
>>> box.remove("e-000001"), box.depth
(True, 0)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway_firmware.core.local_verify import SpentNonce
from parking_protocol.messages import (
    CommandOutcome,
    OfflineDecision,
    ScanEvent,
    decode,
    encode,
)

__all__ = ["CommandAnswer", "Outbox"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    payload BLOB NOT NULL,
    offline INTEGER NOT NULL DEFAULT 0,
    publishes INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('boot', 0), ('seq', 0);
CREATE TABLE IF NOT EXISTS denylist (list_id TEXT NOT NULL, account_id TEXT);
CREATE TABLE IF NOT EXISTS command_replies (
    n INTEGER PRIMARY KEY,
    command_id TEXT NOT NULL UNIQUE,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS spent_nonces (
    n INTEGER PRIMARY KEY,
    nonce TEXT NOT NULL UNIQUE,
    expires_us INTEGER NOT NULL
);
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _to_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("a timezone-aware datetime is needed")
    return (moment - _EPOCH) // _MICROSECOND


def _from_us(value: int) -> datetime:
    return _EPOCH + value * _MICROSECOND


# One gate command's latest answer: (command_id, outcome, detail).
CommandAnswer = tuple[str, CommandOutcome, str]


class Outbox:
    """The gateway's durable queue of unanswered events (one per gateway; one thread).

    It may be opened in another thread than the one that then uses it (opening syncs the
    disk; a simulator opening a thousand does it off its event loop), never used from two.
    """

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # check_same_thread=False only lets the opening thread hand the outbox over.
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        # The schema and this boot's number in one transaction: one sync to disk at start,
        # not one per statement.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self.boot: int = self._bump("boot")
        except BaseException:
            self._conn.execute("ROLLBACK")
            self._conn.close()
            raise
        self._conn.execute("COMMIT")

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes --------------------------------------------------------------------------------
    def add(self, build: Callable[[int, int], ScanEvent]) -> ScanEvent:
        """Allocate the next seq, build the event with ``(seq, boot)`` and store it durably."""
        with self._transaction():
            seq = self._bump("seq")
            event = build(seq, self.boot)
            if event.seq != seq or event.boot != self.boot:
                raise ValueError("the event must carry the seq and boot the outbox allocated")
            self._conn.execute(
                "INSERT INTO outbox (seq, event_id, payload, offline) VALUES (?, ?, ?, ?)",
                (seq, event.event_id, encode(event), int(event.offline is not None)),
            )
        return event

    def set_offline(self, event_id: str, decision: OfflineDecision) -> ScanEvent | None:
        """Attach the lane's own decision, so the replay tells the server what happened."""
        with self._transaction():
            event = self._get(event_id)
            if event is None:
                return None
            event = event.model_copy(update={"offline": decision})
            self._conn.execute(
                "UPDATE outbox SET payload = ?, offline = 1 WHERE event_id = ?",
                (encode(event), event_id),
            )
        return event

    def mark_published(self, event_id: str) -> None:
        self._conn.execute(
            "UPDATE outbox SET publishes = publishes + 1 WHERE event_id = ?", (event_id,)
        )

    def remove(self, event_id: str) -> bool:
        """The server answered ``event_id``: forget it. False when it was not pending."""
        cursor = self._conn.execute("DELETE FROM outbox WHERE event_id = ?", (event_id,))
        return cursor.rowcount > 0

    def save_denylist(self, list_id: str, accounts: Iterable[str]) -> None:
        """Keep the lot's latest deny-list (it must hold offline and across restarts)."""
        accounts = list(accounts)
        with self._transaction():
            self._conn.execute("DELETE FROM denylist")
            # One marker row names the list even when it is empty.
            self._conn.execute("INSERT INTO denylist VALUES (?, NULL)", (list_id,))
            self._conn.executemany(
                "INSERT INTO denylist VALUES (?, ?)", [(list_id, a) for a in accounts]
            )

    def load_denylist(self) -> tuple[str | None, list[str]]:
        """The saved deny-list: ``(list_id, accounts)``, or ``(None, [])`` if none was saved."""
        rows = self._conn.execute("SELECT list_id, account_id FROM denylist").fetchall()
        if not rows:
            return None, []
        return rows[0][0], sorted(a for _, a in rows if a is not None)

    def save_command_answer(
        self, command_id: str, outcome: CommandOutcome, detail: str = "", *, keep: int = 1024
    ) -> None:
        """Remember the answer to ``command_id`` (replacing an earlier one, e.g. accepted ->
        done), keeping only the ``keep`` most recent commands."""
        with self._transaction():
            self._conn.execute(
                "INSERT INTO command_replies (command_id, outcome, detail) VALUES (?, ?, ?) "
                "ON CONFLICT (command_id) DO UPDATE "
                "SET outcome = excluded.outcome, detail = excluded.detail",
                (command_id, outcome.value, detail),
            )
            self._conn.execute(
                "DELETE FROM command_replies WHERE n <= (SELECT MAX(n) FROM command_replies) - ?",
                (keep,),
            )

    def load_command_answers(self, limit: int = 1024) -> list[CommandAnswer]:
        """The ``limit`` most recent command answers, oldest first."""
        rows = self._conn.execute(
            "SELECT command_id, outcome, detail FROM command_replies ORDER BY n DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [(cid, CommandOutcome(outcome), detail) for cid, outcome, detail in reversed(rows)]

    def save_spent_nonce(self, spent: SpentNonce, *, now: datetime, keep: int = 10_000) -> None:
        """Remember that ``spent`` is used up here until it expires; forget expired ones and
        all but the ``keep`` most recent (the verifier's own bound)."""
        with self._transaction():
            self._conn.execute(
                "INSERT OR REPLACE INTO spent_nonces (nonce, expires_us) VALUES (?, ?)",
                (spent.nonce, _to_us(spent.expires_at)),
            )
            self._prune_spent(now)
            self._conn.execute(
                "DELETE FROM spent_nonces WHERE n <= (SELECT MAX(n) FROM spent_nonces) - ?",
                (keep,),
            )

    def load_spent_nonces(self, now: datetime) -> list[SpentNonce]:
        """The nonces still unexpired at ``now``, oldest first (expired ones are deleted)."""
        with self._transaction():
            self._prune_spent(now)
            rows = self._conn.execute(
                "SELECT nonce, expires_us FROM spent_nonces ORDER BY n"
            ).fetchall()
        return [SpentNonce(nonce, _from_us(expires)) for nonce, expires in rows]

    # -- reads ---------------------------------------------------------------------------------
    def get(self, event_id: str) -> ScanEvent | None:
        return self._get(event_id)

    def pending(self) -> list[ScanEvent]:
        """Unanswered events in sequence order (the replay order)."""
        rows = self._conn.execute("SELECT payload FROM outbox ORDER BY seq").fetchall()
        return [decode(row[0], ScanEvent) for row in rows]

    @property
    def depth(self) -> int:
        (count,) = self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def __len__(self) -> int:
        return self.depth

    @property
    def last_seq(self) -> int:
        (value,) = self._conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        return int(value)

    # -- helpers -------------------------------------------------------------------------------
    def _get(self, event_id: str) -> ScanEvent | None:
        row = self._conn.execute(
            "SELECT payload FROM outbox WHERE event_id = ?", (event_id,)
        ).fetchone()
        return None if row is None else decode(row[0], ScanEvent)

    def _prune_spent(self, now: datetime) -> None:
        self._conn.execute("DELETE FROM spent_nonces WHERE expires_us <= ?", (_to_us(now),))

    def _bump(self, key: str) -> int:
        (value,) = self._conn.execute(
            "UPDATE meta SET value = value + 1 WHERE key = ? RETURNING value", (key,)
        ).fetchone()
        return int(value)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
