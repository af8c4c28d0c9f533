"""A simulated fleet: N lots x M gates of real gateway firmware, driven by simulated drivers.

Each gate is a :class:`~sim_devices.lot.SimLane` (the real firmware on a rendering camera,
a simulated barrier and loop detector). Drivers of a lot arrive by a Poisson process, enter
through a random entry lane, park for a while, and leave through a random exit lane; their
phones fetch fresh codes from the central service. Faults are scheduled from specs::

    cut-gateway:LOT/GATE@START+DURATION   the gateway's link to the broker is cut (a proxy)
    cut-lot:LOT@START+DURATION            every gateway of a lot is cut
    camera-fail:LOT/GATE@START+DURATION   the camera fails (CameraError on every read)
    broker-restart@START                  the broker restarts (needs a broker we run)
    slow-server@START+DURATION            the service process is stopped (SIGSTOP/SIGCONT)

Times are seconds from the start of the run. The service and broker are reached through a
:class:`Backend` (REST calls and the hooks a fault needs), so the CLI can point the fleet at
a running service or at one it started itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gateway_firmware.app import Tuning
from parking_protocol.clock import Clock
from parking_protocol.types import Direction
from sim_devices.lot import SimLane, SimLaneConfig, start_sim_lane
from sim_devices.netfault import TcpProxy
from sim_devices.schedule import SharedTimer, Ticker
from sim_devices.traffic import Driver, LaneOutcome, Phone, pass_lane, reason_for_text

__all__ = [
    "Backend",
    "Fault",
    "FaultError",
    "Fleet",
    "FleetConfig",
    "FleetStats",
    "parse_fault",
]

log = logging.getLogger(__name__)

TARIFF = {"grace_minutes": 0, "hourly_minor": 500, "daily_cap_minor": 6000, "currency": "CNY"}


class FaultError(ValueError):
    """A fault spec that does not parse or cannot be injected here."""


_FAULT = re.compile(
    r"^(?P<kind>cut-gateway|cut-lot|camera-fail|broker-restart|slow-server)"
    r"(?::(?P<target>[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)?))?"
    r"@(?P<start>\d+(?:\.\d+)?)(?:\+(?P<duration>\d+(?:\.\d+)?))?$"
)
_NEEDS_GATE = {"cut-gateway", "camera-fail"}
_NEEDS_DURATION = {"cut-gateway", "cut-lot", "camera-fail", "slow-server"}


@dataclass(frozen=True)
class Fault:
    kind: str
    start_s: float
    duration_s: float = 0.0
    lot: str | None = None
    gate: str | None = None

    def __str__(self) -> str:
        target = f":{self.lot}" + (f"/{self.gate}" if self.gate else "") if self.lot else ""
        span = f"+{self.duration_s:g}" if self.duration_s else ""
        return f"{self.kind}{target}@{self.start_s:g}{span}"


def parse_fault(spec: str) -> Fault:
    """``cut-gateway:lot1/out1@30+60`` -> Fault; a bad spec raises :class:`FaultError`."""
    match = _FAULT.match(spec.strip())
    if match is None:
        raise FaultError(
            f"bad fault {spec!r}: expected e.g. cut-gateway:LOT/GATE@30+60, cut-lot:LOT@30+60, "
            "camera-fail:LOT/GATE@10+20, broker-restart@45, slow-server@20+8"
        )
    kind, target = match["kind"], match["target"]
    lot, _, gate = (target or "").partition("/")
    if kind in _NEEDS_GATE and not gate:
        raise FaultError(f"{kind} needs LOT/GATE: {spec!r}")
    if kind == "cut-lot" and (not lot or gate):
        raise FaultError(f"cut-lot needs LOT: {spec!r}")
    if kind in ("broker-restart", "slow-server") and target:
        raise FaultError(f"{kind} takes no target: {spec!r}")
    if kind in _NEEDS_DURATION and match["duration"] is None:
        raise FaultError(f"{kind} needs a duration (@START+SECONDS): {spec!r}")
    return Fault(
        kind=kind,
        start_s=float(match["start"]),
        duration_s=float(match["duration"] or 0),
        lot=lot or None,
        gate=gate or None,
    )


class Backend(Protocol):
    """The central service (and, for some faults, the broker) as the fleet sees them."""

    broker_url: str

    async def call(self, method: str, path: str, body: object | None = None, **headers: str) -> Any:
        """A REST call; returns the decoded JSON (None for an already-existing resource)."""
        ...

    def broker_address(self) -> tuple[str, int]:
        """The broker's host and TCP port (the fault proxies forward there)."""
        ...

    async def restart_broker(self) -> None:
        """Restart the broker; raises FaultError when the fleet does not run it."""
        ...

    async def pause_service(self, paused: bool) -> None:
        """SIGSTOP/SIGCONT the service; raises FaultError when the fleet does not run it."""
        ...


@dataclass(frozen=True)
class FleetConfig:
    lots: int = 1
    gates: int = 2  # per lot: half entries (rounded up), half exits
    drivers: int = 10  # per lot
    rate: float = 6.0  # arrivals per minute per lot
    dwell_s: tuple[float, float] = (5.0, 20.0)
    short_of_money: float = 0.1  # share of drivers whose balance will not cover an exit
    fps: float = 10.0
    seed: int = 1
    data_dir: Path = Path("var/sim")
    faults: tuple[Fault, ...] = ()
    prefix: str = "sim"
    decision_timeout_s: float = 3.0
    open_hold_s: float = 6.0
    tick_s: float = 0.05
    gateway_password: str | None = None
    # Lots provisioned at a time (the service's database serialises the writes anyway), and
    # gateways started at a time.
    provision_concurrency: int = 4
    start_concurrency: int = 32
    # Where the gateways keep their outboxes (default: data_dir/gateways). Each commits
    # synchronously (fsync) on the one event loop they all share here: a RAM disk keeps a
    # thousand of them from stalling it, as a thousand Pis' own SD cards would not.
    gateway_dir: Path | None = None

    def lot_ids(self) -> list[str]:
        return [f"{self.prefix}{i}" for i in range(1, self.lots + 1)]

    def gate_plan(self) -> list[tuple[str, Direction]]:
        entries = max(1, (self.gates + 1) // 2)
        exits = max(1, self.gates - entries)
        return [(f"in{i}", Direction.ENTRY) for i in range(1, entries + 1)] + [
            (f"out{i}", Direction.EXIT) for i in range(1, exits + 1)
        ]


@dataclass
class FleetStats:
    arrivals: int = 0
    entries: int = 0
    exits: int = 0
    denials: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # code shown -> barrier/refusal
    presentations: int = 0
    faults_done: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return float(np.percentile(np.asarray(self.latencies), q))


@dataclass
class _LotRun:
    lot_id: str
    entries: list[SimLane]
    exits: list[SimLane]
    drivers: list[Driver]
    inside: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)


class Fleet:
    """Provision, start, drive and stop a fleet of simulated lanes."""

    def __init__(self, config: FleetConfig, backend: Backend, clock: Clock) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self.stats = FleetStats()
        self.lanes: dict[tuple[str, str], SimLane] = {}
        self.proxies: dict[tuple[str, str], TcpProxy] = {}
        self.active_faults: set[str] = set()
        self._lots: list[_LotRun] = []
        self._rng = random.Random(config.seed)  # noqa: S311 - traffic, not crypto
        self._tasks: set[asyncio.Task[Any]] = set()
        # Every gateway's tick and every camera's frames on a few shared timers, not a
        # thousand sleeping loops each (sim_devices.schedule).
        self.ticker = Ticker()
        self.frame_timer = SharedTimer()

    # -- setup ----------------------------------------------------------------------------------
    async def provision(self) -> dict[str, str]:
        """Create the lots, gates and driver accounts (idempotent); return the public keys.

        Lots are provisioned ``provision_concurrency`` at a time (each lot's calls in order)."""
        limit = asyncio.Semaphore(max(1, self.config.provision_concurrency))

        async def one(lot: str) -> None:
            async with limit:
                await self._provision_lot(lot)

        await _gather_all(one(lot) for lot in self.config.lot_ids())
        return await self._public_keys()

    async def _public_keys(self) -> dict[str, str]:
        keys = (await self.backend.call("GET", "/api/v1/keys"))["keys"]
        return {key["kid"]: key["public_key"] for key in keys}

    async def _provision_lot(self, lot: str) -> None:
        call = self.backend.call
        await call(
            "POST",
            "/api/v1/lots",
            {"lot_id": lot, "name": f"Sim {lot}", "capacity": 10_000, "tariff": TARIFF},
        )
        for gate, direction in self.config.gate_plan():
            await call(
                "POST",
                f"/api/v1/lots/{lot}/gates",
                {"gate_id": gate, "direction": direction.value, "name": gate},
            )
        short = round(self.config.drivers * self.config.short_of_money)
        for i in range(1, self.config.drivers + 1):
            account = f"{lot}-d{i}"
            await call("POST", "/api/v1/accounts", {"account_id": account, "name": account})
            amount = 100 if i <= short else 50_000
            await call(
                "POST",
                f"/api/v1/accounts/{account}/topups",
                {"amount_minor": amount},
                **{"Idempotency-Key": f"sim-initial-{account}"},
            )

    def _targets(self, fault: Fault) -> list[tuple[str, str]]:
        gates = [g for g, _ in self.config.gate_plan()]
        if fault.kind == "cut-lot":
            return [(str(fault.lot), g) for g in gates]
        if fault.kind in _NEEDS_GATE:
            return [(str(fault.lot), str(fault.gate))]
        return []

    def check_faults(self) -> None:
        known = {(lot, g) for lot in self.config.lot_ids() for g, _ in self.config.gate_plan()}
        for fault in self.config.faults:
            for target in self._targets(fault):
                if target not in known:
                    raise FaultError(f"{fault}: no gate {target[0]}/{target[1]} in this fleet")

    async def start(self) -> None:
        """Provision every lot and start its gateways as soon as it is provisioned
        (``provision_concurrency`` lots, ``start_concurrency`` gateways at a time: the
        service's REST calls and the gateways' local start overlap). Returns once every
        gateway runs; they connect to the broker in the background (:meth:`wait_online`)."""
        self.check_faults()
        keys = await self._public_keys()  # the service's signing keys exist before any lot
        cut = {t for f in self.config.faults if f.kind.startswith("cut") for t in self._targets(f)}
        tuning = Tuning(tick_s=self.config.tick_s, idle_sleep_s=0.05)
        gateway_dir = self.config.gateway_dir or self.config.data_dir / "gateways"
        gates = self.config.gate_plan()
        provisioning = asyncio.Semaphore(max(1, self.config.provision_concurrency))
        starting = asyncio.Semaphore(max(1, self.config.start_concurrency))

        async def gateway(index: int, lot: str, gate: str, direction: Direction) -> SimLane:
            async with starting:
                broker_url = self.backend.broker_url
                if (lot, gate) in cut:
                    host, port = self.backend.broker_address()
                    proxy = await TcpProxy(host, port, name=f"link-{lot}-{gate}").start()
                    self.proxies[(lot, gate)] = proxy
                    broker_url = proxy.url
                return await start_sim_lane(
                    SimLaneConfig(
                        lot_id=lot,
                        gate_id=gate,
                        direction=direction,
                        broker_url=broker_url,
                        public_keys=keys,
                        data_dir=gateway_dir,
                        mqtt_username=f"gw-{lot}-{gate}" if self.config.gateway_password else None,
                        mqtt_password=self.config.gateway_password,
                        fps=self.config.fps,
                        seed=self.config.seed * 1000 + index,
                        open_hold_s=self.config.open_hold_s,
                        decision_timeout_s=self.config.decision_timeout_s,
                        heartbeat_s=10,
                        extra={"reconnect_max_s": 2.0},
                    ),
                    self.clock,
                    tuning=tuning,
                    ticks=self.ticker,
                    frame_timer=self.frame_timer,
                )

        async def lot_and_gateways(number: int, lot: str) -> list[SimLane | BaseException]:
            async with provisioning:
                await self._provision_lot(lot)
            first = number * len(gates)
            return await asyncio.gather(
                *(gateway(first + i, lot, g, d) for i, (g, d) in enumerate(gates)),
                return_exceptions=True,
            )

        plan = [(lot, g, d) for lot in self.config.lot_ids() for g, d in gates]
        per_lot = await asyncio.gather(
            *(lot_and_gateways(n, lot) for n, lot in enumerate(self.config.lot_ids())),
            return_exceptions=True,
        )
        results: list[SimLane | BaseException] = []
        for outcome in per_lot:
            results += [outcome] * len(gates) if isinstance(outcome, BaseException) else outcome
        started = [lane for lane in results if isinstance(lane, SimLane)]
        failed = [exc for exc in results if isinstance(exc, BaseException)]
        if failed:
            await asyncio.gather(*(lane.stop() for lane in started), return_exceptions=True)
            for proxy in self.proxies.values():
                await proxy.close()
            self.proxies.clear()
            raise failed[0]
        runs = {lot: _LotRun(lot, [], [], []) for lot in self.config.lot_ids()}
        for (lot, gate, direction), lane in zip(plan, started, strict=True):
            self.lanes[(lot, gate)] = lane
            run = runs[lot]
            (run.entries if direction is Direction.ENTRY else run.exits).append(lane)
        for lot, run in runs.items():
            for i in range(1, self.config.drivers + 1):
                account = f"{lot}-d{i}"
                run.drivers.append(Driver(account, Phone(account, self._code_source, self.clock)))
            self._lots.append(run)

    async def wait_online(self, timeout_s: float = 60.0) -> bool:
        """Wait until every gateway is connected to the broker (False after ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not all(lane.gateway.uplink.connected for lane in self.lanes.values()):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def _code_source(self, account: str) -> str:
        issued = await self.backend.call("POST", f"/api/v1/accounts/{account}/codes")
        return str(issued["code"])

    # -- running -----------------------------------------------------------------------------
    async def run(self, duration_s: float, stop: asyncio.Event | None = None) -> FleetStats:
        """Drive traffic and faults for ``duration_s`` (or until ``stop``); cars parked at
        the end stay parked (their sessions stay open, as in a real lot)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(duration_s, stop.set)
        workers = [asyncio.create_task(self._arrivals(run, stop)) for run in self._lots]
        workers += [asyncio.create_task(self._fault(fault, stop)) for fault in self.config.faults]
        try:
            await stop.wait()
        finally:
            timer.cancel()
            for task in [*workers, *self._tasks]:
                task.cancel()
            await asyncio.gather(*workers, *self._tasks, return_exceptions=True)
            await self._clear_faults()
        return self.stats

    async def settle(self, timeout_s: float = 20.0) -> bool:
        """Wait until every gateway is online with an empty outbox (replays answered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if all(
                lane.gateway.uplink.connected and lane.gateway.outbox.depth == 0
                for lane in self.lanes.values()
            ):
                return True
            await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        await asyncio.gather(*(lane.stop() for lane in self.lanes.values()), return_exceptions=True)
        for proxy in self.proxies.values():
            await proxy.close()

    async def _arrivals(self, run: _LotRun, stop: asyncio.Event) -> None:
        per_second = self.config.rate / 60
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._rng.expovariate(per_second))
            if stop.is_set():
                return
            free = [d for d in run.drivers if d.name not in run.inside | run.busy]
            if not free:
                continue
            driver = self._rng.choice(free)
            run.busy.add(driver.name)
            self._spawn(self._visit(run, driver, stop))

    async def _visit(self, run: _LotRun, driver: Driver, stop: asyncio.Event) -> None:
        try:
            self.stats.arrivals += 1
            outcome = await self._pass(self._rng.choice(run.entries), driver)
            if not outcome.opened:
                return
            self.stats.entries += 1
            run.inside.add(driver.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._rng.uniform(*self.config.dwell_s))
            for _attempt in range(3):
                if stop.is_set():
                    return
                outcome = await self._pass(self._rng.choice(run.exits), driver)
                if outcome.opened:
                    self.stats.exits += 1
                    run.inside.discard(driver.name)
                    return
                await asyncio.sleep(2)
        finally:
            run.busy.discard(driver.name)

    async def _pass(self, lane: SimLane, driver: Driver) -> LaneOutcome:
        try:
            outcome = await pass_lane(
                lane.lane, driver, timeout=10.0, drive_through_s=0.3, represent_after_s=2.5
            )
        except Exception as exc:  # the service refused to issue a code, say
            log.warning("%s could not use %s: %s", driver.name, lane.config.gate_id, exc)
            self.stats.denials["no_code"] += 1
            return LaneOutcome(opened=False, waited_s=0.0)
        self.stats.presentations += outcome.presentations
        if outcome.opened or outcome.refused:
            self.stats.latencies.append(outcome.waited_s)
        if not outcome.opened:
            self.stats.denials[reason_for_text(outcome.message if outcome.refused else None)] += 1
        return outcome

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- faults -------------------------------------------------------------------------------
    async def _fault(self, fault: Fault, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), fault.start_s)
        if stop.is_set():
            return
        label = str(fault)
        log.info("fault: %s", label)
        self.active_faults.add(label)
        try:
            await self._inject(fault, on=True)
            if fault.duration_s:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), fault.duration_s)
        finally:
            if fault.duration_s:
                await self._inject(fault, on=False)
            self.active_faults.discard(label)
            self.stats.faults_done.append(label)

    async def _inject(self, fault: Fault, *, on: bool) -> None:
        match fault.kind:
            case "cut-gateway" | "cut-lot":
                for target in self._targets(fault):
                    proxy = self.proxies[target]
                    await (proxy.sever() if on else proxy.heal())
            case "camera-fail":
                for target in self._targets(fault):
                    self.lanes[target].camera.set_failed(on)
            case "broker-restart":
                if on:
                    await self.backend.restart_broker()
            case "slow-server":
                await self.backend.pause_service(on)

    async def _clear_faults(self) -> None:
        for proxy in self.proxies.values():
            await proxy.heal()
        for lane in self.lanes.values():
            lane.camera.set_failed(False)
        with contextlib.suppress(FaultError):
            await self.backend.pause_service(False)

    # -- figures ------------------------------------------------------------------------------
    def gateway_totals(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for lane in self.lanes.values():
            stats = lane.gateway.stats
            totals["scans"] += stats.scans
            totals["frames"] += stats.frames
            totals["frames_decoded"] += stats.frames - stats.frames_unchanged
            totals["offline_decisions"] += stats.offline_decisions
            totals["replayed"] += stats.events_replayed
            totals["late_disagreements"] += stats.late_disagreements
            totals["camera_errors"] += stats.camera_errors
            totals["outbox"] += lane.gateway.outbox.depth
            totals["online"] += int(lane.gateway.uplink.connected)
            totals["connects"] += lane.gateway.uplink.connects
            for reason, count in lane.gateway.lane.local_denials.items():
                totals[f"local:{reason.value}"] += count
            # What the barriers did (read off the relays' mock pins), including a lift for
            # a driver whose visit the end of the run cut short.
            totals[f"opens:{lane.config.direction.value}"] += lane.gate.opens
        return dict(totals)

    def summary(self) -> dict[str, Any]:
        totals = self.gateway_totals()
        p50, p99 = self.stats.percentile(50), self.stats.percentile(99)
        return {
            "lots": self.config.lots,
            "gates": len(self.lanes),
            "arrivals": self.stats.arrivals,
            "scans": totals.get("scans", 0),
            "entries": self.stats.entries,
            "exits": self.stats.exits,
            "barrier_opens": {
                "entry": totals.get("opens:entry", 0),
                "exit": totals.get("opens:exit", 0),
            },
            "denials": dict(self.stats.denials.most_common()),
            "offline_decisions": totals.get("offline_decisions", 0),
            "replayed_events": totals.get("replayed", 0),
            "late_disagreements": totals.get("late_disagreements", 0),
            "camera_errors": totals.get("camera_errors", 0),
            "broker_connects": totals.get("connects", 0),
            "outbox_remaining": totals.get("outbox", 0),
            "frames": totals.get("frames", 0),
            "frames_decoded": totals.get("frames_decoded", 0),
            "presentations": self.stats.presentations,
            "latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "latency_p99_ms": None if p99 is None else round(p99 * 1000, 1),
            "faults": list(self.stats.faults_done),
        }


async def _gather_all(coros: Iterable[Awaitable[None]]) -> None:
    """Run them all; raise the first failure once every one has finished."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
