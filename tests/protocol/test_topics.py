from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from parking_protocol.topics import (
    QOS,
    RETAIN,
    TopicKind,
    all_gates_filter,
    denylist_topic,
    gate_topic,
    parse_topic,
    shared,
)
from parking_protocol.transport import topic_matches

ids = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=36)


@given(lot=ids, gate=ids, kind=st.sampled_from(["events", "commands", "replies", "status"]))
def test_gate_topic_round_trips_through_the_parser(lot: str, gate: str, kind: str) -> None:
    ref = parse_topic(gate_topic(lot, gate, TopicKind(kind)))
    assert ref is not None
    assert (ref.lot_id, ref.gate_id, ref.kind) == (lot, gate, TopicKind(kind))


def test_denylist_topic_parses_without_gate() -> None:
    ref = parse_topic(denylist_topic("lot1"))
    assert ref is not None
    assert ref.gate_id is None
    assert ref.kind is TopicKind.DENYLIST


@pytest.mark.parametrize(
    "topic",
    [
        "qrpark/v2/lots/a/gates/b/events",
        "qrpark/v1/lots/a/gates/b/events/extra",
        "qrpark/v1/lots/a/gates//events",
        "qrpark/v1/lots/a b/gates/b/events",
        "qrpark/v1/lots/a/gates/b/unknown",
        "",
        "#",
    ],
)
def test_foreign_topics_parse_to_none(topic: str) -> None:
    assert parse_topic(topic) is None


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 37, "a.b"])
def test_builders_refuse_ids_that_would_break_the_scheme(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid identifier"):
        gate_topic(bad, "g", TopicKind.EVENTS)


def test_filters_match_exactly_their_kind() -> None:
    events = all_gates_filter(TopicKind.EVENTS)
    assert topic_matches(events, gate_topic("l", "g", TopicKind.EVENTS))
    assert not topic_matches(events, gate_topic("l", "g", TopicKind.STATUS))
    assert topic_matches(shared("central", events), gate_topic("l", "g", TopicKind.EVENTS))


def test_status_and_denylist_are_retained_events_are_not() -> None:
    assert RETAIN[TopicKind.STATUS] and RETAIN[TopicKind.DENYLIST]
    assert not RETAIN[TopicKind.EVENTS] and not RETAIN[TopicKind.COMMANDS]
    assert all(qos == 1 for qos in QOS.values())
