"""Two lots cut off from the broker for 30 simulated minutes, hundreds of cars in and out,
then healed: the books must come out exact.

Real parts (the harness of test_real_faults.py): the real gateway firmware on simulated
cameras, barriers and loop detectors, the real central service on PostgreSQL, a real
Mosquitto; two lots of six lanes (three entries, three exits). Each gateway reaches the broker
through its own :class:`~sim_devices.netfault.TcpProxy`. Lot A's links refuse (connections
reset, the port closed: its gateways know at once they are offline); lot B's hang
(connections stay up and nothing moves: each scan is published into the void and the lane
decides on its own when its decision timeout passes; after the heal those scans reach the
service live, minutes late).

Time is one FakeClock shared by the service, the gateways and the phones, moved by the test
(:class:`SimTime`): it flows with real time online, twenty times faster during the partition
(so the lanes' decision timeouts pass), and jumps between rounds of traffic: 30 minutes
take about 20 s. Drivers come and go round after round (at least 300 scans during the
partition); the lanes decide offline with their local rules (a code that verifies locally,
unused at that lane, opens), and twice per lot a copycat shows a driver's code again: at
the same lane (refused there) and at the lot's other entry lane (it opens: offline, that
lane cannot know; the service must flag it and count it never).

After the heal: every outbox drains; every event is processed once (per gate the sequence
numbers 1..n, none missing, none twice); one closed stay per entry the drivers made, each
exit paid exactly once, wallets = top-up - charges, every ledger transaction balanced;
every copied code flagged ``code_reused`` once, nothing else flagged; and the service's
state is the gateways': each barrier opening during the partition is in a stay or is that
flag, and each gateway's status at the service is what the gateway says (online, its
boot, an empty queue). What was sent, lost and doubled goes to the reliability report.

A product bug this found (an exit arriving late, live, closes the stay after it) is pinned
by a strict xfail that replays it exactly, at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pytest
import sqlalchemy as sa
from e2e.test_spine import HandGateway
from reliability_report import Report
from sim.test_sim_offline import eventually
from sqlmodel import select
from test_real_faults import (
    CATCHING_UP,
    HOURLY,
    START_BALANCE,
    Site,
    collect_commands,
    summary,
)

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    EventAck,
    GateCommand,
    GatewayState,
    OfflineDecision,
    ScanEvent,
    new_id,
)
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.qr_token import parse_code, public_key_text
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.types import Direction, GateAction, Reason
from qrpark.services import MosquittoProcess
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate, GatewayStatusRecord
from server.lots.models import LotCreate, TariffSchema
from server.mqtt.bridge import Inbound
from server.sessions.flows import Reply
from sim_devices.lot import SimLane, SimLaneConfig, start_sim_lane
from sim_devices.netfault import TcpProxy
from sim_devices.render import CLEAN
from sim_devices.traffic import Driver, LaneOutcome, Phone, pass_lane, reason_for_text

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

PARTITION = timedelta(minutes=30)
ROUND = timedelta(seconds=90)  # simulated time from one round of traffic to the next
PAIRS = 3  # entry/exit lane pairs per lot
DRIVERS = 11  # per lot
FLOW_ONLINE = 1.0  # simulated seconds per real second
FLOW_PARTITION = 20.0
FLOW_COPYCAT = 5.0
MIN_PARTITION_SCANS = 300

Fault = Literal["refuse", "hang"]


class SimTime:
    """The test's control of the shared FakeClock: it flows at ``rate`` simulated seconds
    per real second (a background task), and :meth:`jump_to` moves it forward at once."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.rate = FLOW_ONLINE
        self._task: asyncio.Task[None] | None = None

    async def _flow(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            self.clock.advance(timedelta(seconds=(now - last) * self.rate))
            last = now

    def start(self) -> None:
        self._task = asyncio.create_task(self._flow(), name="sim-time")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def jump_to(self, when: datetime) -> None:
        if when > self.clock.now():
            self.clock.set(when)


@dataclass
class Inside:
    """Where a driver is: inside since which round (None: outside)."""

    since: int | None = None


@dataclass
class PartitionLot:
    site: Site
    fault: Fault
    links: dict[str, TcpProxy]  # gate id -> that gateway's link to the broker
    drivers: list[Driver]
    where: dict[str, Inside] = field(default_factory=dict)

    def entries(self) -> list[SimLane]:
        return [entry for entry, _ in self.site.lanes]

    def exits(self) -> list[SimLane]:
        return [exit_ for _, exit_ in self.site.lanes]

    async def cut(self) -> None:
        for link in self.links.values():
            if self.fault == "refuse":
                await link.sever()
            else:
                link.stall()
        if self.fault == "refuse":
            await eventually(
                lambda: not any(lane.gateway.uplink.connected for lane in self.site.gateways()),
                what=f"{self.site.lot}: every gateway offline",
            )

    async def heal(self) -> None:
        for link in self.links.values():
            await link.heal()  # accepting again; held bytes flow


@dataclass
class World:
    central: Central
    time: SimTime
    lots: list[PartitionLot]
    copycats: list[tuple[PartitionLot, ScanEvent, str]] = field(default_factory=list)
    # Every scan event in the order the service decided it, with its answer.
    arrivals: list[tuple[ScanEvent, GateCommand | EventAck]] = field(default_factory=list)

    def take(self, batch: Sequence[Inbound], replies: Sequence[Reply]) -> None:
        answers = {r.message.event_id: r.message for r in replies}
        for item in batch:
            event = item.message
            if isinstance(event, ScanEvent) and event.event_id in answers:
                self.arrivals.append((event, answers[event.event_id]))

    def arrival_story(self, accounts: Iterable[str]) -> str:
        """For a failure message: what reached the service for each account, in order (the
        exact sequence to replay by hand to reproduce it)."""
        lines = []
        for account in accounts:
            lines.append(f"{account}, as the service decided its scans:")
            for event, answer in self.arrivals:
                if parse_code(event.code).account_id != account:
                    continue
                how = f"offline {event.offline.action.value}" if event.offline else "live"
                said = (
                    f"{answer.action.value} {answer.reason.value}"
                    if isinstance(answer, GateCommand)
                    else f"ack {answer.result.value}"
                )
                stay = (answer.session_id or "-")[:8]
                lines.append(
                    f"  {event.scanned_at:%T.%f} {event.gate_id} seq {event.seq} {how}:"
                    f" {said}, stay {stay}"
                )
        return "\n".join(lines)


@contextlib.asynccontextmanager
async def open_world(
    *, database_url: str, broker: MosquittoProcess, data_dir: Path
) -> AsyncIterator[World]:
    clock = FakeClock(datetime(2026, 3, 2, 7, 30, tzinfo=UTC))
    settings = ServerSettings(
        database_url=database_url,
        mqtt_url=broker.url,
        mqtt_client_id=f"central-{uuid.uuid4().hex[:8]}",
        key_file=data_dir / "keys" / "signing.pem",
    )
    # The production transport (a persistent MQTT session, the default backoff).
    central = build_central(settings, clock=clock)
    await central.start()
    assert central.transport is not None
    assert await central.transport.wait_connected(10)
    keys = {kid: public_key_text(key) for kid, key in central.keys.public_keys().items()}
    time = SimTime(clock)
    time.start()
    started: list[SimLane] = []
    links: list[TcpProxy] = []
    lots: list[PartitionLot] = []

    def driver(account: str) -> Driver:
        async def source(account_id: str) -> str:
            return (await asyncio.to_thread(central.issue_code, account_id)).code

        # The app shows a code with at least 40 of its 60 s left (the clock runs fast).
        return Driver(account, Phone(account, source, clock, refresh_before=timedelta(seconds=40)))

    try:
        faults: tuple[Fault, ...] = ("refuse", "hang")
        for n, fault in enumerate(faults):
            lot = f"p{'ab'[n]}{uuid.uuid4().hex[:6]}"
            tariff = TariffSchema(grace_minutes=0, hourly_minor=HOURLY, daily_cap_minor=6000)
            central.create_lot(LotCreate(lot_id=lot, name=f"Lot {n}", capacity=500, tariff=tariff))
            pairs: list[tuple[SimLane, SimLane]] = []
            lot_links: dict[str, TcpProxy] = {}
            for i in range(PAIRS):
                pair = []
                for gate, direction in ((f"in{i}", Direction.ENTRY), (f"out{i}", Direction.EXIT)):
                    central.create_gate(lot, GateCreate(gate_id=gate, direction=direction))
                    link = await TcpProxy("127.0.0.1", broker.port, name=f"{lot}-{gate}").start()
                    links.append(link)
                    lot_links[gate] = link
                    lane = await start_sim_lane(
                        SimLaneConfig(
                            lot_id=lot,
                            gate_id=gate,
                            direction=direction,
                            broker_url=link.url,
                            public_keys=keys,
                            data_dir=data_dir / "gateways",
                            fps=15,
                            variant=CLEAN,
                            seed=10 * n + i,
                            open_hold_s=4.0,
                            extra={"reconnect_max_s": 1.0},
                        ),
                        clock,
                    )
                    started.append(lane)
                    pair.append(lane)
                pairs.append((pair[0], pair[1]))
            drivers = []
            for j in range(DRIVERS):
                account = f"{lot}-d{j}"
                central.create_account(AccountCreate(account_id=account, name=account))
                central.topup(account, START_BALANCE, idempotency_key=f"init-{account}")
                drivers.append(driver(account))
            groups = [drivers[i::PAIRS] for i in range(PAIRS)]
            site = Site(lot, database_url, central, pairs, groups)
            lots.append(
                PartitionLot(site, fault, lot_links, drivers, {d.name: Inside() for d in drivers})
            )
        for lane in started:
            assert await lane.gateway.uplink.transport.wait_connected(10)
        world = World(central, time, lots)
        central.batch_listeners.append(world.take)
        yield world
    finally:
        await asyncio.gather(*(lane.stop() for lane in started), return_exceptions=True)
        for link in links:
            await link.close()
        await time.stop()
        await central.stop()


async def attempt(
    site: Site, lane: SimLane, driver: Driver, *, allowed: set[str], tries: int = 20
) -> LaneOutcome:
    """The driver passes ``lane``; after no answer, or a refusal in ``allowed``, it tries
    again with a fresh code. Any other refusal fails."""
    tried: list[LaneOutcome] = []
    for _ in range(tries):
        outcome = await pass_lane(lane.lane, driver, timeout=4.0, drive_through_s=0.05)
        site.tally.record(driver.name, lane.config.direction, outcome)
        tried.append(outcome)
        if outcome.opened:
            return outcome
        if outcome.refused and reason_for_text(outcome.message) not in allowed:
            break
        driver.phone.code_used()  # the app shows a fresh code for the next try
        await asyncio.sleep(0.3)
    raise AssertionError(
        f"{driver.name} stuck at {lane.config.gate_id}: {tried[:3]} ... {tried[-2:]};"
        f" lane {lane.gateway.lane.state}, gateway {lane.gateway.stats}"
    )


@dataclass
class Traffic:
    """The drivers of every lot, moved round by round."""

    world: World
    rng: random.Random
    round: int = 0

    async def play(self, *, allowed: set[str], copycats: bool = False) -> None:
        """Every driver moves once or stays put: in when outside, out when inside since an
        earlier round (so every stay spans a jump of the clock). With ``copycats`` one
        driver per lot first enters and has its code copied (:meth:`copycat`)."""
        moves: list[Awaitable[None]] = []
        for lot in self.world.lots:
            outside = [d for d in lot.drivers if lot.where[d.name].since is None]
            if copycats and outside:
                await self.copycat(lot, self.rng.choice(outside))
            coming, going = [], []
            for driver in lot.drivers:
                since = lot.where[driver.name].since
                if since is None and self.rng.random() < 0.85:
                    coming.append(driver)
                elif (
                    since is not None
                    and since < self.round
                    and (self.rng.random() < 0.7 or self.round - since >= 3)
                ):
                    going.append(driver)
            # The queues they join: as even as drivers choose them, in random order.
            for drivers in (coming, going):
                self.rng.shuffle(drivers)
            entries, exits = lot.entries(), lot.exits()
            moves += [
                self.enter(lot, d, entries[i % len(entries)], allowed) for i, d in enumerate(coming)
            ]
            moves += [
                self.leave(lot, d, allowed, exits[i % len(exits)]) for i, d in enumerate(going)
            ]
        await asyncio.gather(*moves)
        self.round += 1

    async def enter(
        self, lot: PartitionLot, driver: Driver, lane: SimLane, allowed: set[str]
    ) -> None:
        await attempt(lot.site, lane, driver, allowed=allowed)
        lot.where[driver.name].since = self.round

    async def leave(
        self, lot: PartitionLot, driver: Driver, allowed: set[str], lane: SimLane | None = None
    ) -> None:
        lane = lane or self.rng.choice(lot.exits())
        await attempt(lot.site, lane, driver, allowed=allowed)
        lot.where[driver.name].since = None

    async def everyone_leaves(self, *, allowed: set[str]) -> None:
        await asyncio.gather(
            *(
                self.leave(lot, driver, allowed)
                for lot in self.world.lots
                for driver in lot.drivers
                if lot.where[driver.name].since is not None
            )
        )

    async def copycat(self, lot: PartitionLot, driver: Driver) -> None:
        """Offline, the driver enters; then a copycat shows the same code (a screenshot) at
        that lane (refused by the lane alone) and at the lot's other entry lane (it opens:
        offline, that lane cannot know). The clock runs slower meanwhile, so the code is
        still valid however slow the machine."""
        time = self.world.time
        rate, time.rate = time.rate, FLOW_COPYCAT
        try:
            entry, other = self.rng.sample(lot.entries(), 2)
            seen = {event.event_id for event in entry.gateway.outbox.pending()}
            await self.enter(lot, driver, entry, set())
            (used,) = [
                e.code
                for e in entry.gateway.outbox.pending()
                if e.event_id not in seen and e.offline and e.offline.action is GateAction.OPEN
            ]

            async def screenshot(_account: str) -> str:
                return used

            fake = Driver(f"copycat-{driver.name}", Phone(driver.name, screenshot, time.clock))
            time.clock.advance(timedelta(seconds=6))  # past the lane's debounce window (5 s)
            again = await pass_lane(entry.lane, fake, timeout=4.0, drive_through_s=0.05)
            assert again.refused and reason_for_text(again.message) == "code_replayed", again
            seen = {event.event_id for event in other.gateway.outbox.pending()}
            elsewhere = await pass_lane(other.lane, fake, timeout=4.0, drive_through_s=0.05)
            assert elsewhere.opened, elsewhere
            (event,) = [e for e in other.gateway.outbox.pending() if e.event_id not in seen]
            self.world.copycats.append((lot, event, driver.name))
        finally:
            time.rate = rate


class LateExitClosesLaterStay(AssertionError):
    """A live exit, scanned before the open stay began, closed that stay (at its entry
    time, free) instead of the stay it ended. Found by the partition test (a hung link
    delivers an exit minutes late); fixed in server/sessions/flows.py ``_exit``."""


@pytest.mark.slow
@pytest.mark.postgres
async def test_30_minute_partition_of_two_lots_reconciles_exactly(
    mosquitto: MosquittoProcess, fresh_postgres_url: str, tmp_path: Path, report: Report
) -> None:
    url = fresh_postgres_url
    async with open_world(database_url=url, broker=mosquitto, data_dir=tmp_path) as world:
        time, traffic = world.time, Traffic(world, random.Random(6))
        for _ in range(2):  # online: stays begun and ended; some drivers inside at the cut
            await traffic.play(allowed=set())
            time.jump_to(time.clock.now() + ROUND)
        for lot in world.lots:
            await lot.site.settle()  # every outbox empty: what waits later is the partition's
        created_before = {lot.site.lot: lot.site.events_created() for lot in world.lots}
        for lot in world.lots:
            await lot.cut()
            report.faults["30-min partition"] += 1
        cut_at = time.clock.now()
        time.rate = FLOW_PARTITION
        rounds = PARTITION // ROUND
        for k in range(rounds):
            await traffic.play(allowed=set(), copycats=k in (3, rounds // 2 + 1))
            time.jump_to(cut_at + (k + 1) * ROUND)
        time.rate = FLOW_ONLINE
        assert time.clock.now() - cut_at == PARTITION
        report.bad_inputs["code copied, shown offline"] += 2 * len(world.copycats)
        # What the gateways did on their own: every event of the partition still waits in
        # its outbox with the lane's decision, and the service has none of them.
        offline: dict[str, ScanEvent] = {}
        for lot in world.lots:
            made = lot.site.events_created() - created_before[lot.site.lot]
            waiting = [e for lane in lot.site.gateways() for e in lane.gateway.outbox.pending()]
            assert len(waiting) == made, (lot.fault, len(waiting), made)
            assert all(e.offline is not None for e in waiting), lot.fault
            offline.update((e.event_id, e) for e in waiting)
        assert len(offline) >= MIN_PARTITION_SCANS, len(offline)
        assert not processed_ids(url) & set(offline), "the partition leaked"

        for lot in world.lots:
            await lot.heal()
        # Online again at once: drivers come and go while the outboxes drain (a driver
        # whose offline stay has not arrived yet may be refused once: CATCHING_UP).
        await traffic.play(allowed=CATCHING_UP)
        time.jump_to(time.clock.now() + ROUND)
        await traffic.everyone_leaves(allowed=CATCHING_UP)
        for lot in world.lots:
            await lot.site.settle(timeout=60)
        for lot in world.lots:
            summary(lot.site, f"lot {lot.site.lot}, links {lot.fault}")
        print(f"{len(offline)} scans during the partition, {len(world.copycats)} copied codes")
        resent = sum(
            lane.gateway.stats.events_replayed for lot in world.lots for lane in lot.site.gateways()
        )
        print(f"events sent again by the gateways (replays after reconnect and resends): {resent}")
        for lot in world.lots:
            try:
                lot.site.check_exactly_once(report)
            except AssertionError as exc:
                wrong = [line.split(":")[0] for line in str(exc).splitlines() if ": saw " in line]
                failure = f"{exc}\n{world.arrival_story(wrong)}"
                late = exits_closing_later_stays(world, url)
                if late:
                    raise LateExitClosesLaterStay("\n".join([*late, failure])) from None
                raise AssertionError(failure) from None
            assert set(lot.site.tally.refusals) <= CATCHING_UP, lot.site.tally.refusals
        check_flags_and_state(world, url, offline)
        await check_status(world)


def processed_ids(url: str) -> set[str]:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as db:
            return {
                str(row[0]) for row in db.execute(sa.text("select event_id from processed_events"))
            }
    finally:
        engine.dispose()


def check_flags_and_state(world: World, url: str, offline: dict[str, ScanEvent]) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as db:
            per_gate: Counter[tuple[str, str]] = Counter()
            seqs: dict[tuple[str, str], set[int]] = {}
            for lot, gate, seq in db.execute(
                sa.text("select lot_id, gate_id, seq from processed_events")
            ):
                per_gate[str(lot), str(gate)] += 1
                seqs.setdefault((str(lot), str(gate)), set()).add(int(seq))
            in_stays = {
                str(e)
                for row in db.execute(
                    sa.text("select entry_event_id, exit_event_id from parking_sessions")
                )
                for e in row
                if e is not None
            }
            flags = [
                (str(r[0]), str(r[1]), r[2])
                for r in db.execute(
                    sa.text("select event_id, kind, account_id from reconcile_flags")
                )
            ]
    finally:
        engine.dispose()
    for lot in world.lots:
        for lane in lot.site.gateways():
            key = (lot.site.lot, lane.config.gate_id)
            last = lane.gateway.outbox.last_seq
            assert per_gate[key] == last, (key, per_gate[key], last)
            assert seqs.get(key, set()) == set(range(1, last + 1)), key
    # Each copycat entry: one code_reused flag, on it or on the driver's own entry.
    reused = [(event_id, account) for event_id, kind, account in flags if kind == "code_reused"]
    assert sorted(a for _, a in reused) == sorted(a for _, _, a in world.copycats), flags
    assert len(flags) == len(reused), flags  # nothing else to flag
    # Every barrier that opened during the partition is in a stay, or is that flag.
    opened = {e for e, ev in offline.items() if ev.offline and ev.offline.action is GateAction.OPEN}
    flagged = {event_id for event_id, _ in reused}
    assert opened - in_stays == flagged, (len(opened - in_stays), flagged)
    assert not (in_stays & flagged)


async def check_status(world: World) -> None:
    """Each gateway says how it is; the service then shows exactly that."""
    for lot in world.lots:
        for lane in lot.site.gateways():
            status = lane.gateway.status()
            assert status.queue_depth == 0
            assert await lane.gateway.uplink.publish_status(status)

    def shown() -> bool:
        with world.central.db() as db:
            rows = {(r.lot_id, r.gate_id): r for r in db.exec(select(GatewayStatusRecord)).all()}
        for lot in world.lots:
            for lane in lot.site.gateways():
                row = rows.get((lot.site.lot, lane.config.gate_id))
                if row is None or row.state != GatewayState.ONLINE.value:
                    return False
                if row.boot != lane.gateway.boot or row.queue_depth != 0:
                    return False
        return True

    await eventually(shown, timeout=10, what="every gateway's status at the service")


def exits_closing_later_stays(world: World, url: str) -> list[str]:
    """The live exits the service let close a stay that began after them (beyond the clock
    skew it allows, 5 s)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as db:
            began = {
                str(sid): at if at.tzinfo else at.replace(tzinfo=UTC)
                for sid, at in db.execute(
                    sa.text("select session_id, entered_at from parking_sessions")
                )
            }
    finally:
        engine.dispose()
    found = []
    for event, answer in world.arrivals:
        if (
            event.direction is Direction.EXIT
            and event.offline is None
            and isinstance(answer, GateCommand)
            and answer.action is GateAction.OPEN
            and answer.session_id in began
            and began[answer.session_id] > event.scanned_at + timedelta(seconds=5)
        ):
            found.append(
                f"exit {event.lot_id}/{event.gate_id} seq {event.seq} scanned"
                f" {event.scanned_at:%T.%f} closed stay {answer.session_id[-8:]}, which began"
                f" {began[answer.session_id]:%T.%f}"
            )
    return found


async def test_a_late_live_exit_does_not_close_a_stay_that_began_after_it(
    mosquitto: MosquittoProcess, tmp_path: Path, report: Report
) -> None:
    """What one driver's scans did at the service in a partition run (the lot whose links
    hung), replayed exactly.

    The driver: entry A1 (t0), exit X1 (t0+3 min), entry A2 (t0+5), exit X2 (t0+7), every
    one opened by its lane offline (no answer came). The lanes had published each scan
    live into the hung link; when it healed the scans reached the service live, late, each
    lane's in its own order: A2 first (opens a stay), then X1 (scanned before A2: it cannot
    end that stay), then A1 (re-sent with its offline decision), then X2. Right: two stays,
    t0-t0+3 and t0+5-t0+7, each paid once. The service instead ends A2's stay with X1, at
    t0+5, free.
    """
    clock = FakeClock()
    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path}/qrpark.db",
        mqtt_url=mosquitto.url,
        mqtt_client_id=f"central-{uuid.uuid4().hex[:8]}",
        key_file=tmp_path / "keys" / "signing.pem",
    )
    transport = MqttTransport(
        parse_broker_url(mosquitto.url), settings.mqtt_client_id, persistent=False
    )
    central = build_central(settings, clock=clock, transport=transport)
    await central.start()
    lot, account = f"rl{uuid.uuid4().hex[:6]}", "late"
    hand = HandGateway(MqttTransport(parse_broker_url(mosquitto.url), f"hand-{lot}"), [])
    try:
        assert await transport.wait_connected(10)
        tariff = TariffSchema(grace_minutes=0, hourly_minor=HOURLY, daily_cap_minor=6000)
        central.create_lot(LotCreate(lot_id=lot, name="Late", capacity=10, tariff=tariff))
        for gate, direction in (("in1", Direction.ENTRY), ("out1", Direction.EXIT)):
            central.create_gate(lot, GateCreate(gate_id=gate, direction=direction))
            await hand.transport.subscribe(gate_topic(lot, gate, TopicKind.COMMANDS))
        central.create_account(AccountCreate(account_id=account, name="Late"))
        central.topup(account, START_BALANCE, idempotency_key="late-initial")
        await hand.transport.start()
        assert await hand.transport.wait_connected(10)
        reader = asyncio.create_task(collect_commands(hand))
        t0 = clock.now()

        def opened(gate: str, at: datetime) -> OfflineDecision:
            """What the lane decided, the decision timeout (3 s) after the scan."""
            reason = Reason.WELCOME if gate == "in1" else Reason.PAID
            return OfflineDecision(
                action=GateAction.OPEN, reason=reason, decided_at=at + timedelta(seconds=3)
            )

        def scan(gate: str, seq: int, minutes: int, *, offline: bool) -> ScanEvent:
            at = t0 + timedelta(minutes=minutes)
            return ScanEvent(
                event_id=new_id(),
                lot_id=lot,
                gate_id=gate,
                seq=seq,
                boot=1,
                direction=Direction.ENTRY if gate == "in1" else Direction.EXIT,
                code=central.issue_code(account, now=at).code,
                scanned_at=at,
                offline=opened(gate, at) if offline else None,
            )

        a1, a2 = scan("in1", 1, 0, offline=True), scan("in1", 2, 5, offline=False)
        x1, x2 = scan("out1", 1, 3, offline=False), scan("out1", 2, 7, offline=False)
        clock.advance(timedelta(minutes=9))  # the link heals; every scan is minutes old

        async def deliver(event: ScanEvent) -> None:
            """As the lane does: publish; an answer other than what the barrier did (it
            opened) makes it send the event again with its offline decision."""
            await hand.publish(event)
            (answer,) = await hand.answers(event, 1)
            if isinstance(answer, GateCommand) and answer.action is not GateAction.OPEN:
                decided = opened(event.gate_id, event.scanned_at)
                await hand.publish(event.model_copy(update={"offline": decided}))
                await hand.answers(event, 2)

        await deliver(a2)
        await deliver(x1)
        await deliver(a1)
        await deliver(x2)
        await central.wait_idle()
        reader.cancel()
        stays = sorted(
            (s.entered_at - t0, s.exited_at and s.exited_at - t0, s.state, s.settlement)
            for s in central.list_sessions(lot_id=lot, account_id=account)
        )
        report.events(4, lost=sum(1 for stay in stays if stay[2] != "closed"))
        minute = timedelta(minutes=1)
        right = [
            (0 * minute, 3 * minute, "closed", "paid"),
            (5 * minute, 7 * minute, "closed", "paid"),
        ]
        (x1_answer, *_) = await hand.answers(x1, 1)
        a2_stay = next(c.session_id for c in hand.commands if c.event_id == a2.event_id)
        if stays != right and x1_answer.session_id == a2_stay:
            raise LateExitClosesLaterStay(f"X1 ended A2's stay: stays {stays}, not {right}")
        assert stays == right
        assert central.balance(account) == START_BALANCE - 2 * HOURLY
    finally:
        await hand.transport.close()
        await central.stop()
