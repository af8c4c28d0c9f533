"""Polled reads and token lookups are cached per process, never served stale to this
process's own writes, and a write by another process shows within the cache's lifetime."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from api_support import API_TOKEN, asgi_client
from fastapi import FastAPI

from parking_protocol.clock import FakeClock
from parking_protocol.messages import GateCommand, ScanEvent, decode, encode, new_id
from parking_protocol.topics import TopicKind, gate_topic
from parking_protocol.transport import InMemoryBroker
from parking_protocol.types import Direction, Reason
from server.central import Central
from server.config import ServerSettings
from server.main import create_app
from server.readcache import CachedToken, ReadCache, TokenCache

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
    ticks.now += 0.9
    assert await cache.get("k", "lot1", load) == b"v1"
    ticks.now += 0.2
    assert await cache.get("k", "lot1", load) == b"v2"


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


async def test_own_writes_show_at_once_and_another_process_within_the_ttl(
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

    # Another service process closes that stay: this one sees it once its entry expires.
    engine = sa.create_engine(str(central.engine.url))
    with engine.begin() as conn:
        conn.execute(sa.text("update parking_sessions set state = 'void'"))
    engine.dispose()
    started = time.monotonic()
    while await occupancy(client) != 0:
        assert time.monotonic() - started < TTL_S + 1.0, "a stale read outlived the cache ttl"
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
