from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from parking_protocol.messages import (
    MAX_PAYLOAD_BYTES,
    DecodeFailure,
    GateCommand,
    GatewayState,
    GatewayStatus,
    OfflineDecision,
    ProtocolError,
    ScanEvent,
    decode,
    encode,
    message_json_schema,
    new_id,
)
from parking_protocol.types import Direction, GateAction, Money, Reason

NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def scan(**overrides: object) -> ScanEvent:
    fields: dict[str, object] = {
        "event_id": new_id(),
        "lot_id": "lot1",
        "gate_id": "in1",
        "seq": 7,
        "boot": 2,
        "direction": Direction.ENTRY,
        "code": "QP1.k1.alice.1.61.bm9uY2U.sig",
        "scanned_at": NOW,
    }
    fields.update(overrides)
    return ScanEvent.model_validate(fields)


def command() -> GateCommand:
    return GateCommand(
        command_id=new_id(),
        event_id=new_id(),
        lot_id="lot1",
        gate_id="out1",
        action=GateAction.OPEN,
        reason=Reason.PAID,
        display="Paid ¥12.00",
        amount=Money(amount_minor=1200, currency="CNY"),
        session_id="s1",
        issued_at=NOW,
        deadline=NOW + timedelta(seconds=10),
    )


def test_every_message_type_round_trips() -> None:
    offline = OfflineDecision(action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=NOW)
    status = GatewayStatus(
        status_id=new_id(), lot_id="l", gate_id="g", state=GatewayState.ONLINE, sent_at=NOW
    )
    for message in (scan(), scan(offline=offline), command(), status):
        assert decode(encode(message)) == message


def test_money_is_integer_minor_units_on_the_wire() -> None:
    wire = json.loads(encode(command()))
    assert wire["amount"] == {"amount_minor": 1200, "currency": "CNY"}
    with pytest.raises(ValidationError):
        Money(amount_minor=12.5, currency="CNY")  # type: ignore[arg-type]


def test_messages_are_frozen() -> None:
    event = scan()
    with pytest.raises(ValidationError):
        event.seq = 8  # type: ignore[misc]


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError):
        scan(scanned_at=datetime(2026, 3, 1, 9, 30))  # noqa: DTZ001 - the point of the test


@pytest.mark.parametrize(
    ("payload", "failure"),
    [
        (b"{", DecodeFailure.NOT_JSON),
        (b"\xff\xfe\x00", DecodeFailure.NOT_JSON),
        (b"[]", DecodeFailure.INVALID),
        (b"null", DecodeFailure.INVALID),
        (b'{"v": 1}', DecodeFailure.INVALID),
        (b'{"type": "teleport", "v": 1}', DecodeFailure.UNKNOWN_TYPE),
        (b"x" * (MAX_PAYLOAD_BYTES + 1), DecodeFailure.TOO_LARGE),
    ],
)
def test_garbage_is_rejected_with_a_reason(payload: bytes, failure: DecodeFailure) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(payload)
    assert info.value.failure is failure


def test_unknown_schema_version_is_its_own_reason() -> None:
    wire = json.loads(encode(scan()))
    wire["v"] = 2
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(wire))
    assert info.value.failure is DecodeFailure.UNKNOWN_VERSION


def test_missing_field_names_the_field() -> None:
    wire = json.loads(encode(scan()))
    del wire["event_id"]
    with pytest.raises(ProtocolError, match="event_id") as info:
        decode(json.dumps(wire))
    assert info.value.failure is DecodeFailure.INVALID


def test_expected_type_is_enforced() -> None:
    with pytest.raises(ProtocolError) as info:
        decode(encode(scan()), GateCommand)
    assert info.value.failure is DecodeFailure.WRONG_TYPE


def test_bad_identifier_in_payload_is_invalid() -> None:
    wire = json.loads(encode(scan()))
    wire["lot_id"] = "lot/1/#"
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(wire))
    assert info.value.failure is DecodeFailure.INVALID


@settings(max_examples=300)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_decode_never_raises_anything_but_protocol_error(payload: bytes) -> None:
    try:
        decode(payload)
    except ProtocolError:
        pass


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["v", "type", "event_id", "lot_id", "seq", "code", "scanned_at", "x"]),
        st.none() | st.integers() | st.text(max_size=20) | st.booleans() | st.floats(),
        max_size=8,
    )
)
def test_decode_of_random_objects_only_raises_protocol_error(obj: dict[str, object]) -> None:
    try:
        decode(json.dumps(obj))
    except ProtocolError:
        pass


def test_json_schema_covers_every_message_type() -> None:
    schema = json.dumps(message_json_schema())
    for name in ("ScanEvent", "GateCommand", "EventAck", "CommandReply", "GatewayStatus"):
        assert name in schema


def test_new_ids_are_uuid7_text_and_never_repeat_across_threads_and_forks() -> None:
    import os
    import threading
    import uuid

    ids = [new_id() for _ in range(1000)]  # several refills of the per-thread buffer
    assert all(str(uuid.UUID(i)) == i and uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == len(ids)

    other: list[str] = []
    worker = threading.Thread(target=lambda: other.extend(new_id() for _ in range(300)))
    worker.start()
    worker.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child draws ids from where its parent's buffer stands
        os.write(write, "\n".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split("\n")
    parent = [new_id() for _ in range(10)]
    everything = ids + other + child + parent
    assert len(child) == 10
    assert len(set(everything)) == len(everything)


def test_new_ids_made_later_sort_later() -> None:
    import time

    first = new_id()
    time.sleep(0.002)  # the timestamp is in milliseconds
    assert first < new_id()


def test_decoded_utc_timestamps_carry_the_standard_utc_tzinfo() -> None:
    """Consumers skip a conversion for ``tzinfo is UTC``; another offset is kept as sent."""
    wire = encode(scan(scanned_at=NOW))
    decoded = decode(wire)
    assert isinstance(decoded, ScanEvent)
    assert decoded.scanned_at.tzinfo is UTC and decoded.scanned_at == NOW
    assert encode(decoded) == wire
    shanghai = decode(wire.replace(b'09:30:00Z"', b'17:30:00+08:00"'))
    assert isinstance(shanghai, ScanEvent)
    assert shanghai.scanned_at == NOW and shanghai.scanned_at.utcoffset() == timedelta(hours=8)
