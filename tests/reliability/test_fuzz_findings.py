"""What the coverage-guided fuzzers found, kept as plain tests (no atheris needed).

* A timestamp with no UTC form (``0001-01-01T00:00:00+01:00``) decoded fine and then failed
  in the service's database layer (``astimezone(UTC)``: OverflowError), dead-lettering a
  gateway's status. The decoder now refuses it: a typed, counted rejection at the edge.
* ``Infinity`` (not JSON) and ``1e400`` decoded into a status' ``camera_fps`` and came back
  as ``null`` when re-encoded. Non-finite numbers are refused.
* ``parse_topic`` accepted a topic with a trailing newline (its pattern's ``$`` matches
  before a final ``\\n``): it matches the whole topic now.

The inputs below are the fuzzers' own, replayed through the same targets.
"""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from fuzz_targets import NOW, TARGETS

from parking_protocol.clock import FakeClock
from parking_protocol.messages import DecodeFailure, GatewayStatus, ProtocolError, decode
from parking_protocol.topics import parse_topic
from parking_protocol.transport import InboundMessage, InMemoryBroker
from server.mqtt.bridge import Bridge
from server.sessions.flows import FlowConfig

FOUND_BY_ATHERIS = (
    b'{"v": 1, "type": "denylist", "list_id": "-01000007", "lot_id": "p1o", "accounts":'
    b' ["mallory", "eve"], "issued_at": "0001-01-01T00:00:00+01:00"}'
)


def status(**fields: object) -> bytes:
    body = {
        "type": "status",
        "status_id": "status-0001",
        "lot_id": "p1",
        "gate_id": "in1",
        "state": "online",
        "sent_at": "2026-01-01T08:00:00Z",
        **fields,
    }
    return json.dumps(body, allow_nan=True).encode()


@pytest.mark.parametrize(
    "payload",
    [
        FOUND_BY_ATHERIS,
        status(sent_at="0001-01-01T00:00:00+01:00"),
        status(sent_at="9999-12-31T23:59:59-00:01"),
        status(camera_fps=float("inf")),
        status(last_decode_ms=float("inf")),
        status(camera_fps=1e400),
        status(camera_fps=float("nan")),
    ],
    ids=["found", "before-year-1", "after-9999", "inf", "inf-ms", "1e400", "nan"],
)
def test_values_no_consumer_can_use_are_refused_at_decode(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(payload)
    assert caught.value.failure is DecodeFailure.INVALID
    TARGETS["message"].build()(payload)  # and the fuzz target's properties hold


def test_the_edges_of_the_range_that_exist_in_utc_still_decode() -> None:
    for stamp in ("0001-01-01T00:00:00-01:00", "9999-12-31T23:59:59+01:00"):
        message = decode(status(sent_at=stamp, camera_fps=0.0), GatewayStatus)
        assert message.sent_at.isoformat().startswith(stamp[:10])
        assert message.camera_fps == 0.0


def test_the_service_drops_such_a_status_with_a_count_instead_of_a_dead_letter() -> None:
    bridge = Bridge(
        InMemoryBroker().client("central"),
        sa.create_engine("sqlite://"),
        FakeClock(NOW),
        FlowConfig(keys={}),
    )
    topic = "qrpark/v1/lots/p1/gates/in1/status"
    assert bridge.accept(InboundMessage(topic, status(sent_at="0001-01-01T00:00:00+01:00"))) is None
    assert bridge.stats.decode_failures[DecodeFailure.INVALID] == 1
    assert bridge.accept(InboundMessage(topic, status())) is not None


def test_a_topic_with_a_trailing_newline_is_not_of_the_scheme() -> None:
    assert parse_topic("qrpark/v1/lots/p1/gates/in1/events\n") is None
