"""Sequence gaps per gateway: noticed when a later event arrives first, closed when the
missing ones are replayed, and reported through the metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    CommandOutcome,
    CommandReply,
    GateCommand,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction
from server.accounts.models import AccountCreate
from server.central import build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.gateways.sequence import MAX_MISSING, SeqTracker
from server.lots.models import LotCreate


def test_a_jump_opens_a_gap_that_replayed_events_close() -> None:
    t = SeqTracker()
    assert t.observe("l", "g", boot=1, seq=10).opened == ()  # first sight: no history
    assert t.observe("l", "g", boot=1, seq=11).opened == ()
    assert t.observe("l", "g", boot=1, seq=14).opened == (12, 13)
    assert t.missing() == {("l", "g"): (12, 13)}
    assert t.observe("l", "g", boot=1, seq=11) == t.observe("l", "g", boot=1, seq=11)  # dup
    assert t.observe("l", "g", boot=1, seq=13).closed == (13,)
    assert t.observe("l", "g", boot=1, seq=12).closed == (12,)
    assert t.missing() == {}
    assert t.gaps_opened == 1


def test_a_counter_that_continues_across_boots_is_still_checked() -> None:
    t = SeqTracker()
    t.observe("l", "g", boot=1, seq=5)
    assert t.observe("l", "g", boot=2, seq=6).opened == ()
    assert t.observe("l", "g", boot=3, seq=9).opened == (7, 8)


def test_a_counter_that_restarts_at_boot_abandons_what_the_old_run_missed() -> None:
    t = SeqTracker()
    t.observe("l", "g", boot=1, seq=1)
    t.observe("l", "g", boot=1, seq=3)
    change = t.observe("l", "g", boot=2, seq=0)
    assert change.abandoned == (2,)
    assert t.missing() == {}


def test_gates_are_tracked_apart_and_a_huge_jump_is_bounded() -> None:
    t = SeqTracker()
    t.observe("l", "a", boot=1, seq=0)
    t.observe("l", "b", boot=1, seq=0)
    t.observe("l", "a", boot=1, seq=10**9)
    assert set(t.missing()) == {("l", "a")}
    assert len(t.missing()[("l", "a")]) == MAX_MISSING


@given(st.permutations(list(range(1, 40))))
def test_any_arrival_order_ends_with_nothing_missing(order: list[int]) -> None:
    t = SeqTracker()
    t.observe("l", "g", boot=1, seq=0)
    for seq in order:
        t.observe("l", "g", boot=1, seq=seq)
        assert all(s < max(order[: order.index(seq) + 1]) for s in t.missing().get(("l", "g"), ()))
    assert t.missing() == {}


async def test_the_bridge_counts_gaps_and_ignores_replies_for_another_gate(
    sqlite_url: str, make_settings: Callable[..., ServerSettings], clock: FakeClock
) -> None:
    broker = InMemoryBroker()
    central = build_central(make_settings(sqlite_url), clock=clock, transport=broker.client("c"))
    await central.start()
    try:
        central.create_lot(LotCreate(lot_id="lot1", name="Main", capacity=5))
        central.create_gate("lot1", GateCreate(gate_id="in1", direction=Direction.ENTRY))
        for name in ("alice", "bob", "carol"):
            central.create_account(AccountCreate(account_id=name, name=name))
        gateway = broker.client("gw")
        await gateway.start()
        await gateway.subscribe(gate_topic("lot1", "in1", TopicKind.COMMANDS))
        answers = aiter(gateway.messages())

        async def scan(account: str, seq: int) -> None:
            event = ScanEvent(
                event_id=new_id(),
                lot_id="lot1",
                gate_id="in1",
                seq=seq,
                boot=1,
                direction=Direction.ENTRY,
                code=central.issue_code(account).code,
                scanned_at=clock.now(),
            )
            await gateway.publish(gate_topic("lot1", "in1", TopicKind.EVENTS), encode(event))
            answer = decode((await asyncio.wait_for(anext(answers), 5)).payload, GateCommand)
            assert answer.event_id == event.event_id

        await scan("alice", 1)
        await scan("bob", 3)
        assert central.bridge is not None
        assert central.stats.seq_gaps == 1
        assert central.bridge.sequences.missing() == {("lot1", "in1"): (2,)}
        await scan("carol", 2)
        assert central.bridge.sequences.missing() == {}

        # A reply naming another gate than its topic is not stored.
        reply = CommandReply(
            reply_id=new_id(),
            command_id=new_id(),
            lot_id="lot1",
            gate_id="out9",
            outcome=CommandOutcome.DONE,
            at=clock.now(),
        )
        await gateway.publish(gate_topic("lot1", "in1", TopicKind.REPLIES), encode(reply))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if central.stats.misaddressed:
                break
        await central.wait_idle()
        assert (central.stats.misaddressed, central.stats.replies) == (1, 0)
    finally:
        await central.stop()
