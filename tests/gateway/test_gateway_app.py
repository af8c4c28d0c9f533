"""The whole gateway over an in-memory broker, against a tiny fake central service."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from gw_support import GATE, LOT, Harness, eventually

from gateway_firmware.app import resend_due
from gateway_firmware.core.lane import CHECKING_TEXT, LaneState
from gateway_firmware.hardware.interfaces import CameraError
from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    CommandOutcome,
    DenyList,
    GatewayState,
    GatewayStatus,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, denylist_topic, gate_topic
from parking_protocol.types import DENY_TEXT, GateAction, Reason

STATUS_TOPIC = gate_topic(LOT, GATE, TopicKind.STATUS)


def retained_status(h: Harness) -> GatewayStatus:
    return decode(h.broker.retained[STATUS_TOPIC], GatewayStatus)


async def test_scan_publishes_event_then_command_opens_the_gate(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    code = issue()
    h.server.display = "Welcome alice"
    h.camera.push_code(code)
    await eventually(lambda: h.gate.is_open, what="gate open")
    (event,) = h.server.events
    assert (event.code, event.lot_id, event.gate_id, event.direction) == (code, LOT, GATE, "entry")
    assert (event.seq, event.boot, event.offline) == (1, 1, None)
    assert h.display.texts[-2:] == [CHECKING_TEXT, "Welcome alice"]
    await eventually(lambda: len(h.server.replies) == 1, what="reply")
    assert h.server.replies[0].outcome is CommandOutcome.ACCEPTED
    assert h.server.replies[0].command_id == h.server.commands[0].command_id
    assert h.gateway.outbox.depth == 0  # answered, so removed
    stats = h.gateway.stats
    assert (stats.scans, stats.events_published, stats.commands_executed) == (1, 1, 1)
    assert stats.offline_decisions == 0
    assert stats.last_decode_ms is not None


async def test_held_code_is_one_scan(harness: Harness, issue: Callable[..., str]) -> None:
    h = harness
    code = issue()
    for _ in range(5):
        h.camera.push_code(code)
    await eventually(lambda: h.gateway.stats.decodes == 5, what="five decodes")
    await eventually(lambda: h.gate.is_open)
    assert h.gateway.stats.frames == 5
    assert h.gateway.stats.scans == 1
    assert len(h.server.events) == 1


async def test_barrier_closes_after_open_hold_without_detector(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.camera.push_code(issue())
    await eventually(lambda: h.gate.is_open)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.open_hold_s))
    await eventually(lambda: not h.gate.is_open, what="gate closed")
    h.gate.assert_events(["open", "close"])
    await eventually(lambda: [r.outcome for r in h.server.replies] == ["accepted", "done"])


async def test_barrier_waits_for_the_vehicle_to_pass(
    harness_factory: Callable[..., Any], issue: Callable[..., str]
) -> None:
    h: Harness = await harness_factory(presence=True)
    assert h.presence is not None
    h.presence.arrive()
    h.camera.push_code(issue())
    await eventually(lambda: h.gate.is_open)
    h.clock.advance(timedelta(minutes=5))  # long past the hold time, the car is still there
    await eventually(lambda: h.gateway.stats.frames >= 1 and h.gateway.lane.vehicle_present)
    await _ticks(h)
    assert h.gate.is_open
    h.presence.leave()
    await eventually(lambda: not h.gate.is_open)
    h.gate.assert_never_closed_on_vehicle()


async def test_deny_shows_the_reason_and_keeps_the_barrier_closed(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.server.deny(Reason.INSUFFICIENT_BALANCE)
    h.camera.push_code(issue())
    await eventually(lambda: h.display.last == DENY_TEXT[Reason.INSUFFICIENT_BALANCE])
    await eventually(lambda: len(h.server.replies) == 1)
    assert h.gate.events() == []
    assert h.gateway.lane.state is LaneState.IDLE


async def test_silent_server_times_out_to_an_offline_decision(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.server.silent = True
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    await _ticks(h)
    assert not h.gate.is_open  # still waiting for the decision
    h.clock.advance(timedelta(seconds=h.settings.timeouts.decision_timeout_s))
    await eventually(lambda: h.gate.is_open, what="offline open")
    assert h.gateway.stats.offline_decisions == 1
    (pending,) = h.gateway.outbox.pending()
    assert pending.offline is not None
    assert pending.offline.action is GateAction.OPEN


async def test_a_failing_disk_for_an_offline_decision_still_moves_the_barrier(
    harness: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    h.server.silent = True

    def io_error(*args: Any, **kwargs: Any) -> None:
        raise OSError("I/O error")

    monkeypatch.setattr(h.gateway.outbox, "set_offline", io_error)
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.decision_timeout_s))
    await eventually(lambda: h.gate.is_open, what="offline open despite the disk")
    assert h.gateway.stats.offline_decisions == 1
    assert h.gateway.stats.last_error == "outbox: I/O error"


async def test_an_offline_decision_the_disk_refused_still_reaches_the_service(
    harness: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The barrier opened on the lane's own decision but the outbox could not record it:
    the replay still carries the decision, and it is written once the disk works again."""
    h = harness
    h.server.silent = True
    real_set_offline = h.gateway.outbox.set_offline
    disk_ok = False

    def failing_until_fixed(*args: Any, **kwargs: Any) -> Any:
        if not disk_ok:
            raise OSError("I/O error")
        return real_set_offline(*args, **kwargs)

    monkeypatch.setattr(h.gateway.outbox, "set_offline", failing_until_fixed)
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.decision_timeout_s))
    await eventually(lambda: h.gate.is_open, what="offline open")
    await h.gateway.replay()
    await eventually(lambda: len(h.server.events) == 2, what="the replay")
    replayed = h.server.events[-1]
    assert replayed.event_id == h.server.events[0].event_id
    assert replayed.offline is not None and replayed.offline.action is GateAction.OPEN
    (stored,) = h.gateway.outbox.pending()
    assert stored.offline is None  # not on disk yet
    disk_ok = True
    await h.gateway.replay()
    (stored,) = h.gateway.outbox.pending()
    assert stored.offline is not None and stored.offline.action is GateAction.OPEN


async def test_a_failing_round_of_the_tick_does_not_end_it(
    harness: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round of the tick fails (a bug, a device): the next rounds still decide the
    lane's timeouts. A tick that died would leave the lane awaiting its answer for ever."""
    h = harness
    h.server.silent = True
    real_tick = h.gateway.tick
    failed: list[bool] = []

    def tick_failing_once() -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("boom")
        real_tick()

    monkeypatch.setattr(h.gateway, "tick", tick_failing_once)
    await eventually(lambda: bool(failed), what="the failing round")
    assert h.gateway.stats.handler_errors == 1
    assert h.gateway.stats.last_error == "the tick: boom"
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.decision_timeout_s))
    await eventually(lambda: h.gateway.stats.offline_decisions == 1, what="the timeout")
    await eventually(lambda: h.gate.is_open, what="offline open")


async def test_broker_cut_decides_offline_and_replays_after_heal(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    await h.broker.cut(h.client_id)
    assert retained_status(h).state is GatewayState.OFFLINE  # the last will
    code = issue("alice")
    h.camera.push_code(code)
    await eventually(lambda: h.gate.is_open, what="offline open")
    assert h.gateway.stats.offline_decisions == 1
    assert h.gateway.stats.publish_failures == 1
    assert h.server.events == []
    (pending,) = h.gateway.outbox.pending()
    assert pending.offline is not None
    # A second, deny-listed-free but replayed screenshot of the same code is refused offline.
    h.clock.advance(timedelta(seconds=h.settings.timeouts.open_hold_s))
    await eventually(lambda: not h.gate.is_open)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.debounce_s))
    h.camera.push_code(code)
    await eventually(lambda: h.display.last == DENY_TEXT[Reason.CODE_REPLAYED])
    # Refused by local verification before any event exists: nothing to replay for it.
    assert h.gateway.lane.local_denials[Reason.CODE_REPLAYED] == 1
    assert h.gateway.outbox.depth == 1

    await h.broker.heal(h.client_id)
    await eventually(lambda: len(h.server.events) == 1, what="replay")
    assert [e.seq for e in h.server.events] == [1]
    assert [e.offline.action for e in h.server.events if e.offline] == ["open"]
    await eventually(lambda: h.gateway.outbox.depth == 0, what="acks remove the events")
    assert h.gateway.stats.acks == 1
    assert h.gateway.stats.events_replayed == 1
    assert retained_status(h).state is GatewayState.ONLINE  # the birth message


async def test_restart_replays_unanswered_events_with_a_new_boot(
    harness_factory: Callable[..., Any], issue: Callable[..., str]
) -> None:
    first: Harness = await harness_factory()
    first.server.silent = True
    first.camera.push_code(issue())
    await eventually(lambda: first.gateway.outbox.depth == 1 and len(first.server.events) == 1)
    await first.stop()
    first.gateway.close()
    assert retained_status(first).state is GatewayState.OFFLINE  # said goodbye

    first.server.silent = False
    second: Harness = await harness_factory()
    assert second.gateway.boot == 2
    await eventually(lambda: len(second.server.events) == 2, what="replay after restart")
    replayed = second.server.events[1]
    assert (replayed.event_id, replayed.seq, replayed.boot) == (
        first.server.events[0].event_id,
        1,
        1,
    )
    # The server answers the stale event with a command; the new lane never acted on that
    # scan, so it says "expired" (the barrier did not move: the service undoes what it
    # decided), and the event leaves the outbox because it was answered.
    await eventually(lambda: second.gateway.outbox.depth == 0)
    await eventually(lambda: len(second.server.replies) == 1)
    assert second.server.replies[0].outcome is CommandOutcome.EXPIRED
    assert second.server.replies[0].detail == "no longer awaited"
    assert second.gate.events() == []
    second.camera.push_code(issue("bob"))
    await eventually(lambda: second.gate.is_open)
    assert second.server.events[-1].seq == 2  # monotonic across the restart


async def test_a_reply_the_link_lost_is_sent_again_once_connected(
    harness: Harness, issue: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate says "expired" to a late open while its link is down: that reply is what
    makes the service undo the entry, so it goes again (the same reply) after the
    reconnect instead of being dropped."""
    h = harness
    h.server.silent = True
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    event = h.server.events[0]
    real_publish = h.gateway.uplink.publish_reply
    attempts: list[str] = []

    async def offline_once(reply: Any) -> bool:
        attempts.append(reply.reply_id)
        if len(attempts) == 1:
            return False  # the link was down at that moment
        return await real_publish(reply)

    monkeypatch.setattr(h.gateway.uplink, "publish_reply", offline_once)
    stale = h.server.command(event_id=event.event_id, deadline=h.clock.now() - timedelta(seconds=1))
    await h.server.send(encode(stale))
    await eventually(lambda: len(attempts) == 1, what="the reply tried")
    await _ticks(h)
    assert h.server.replies == []
    await h.broker.cut(h.client_id)
    await h.broker.heal(h.client_id)
    await eventually(lambda: len(h.server.replies) == 1, what="the reply sent again")
    (reply,) = h.server.replies
    assert (reply.command_id, reply.outcome) == (stale.command_id, CommandOutcome.EXPIRED)
    assert reply.reply_id == attempts[0]  # the same reply: the service keeps it once
    await _ticks(h)
    assert len(h.server.replies) == 1


async def test_malformed_and_stray_messages_are_counted_and_dropped(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    commands = gate_topic(LOT, GATE, TopicKind.COMMANDS)
    await h.server.send(b"not json", commands)
    await h.server.send(b'{"v": 9, "type": "command"}', commands)
    await h.server.send(b'{"type": "command", "command_id": "x"}', commands)
    status = retained_status(h)
    await h.server.send(encode(status), commands)  # valid JSON, wrong message for the topic
    await eventually(lambda: h.gateway.stats.malformed_messages == 3)
    await eventually(lambda: h.gateway.stats.unexpected_messages == 1)
    assert h.gateway.uplink.malformed["not_json"] == 1
    # ...and the gateway keeps working.
    h.camera.push_code(issue())
    await eventually(lambda: h.gate.is_open)


async def test_stale_commands_are_refused_and_duplicates_get_the_first_answer(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.server.silent = True
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    event = h.server.events[0]
    stale = h.server.command(event_id=event.event_id, deadline=h.clock.now() - timedelta(seconds=1))
    await h.server.send(encode(stale))
    await eventually(lambda: len(h.server.replies) == 1)
    assert h.server.replies[0].outcome is CommandOutcome.EXPIRED
    assert not h.gate.is_open
    good = h.server.command(event_id=event.event_id)
    await h.server.send(encode(good))
    await eventually(lambda: h.gate.is_open)
    await h.server.send(encode(good))  # our reply was lost: the service asks again
    await h.server.send(encode(stale))
    await eventually(lambda: len(h.server.replies) == 4)
    assert [(r.command_id, r.outcome) for r in h.server.replies] == [
        (stale.command_id, "expired"),
        (good.command_id, "accepted"),
        (good.command_id, "accepted"),
        (stale.command_id, "expired"),
    ]
    assert h.gateway.stats.commands_refused == 1
    assert h.gateway.stats.commands_executed == 1
    assert h.gateway.stats.commands_repeated == 2
    h.gate.assert_events(["open"])


async def test_a_command_redelivered_after_a_restart_gets_the_same_answer(
    harness_factory: Callable[..., Any],
) -> None:
    """The answers are kept with the outbox: an operator's open that reaches the restarted
    gateway again (still within its deadline) does not lift the barrier a second time."""
    first: Harness = await harness_factory()
    manual = first.server.command(display=DENY_TEXT[Reason.MANUAL_OPEN])
    await first.server.send(manual.model_dump_json().encode())
    await eventually(lambda: first.gate.is_open)
    await eventually(lambda: len(first.server.replies) == 1)
    await first.stop()
    first.gateway.close()

    second: Harness = await harness_factory()
    assert second.gateway.boot == 2
    await second.server.send(manual.model_dump_json().encode())
    await eventually(lambda: len(second.server.replies) == 2)
    again = second.server.replies[1]
    assert (again.command_id, again.outcome) == (manual.command_id, CommandOutcome.ACCEPTED)
    assert second.gate.events() == []
    assert second.gateway.stats.commands_repeated == 1


async def test_a_failing_disk_for_command_answers_still_moves_the_barrier(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(h.gateway.outbox, "save_command_answer", disk_full)
    manual = h.server.command(display=DENY_TEXT[Reason.MANUAL_OPEN])
    await h.server.send(manual.model_dump_json().encode())
    await eventually(lambda: h.gate.is_open)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.open_hold_s))
    await eventually(lambda: not h.gate.is_open, what="closed despite the disk")
    assert h.gateway.stats.last_error == "outbox: disk full"
    await eventually(lambda: [r.outcome for r in h.server.replies] == ["accepted", "done"])


async def test_manual_open_from_the_operator(harness: Harness) -> None:
    h = harness
    manual = h.server.command(display=DENY_TEXT[Reason.MANUAL_OPEN])
    # Sent with an explicit null event_id: see test_manual_open_survives_encode below.
    await h.server.send(manual.model_dump_json().encode())
    await eventually(lambda: h.gate.is_open)
    assert h.display.last == DENY_TEXT[Reason.MANUAL_OPEN]


def test_manual_open_survives_encode(clock: FakeClock) -> None:
    from gw_support import FakeServer

    from parking_protocol.transport import InMemoryBroker

    manual = FakeServer(InMemoryBroker(), clock).command()
    assert decode(encode(manual)) == manual


async def test_camera_errors_are_reported_and_survived(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.camera.push(CameraError("unplugged"), CameraError("still unplugged"))
    h.camera.push_code(issue())
    await eventually(lambda: h.gate.is_open, what="scan after camera errors")
    assert h.gateway.stats.camera_errors == 2
    assert h.gateway.stats.last_error == "camera: still unplugged"
    await h.gateway.publish_status()
    assert retained_status(h).last_error == "camera: still unplugged"


async def test_decoder_crash_is_survived(harness: Harness, issue: Callable[..., str]) -> None:
    h = harness
    decoder: Any = h.gateway.hardware.decoder
    real = decoder.decode
    calls = iter([RuntimeError("segfault-ish"), None])

    def flaky(frame: Any) -> list[str]:
        failure = next(calls, None)
        if failure is not None:
            raise failure
        return list(real(frame))

    decoder.decode = flaky
    h.camera.push_code(issue())
    h.camera.push_code(issue("bob"))
    await eventually(lambda: h.gate.is_open)
    assert h.gateway.stats.decode_errors == 1


async def test_denylist_is_applied_offline(harness: Harness, issue: Callable[..., str]) -> None:
    h = harness
    assert h.server.client is not None
    deny = DenyList(list_id=new_id(), lot_id=LOT, accounts=("mallory",), issued_at=h.clock.now())
    await h.server.client.publish(denylist_topic(LOT), encode(deny), retain=True)
    await eventually(lambda: h.gateway.stats.denylist_updates == 1)
    await h.broker.cut(h.client_id)
    h.camera.push_code(issue("mallory"))
    await eventually(lambda: h.display.last == DENY_TEXT[Reason.ACCOUNT_BLOCKED])
    assert h.gate.events() == []


async def test_status_birth_heartbeat_and_goodbye(
    harness_factory: Callable[..., Any],
) -> None:
    h: Harness = await harness_factory(heartbeat_s=0.02)
    birth = retained_status(h)
    assert (birth.state, birth.boot, birth.lot_id, birth.gate_id) == ("online", 1, LOT, GATE)
    assert birth.direction == "entry"

    def statuses() -> list[str]:
        return [t for t, _ in h.broker.published if t == STATUS_TOPIC]

    await eventually(lambda: len(statuses()) >= 3, what="heartbeats")
    assert retained_status(h).queue_depth == 0
    await h.stop()
    assert retained_status(h).state is GatewayState.OFFLINE


async def _ticks(h: Harness, n: int = 5) -> None:
    """Let the tick loop run a few times (real time)."""
    import asyncio

    await asyncio.sleep(h.gateway.tuning.tick_s * n)


async def test_event_is_in_the_outbox_before_its_first_publish(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    uplink = h.gateway.uplink
    publish = uplink.publish_event
    stored_at_publish: list[bool] = []

    async def checking_publish(event: ScanEvent) -> bool:
        stored_at_publish.append(h.gateway.outbox.get(event.event_id) is not None)
        return await publish(event)

    uplink.publish_event = checking_publish  # type: ignore[method-assign]
    h.camera.push_code(issue())
    await eventually(lambda: h.gate.is_open)
    assert stored_at_publish == [True]


async def _opened_offline(h: Harness, issue: Callable[..., str]) -> None:
    """A scan the silent service never answers: the lane opens on its own at the timeout."""
    h.server.silent = True
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.decision_timeout_s))
    await eventually(lambda: h.gate.is_open, what="offline open")


async def test_late_answer_that_disagrees_with_the_offline_decision_is_reported_back(
    harness: Harness, issue: Callable[..., str]
) -> None:
    """The service was slow: the lane opened offline, then a late deny arrives. The barrier
    already opened, so the event stays in the outbox and goes again with its offline
    decision until the service acknowledges that (an EventAck)."""
    h = harness
    await _opened_offline(h, issue)
    h.server.silent = False
    event = h.server.events[0]
    late = h.server.command(
        event_id=event.event_id,
        action=GateAction.DENY,
        reason=Reason.INSUFFICIENT_BALANCE,
        display=DENY_TEXT[Reason.INSUFFICIENT_BALANCE],
    )
    await h.server.send(encode(late))
    await eventually(lambda: len(h.server.events) == 2, what="offline decision resent")
    resent = h.server.events[1]
    assert resent.event_id == event.event_id
    assert resent.offline is not None and resent.offline.action is GateAction.OPEN
    await eventually(lambda: h.gateway.outbox.depth == 0, what="ack settles it")
    assert h.gateway.stats.late_disagreements == 1
    assert h.gate.events() == ["open"]  # the late deny did not touch the barrier


async def test_a_late_answer_again_does_not_drop_the_offline_decision_unheard(
    harness: Harness, issue: Callable[..., str]
) -> None:
    """The live event reached the service twice (a redelivery) and both answers, the same
    deny, arrive after the lane opened on its own. The second must not settle the event:
    until the service acknowledges the offline open, that exit (or entry) is unknown to it,
    and dropping it would leave a stay open for a car that is gone."""
    h = harness
    await _opened_offline(h, issue)
    event = h.server.events[0]
    late = h.server.command(
        event_id=event.event_id,
        action=GateAction.DENY,
        reason=Reason.NO_OPEN_SESSION,
        display=DENY_TEXT[Reason.NO_OPEN_SESSION],
    )
    await h.server.send(encode(late))
    await eventually(lambda: len(h.server.events) == 2, what="offline decision resent")
    await h.server.send(encode(late))  # the answer to the redelivered live copy
    await eventually(lambda: h.gateway.stats.commands_received == 2)
    assert h.gateway.outbox.depth == 1  # still owed to the service
    assert h.gateway.stats.late_disagreements == 1
    h.server.silent = False
    assert await h.gateway.replay() == 1  # what the resend loop does
    await eventually(lambda: h.gateway.outbox.depth == 0, what="ack settles it")
    assert [e.offline is not None for e in h.server.events] == [False, True, True]
    assert h.gate.events() == ["open"]


async def test_late_answer_that_agrees_with_the_offline_decision_settles_the_event(
    harness: Harness, issue: Callable[..., str]
) -> None:
    h = harness
    h.server.silent = True
    h.camera.push_code(issue())
    await eventually(lambda: len(h.server.events) == 1)
    h.clock.advance(timedelta(seconds=h.settings.timeouts.decision_timeout_s))
    await eventually(lambda: h.gate.is_open)
    await h.server.send(encode(h.server.command(event_id=h.server.events[0].event_id)))
    await eventually(lambda: h.gateway.outbox.depth == 0)
    assert len(h.server.events) == 1
    assert h.gateway.stats.late_disagreements == 0


@pytest.mark.parametrize("first_use", ["offline", "online"])
async def test_a_used_code_is_refused_as_replayed_after_a_restart(
    harness_factory: Callable[..., Any], issue: Callable[..., str], first_use: str
) -> None:
    """Offline double use at one gate across a reboot: a screenshot of a code still within
    its lifetime is refused locally, because the spent nonce is kept in the outbox file."""
    first: Harness = await harness_factory()
    if first_use == "offline":
        await first.broker.stop()  # the lot's network is down, and stays down
    code = issue("alice")
    first.camera.push_code(code)
    await eventually(lambda: first.gate.is_open, what=f"{first_use} open")
    assert first.gateway.stats.offline_decisions == (1 if first_use == "offline" else 0)
    await first.stop()
    first.gateway.close()

    if first_use == "online":
        await first.broker.stop()
    second: Harness = await harness_factory()  # a new app object on the same outbox file
    assert second.gateway.boot == 2
    assert not second.gateway.uplink.connected
    second.clock.advance(timedelta(seconds=30))  # the code has 30 s of its 60 s left
    second.camera.push_code(code)
    await eventually(lambda: second.display.last == DENY_TEXT[Reason.CODE_REPLAYED])
    assert second.gateway.lane.local_denials[Reason.CODE_REPLAYED] == 1
    assert second.gate.events() == []
    assert second.gateway.stats.offline_decisions == 0  # refused before any decision
    # Another driver's fresh code still opens offline: only the used one is refused.
    second.camera.push_code(issue("bob"))
    await eventually(lambda: second.gate.is_open, what="a fresh code opens offline")


@pytest.mark.parametrize(
    ("oldest", "pending", "due"),
    [
        (None, ["a", "b"], False),  # nothing has waited a whole interval yet
        ("a", ["a", "b"], True),  # the oldest unanswered for an interval: lost
        ("a", ["a", "b", "c"], True),  # newer ones meanwhile change nothing
        ("a", ["b", "c", "d"], False),  # "a" answered: a backlog draining in order
        ("a", [], False),  # all answered
    ],
)
def test_unanswered_events_go_again_only_when_the_oldest_waited_a_whole_interval(
    oldest: str | None, pending: list[str], due: bool
) -> None:
    assert resend_due(oldest, pending) is due
