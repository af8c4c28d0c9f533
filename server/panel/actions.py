"""The panel's state-changing use cases: each one audited, each usable from a form or JSON."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from fastapi.concurrency import run_in_threadpool
from sqlmodel import Session

from parking_protocol.transport import TransportUnavailable
from server.accounts import service as accounts
from server.audit import service as audit
from server.auth.web import Operator
from server.errors import NotFoundError, UnprocessableError
from server.gateways import service as gateways
from server.panel import service
from server.panel.live import manual_open_event
from server.panel.runtime import PanelRuntime

__all__ = ["Outcome", "block_account", "clean_reason", "open_gate"]


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    detail: str
    command_id: str | None = None


def clean_reason(reason: str | None, *, required: bool = True) -> str:
    text = " ".join((reason or "").split())
    if required and len(text) < 3:
        raise UnprocessableError("a reason (at least 3 characters) is required")
    if len(text) > 300:
        raise UnprocessableError("keep the reason under 300 characters")
    return text


async def open_gate(
    panel: PanelRuntime,
    db: Session,
    operator: Operator,
    *,
    lot_id: str,
    gate_id: str,
    reason: str,
) -> Outcome:
    """Send an operator's open to the gate; audited before it is sent, and again if it failed."""
    central = panel.central
    reason = clean_reason(reason)
    now = central.clock.now()
    ttl = timedelta(seconds=central.settings.command_ttl_s)
    topic, payload, command = service.manual_open_command(lot_id, gate_id, now=now, ttl=ttl)
    target = f"{lot_id}/{gate_id}"

    def write_intent() -> None:
        if gateways.get_gate(db, lot_id, gate_id) is None:
            raise NotFoundError(f"gate {gate_id!r} not found in lot {lot_id!r}")
        audit.record(
            db,
            actor=operator.actor,
            action="gate.manual_open",
            target_type="gate",
            target_id=target,
            now=now,
            reason=reason,
            details={"command_id": command.command_id, "deadline": command.deadline.isoformat()},
        )
        db.commit()

    await run_in_threadpool(write_intent)
    error = None
    if central.transport is None:
        error = "MQTT is disabled on this service"
    else:
        try:
            await central.transport.publish(topic, payload, qos=1, expiry=int(ttl.total_seconds()))
        except TransportUnavailable as exc:
            error = f"broker unreachable: {exc}"
    if error is not None:

        def write_failure() -> None:
            audit.record(
                db,
                actor=operator.actor,
                action="gate.manual_open_failed",
                target_type="gate",
                target_id=target,
                now=central.clock.now(),
                reason=reason,
                details={"command_id": command.command_id, "error": error},
            )
            db.commit()

        await run_in_threadpool(write_failure)
    panel.hub.publish(
        manual_open_event(
            command, actor=operator.username, reason=reason, published=error is None, now=now
        )
    )
    if error is not None:
        return Outcome(False, f"Not sent: {error}", command.command_id)
    return Outcome(True, f"Open sent to {target}", command.command_id)


async def block_account(
    panel: PanelRuntime,
    db: Session,
    operator: Operator,
    account_id: str,
    *,
    blocked: bool,
    reason: str,
) -> Outcome:
    """Block or unblock, audited; then every lot's retained deny list is republished."""
    central = panel.central
    reason = clean_reason(reason)

    def write() -> None:
        accounts.set_blocked(db, account_id, blocked)
        audit.record(
            db,
            actor=operator.actor,
            action="account.block" if blocked else "account.unblock",
            target_type="account",
            target_id=account_id,
            now=central.clock.now(),
            reason=reason,
            details={"blocked": blocked},
        )
        db.commit()

    await run_in_threadpool(write)
    failed = await panel.publish_denylists()
    verb = "blocked" if blocked else "unblocked"
    if failed:
        return Outcome(True, f"{account_id} {verb}; gateways get it when the broker is back")
    return Outcome(True, f"{account_id} {verb}; gateways updated")
