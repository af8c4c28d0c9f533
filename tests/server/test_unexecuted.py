"""A gate that lets an "open" expire unexecuted (it saw the command only after its deadline,
say after a power loss) did not let the car through: the service undoes that entry or exit."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from conftest import World

from parking_protocol.messages import CommandOutcome, CommandReply, GateCommand, encode, new_id
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.types import GateAction, Reason


async def reply(world: World, command: GateCommand, outcome: CommandOutcome) -> None:
    lane = world.entry if command.gate_id == world.entry.gate_id else world.exit
    message = CommandReply(
        reply_id=new_id(),
        command_id=command.command_id,
        lot_id=command.lot_id,
        gate_id=command.gate_id,
        outcome=outcome,
        at=world.clock.now(),
    )
    before = world.central.stats.replies
    await lane.publish(encode(message), topic=gate_topic("lot1", lane.gate_id, TopicKind.REPLIES))
    for _ in range(300):
        await asyncio.sleep(0.01)
        await world.central.wait_idle()
        if world.central.stats.replies > before:
            return
    raise AssertionError("the reply was not handled")


async def test_an_entry_whose_open_expired_unexecuted_is_undone(world: World) -> None:
    code = world.code()
    event = world.entry.event(code)
    opened = await world.entry.send(event)
    assert isinstance(opened, GateCommand) and opened.action is GateAction.OPEN
    assert world.central.get_lot("lot1").occupancy.open_sessions == 1

    world.clock.advance(timedelta(seconds=30))
    await reply(world, opened, CommandOutcome.EXPIRED)

    assert world.central.stats.undone == 1
    assert world.central.get_lot("lot1").occupancy.open_sessions == 0
    assert [s.state for s in world.central.list_sessions(account_id="alice")] == ["void"]
    # The scan redelivered later gets a deny that asks for a new scan, not the stale open.
    again = await world.entry.send(event)
    assert isinstance(again, GateCommand)
    assert (again.action, again.reason) == (GateAction.DENY, Reason.SERVICE_UNAVAILABLE)
    # The same code was not spent by the entry that never happened: the driver can enter.
    retry = await world.entry.scan(code)
    assert (retry.action, retry.reason) == (GateAction.OPEN, Reason.WELCOME)


async def test_an_exit_whose_open_expired_unexecuted_is_reopened_and_refunded(
    world: World,
) -> None:
    await world.entry.scan(world.code())
    world.clock.advance(timedelta(hours=2))
    paid = await world.exit.scan(world.code())
    assert (paid.action, paid.reason) == (GateAction.OPEN, Reason.PAID)
    charged = world.balance()
    assert charged < 10_000

    await reply(world, paid, CommandOutcome.EXPIRED)

    assert world.balance() == 10_000  # refunded
    assert [s.state for s in world.central.list_sessions(account_id="alice")] == ["open"]
    out = await world.exit.scan(world.code())  # the driver, still at the barrier, scans again
    assert (out.action, out.reason) == (GateAction.OPEN, Reason.PAID)
    assert world.balance() == charged  # the same stay, charged once


async def test_other_replies_change_nothing(world: World) -> None:
    opened = await world.entry.scan(world.code())
    for outcome in (CommandOutcome.ACCEPTED, CommandOutcome.DONE, CommandOutcome.REJECTED):
        await reply(world, opened, outcome)
    assert world.central.stats.undone == 0
    assert world.central.get_lot("lot1").occupancy.open_sessions == 1
