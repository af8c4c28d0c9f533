"""The money migration keeps existing lots working: their simple tariff becomes version 1."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from server.db import make_engine, upgrade
from server.pricing import service as pricing
from server.pricing.engine import price


@pytest.mark.usefixtures("database_url")
def test_lots_from_before_the_money_migration_get_their_tariff_as_version_1(
    database_url: str,
) -> None:
    created = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    upgrade(database_url, "0002")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO lots (lot_id, name, capacity, timezone, grace_minutes,"
                    " hourly_minor, daily_cap_minor, currency, created_at) VALUES"
                    " ('old', 'Old', 5, 'Asia/Shanghai', 15, 500, 6000, 'CNY', :at)"
                ),
                {"at": created.replace(tzinfo=None) if "sqlite" in database_url else created},
            )
        upgrade(database_url)

        with Session(engine) as db:
            version = pricing.version_at(db, "old", created + timedelta(days=30))
            tariff = pricing.tariff_of(version, "Asia/Shanghai")
        assert (version.version, version.effective_from) == (1, created)
        entry = created + timedelta(days=1)
        assert price(tariff, entry, entry + timedelta(hours=2)).amount.amount_minor == 1000
        assert price(tariff, entry, entry + timedelta(hours=30)).amount.amount_minor == 9000
        with engine.connect() as conn:
            policy = conn.execute(sa.text("SELECT payment_policy FROM lots")).scalar_one()
        assert policy == "pay_on_exit"
    finally:
        engine.dispose()
