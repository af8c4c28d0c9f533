"""The qrpark wire contract: topics, messages, the dynamic QR code, clocks and transports.

This package is shared by the central service, the gateway firmware and the simulator, and
depends only on pydantic and cryptography (``parking_protocol.mqtt`` adds mqtt5).
"""

from parking_protocol.clock import Clock, FakeClock, SystemClock
from parking_protocol.messages import (
    CommandOutcome,
    CommandReply,
    DecodeFailure,
    DenyList,
    EventAck,
    GateCommand,
    GatewayState,
    GatewayStatus,
    OfflineDecision,
    ProtocolError,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.qr_token import (
    CodeClaims,
    CodeRejected,
    issue_code,
    load_public_key,
    public_key_text,
    verify_code,
)
from parking_protocol.topics import TopicKind, TopicRef, gate_topic, parse_topic
from parking_protocol.transport import InboundMessage, LastWill, Transport, TransportUnavailable
from parking_protocol.types import (
    DENY_TEXT,
    CodeRejection,
    Direction,
    GateAction,
    Money,
    Reason,
)

__all__ = [
    "DENY_TEXT",
    "Clock",
    "CodeClaims",
    "CodeRejected",
    "CodeRejection",
    "CommandOutcome",
    "CommandReply",
    "DecodeFailure",
    "DenyList",
    "Direction",
    "EventAck",
    "FakeClock",
    "GateAction",
    "GateCommand",
    "GatewayState",
    "GatewayStatus",
    "InboundMessage",
    "LastWill",
    "Money",
    "OfflineDecision",
    "ProtocolError",
    "Reason",
    "ScanEvent",
    "SystemClock",
    "TopicKind",
    "TopicRef",
    "Transport",
    "TransportUnavailable",
    "decode",
    "encode",
    "gate_topic",
    "issue_code",
    "load_public_key",
    "new_id",
    "parse_topic",
    "public_key_text",
    "verify_code",
]
