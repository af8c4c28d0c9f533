"""The live feed: decided gate events turned into small dicts and fanned out to browsers (SSE).

The MQTT bridge calls :meth:`EventHub.on_batch` on the event loop after each committed
batch; the hub keeps the last events for a page that just opened and gives each subscriber
its own bounded queue (a slow browser loses old events, it never slows the bridge). Gateway
status changes are also queued for :mod:`server.panel.service` to keep as history.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from parking_protocol.messages import EventAck, GateCommand, GatewayStatus, ScanEvent
from parking_protocol.qr_token import CodeRejected, parse_code
from parking_protocol.types import DENY_TEXT, GateAction, Reason
from server.mqtt.bridge import Inbound
from server.sessions.flows import Reply

__all__ = ["EventHub", "FeedEvent", "feed_event"]

log = logging.getLogger(__name__)

FeedEvent = dict[str, Any]


def _claimed_account(code: str) -> str | None:
    try:
        return parse_code(code).account_id
    except CodeRejected:
        return None


def feed_event(event: ScanEvent, reply: GateCommand | EventAck) -> FeedEvent:
    """What the dashboard shows for one decided scan."""
    if isinstance(reply, GateCommand):
        action, reason = reply.action, reply.reason
    else:  # an offline decision replayed and reconciled
        assert event.offline is not None
        action, reason = event.offline.action, reply.result
    amount = reply.amount.display() if reply.amount and reply.amount.amount_minor else None
    kind = event.direction.value if action == GateAction.OPEN else "denied"
    return {
        "kind": kind,
        "at": event.scanned_at.isoformat(),
        "lot_id": event.lot_id,
        "gate_id": event.gate_id,
        "direction": event.direction.value,
        "action": action.value,
        "reason": reason.value,
        "text": DENY_TEXT.get(Reason(reason), reason.value),
        "account_id": _claimed_account(event.code),
        "amount": amount,
        "session_id": reply.session_id,
        "offline": event.offline is not None,
        "event_id": event.event_id,
    }


@dataclass(frozen=True, slots=True)
class _Unbuilt:
    """A decided scan kept while nobody watches: its feed event is built when asked for."""

    id: int
    event: ScanEvent
    reply: GateCommand | EventAck


class EventHub:
    """Fan-out of feed events to any number of subscribers, plus a short memory."""

    def __init__(self, *, keep: int = 50, queue_size: int = 200) -> None:
        self._recent: deque[FeedEvent | _Unbuilt] = deque(maxlen=keep)
        self._subscribers: set[asyncio.Queue[FeedEvent | None]] = set()
        self._queue_size = queue_size
        self._ids = itertools.count(1)
        self.status_changes: asyncio.Queue[GatewayStatus] = asyncio.Queue(10_000)
        self.closed = False

    def recent(self) -> list[FeedEvent]:
        for i, kept in enumerate(self._recent):
            if isinstance(kept, _Unbuilt):  # built once, when first asked for
                self._recent[i] = {"id": kept.id, **feed_event(kept.event, kept.reply)}
        return cast("list[FeedEvent]", list(self._recent))

    def publish(self, event: FeedEvent) -> None:
        event = {"id": next(self._ids), **event}
        self._recent.append(event)
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def on_batch(self, batch: Sequence[Inbound], replies: Sequence[Reply]) -> None:
        """The bridge's hook: one feed event per decided scan (redeliveries are not new)."""
        answers = {r.message.event_id: r for r in replies if not r.replayed}
        decided = [
            (item.message, reply)
            for item in batch
            if isinstance(item.message, ScanEvent)
            and (reply := answers.get(item.message.event_id)) is not None
        ]
        if self._subscribers:
            for event, reply in decided:
                self.publish(feed_event(event, reply.message))
        else:
            # Nobody is watching: the short memory keeps the scans, and their feed events
            # (parsing each code for its driver, ~10 % of a busy service's event loop) are
            # built only if a page asks for them.
            keep = self._recent.maxlen
            if keep is not None and len(decided) > keep:
                del decided[:-keep]
            for event, reply in decided:
                self._recent.append(_Unbuilt(next(self._ids), event, reply.message))
        for item in batch:
            message = item.message
            if isinstance(message, GatewayStatus):
                with contextlib.suppress(asyncio.QueueFull):
                    self.status_changes.put_nowait(message)
                self.publish(
                    {
                        "kind": "status",
                        "at": message.sent_at.isoformat(),
                        "lot_id": message.lot_id,
                        "gate_id": message.gate_id,
                        "state": message.state.value,
                        "firmware_version": message.firmware_version,
                        "quiet": True,  # heartbeats update the gate list, not the feed
                    }
                )

    @contextlib.contextmanager
    def subscription(self) -> Iterator[asyncio.Queue[FeedEvent | None]]:
        """A queue of new events; ``None`` means the hub closed."""
        queue: asyncio.Queue[FeedEvent | None] = asyncio.Queue(self._queue_size)
        if self.closed:
            queue.put_nowait(None)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscription (the service is stopping)."""
        self.closed = True
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


def manual_open_event(
    command: GateCommand, *, actor: str, reason: str, published: bool, now: datetime
) -> FeedEvent:
    return {
        "kind": "manual_open",
        "at": now.isoformat(),
        "lot_id": command.lot_id,
        "gate_id": command.gate_id,
        "action": command.action.value,
        "reason": command.reason.value,
        "text": f"Opened by {actor}: {reason}" if published else f"NOT sent ({actor}): {reason}",
        "account_id": None,
        "amount": None,
        "session_id": None,
        "offline": False,
        "event_id": None,
    }


Listener = Callable[[Sequence[Inbound], Sequence[Reply]], None]
