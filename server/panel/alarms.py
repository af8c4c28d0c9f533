"""What the operator must look at: dead letters not dealt with yet, and gateways whose events
arrived with earlier ones of their sequence missing.

A dead letter is an inbound message the service could not process (kept by the MQTT bridge,
see :mod:`server.mqtt.bridge`); it stays an alarm until an operator resolves it with a reason,
audited as ``dead_letter.resolve``. Sequence gaps live in the bridge's memory
(:class:`server.gateways.sequence.SeqTracker`): they close by themselves when the gateway's
outbox replays the missing events after it reconnects.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from sqlmodel import Session, col, select

from server.audit import service as audit
from server.auth.web import Operator
from server.central import Central
from server.errors import ConflictError, NotFoundError
from server.panel.actions import clean_reason
from server.sessions.models import DeadLetter

__all__ = [
    "Alarms",
    "DeadLetterView",
    "Gap",
    "alarms",
    "dead_letter_view",
    "list_dead_letters",
    "resolve_dead_letter",
    "sequence_gaps",
    "unresolved_dead_letters",
]

PAYLOAD_PREVIEW = 400
"""Characters of a dead letter's payload the page shows (the row keeps all of it)."""
ERROR_PREVIEW = 300
GAP_PREVIEW = 10
"""Missing seqs listed per gate (the count is always the full one)."""

DeadLetterState = Literal["open", "resolved", "all"]


@dataclass(frozen=True, slots=True)
class Gap:
    """One gate with events of its sequence not received yet."""

    lot_id: str
    gate_id: str
    missing: int
    first: tuple[int, ...]  # the lowest GAP_PREVIEW missing seqs

    @property
    def more(self) -> int:
        return self.missing - len(self.first)


@dataclass(frozen=True, slots=True)
class Alarms:
    dead_letters: int
    gaps: tuple[Gap, ...]

    @property
    def raised(self) -> bool:
        return self.dead_letters > 0 or bool(self.gaps)

    @property
    def events_missing(self) -> int:
        return sum(gap.missing for gap in self.gaps)


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    """A dead letter as the page shows it: the payload decoded (bytes that are not UTF-8
    as ``\\x..``) and cut to :data:`PAYLOAD_PREVIEW` characters; the template escapes it."""

    dead_letter_id: int
    created_at: datetime
    topic: str
    event_id: str | None
    error: str
    error_cut: bool
    payload: str
    payload_bytes: int
    payload_cut: bool
    resolved_at: datetime | None
    resolved_by: str | None
    resolve_reason: str | None


def sequence_gaps(central: Central) -> tuple[Gap, ...]:
    """Gates missing events, from this process's bridge (none when MQTT is off)."""
    if central.bridge is None:
        return ()
    return tuple(
        Gap(lot_id=lot_id, gate_id=gate_id, missing=len(seqs), first=seqs[:GAP_PREVIEW])
        for (lot_id, gate_id), seqs in sorted(central.bridge.sequences.missing().items())
    )


def unresolved_dead_letters(db: Session) -> int:
    query = select(sa.func.count()).select_from(DeadLetter).where(_unresolved())
    return int(db.exec(query).one())


def alarms(db: Session, central: Central) -> Alarms:
    """What the dashboard's alarm banner shows."""
    return Alarms(dead_letters=unresolved_dead_letters(db), gaps=sequence_gaps(central))


def dead_letter_view(letter: DeadLetter) -> DeadLetterView:
    assert letter.dead_letter_id is not None
    text = letter.payload.decode("utf-8", errors="backslashreplace")
    return DeadLetterView(
        dead_letter_id=letter.dead_letter_id,
        created_at=letter.created_at,
        topic=letter.topic,
        event_id=letter.event_id,
        error=letter.error[:ERROR_PREVIEW],
        error_cut=len(letter.error) > ERROR_PREVIEW,
        payload=text[:PAYLOAD_PREVIEW],
        payload_bytes=len(letter.payload),
        payload_cut=len(text) > PAYLOAD_PREVIEW,
        resolved_at=letter.resolved_at,
        resolved_by=letter.resolved_by,
        resolve_reason=letter.resolve_reason,
    )


def list_dead_letters(
    db: Session, *, state: DeadLetterState = "open", limit: int = 200
) -> list[DeadLetterView]:
    """Dead letters, newest first."""
    query = select(DeadLetter)
    if state == "open":
        query = query.where(_unresolved())
    elif state == "resolved":
        query = query.where(col(DeadLetter.resolved_at).is_not(None))
    query = query.order_by(
        col(DeadLetter.created_at).desc(), col(DeadLetter.dead_letter_id).desc()
    ).limit(limit)
    return [dead_letter_view(letter) for letter in db.exec(query)]


def resolve_dead_letter(
    db: Session, operator: Operator, dead_letter_id: int, *, reason: str, now: datetime
) -> DeadLetterView:
    """Mark a dead letter dealt with, once, and audit who did it and why (one transaction)."""
    note = clean_reason(reason)
    letter = db.get(DeadLetter, dead_letter_id)
    if letter is None:
        raise NotFoundError(f"dead letter {dead_letter_id} not found")
    done = db.execute(
        sa.update(DeadLetter)
        .where(col(DeadLetter.dead_letter_id) == dead_letter_id, _unresolved())
        .values(resolved_at=now, resolved_by=operator.actor[:100], resolve_reason=note)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        db.rollback()
        raise ConflictError(f"dead letter {dead_letter_id} was already resolved")
    audit.record(
        db,
        actor=operator.actor,
        action="dead_letter.resolve",
        target_type="dead_letter",
        target_id=str(dead_letter_id),
        now=now,
        reason=note,
        details={"topic": letter.topic[:200], "event_id": letter.event_id},
    )
    db.commit()
    db.refresh(letter)
    return dead_letter_view(letter)


def _unresolved() -> sa.ColumnElement[bool]:
    return col(DeadLetter.resolved_at).is_(None)
