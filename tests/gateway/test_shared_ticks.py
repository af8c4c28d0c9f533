"""A gateway built with a TickSource runs its tick from it (a fleet's shared timer), not a
loop of its own; the tick itself (detector, deadlines) is unchanged."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import timedelta

from gw_support import FakeServer, eventually

from gateway_firmware.app import Gateway, Hardware, Tuning, build_gateway
from gateway_firmware.config import GatewaySettings
from gateway_firmware.core.lane import LaneState
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.clock import FakeClock
from parking_protocol.transport import InMemoryBroker
from sim_devices.devices import (
    MarkerDecoder,
    ScriptedCamera,
    SimDisplay,
    SimGate,
    SimIndicator,
    SimPresence,
)
from sim_devices.schedule import Ticker


class ManualTicks:
    """A TickSource the test fires by hand."""

    def __init__(self) -> None:
        self.registered: list[tuple[float, Callable[[], None]]] = []
        self.stopped = 0

    def every(self, period: float, callback: Callable[[], None]) -> Callable[[], None]:
        entry = (period, callback)
        self.registered.append(entry)

        def stop() -> None:
            self.registered.remove(entry)
            self.stopped += 1

        return stop

    def fire(self) -> None:
        for _, callback in list(self.registered):
            callback()


def _gateway(
    settings: GatewaySettings,
    clock: FakeClock,
    broker: InMemoryBroker,
    ticks: ManualTicks | Ticker,
    presence: SimPresence,
) -> tuple[Gateway, ScriptedCamera, SimGate]:
    camera, gate = ScriptedCamera(), SimGate(clock, presence=presence)
    hardware = Hardware(
        camera=camera,
        decoder=MarkerDecoder(),
        gate=gate,
        display=SimDisplay(clock),
        presence=presence,
        indicator=SimIndicator(clock),
    )
    gateway = build_gateway(
        settings,
        hardware=hardware,
        transport=broker.client(settings.client_id),
        clock=clock,
        outbox=Outbox(settings.outbox_file),
        tuning=Tuning(tick_s=0.005, idle_sleep_s=0.002),
        ticks=ticks,
    )
    return gateway, camera, gate


async def test_the_tick_source_alone_drives_the_detector_and_the_decision_timeout(
    make_settings: Callable[..., GatewaySettings], clock: FakeClock, issue: Callable[..., str]
) -> None:
    broker = InMemoryBroker()
    server = FakeServer(broker, clock, silent=True)
    await server.start()
    ticks = ManualTicks()
    presence = SimPresence(clock)
    settings = make_settings(gpio={"presence_pin": 23})
    gateway, camera, gate = _gateway(settings, clock, broker, ticks, presence)
    task = asyncio.create_task(gateway.run())
    try:
        await asyncio.wait_for(gateway.started.wait(), 2)
        assert [period for period, _ in ticks.registered] == [0.005]
        presence.arrive()
        await asyncio.sleep(0.05)  # many tick_s: a loop of its own would have noticed
        assert not gateway.lane.vehicle_present
        ticks.fire()
        assert gateway.lane.vehicle_present
        camera.push_code(issue())
        await eventually(lambda: gateway.lane.state is LaneState.AWAITING_DECISION)
        clock.advance(timedelta(seconds=settings.timeouts.decision_timeout_s))
        await asyncio.sleep(0.05)
        assert gateway.lane.state is LaneState.AWAITING_DECISION  # no tick, no timeout
        ticks.fire()
        assert gate.is_open  # decided offline (entries are allowed offline by default)
        assert gateway.stats.offline_decisions == 1
    finally:
        gateway.stop()
        await asyncio.wait_for(task, 5)
        gateway.close()
        await server.stop()
    assert ticks.registered == []
    assert ticks.stopped == 1


async def test_a_shared_ticker_ticks_every_gateway_and_forgets_stopped_ones(
    make_settings: Callable[..., GatewaySettings], clock: FakeClock
) -> None:
    broker = InMemoryBroker()
    ticker = Ticker()
    gateways: list[tuple[Gateway, SimPresence, asyncio.Task[None]]] = []
    for gate_id in ("in1", "in2", "in3"):
        presence = SimPresence(clock)
        settings = make_settings(
            gate_id=gate_id,
            gpio={"presence_pin": 23},
            outbox_path=make_settings().outbox_file.with_name(f"outbox-{gate_id}.db"),
        )
        gateway, _, _ = _gateway(settings, clock, broker, ticker, presence)
        task = asyncio.create_task(gateway.run())
        await asyncio.wait_for(gateway.started.wait(), 2)
        gateways.append((gateway, presence, task))
    try:
        assert ticker.callbacks == 3
        for _, presence, _ in gateways:
            presence.arrive()
        await eventually(lambda: all(g.lane.vehicle_present for g, _, _ in gateways))
        first, _, first_task = gateways[0]
        first.stop()
        await asyncio.wait_for(first_task, 5)
        assert ticker.callbacks == 2
        for _, presence, _ in gateways:
            presence.leave()
        await eventually(lambda: not any(g.lane.vehicle_present for g, _, _ in gateways[1:]))
        assert first.lane.vehicle_present  # stopped: no longer ticked
    finally:
        for gateway, _, task in gateways:
            gateway.stop()
            await asyncio.wait_for(task, 5)
            gateway.close()
    assert ticker.callbacks == 0


def test_an_outbox_opened_in_one_thread_is_used_in_another(
    make_settings: Callable[..., GatewaySettings],
) -> None:
    """A simulator opens its gateways' outboxes off the event loop (opening syncs the disk)."""
    opened: list[Outbox] = []
    worker = threading.Thread(target=lambda: opened.append(Outbox(make_settings().outbox_file)))
    worker.start()
    worker.join(5)
    (outbox,) = opened
    try:
        assert outbox.boot == 1
        assert outbox.depth == 0
        assert outbox.load_denylist() == (None, [])
    finally:
        outbox.close()
    with Outbox(make_settings().outbox_file) as again:
        assert again.boot == 2  # the first opening's boot was committed
