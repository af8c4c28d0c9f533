"""Polled reads and token lookups are cached per process, never served stale to this
process's own writes, and a write by another process shows within the cache's lifetime plus
one load: an expired read is answered at once while one background refresh loads it, within
a bound on staleness."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from api_support import API_TOKEN, asgi_client
from fastapi import FastAPI
from sqlmodel import Session

from parking_protocol.clock import FakeClock
from parking_protocol.messages import (
    GateCommand,
    GatewayState,
    GatewayStatus,
    ScanEvent,
    decode,
    encode,
    new_id,
)
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, Reason
from server.central import Central
from server.config import ServerSettings
from server.gateways import service as gateway_service
from server.lots import service as lots_service
from server.lots.models import TariffSchema
from server.main import create_app
from server.pricing import service as pricing_service
from server.pricing.models import TariffVersion
from server.readcache import CachedToken, ReadCache, TokenCache
from server.sessions import service as session_service

TTL_S = 0.5


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_misses_share_one_load_and_the_entry_lives_for_its_ttl() -> None:
    ticks = Ticks()
    cache = ReadCache(1.0, clock=ticks)
    gate = asyncio.Event()
    calls = 0

    async def load() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return f"v{calls}".encode()

    waiting = [asyncio.create_task(cache.get("k", "lot1", load)) for _ in range(20)]
    await asyncio.sleep(0)
    gate.set()
    assert set(await asyncio.gather(*waiting)) == {b"v1"}
    assert calls == 1
    assert cache.waits == 19
    ticks.now += 0.9
    assert await cache.get("k", "lot1", load) == b"v1"
    assert calls == 1
    ticks.now += 0.2  # expired: answered once more while the refresh runs
    assert await cache.get("k", "lot1", load) == b"v1"
    await settle()
    assert calls == 2
    assert await cache.get("k", "lot1", load) == b"v2"


class Loader:
    """A load the test releases: ``calls`` counts loads, each returns ``v<n>``."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.fail = False

    async def __call__(self) -> bytes:
        self.calls += 1
        n = self.calls
        await self.release.wait()
        if self.fail:
            raise ConnectionError("database unreachable")
        return f"v{n}".encode()


async def settle() -> None:
    """Let background refreshes (a task, then the load's own steps) run to the end."""
    for _ in range(10):
        await asyncio.sleep(0)


async def primed(ticks: Ticks, loader: Loader, *, ttl: float = 1.0) -> ReadCache:
    """A cache holding ``v1`` for ``("k", "lot1")``, loaded at ``ticks.now``."""
    cache = ReadCache(ttl, clock=ticks)
    loader.release.set()
    assert await cache.get("k", "lot1", loader) == b"v1"
    loader.release.clear()
    return cache


async def test_an_expired_entry_is_answered_at_once_while_exactly_one_refresh_loads_it() -> None:
    ticks, loader = Ticks(), Loader()
    cache = await primed(ticks, loader)
    assert cache.max_stale == 2.0  # default: two ttls
    ticks.now += 1.5
    # The refresh is blocked: every read, through get() or the fast path's peek(), is
    # answered from the expired entry without waiting, and only one refresh starts.
    answers = await asyncio.wait_for(
        asyncio.gather(*(cache.get("k", "lot1", loader) for _ in range(30))), 1
    )
    assert set(answers) == {b"v1"}
    assert cache.peek("k", "lot1") == b"v1"
    assert loader.calls == 2
    assert (cache.refreshes, cache.stale_hits, cache.waits) == (1, 31, 0)
    loader.release.set()
    await settle()
    assert cache.peek("k", "lot1") == b"v2"  # fresh for ttl from the refresh's start
    assert loader.calls == 2
    ticks.now += 0.99
    assert cache.peek("k", "lot1") == b"v2"
    assert loader.calls == 2


async def test_the_fast_path_refreshes_an_expired_entry_with_the_loader_it_was_loaded_with() -> (
    None
):
    ticks, loader = Ticks(), Loader()
    cache = await primed(ticks, loader)
    ticks.now += 1.0
    loader.release.set()
    assert cache.peek("k", "lot1") == b"v1"
    await settle()
    assert loader.calls == 2
    assert cache.peek("k", "lot1") == b"v2"


async def test_no_answer_comes_from_a_load_older_than_ttl_plus_max_stale() -> None:
    ticks, loader = Ticks(), Loader()
    cache = await primed(ticks, loader)
    ticks.now += 2.999  # loaded 3 s (ttl + max_stale) ago, minus a hair: still answered
    assert cache.peek("k", "lot1") == b"v1"
    loader.release.set()
    await settle()
    ticks.now += 3.0  # the refreshed entry is past its bound now too
    assert cache.peek("k", "lot1") is None
    reading = asyncio.create_task(cache.get("k", "lot1", loader))
    await settle()
    assert loader.calls == 3
    assert await reading == b"v3"  # waited for the load, not answered with v2


@pytest.mark.parametrize("drop", ["invalidate", "clear"])
async def test_a_dropped_entry_is_never_answered_nor_its_refresh_shared(drop: str) -> None:
    ticks, loader = Ticks(), Loader()
    cache = await primed(ticks, loader)
    ticks.now += 1.5
    assert cache.peek("k", "lot1") == b"v1"  # expired: a refresh (v2) starts, blocked
    await settle()
    assert loader.calls == 2
    # This process writes: the refresh began before the write, so it may have read the
    # old state. Neither the entry nor that refresh may answer from now on.
    cache.invalidate("lot1") if drop == "invalidate" else cache.clear()
    assert cache.peek("k", "lot1") is None
    reading = asyncio.create_task(cache.get("k", "lot1", loader))
    await settle()
    assert not reading.done()  # waits for its own load (v3), not for the refresh (v2)
    assert loader.calls == 3
    loader.release.set()
    assert await reading == b"v3"
    await settle()
    assert cache.peek("k", "lot1") == b"v3"  # the overtaken refresh did not store v2


async def test_a_read_after_an_invalidation_does_not_share_a_load_that_began_before_it() -> None:
    cache = ReadCache(10.0, clock=Ticks())
    loader = Loader()
    first = asyncio.create_task(cache.get("k", "lot1", loader))
    await settle()
    cache.invalidate("lot1")
    second = asyncio.create_task(cache.get("k", "lot1", loader))
    await settle()
    assert loader.calls == 2
    loader.release.set()
    assert (await first, await second) == (b"v1", b"v2")
    assert cache.peek("k", "lot1") == b"v2"


async def test_a_failed_refresh_is_logged_and_the_last_answer_kept_only_within_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ticks, loader = Ticks(), Loader()
    cache = await primed(ticks, loader)
    loader.fail = True
    loader.release.set()
    ticks.now += 1.2
    with caplog.at_level(logging.WARNING, logger="server.readcache"):
        assert await cache.get("k", "lot1", loader) == b"v1"
        await settle()
    assert cache.refresh_failures == 1
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "failed" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is not None
    # Still answered; the next refresh only after ttl, not on every read.
    ticks.now += 0.9
    assert await cache.get("k", "lot1", loader) == b"v1"
    await settle()
    assert loader.calls == 2
    ticks.now += 0.2  # ttl after the failure: one retry, failing again
    assert await cache.get("k", "lot1", loader) == b"v1"
    await settle()
    assert (loader.calls, cache.refresh_failures) == (3, 2)
    ticks.now += 0.7  # 3 s after the load began: past the bound, the read waits and fails
    with pytest.raises(ConnectionError):
        await cache.get("k", "lot1", loader)
    assert cache.peek("k", "lot1") is None


async def test_a_load_overtaken_by_an_invalidation_is_not_kept() -> None:
    cache = ReadCache(10.0, clock=Ticks())
    values = iter([b"stale", b"fresh"])

    async def load() -> bytes:
        value = next(values)
        cache.invalidate("lot1")  # the bridge committed an event while this read ran
        return value

    assert await cache.get("k", "lot1", load) == b"stale"  # what it read, once
    assert await cache.get("k", "lot1", lambda: _const(b"next")) == b"next"


async def _const(value: bytes) -> bytes:
    return value


async def test_a_failed_load_fails_its_waiters_and_is_not_cached() -> None:
    cache = ReadCache(10.0, clock=Ticks())

    async def broken() -> bytes:
        await asyncio.sleep(0)
        raise LookupError("no such lot")

    results = await asyncio.gather(
        *(cache.get("k", "lot1", broken) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, LookupError) for r in results)
    assert await cache.get("k", "lot1", lambda: _const(b"ok")) == b"ok"


def test_a_token_cleared_while_it_was_looked_up_is_not_remembered() -> None:
    ticks = Ticks()
    tokens = TokenCache(5.0, clock=ticks)
    token = CachedToken("t1", "ci", "viewer")
    epoch = tokens.epoch()
    tokens.clear()  # revoked meanwhile
    tokens.put("h", token, epoch=epoch)
    assert tokens.get("h") is None
    tokens.put("h", token, epoch=tokens.epoch())
    assert tokens.get("h") == token
    ticks.now += 5.0
    assert tokens.get("h") is None


# -- through the app -------------------------------------------------------------------------
@pytest.fixture
def app(sqlite_url: str, tmp_path: Path, clock: FakeClock, broker: InMemoryBroker) -> FastAPI:
    settings = ServerSettings(
        database_url=sqlite_url,
        key_file=tmp_path / "keys" / "signing.pem",
        bootstrap_api_token=API_TOKEN,
        api_read_cache_s=TTL_S,
        api_token_cache_s=TTL_S,
    )
    return create_app(settings, clock=clock, transport=broker.client("central"))


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as client:
        yield client


def central_of(app: FastAPI) -> Central:
    central: Central = app.state.central
    return central


async def occupancy(client: httpx.AsyncClient) -> int:
    response = await client.get("/api/v1/lots/lot1")
    assert response.status_code == 200, response.text
    value: int = response.json()["occupancy"]["open_sessions"]
    return value


async def test_own_writes_show_at_once_and_another_process_within_the_ttl_and_one_load(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock, broker: InMemoryBroker
) -> None:
    lot = {"lot_id": "lot1", "name": "Main", "capacity": 10}
    assert (await client.post("/api/v1/lots", json=lot)).status_code == 201
    gate = {"gate_id": "in1", "direction": "entry"}
    assert (await client.get("/api/v1/lots/lot1/gates")).json() == []
    assert (await client.post("/api/v1/lots/lot1/gates", json=gate)).status_code == 201
    assert [g["gate_id"] for g in (await client.get("/api/v1/lots/lot1/gates")).json()] == ["in1"]
    assert (
        await client.post("/api/v1/accounts", json={"account_id": "alice", "name": "Alice"})
    ).status_code == 201
    central = central_of(app)
    gateway = broker.client("gw")
    await gateway.start()
    await gateway.subscribe(gate_topic("lot1", "in1", TopicKind.COMMANDS))
    code = central.issue_code("alice").code
    assert await occupancy(client) == 0  # cached now

    # An entry through this process's bridge: the lot's cached read is dropped on commit.
    event = ScanEvent(
        event_id=new_id(),
        lot_id="lot1",
        gate_id="in1",
        seq=0,
        boot=1,
        direction=Direction.ENTRY,
        code=code,
        scanned_at=clock.now(),
    )
    await gateway.publish(gate_topic("lot1", "in1", TopicKind.EVENTS), encode(event))
    answer = await asyncio.wait_for(anext(aiter(gateway.messages())), 5)
    assert decode(answer.payload, GateCommand).reason == Reason.WELCOME
    await central.wait_idle()
    assert await occupancy(client) == 1

    # Another service process closes that stay: this one sees it once its entry expired and
    # one refresh loaded it (the first read after the expiry may still answer 1).
    engine = sa.create_engine(str(central.engine.url))
    with engine.begin() as conn:
        conn.execute(sa.text("update parking_sessions set state = 'void'"))
    engine.dispose()
    started = time.monotonic()
    while await occupancy(client) != 0:
        assert time.monotonic() - started < TTL_S + 1.0, "a stale read outlived ttl + one load"
        await asyncio.sleep(0.05)


async def test_a_token_revoked_in_another_process_stops_working_within_the_ttl(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    created = await client.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"})
    assert created.status_code == 201, created.text
    secret = created.json()["token"]
    other = {"Authorization": f"Bearer {secret}"}
    assert (await client.get("/api/v1/lots", headers=other)).status_code == 200  # cached

    engine = sa.create_engine(str(central_of(app).engine.url))
    with engine.begin() as conn:
        conn.execute(sa.text("update api_tokens set revoked_at = CURRENT_TIMESTAMP"))
    engine.dispose()
    started = time.monotonic()
    while (await client.get("/api/v1/lots", headers=other)).status_code == 200:
        assert time.monotonic() - started < TTL_S + 1.0, "a revoked token outlived the ttl"
        await asyncio.sleep(0.05)
    assert (await client.get("/api/v1/lots", headers=other)).status_code == 401


async def test_the_cached_fast_path_answers_only_known_tokens(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    lot = {"lot_id": "lot1", "name": "Main", "capacity": 10}
    assert (await client.post("/api/v1/lots", json=lot)).status_code == 201
    created = await client.post("/api/v1/tokens", json={"name": "wall", "role": "viewer"})
    secret, token_id = created.json()["token"], created.json()["token_id"]
    viewer = {"Authorization": f"Bearer {secret}"}
    first = await client.get("/api/v1/lots/lot1", headers=viewer)
    reads = central_of(app).reads
    hits = reads.hits
    again = await client.get("/api/v1/lots/lot1", headers=viewer)
    assert reads.hits == hits + 1  # answered from the cache
    assert again.json() == first.json()
    assert again.headers["content-type"] == "application/json"

    # Neither anonymous nor a wrong token gets the cached body.
    assert (await client.get("/api/v1/lots/lot1", headers={"Authorization": ""})).status_code == 401
    wrong = {"Authorization": "Bearer qrp_not-a-token-at-all-0123456789"}
    assert (await client.get("/api/v1/lots/lot1", headers=wrong)).status_code == 401
    # Revoked here: refused at once, although the lot's body is still cached.
    assert (await client.delete(f"/api/v1/tokens/{token_id}")).status_code == 204
    assert (await client.get("/api/v1/lots/lot1", headers=viewer)).status_code == 401
    assert (await client.get("/api/v1/lots/nope", headers=viewer)).status_code == 401
    assert (await client.get("/api/v1/lots/nope")).status_code == 404


async def test_the_cached_gates_read_is_what_the_gates_service_reads(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The polled gates read is one Core query; it answers what ``gate_read`` does."""
    for lot_id in ("lot1", "bare"):
        lot = {"lot_id": lot_id, "name": lot_id, "capacity": 10}
        assert (await client.post("/api/v1/lots", json=lot)).status_code == 201
    for gate_id, direction in [
        ("out1", "exit"),
        ("in1", "entry"),
        ("a9", "exit"),
        ("in2", "entry"),
    ]:
        gate = {"gate_id": gate_id, "direction": direction, "name": f"Gate {gate_id}"}
        assert (await client.post("/api/v1/lots/lot1/gates", json=gate)).status_code == 201
    central = central_of(app)
    with central.db() as db:
        offline = ("out1", GatewayState.OFFLINE, "camera")
        for gate_id, state, error in [("in1", GatewayState.ONLINE, None), offline]:
            status = GatewayStatus(
                status_id=new_id(),
                lot_id="lot1",
                gate_id=gate_id,
                state=state,
                firmware_version="0.9.1",
                boot=7,
                sent_at=clock.now(),
                queue_depth=3,
                last_error=error,
            )
            assert gateway_service.record_status(db, status, now=clock.now())
    with Session(central.engine) as db:
        expected = [
            gateway_service.gate_read(db, gate).model_dump(mode="json")
            for gate in gateway_service.list_gates(db, "lot1")
        ]
    answered = (await client.get("/api/v1/lots/lot1/gates")).json()
    assert answered == expected
    assert [g["gate_id"] for g in answered] == ["a9", "in1", "in2", "out1"]
    assert [g["status"] and g["status"]["online"] for g in answered] == [None, True, None, False]
    assert (await client.get("/api/v1/lots/bare/gates")).json() == []
    missing = await client.get("/api/v1/lots/nope/gates")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "lot 'nope' not found"}


async def test_the_cached_lot_read_is_what_the_lots_service_reads(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The polled lot read is one Core query; it answers what ``lot_read`` does at now:
    the open sessions, and the tariff version in force (the latest effective by now, the
    newest among equals, else the first)."""
    start = clock.now()
    lot = {"lot_id": "lot1", "name": "Main", "capacity": 2, "payment_policy": "pay_later"}
    assert (await client.post("/api/v1/lots", json=lot)).status_code == 201
    gate = {"gate_id": "in1", "direction": "entry"}
    assert (await client.post("/api/v1/lots/lot1/gates", json=gate)).status_code == 201
    central = central_of(app)
    for n in range(3):
        account = {"account_id": f"d{n}", "name": "D"}
        assert (await client.post("/api/v1/accounts", json=account)).status_code == 201
    with central.db() as db:
        for n, state in enumerate(["open", "open", "void"]):
            parking = session_service.open_session(
                db,
                account_id=f"d{n}",
                lot_id="lot1",
                gate_id="in1",
                event_id=new_id(),
                entered_at=start,
                currency="CNY",
            )
            parking.state = state
        for hours, hourly in [(2, 700), (1, 900), (1, 800), (-1, 100)]:
            pricing_service.add_version(
                db,
                lot_id="lot1",
                currency="CNY",
                tariff=TariffSchema(hourly_minor=hourly),
                effective_from=start + timedelta(hours=hours),
                now=start,
                allow_past=True,
            )

    async def compare() -> dict[str, object]:
        central.reads.clear()  # the fake clock moved; the cache does not know
        with Session(central.engine) as db:
            lot = lots_service.require_lot(db, "lot1")
            expected = lots_service.lot_read(db, lot, now=clock.now()).model_dump(mode="json")
        answered: dict[str, object] = (await client.get("/api/v1/lots/lot1")).json()
        assert answered == expected
        return answered

    # v1 (at start) is newer than v5 (an hour before it); v3 and v4 tie at +1 h; v2 at +2 h.
    for hours, version, hourly in [(0, 1, 500), (1, 4, 800), (3, 2, 700)]:
        clock.set(start + timedelta(hours=hours))
        answered = await compare()
        assert (answered["tariff_version"], answered["tariff"]["hourly_minor"]) == (version, hourly)  # type: ignore[index]
    assert answered["occupancy"] == {"open_sessions": 2, "capacity": 2, "full": True}
    assert answered["payment_policy"] == "pay_later"
    # Nothing in force yet: the first version.
    with central.db() as db:
        db.execute(sa.update(TariffVersion).values(effective_from=start + timedelta(days=9)))
    assert (await compare())["tariff_version"] == 1
    # No tariff at all, no such lot: the service's answers.
    with central.db() as db:
        db.execute(sa.delete(TariffVersion))
    central.reads.clear()
    no_tariff = await client.get("/api/v1/lots/lot1")
    assert (no_tariff.status_code, no_tariff.json()) == (
        404,
        {"detail": "lot 'lot1' has no tariff"},
    )
    missing = await client.get("/api/v1/lots/nope")
    assert (missing.status_code, missing.json()) == (404, {"detail": "lot 'nope' not found"})


async def test_requests_missing_the_token_cache_together_share_one_lookup(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy token's cache entry expires: the requests that miss while its lookup runs
    wait for that one lookup instead of each querying the database."""
    from server.auth import api as auth_api

    real = auth_api._load_token
    lookups: list[str] = []

    def slow_lookup(central: Central, secret: str) -> CachedToken | None:
        lookups.append(secret)
        time.sleep(0.05)  # the others arrive meanwhile
        return real(central, secret)

    monkeypatch.setattr(auth_api, "_load_token", slow_lookup)
    central_of(app).tokens.clear()
    responses = await asyncio.gather(*(client.get("/api/v1/lots") for _ in range(10)))
    assert [r.status_code for r in responses] == [200] * 10
    assert lookups == [API_TOKEN]


async def test_when_the_shared_token_lookup_fails_the_waiting_requests_look_up_themselves(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.auth import api as auth_api

    real = auth_api._load_token
    lookups: list[str] = []

    def first_fails(central: Central, secret: str) -> CachedToken | None:
        lookups.append(secret)
        time.sleep(0.05)
        if len(lookups) == 1:
            raise sa.exc.OperationalError("select", {}, Exception("connection lost"))
        return real(central, secret)

    monkeypatch.setattr(auth_api, "_load_token", first_fails)
    central_of(app).tokens.clear()
    responses = await asyncio.gather(
        *(client.get("/api/v1/lots") for _ in range(5)), return_exceptions=True
    )
    answered = [r for r in responses if isinstance(r, httpx.Response) and r.status_code == 200]
    assert len(answered) >= 4  # the first request's own lookup failed; the rest were answered
    assert 2 <= len(lookups) <= 5


async def test_a_request_after_a_revocation_does_not_take_a_lookup_that_began_before_it(
    app: FastAPI, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup starts while the token is live; the token is revoked (this process clears
    its token cache); a request arriving then must not be let in by that lookup's answer."""
    from server.auth import api as auth_api

    real = auth_api._load_token
    lookups: list[str] = []

    def live_then_revoked(central: Central, secret: str) -> CachedToken | None:
        lookups.append(secret)
        if len(lookups) == 1:
            time.sleep(0.1)  # began before the revocation, answers after it
            return real(central, secret)
        return None  # revoked

    monkeypatch.setattr(auth_api, "_load_token", live_then_revoked)
    central = central_of(app)
    central.tokens.clear()
    first = asyncio.create_task(client.get("/api/v1/lots"))
    while not lookups:  # noqa: ASYNC110 - waits for the first lookup to begin
        await asyncio.sleep(0.005)
    central.tokens.clear()  # what a revocation's commit does in this process
    after = await client.get("/api/v1/lots")
    assert after.status_code == 401, after.text
    assert (await first).status_code == 200  # its own lookup began before the revocation
    assert len(lookups) == 2
