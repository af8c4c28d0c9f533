"""Statements run on the DBAPI cursor give what ``Connection.execute`` gives, on both
databases: the same rows, the same stored values, the same exceptions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server import db as database
from server.accounts.models import Account
from server.lots.models import Lot
from server.sessions.models import ParkingSession, UsedNonce
from server.sessions.prepared import Prepared

_stays = ParkingSession.__table__  # type: ignore[attr-defined]
_nonces = UsedNonce.__table__  # type: ignore[attr-defined]
T0 = datetime(2026, 3, 29, 0, 59, 59, 999_999, tzinfo=UTC)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = database.make_engine(database_url)
    database.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _stay(n: int, state: str = "open", **values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "session_id": f"s{n}",
        "account_id": f"a{n % 3}",
        "lot_id": "L",
        "state": state,
        "entry_gate_id": "in",
        "entry_event_id": f"e{n}",
        "entered_at": T0 + timedelta(minutes=n),
        "offline_entry": n % 2 == 0,
        "offline_exit": False,
        "exit_gate_id": None,
        "exit_event_id": None,
        "exited_at": None,
        "amount_minor": None,
        "currency": "CNY",
        "settlement": None,
        "charge_transaction_id": None,
        "quote_json": None,
        "tariff_version": None,
        "payment_method": None,
        "prepaid_minor": 0,
        "prepaid_at": None,
        "lost_ticket": False,
    }
    row.update(values)
    return row


def _setup(conn: sa.Connection) -> None:
    """The lot and the drivers the stays refer to (foreign keys, on SQLite too)."""
    conn.execute(
        Lot.__table__.insert(),  # type: ignore[attr-defined]
        {
            "lot_id": "L",
            "name": "L",
            "capacity": 10,
            "timezone": "UTC",
            "grace_minutes": 0,
            "hourly_minor": 500,
            "currency": "CNY",
            "created_at": T0,
        },
    )
    conn.execute(
        Account.__table__.insert(),  # type: ignore[attr-defined]
        [
            {"account_id": f"a{n}", "name": "d", "currency": "CNY", "created_at": T0}
            for n in range(3)
        ],
    )


def test_rows_written_and_read_are_what_the_core_path_gives(engine: Engine) -> None:
    query = (
        sa.select(_stays.c.session_id, _stays.c.entered_at, _stays.c.offline_entry)
        .where(
            _stays.c.account_id.in_(sa.bindparam("accounts", expanding=True)),
            _stays.c.entered_at >= sa.bindparam("since"),
        )
        .order_by(_stays.c.session_id)
    )
    prepared = Prepared(query)
    with engine.begin() as conn:
        _setup(conn)
        # Half written through Core, half through the cursor: stored alike.
        conn.execute(_stays.insert(), [_stay(n, state="closed") for n in range(0, 6, 2)])
        Prepared(_stays.insert()).many(conn, [_stay(n, state="closed") for n in range(1, 6, 2)])
        for accounts in (["a0"], ["a0", "a1"], ["a0", "a1", "a2", "nobody"]):
            params = {"accounts": accounts, "since": T0 + timedelta(minutes=1)}
            ours = prepared.all(conn, **params)
            core = conn.execute(query, params).all()
            assert [tuple(r) for r in ours] == [tuple(r) for r in core]
            assert all(r.entered_at.tzinfo is not None for r in ours)
        assert {r.session_id for r in prepared.all(conn, accounts=["a1"], since=T0)} == {
            "s1",
            "s4",
        }
        changed = Prepared(
            _stays.update()
            .where(_stays.c.session_id == sa.bindparam("b_id"))
            .values(exited_at=sa.bindparam("exited_at"))
        ).run(conn, b_id="s3", exited_at=T0 + timedelta(hours=2))
        assert changed == 1
        exited = conn.execute(
            sa.select(_stays.c.exited_at).where(_stays.c.session_id == "s3")
        ).scalar_one()
        assert exited == T0 + timedelta(hours=2)


def test_a_database_error_is_raised_as_the_sqlalchemy_exception(engine: Engine) -> None:
    insert = Prepared(_nonces.insert())
    row = {"nonce": "n1", "account_id": "a0", "event_id": "e1", "used_at": T0}
    with engine.connect() as conn, conn.begin():
        _setup(conn)
        insert.many(conn, [row])
        with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
            insert.many(conn, [row])
        assert conn.execute(sa.select(sa.func.count()).select_from(_nonces)).scalar_one() == 1


def test_plain_parameters_take_the_direct_path_and_give_what_the_general_one_gives(
    engine: Engine,
) -> None:
    one = Prepared(sa.select(_stays.c.session_id).where(_stays.c.session_id == sa.bindparam("s")))
    insert = Prepared(_stays.insert())
    listed = Prepared(
        sa.select(_stays.c.session_id).where(
            _stays.c.account_id.in_(sa.bindparam("accounts", expanding=True))
        )
    )
    with engine.begin() as conn:
        _setup(conn)
        insert.many(conn, [_stay(1), _stay(2, state="closed")])
        assert [r.session_id for r in one.all(conn, s="s2")] == ["s2"]
        assert len(listed.all(conn, accounts=["a1", "a2"])) == 2
        for prepared, given in (
            (one, {"s": "s2"}),
            (insert, _stay(3)),
            (listed, {"accounts": ["a1", "a2"]}),
        ):
            plan = prepared._plan(conn.dialect, given)
            assert (plan.getter is not None) == (prepared is not listed)
            assert plan.parameters(given) == plan._slow_parameters(given)


def test_timestamps_are_stored_as_the_core_path_stores_them(engine: Engine) -> None:
    """Bind conversions apply to plain parameters too: on SQLite a timestamp is UTC text
    (a local offset converted), not the driver's default form with the offset kept."""
    local = datetime(2026, 5, 4, 20, 0, tzinfo=timezone(timedelta(hours=8)))
    row = {"nonce": "core", "account_id": "a0", "event_id": "e-core", "used_at": local}
    with engine.begin() as conn:
        _setup(conn)
        conn.execute(_nonces.insert(), row)
        Prepared(_nonces.insert()).many(conn, [{**row, "nonce": "ours", "event_id": "e-ours"}])
        stored = dict(
            conn.execute(sa.text("SELECT nonce, CAST(used_at AS TEXT) FROM used_nonces")).all()
        )
    assert stored["ours"] == stored["core"]
    read = Prepared(sa.select(_nonces.c.used_at).where(_nonces.c.nonce == sa.bindparam("n")))
    with engine.connect() as conn:
        [(used_at,)] = read.all(conn, n="ours")
    assert used_at == local and used_at.utcoffset() == timedelta(0)


def test_in_lists_are_padded_to_a_few_lengths_and_select_the_same_rows(engine: Engine) -> None:
    from server.sessions.prepared import Prepared

    table = sa.Table("padded", sa.MetaData(), sa.Column("k", sa.String, primary_key=True))
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [{"k": f"k{i}"} for i in range(20)])
        query = Prepared(
            sa.select(table.c.k).where(table.c.k.in_(sa.bindparam("ks", expanding=True)))
        )
        for n in range(1, 21):
            wanted = [f"k{i}" for i in range(n)] + ["absent"]
            assert sorted(r.k for r in query.all(conn, ks=wanted)) == sorted(wanted[:-1])
    # 2..21 values: lengths 2, 4, 8, 16, 32 (one plan each), not 20 plans
    assert len(query._plans) == 5


def test_a_pipeline_sends_queries_together_and_raises_a_write_error_at_its_end(
    engine: Engine,
) -> None:
    from server.sessions.prepared import pipeline

    insert = Prepared(_nonces.insert())
    by_account = Prepared(
        sa.select(_nonces.c.nonce)
        .where(_nonces.c.account_id.in_(sa.bindparam("accounts", expanding=True)))
        .order_by(_nonces.c.nonce)
    )
    rows = [
        {"nonce": f"n{i}", "account_id": f"a{i % 3}", "event_id": f"e{i}", "used_at": T0}
        for i in range(6)
    ]
    with engine.connect() as conn, conn.begin():
        _setup(conn)
        insert.many(conn, rows)
        with pipeline(conn):
            first = by_account.submit(conn, accounts=["a0"])
            second = by_account.submit(conn, accounts=["a1", "a2"])
            if conn.dialect.name == "postgresql":  # sent, not answered yet
                assert first._rows is None and second._rows is None
            assert [r.nonce for r in second.rows()] == ["n1", "n2", "n4", "n5"]
            assert [r.nonce for r in first.rows()] == ["n0", "n3"]

        # A duplicate among the writes of a pipeline: SQLAlchemy's exception, by the end
        # of the block at the latest, and the SAVEPOINT takes everything of it back.
        def duplicate() -> None:
            with conn.begin_nested(), pipeline(conn):
                insert.many(conn, [{**rows[0], "nonce": "fresh"}])
                insert.many(conn, [rows[1]])

        with pytest.raises(sa.exc.IntegrityError):
            duplicate()
        count = sa.select(sa.func.count()).select_from(_nonces)
        assert conn.execute(count).scalar_one() == 6
