"""Operator actions: roles decide who may act; every action is audited and reaches MQTT."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
from fastapi import FastAPI
from panel_support import START, add_user, central_of, signed_in

from parking_protocol.clock import FakeClock
from parking_protocol.messages import DenyList, GateCommand, decode
from parking_protocol.topics import TopicKind, all_gates_filter, denylist_topic
from parking_protocol.transport import InMemoryBroker, InMemoryTransport
from parking_protocol.types import GateAction, Reason
from server.audit import service as audit
from server.auth.models import Role


async def listen(broker: InMemoryBroker, topic_filter: str) -> InMemoryTransport:
    gateway = broker.client(f"gw-listener-{topic_filter.count('/')}")
    await gateway.start()
    await gateway.subscribe(topic_filter)
    return gateway


async def next_message(gateway: InMemoryTransport) -> object:
    message = await asyncio.wait_for(anext(aiter(gateway.messages())), 2)
    return decode(message.payload)


def entries(app: FastAPI, action: str) -> list[audit.AuditRead]:
    with central_of(app).db() as db:
        return audit.list_entries(db, action=action)


async def test_viewer_cannot_open_a_gate_in_the_ui_or_the_api(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    add_user(app, "vera", Role.VIEWER)
    token = await signed_in(client, "vera", "password-123")
    gateway = await listen(broker, all_gates_filter(TopicKind.COMMANDS))

    page = await client.get("/panel/gates/lot1/in1")
    form = await client.post(
        "/panel/gates/lot1/in1/open", data={"reason": "let me in", "csrf_token": token}
    )
    api = await client.post(
        "/panel/api/gates/lot1/in1/open",
        json={"reason": "let me in"},
        headers={"X-CSRF-Token": token},
    )

    assert page.status_code == 200
    assert 'id="open-form"' not in page.text
    assert "can watch gates but not open them" in page.text
    assert form.status_code == 403
    assert "needs the operator role" in form.text
    assert api.status_code == 403
    assert api.json() == {"detail": "This needs the operator role."}
    assert entries(app, "gate.manual_open") == []
    await asyncio.sleep(0.05)
    assert gateway._queue.empty()


async def test_viewer_cannot_block_accounts_or_manage_users(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    add_user(app, "vera", Role.VIEWER)
    token = await signed_in(client, "vera", "password-123")

    block = await client.post(
        "/panel/api/accounts/bob/block",
        json={"blocked": True, "reason": "fraud"},
        headers={"X-CSRF-Token": token},
    )
    users = await client.get("/panel/users")

    assert block.status_code == 403
    assert users.status_code == 403
    assert central_of(app).get_account("bob").blocked is False


async def test_operator_opens_a_gate_manually_with_a_reason_and_it_is_audited(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    add_user(app, "otto", Role.OPERATOR)
    token = await signed_in(client, "otto", "password-123")
    gateway = await listen(broker, all_gates_filter(TopicKind.COMMANDS))

    response = await client.post(
        "/panel/gates/lot1/in1/open",
        data={"reason": "phone battery flat", "csrf_token": token},
    )

    assert response.status_code == 303
    command = await next_message(gateway)
    assert isinstance(command, GateCommand)
    assert (command.lot_id, command.gate_id) == ("lot1", "in1")
    assert command.event_id is None
    assert (command.action, command.reason) == (GateAction.OPEN, Reason.MANUAL_OPEN)
    assert command.issued_at == START
    assert command.deadline == START + timedelta(seconds=10)
    [entry] = entries(app, "gate.manual_open")
    assert (entry.actor, entry.target_id, entry.reason) == (
        "user:otto",
        "lot1/in1",
        "phone battery flat",
    )
    assert entry.details["command_id"] == command.command_id
    page = await client.get("/panel/gates/lot1/in1")
    assert "Open sent to lot1/in1" in page.text
    assert "phone battery flat" in page.text
    assert app.state.panel.hub.recent()[-1]["kind"] == "manual_open"


async def test_a_manual_open_needs_a_reason_and_a_known_gate(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    token = await signed_in(client)
    headers = {"X-CSRF-Token": token}

    no_reason = await client.post(
        "/panel/api/gates/lot1/in1/open", json={"reason": " "}, headers=headers
    )
    no_gate = await client.post(
        "/panel/api/gates/lot1/nope/open", json={"reason": "testing"}, headers=headers
    )

    assert no_reason.status_code == 422
    assert no_gate.status_code == 404
    assert entries(app, "gate.manual_open") == []


async def test_a_manual_open_the_broker_cannot_take_is_reported_and_audited(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker
) -> None:
    token = await signed_in(client)
    await broker.cut("central")

    response = await client.post(
        "/panel/api/gates/lot1/in1/open",
        json={"reason": "testing"},
        headers={"X-CSRF-Token": token},
    )

    assert response.status_code == 503
    assert response.json()["sent"] is False
    assert len(entries(app, "gate.manual_open")) == 1
    assert len(entries(app, "gate.manual_open_failed")) == 1


async def test_blocking_an_account_is_audited_and_reaches_every_lot_as_a_retained_denylist(
    client: httpx.AsyncClient, app: FastAPI, broker: InMemoryBroker, clock: FakeClock
) -> None:
    token = await signed_in(client)

    response = await client.post(
        "/panel/accounts/bob/block",
        data={"blocked": "true", "reason": "chargeback", "csrf_token": token},
    )

    assert response.status_code == 303
    assert central_of(app).get_account("bob").blocked is True
    for lot in ("lot1", "lot2"):
        late_gateway = await listen(broker, denylist_topic(lot))  # retained: arrives on subscribe
        denylist = await next_message(late_gateway)
        assert isinstance(denylist, DenyList)
        assert (denylist.lot_id, denylist.accounts) == (lot, ("bob",))
        await late_gateway.close()
    [entry] = entries(app, "account.block")
    assert (entry.actor, entry.target_id, entry.reason) == ("user:admin", "bob", "chargeback")
    page = await client.get("/panel/accounts/bob")
    assert "chargeback" in page.text and "Unblock account" in page.text

    unblock = await client.post(
        "/panel/api/accounts/bob/block",
        json={"blocked": False, "reason": "paid up"},
        headers={"X-CSRF-Token": token},
    )

    assert unblock.status_code == 200
    gateway = await listen(broker, denylist_topic("lot1"))
    cleared = await next_message(gateway)
    assert isinstance(cleared, DenyList)
    assert cleared.accounts == ()
    assert len(entries(app, "account.unblock")) == 1


async def test_admin_creates_users_and_cannot_lock_themselves_out(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    token = await signed_in(client)

    created = await client.post(
        "/panel/users",
        data={
            "username": "olga",
            "password": "long-enough-1",
            "role": "operator",
            "csrf_token": token,
        },
    )
    short = await client.post(
        "/panel/users",
        data={"username": "pia", "password": "short", "role": "viewer", "csrf_token": token},
    )
    users = await client.get("/panel/users")
    own_id = users.text.split('action="/panel/users/')[1].split('"')[0]  # admin is listed first
    demote_self = await client.post(
        f"/panel/users/{own_id}", data={"role": "viewer", "active": "true", "csrf_token": token}
    )

    assert created.status_code == 303
    assert short.status_code == 303
    assert "olga" in users.text and "pia" not in users.text
    assert entries(app, "user.create")[0].details == {"role": "operator"}
    assert demote_self.status_code == 303
    assert "cannot demote or disable yourself" in (await client.get("/panel/users")).text
    assert entries(app, "user.update") == []
    client.cookies.clear()
    operator_client_token = await signed_in(client, "olga", "long-enough-1")
    refused = await client.post(
        "/panel/users",
        data={
            "username": "x1",
            "password": "long-enough-1",
            "role": "admin",
            "csrf_token": operator_client_token,
        },
    )
    assert refused.status_code == 403
