"""A simulated lane: the real gateway firmware on simulated devices, looking at a LaneScene.

The barrier relay and the loop detector are the firmware's own gpiozero adapters on a
mock pin factory of the lane's own (:func:`~sim_devices.devices.sim_lane_devices`); the
scene drives the detector pin, and ``SimLane.gate`` is the relay pin's timeline.

Used by ``qrpark demo``, the end-to-end tests and the benchmarks::

    lane = await start_sim_lane(SimLaneConfig(lot_id="demo", gate_id="in1",
        direction=Direction.ENTRY, broker_url=..., public_keys=..., data_dir=...), clock)
    ...
    await lane.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway_firmware.app import Gateway, TickSource, Tuning, build_gateway, make_transport
from gateway_firmware.config import GatewaySettings
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.clock import Clock
from parking_protocol.transport import Transport
from parking_protocol.types import Direction
from sim_devices.camera import SimCamera
from sim_devices.devices import SimDisplay, SimGate, sim_lane_devices
from sim_devices.render import FrameVariant
from sim_devices.scene import LaneScene
from sim_devices.schedule import SharedTimer
from sim_devices.traffic import Lane

__all__ = ["SimLane", "SimLaneConfig", "start_sim_lane"]


@dataclass(frozen=True)
class SimLaneConfig:
    lot_id: str
    gate_id: str
    direction: Direction
    broker_url: str
    public_keys: dict[str, str]
    data_dir: Path
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    fps: float = 15.0
    decoder: str = "auto"
    variant: FrameVariant | None = None
    seed: int | None = None
    presence_detector: bool = True
    open_hold_s: float = 8.0
    decision_timeout_s: float = 3.0
    heartbeat_s: float = 30.0
    extra: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> GatewaySettings:
        values: dict[str, Any] = {
            "lot_id": self.lot_id,
            "gate_id": self.gate_id,
            "direction": self.direction,
            "hardware": "sim",
            "broker_url": self.broker_url,
            "mqtt_username": self.mqtt_username,
            "mqtt_password": self.mqtt_password,
            "public_keys": self.public_keys,
            "decoder": self.decoder,
            "camera": {"fps": self.fps},
            "timeouts": {
                "open_hold_s": self.open_hold_s,
                "decision_timeout_s": self.decision_timeout_s,
            },
            "heartbeat_s": self.heartbeat_s,
            "outbox_path": self.data_dir / f"outbox-{self.lot_id}-{self.gate_id}.db",
            "log_format": "text",
        }
        if self.presence_detector:
            # The simulated loop detector stands in for a GPIO input.
            values["gpio"] = {"presence_pin": 23}
        values.update(self.extra)
        return GatewaySettings(**values)


@dataclass
class SimLane:
    config: SimLaneConfig
    scene: LaneScene
    gateway: Gateway
    gate: SimGate
    display: SimDisplay
    camera: SimCamera
    task: asyncio.Task[None]

    @functools.cached_property
    def lane(self) -> Lane:
        """The lane as drivers see it; one object, so its lock queues cars one at a time."""
        return Lane(scene=self.scene, gate=self.gate, display=self.display)

    async def stop(self) -> None:
        self.gateway.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        # Closing the outbox syncs the disk: off the loop, where other lanes may still run.
        await asyncio.to_thread(self.gateway.close)


async def start_sim_lane(
    config: SimLaneConfig,
    clock: Clock,
    *,
    transport: Transport | None = None,
    tuning: Tuning | None = None,
    ticks: TickSource | None = None,
    frame_timer: SharedTimer | None = None,
) -> SimLane:
    """Build and start one simulated lane; returns once the gateway is running.

    A fleet passes the same ``ticks`` (:class:`~sim_devices.schedule.Ticker`) and
    ``frame_timer`` to all its lanes: their firmware ticks and camera frames then share a
    few timers (see :mod:`sim_devices.schedule`)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    settings = config.settings()
    scene = LaneScene(name=f"{config.lot_id}/{config.gate_id}")
    rng = np.random.default_rng(config.seed)
    camera = SimCamera(
        scene, variant=config.variant, rng=rng, frame_interval=1 / config.fps, timer=frame_timer
    )
    devices = sim_lane_devices(settings, clock=clock, scene=scene, camera=camera)
    hardware = devices.hardware
    try:
        # Opening syncs the disk (a few ms): off the loop, where the running lanes are.
        outbox = await asyncio.to_thread(Outbox, settings.outbox_file)
    except BaseException:
        hardware.close()
        raise
    if transport is None:
        transport = make_transport(settings, boot=outbox.boot, clock=clock)
    try:
        gateway = build_gateway(
            settings,
            hardware=hardware,
            transport=transport,
            clock=clock,
            outbox=outbox,
            tuning=tuning,
            ticks=ticks,
        )
    except Exception:
        outbox.close()
        hardware.close()
        raise
    task = asyncio.create_task(gateway.run(), name=f"gateway:{config.gate_id}")
    started = asyncio.create_task(gateway.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises what stopped it
        raise RuntimeError(f"gateway {config.gate_id} stopped while starting")
    if started not in done:
        started.cancel()
        gateway.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
        gateway.close()
        raise TimeoutError(f"gateway {config.gate_id} did not start")
    assert isinstance(hardware.display, SimDisplay)
    return SimLane(config, scene, gateway, devices.gate, hardware.display, camera, task)
