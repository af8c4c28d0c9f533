"""The MQTT topic scheme: the one place topic strings are built and parsed.

Version 1 topics (``{lot}`` and ``{gate}`` are :data:`~parking_protocol.types.LotId` /
:data:`~parking_protocol.types.GateId` values)::

    qrpark/v1/lots/{lot}/gates/{gate}/events    gateway -> central  ScanEvent        QoS 1
    qrpark/v1/lots/{lot}/gates/{gate}/commands  central -> gateway  GateCommand/Ack  QoS 1
    qrpark/v1/lots/{lot}/gates/{gate}/replies   gateway -> central  CommandReply     QoS 1
    qrpark/v1/lots/{lot}/gates/{gate}/status    gateway -> all      GatewayStatus    QoS 1, kept
    qrpark/v1/lots/{lot}/denylist               central -> gateways DenyList         QoS 1, kept

>>> gate_topic("lot1", "g1", TopicKind.EVENTS)
'qrpark/v1/lots/lot1/gates/g1/events'
>>> parse_topic("qrpark/v1/lots/lot1/gates/g1/events")
TopicRef(lot_id='lot1', gate_id='g1', kind=<TopicKind.EVENTS: 'events'>)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "PREFIX",
    "QOS",
    "RETAIN",
    "TopicKind",
    "TopicRef",
    "all_gates_filter",
    "denylist_topic",
    "gate_topic",
    "parse_topic",
    "shared",
]

PREFIX = "qrpark/v1"


class TopicKind(StrEnum):
    EVENTS = "events"
    COMMANDS = "commands"
    REPLIES = "replies"
    STATUS = "status"
    DENYLIST = "denylist"


QOS: dict[TopicKind, int] = {
    TopicKind.EVENTS: 1,
    TopicKind.COMMANDS: 1,
    TopicKind.REPLIES: 1,
    TopicKind.STATUS: 1,
    TopicKind.DENYLIST: 1,
}
RETAIN: dict[TopicKind, bool] = {
    TopicKind.EVENTS: False,
    TopicKind.COMMANDS: False,
    TopicKind.REPLIES: False,
    TopicKind.STATUS: True,
    TopicKind.DENYLIST: True,
}

_ID = r"[A-Za-z0-9_-]{1,36}"
_TOPIC_RE = re.compile(
    rf"^{re.escape(PREFIX)}/lots/(?P<lot>{_ID})"
    rf"(?:/gates/(?P<gate>{_ID})/(?P<gkind>events|commands|replies|status)|/(?P<lkind>denylist))$"
)
_GATE_KINDS = (TopicKind.EVENTS, TopicKind.COMMANDS, TopicKind.REPLIES, TopicKind.STATUS)


@dataclass(frozen=True, slots=True)
class TopicRef:
    """What a topic names: a lot, maybe a gate, and the kind of message."""

    lot_id: str
    gate_id: str | None
    kind: TopicKind


def _check_id(value: str, what: str) -> None:
    if not re.fullmatch(_ID, value):
        raise ValueError(f"{what} {value!r} is not a valid identifier ([A-Za-z0-9_-]{{1,36}})")


def gate_topic(lot_id: str, gate_id: str, kind: TopicKind) -> str:
    """The topic for one gate's messages of ``kind``."""
    _check_id(lot_id, "lot id")
    _check_id(gate_id, "gate id")
    if kind not in _GATE_KINDS:
        raise ValueError(f"{kind} is not a per-gate topic")
    return f"{PREFIX}/lots/{lot_id}/gates/{gate_id}/{kind.value}"


def denylist_topic(lot_id: str) -> str:
    """The retained deny-list topic of a lot."""
    _check_id(lot_id, "lot id")
    return f"{PREFIX}/lots/{lot_id}/denylist"


def all_gates_filter(kind: TopicKind) -> str:
    """A subscription filter matching ``kind`` messages of every gate in every lot."""
    if kind not in _GATE_KINDS:
        raise ValueError(f"{kind} is not a per-gate topic")
    return f"{PREFIX}/lots/+/gates/+/{kind.value}"


def shared(group: str, topic_filter: str) -> str:
    """An MQTT 5 shared subscription, so several central processes split the load."""
    _check_id(group, "share group")
    return f"$share/{group}/{topic_filter}"


def parse_topic(topic: str) -> TopicRef | None:
    """Parse a topic of this scheme; ``None`` for anything else (never raises)."""
    match = _TOPIC_RE.fullmatch(topic)  # not .match: its '$' matches before a final '\n'
    if match is None:
        return None
    if match["lkind"]:
        return TopicRef(lot_id=match["lot"], gate_id=None, kind=TopicKind.DENYLIST)
    return TopicRef(lot_id=match["lot"], gate_id=match["gate"], kind=TopicKind(match["gkind"]))
