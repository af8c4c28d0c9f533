"""The offline story end to end: real firmware, real Mosquitto, the real central service.

Each gateway reaches the broker through its own :class:`~sim_devices.netfault.TcpProxy`,
so a test cuts one lane off (connections reset, reconnects refused) while the central
service and the other lane stay online. Time is a FakeClock shared by the service and the
gateways: "ten minutes" pass in milliseconds, so tariffs and code lifetimes are exact.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from parking_protocol.clock import FakeClock
from parking_protocol.mqtt import MqttTransport, parse_broker_url
from parking_protocol.qr_token import public_key_text
from parking_protocol.types import DENY_TEXT, Direction, Reason
from qrpark.services import MosquittoProcess
from server.accounts.models import AccountCreate
from server.central import Central, build_central
from server.config import ServerSettings
from server.gateways.models import GateCreate
from server.lots.models import LotCreate, TariffSchema
from server.sessions.models import SessionRead
from sim_devices.lot import SimLane, SimLaneConfig, start_sim_lane
from sim_devices.netfault import TcpProxy
from sim_devices.traffic import Driver, Phone, pass_lane

pytestmark = [pytest.mark.e2e, pytest.mark.broker]

LOT = "off1"
HOURLY = 500  # ¥5.00 per started hour, no grace period: every stay costs something
BALANCE = 10_000
ACCOUNTS = ("alice", "bob", "carol", "dave")


@dataclass
class OfflineLot:
    central: Central
    clock: FakeClock
    entry: SimLane
    exit: SimLane
    entry_link: TcpProxy
    exit_link: TcpProxy

    def driver(self, account_id: str) -> Driver:
        async def source(account: str) -> str:
            return (await asyncio.to_thread(self.central.issue_code, account)).code

        return Driver(account_id, Phone(account_id, source, self.clock))

    def sessions(self, account_id: str) -> list[SessionRead]:
        return self.central.list_sessions(lot_id=LOT, account_id=account_id)

    async def cut(self, lane: SimLane) -> None:
        await self._link(lane).sever()
        await eventually(lambda: not lane.gateway.uplink.connected, what="gateway offline")

    async def heal_and_drain(self, lane: SimLane) -> None:
        await self._link(lane).heal()
        await eventually(lambda: lane.gateway.uplink.connected, what="gateway reconnected")
        await eventually(lambda: lane.gateway.outbox.depth == 0, what="outbox drained")
        await self.central.wait_idle()

    def _link(self, lane: SimLane) -> TcpProxy:
        return self.entry_link if lane is self.entry else self.exit_link


async def eventually(
    check: Callable[[], bool], timeout: float = 15.0, what: str = "condition"
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def lot(mosquitto: MosquittoProcess, tmp_path: Path) -> AsyncIterator[OfflineLot]:
    clock = FakeClock()
    client_id = f"central-{uuid.uuid4().hex[:8]}"
    settings = ServerSettings(
        database_url=f"sqlite:///{tmp_path}/qrpark.db",
        mqtt_url=mosquitto.url,
        mqtt_client_id=client_id,
        key_file=tmp_path / "keys" / "signing.pem",
    )
    transport = MqttTransport(parse_broker_url(mosquitto.url), client_id, persistent=False)
    central = build_central(settings, clock=clock, transport=transport)
    await central.start()
    assert await transport.wait_connected(10)
    tariff = TariffSchema(grace_minutes=0, hourly_minor=HOURLY, daily_cap_minor=6000)
    central.create_lot(LotCreate(lot_id=LOT, name="Offline Plaza", capacity=50, tariff=tariff))
    central.create_gate(LOT, GateCreate(gate_id="in1", direction=Direction.ENTRY))
    central.create_gate(LOT, GateCreate(gate_id="out1", direction=Direction.EXIT))
    for account in ACCOUNTS:
        central.create_account(AccountCreate(account_id=account, name=account.title()))
        central.topup(account, BALANCE, idempotency_key=f"{account}-initial")
    keys = {kid: public_key_text(key) for kid, key in central.keys.public_keys().items()}
    links = [
        await TcpProxy("127.0.0.1", mosquitto.port, name=f"link-{gate}").start()
        for gate in ("in1", "out1")
    ]

    def config(gate: str, direction: Direction, link: TcpProxy) -> SimLaneConfig:
        return SimLaneConfig(
            lot_id=LOT,
            gate_id=gate,
            direction=direction,
            broker_url=link.url,
            public_keys=keys,
            data_dir=tmp_path / "gateways",
            fps=30,
            seed=7,
            extra={"reconnect_max_s": 0.3},
        )

    entry = await start_sim_lane(config("in1", Direction.ENTRY, links[0]), clock)
    exit_ = await start_sim_lane(config("out1", Direction.EXIT, links[1]), clock)
    for lane in (entry, exit_):
        assert await lane.gateway.uplink.transport.wait_connected(10)  # type: ignore[attr-defined]
    try:
        yield OfflineLot(central, clock, entry, exit_, links[0], links[1])
    finally:
        await entry.stop()
        await exit_.stop()
        for link in links:
            await link.close()
        await central.stop()


async def test_lot_cut_off_ten_minutes_with_traffic_reconciles_exactly(lot: OfflineLot) -> None:
    alice, bob, carol, dave = (lot.driver(name) for name in ACCOUNTS)
    t0 = lot.clock.now()
    assert (await pass_lane(lot.entry.lane, alice)).opened
    assert (await pass_lane(lot.entry.lane, bob)).opened

    lot.clock.advance(timedelta(hours=1))
    t1 = lot.clock.now()
    await lot.cut(lot.entry)
    await lot.cut(lot.exit)

    # Ten simulated minutes without the central service.
    alice_code = await alice.phone.current_code()
    assert (await pass_lane(lot.exit.lane, alice)).opened  # t1: exit, settled later
    # A screenshot of alice's code, shown again a little later, is refused by the lane alone.
    lot.clock.advance(timedelta(seconds=10))
    lot.exit.scene.vehicle_arrives("copycat")
    lot.exit.scene.show_code(alice_code)
    await eventually(lambda: DENY_TEXT[Reason.CODE_REPLAYED] in lot.exit.display.texts)
    lot.exit.scene.vehicle_leaves()
    await eventually(lambda: lot.exit.gateway.lane.state == "idle")
    lot.clock.advance(timedelta(seconds=110))
    assert (await pass_lane(lot.entry.lane, carol)).opened  # t1+2: offline entry
    lot.clock.advance(timedelta(minutes=3))
    assert (await pass_lane(lot.entry.lane, dave)).opened  # t1+5
    lot.clock.advance(timedelta(minutes=3))
    assert (await pass_lane(lot.exit.lane, carol)).opened  # t1+8: a 6-minute offline stay
    lot.clock.advance(timedelta(minutes=2))

    assert lot.sessions("carol") == [] and lot.sessions("dave") == []  # nothing arrived yet
    assert lot.entry.gateway.outbox.depth == 2
    assert lot.exit.gateway.outbox.depth == 2
    assert lot.entry.gateway.stats.offline_decisions == 2
    assert lot.exit.gateway.stats.offline_decisions == 2

    # The entry lane's link comes back first, then the exit's: every event is reconciled.
    await lot.heal_and_drain(lot.entry)
    await lot.heal_and_drain(lot.exit)
    assert lot.entry.gateway.stats.events_replayed == 2
    assert lot.exit.gateway.stats.events_replayed == 2
    assert lot.entry.gateway.stats.acks == 2
    assert lot.exit.gateway.stats.acks == 2

    (a,) = lot.sessions("alice")
    assert (a.state, a.entered_at, a.exited_at, a.offline_exit) == ("closed", t0, t1, True)
    assert a.amount is not None and a.amount.amount_minor == HOURLY
    (b,) = lot.sessions("bob")
    assert b.state == "open"
    (c,) = lot.sessions("carol")
    assert (c.state, c.offline_entry, c.offline_exit) == ("closed", True, True)
    assert (c.entered_at, c.exited_at) == (t1 + timedelta(minutes=2), t1 + timedelta(minutes=8))
    assert c.amount is not None and c.amount.amount_minor == HOURLY
    (d,) = lot.sessions("dave")
    assert (d.state, d.entered_at, d.offline_entry) == ("open", t1 + timedelta(minutes=5), True)

    # Online again: dave's exit is priced from his offline entry time (2 h 5 min: 3 hours).
    lot.clock.advance(timedelta(hours=2))
    assert (await pass_lane(lot.exit.lane, dave)).opened
    (d,) = lot.sessions("dave")
    assert d.state == "closed" and d.amount is not None and d.amount.amount_minor == 3 * HOURLY

    balances = {name: lot.central.balance(name) for name in ACCOUNTS}
    assert balances == {
        "alice": BALANCE - HOURLY,
        "bob": BALANCE,
        "carol": BALANCE - HOURLY,
        "dave": BALANCE - 3 * HOURLY,
    }
    assert lot.central.get_lot(LOT).occupancy.open_sessions == 1  # bob
    for lane in (lot.entry, lot.exit):
        lane.gate.assert_never_closed_on_vehicle()
        assert lane.gateway.outbox.depth == 0


async def test_replaying_twice_changes_nothing(lot: OfflineLot) -> None:
    """A gateway that replays its outbox again (a lost ack) doubles no session or charge."""
    carol = lot.driver("carol")
    assert lot.entry.lane is lot.entry.lane  # one lane, one lock: cars queue one at a time
    await lot.cut(lot.entry)
    assert (await pass_lane(lot.entry.lane, carol)).opened
    (pending,) = lot.entry.gateway.outbox.pending()
    await lot.heal_and_drain(lot.entry)
    # The ack was lost, say: the same event comes again, twice.
    for _ in range(2):
        assert await lot.entry.gateway.uplink.publish_event(pending)
    await eventually(lambda: lot.entry.gateway.stats.acks == 3, what="acks for the duplicates")
    assert len(lot.sessions("carol")) == 1
    lot.clock.advance(timedelta(minutes=30))
    assert (await pass_lane(lot.exit.lane, carol)).opened
    assert lot.central.balance("carol") == BALANCE - HOURLY


async def test_offline_exit_arriving_before_its_offline_entry_is_settled(
    lot: OfflineLot,
) -> None:
    carol = lot.driver("carol")
    await lot.cut(lot.entry)
    await lot.cut(lot.exit)
    t1 = lot.clock.now()
    assert (await pass_lane(lot.entry.lane, carol)).opened
    lot.clock.advance(timedelta(minutes=90))
    assert (await pass_lane(lot.exit.lane, carol)).opened
    # The exit lane's link comes back first.
    await lot.heal_and_drain(lot.exit)
    await lot.heal_and_drain(lot.entry)
    sessions = lot.sessions("carol")
    assert [(s.state, s.entered_at, s.exited_at) for s in sessions] == [
        ("closed", t1, t1 + timedelta(minutes=90))
    ]
    assert lot.central.balance("carol") == BALANCE - 2 * HOURLY
    assert lot.central.get_lot(LOT).occupancy.open_sessions == 0


async def test_slow_service_late_deny_after_an_offline_exit_is_reconciled(
    lot: OfflineLot,
) -> None:
    lot.central.create_account(AccountCreate(account_id="erin", name="Erin"))
    lot.central.topup("erin", 100, idempotency_key="erin-initial")  # ¥1.00: short of money
    erin = lot.driver("erin")
    assert (await pass_lane(lot.entry.lane, erin)).opened
    lot.clock.advance(timedelta(hours=3))

    lot.exit_link.stall()  # the service is slow to answer: nothing moves for a while
    leaving = asyncio.create_task(pass_lane(lot.exit.lane, erin))
    await eventually(lambda: lot.exit.gateway.lane.awaiting_event_id is not None)
    lot.clock.advance(timedelta(seconds=3))  # the decision timeout: exits open offline
    assert (await leaving).opened
    lot.exit_link.unstall()
    await eventually(lambda: lot.exit.gateway.stats.late_disagreements == 1)
    await eventually(lambda: lot.exit.gateway.outbox.depth == 0)
    await lot.central.wait_idle()

    (session,) = lot.sessions("erin")
    assert session.state == "closed"  # the car is gone: the stay is settled, as a debt
    assert session.settlement == "owed"
    assert lot.central.balance("erin") == 100  # the wallet is untouched ...
    assert lot.central.get_account("erin").debt_minor == 3 * HOURLY  # ... the stay is owed
