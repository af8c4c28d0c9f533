"""The central service without HTTP: database, keys, the MQTT bridge and the service layer.

``create_app`` wraps a :class:`Central` in FastAPI; tests and benchmarks drive one directly::

    central = build_central(settings, clock=FakeClock(), transport=broker.client("central"))
    await central.start()
    central.create_lot(LotCreate(lot_id="lot1", name="P1", capacity=10))
    ...
    await central.stop()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session

from parking_protocol.clock import Clock, SystemClock
from parking_protocol.qr_token import issue_code
from parking_protocol.transport import Transport
from server import db as database
from server.accounts import service as accounts
from server.accounts.models import AccountCreate, AccountRead, CodeRead, TopupRead
from server.config import ServerSettings
from server.errors import NotFoundError
from server.gateways import service as gateways
from server.gateways.models import GateCreate, GateRead
from server.keys import KeyRing, load_or_create_keys
from server.lots import service as lots
from server.lots.models import LotCreate, LotRead
from server.mqtt.bridge import BatchListener, Bridge, BridgeStats, Inbound, ScanHandler
from server.readcache import ReadCache, TokenCache
from server.sessions import service as sessions
from server.sessions.fastpath import FastPath
from server.sessions.flows import FlowConfig, Reply, handle_scan
from server.sessions.models import SessionRead
from server.signatures import SignatureChecker

__all__ = ["Central", "build_central"]

log = logging.getLogger(__name__)


class Central:
    """One running central service (composition result of :func:`build_central`).

    The service helpers (``create_lot``, ``topup``, ``issue_code`` ...) are synchronous
    database calls for tests, seeding and the CLI; async code runs them in a thread.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        engine: Engine,
        keys: KeyRing,
        clock: Clock,
        transport: Transport | None,
        owns_engine: bool,
        handler: ScanHandler = handle_scan,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.read_engine = database.read_only(engine)
        """For transactions that only read (SQLite: deferred, no write lock)."""
        self.reads = ReadCache(settings.api_read_cache_s)
        self.tokens = TokenCache(settings.api_token_cache_s)
        self.keys = keys
        self.clock = clock
        self.transport = transport
        self._owns_engine = owns_engine
        self.signatures = SignatureChecker()
        """Checks scanned codes' signatures ahead on its own thread (started with MQTT)."""
        self.flow_config = FlowConfig(
            keys=keys.public_keys(),
            skew=timedelta(seconds=settings.clock_skew_s),
            command_ttl=timedelta(seconds=settings.command_ttl_s),
            signatures=self.signatures,
        )
        self.bridge: Bridge | None = None
        self.batch_listeners: list[BatchListener] = []  # e.g. the panel's live feed
        if transport is not None:
            self.bridge = Bridge(
                transport,
                engine,
                clock,
                self.flow_config,
                shared_group=settings.mqtt_shared_group,
                max_batch=settings.max_batch,
                handler=handler,
                on_batch=self._notify,
                fast_path=FastPath(self.flow_config)
                if settings.event_fast_path and handler is handle_scan
                else None,
            )
        self.started = False

    def _notify(self, batch: Sequence[Inbound], replies: Sequence[Reply]) -> None:
        for lot_id in {item.ref.lot_id for item in batch}:
            self.reads.invalidate(lot_id)
        for listener in self.batch_listeners:
            listener(batch, replies)

    @property
    def stats(self) -> BridgeStats:
        return self.bridge.stats if self.bridge is not None else BridgeStats()

    async def start(self) -> None:
        """Migrate (when ``auto_migrate``), then connect MQTT and start the bridge."""
        if self.settings.auto_migrate:
            await asyncio.to_thread(database.upgrade, self.engine)
        if self.transport is not None and self.bridge is not None:
            self.signatures.start()
            await self.bridge.start()
            await self.transport.start()
        self.started = True
        log.info(
            "central started (key %s, mqtt %s)", self.keys.active.kid, self.transport is not None
        )

    async def stop(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
        if self.transport is not None:
            await self.transport.close()
        self.signatures.stop()
        if self._owns_engine:
            self.engine.dispose()
        self.started = False

    async def wait_idle(self) -> None:
        if self.bridge is not None:
            await self.bridge.wait_idle()

    # -- service helpers ------------------------------------------------------------------------
    @contextmanager
    def db(self) -> Iterator[Session]:
        """A session in a transaction committed on success (then cached reads are dropped)."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session
        self.forget_cached_reads()

    def forget_cached_reads(self) -> None:
        """After a write of this process: polled reads, token lookups and the lots, gates
        and tariffs the event fast path keeps are loaded anew."""
        self.reads.clear()
        self.tokens.clear()
        if self.bridge is not None and self.bridge.fast_path is not None:
            self.bridge.fast_path.forget()  # a lot, gate or tariff may have changed

    def create_lot(self, data: LotCreate) -> LotRead:
        with self.db() as session:
            return lots.lot_read(session, lots.create_lot(session, data, now=self.clock.now()))

    def get_lot(self, lot_id: str) -> LotRead:
        with self.db() as session:
            return lots.lot_read(session, lots.require_lot(session, lot_id))

    def create_gate(self, lot_id: str, data: GateCreate) -> GateRead:
        with self.db() as session:
            gate = gateways.create_gate(session, lot_id, data, now=self.clock.now())
            return gateways.gate_read(session, gate)

    def create_account(self, data: AccountCreate) -> AccountRead:
        with self.db() as session:
            account = accounts.create_account(session, data, now=self.clock.now())
            return accounts.account_read(session, account)

    def get_account(self, account_id: str) -> AccountRead:
        with self.db() as session:
            return accounts.account_read(session, accounts.require_account(session, account_id))

    def set_blocked(self, account_id: str, blocked: bool = True) -> AccountRead:
        with self.db() as session:
            return accounts.account_read(
                session, accounts.set_blocked(session, account_id, blocked)
            )

    def balance(self, account_id: str) -> int:
        return self.get_account(account_id).balance_minor

    def topup(self, account_id: str, amount_minor: int, *, idempotency_key: str) -> TopupRead:
        with Session(self.engine, expire_on_commit=False) as session:
            return accounts.topup(
                session,
                account_id,
                amount_minor,
                idempotency_key=idempotency_key,
                now=self.clock.now(),
            ).response

    def issue_code(self, account_id: str, *, now: datetime | None = None) -> CodeRead:
        """Sign a fresh dynamic code for an existing account with the active key."""
        with self.db() as session:
            if accounts.get_account(session, account_id) is None:
                raise NotFoundError(f"account {account_id!r} not found")
        return self.sign_code(account_id, now=now)

    def sign_code(self, account_id: str, *, now: datetime | None = None) -> CodeRead:
        """Sign a code without looking the account up (tests use it for unknown accounts)."""
        issued = now or self.clock.now()
        lifetime = timedelta(seconds=self.settings.code_lifetime_s)
        code = issue_code(
            self.keys.active.private_key,
            kid=self.keys.active.kid,
            account_id=account_id,
            now=issued,
            lifetime=lifetime,
        )
        issued_at = datetime.fromtimestamp(int(issued.timestamp()), issued.tzinfo)
        return CodeRead(
            code=code,
            kid=self.keys.active.kid,
            issued_at=issued_at,
            expires_at=issued_at + timedelta(seconds=max(1, int(lifetime.total_seconds()))),
        )

    def get_session(self, session_id: str) -> SessionRead:
        with self.db() as session:
            return sessions.session_read(sessions.require_session(session, session_id))

    def list_sessions(
        self, *, lot_id: str | None = None, account_id: str | None = None, state: str | None = None
    ) -> list[SessionRead]:
        with self.db() as session:
            found = sessions.list_sessions(
                session, lot_id=lot_id, account_id=account_id, state=state, limit=1000
            )
            return [sessions.session_read(item) for item in found]


def build_central(
    settings: ServerSettings,
    *,
    clock: Clock | None = None,
    transport: Transport | None = None,
    engine: Engine | None = None,
    handler: ScanHandler = handle_scan,
) -> Central:
    """Build (not start) the central service from settings.

    Without ``transport`` and with ``settings.mqtt_enabled``, a persistent MQTT 5 client to
    ``settings.mqtt_url`` is created; ``mqtt_enabled=False`` gives an API-only service.
    """
    owns_engine = engine is None
    if engine is None:
        engine = database.make_engine(settings.database_url)
    if transport is None and settings.mqtt_enabled:
        from parking_protocol.mqtt import MqttTransport, parse_broker_url

        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        transport = MqttTransport(
            parse_broker_url(settings.mqtt_url),
            settings.mqtt_client_id,
            username=settings.mqtt_username,
            password=password,
            persistent=True,
        )
    return Central(
        settings,
        engine=engine,
        keys=load_or_create_keys(settings.key_file),
        clock=clock or SystemClock(),
        transport=transport,
        owns_engine=owns_engine,
        handler=handler,
    )
