"""Shared fixtures: a real Mosquitto and a real PostgreSQL, or a clear skip.

With ``QRPARK_REQUIRE_SERVICES=1`` (CI sets it) a missing service FAILS the tests that need
it instead of skipping them, so CI can never go green without exercising the real parts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from service_guard import missing_service

from qrpark.services import MosquittoProcess, mosquitto_binary, port_open

POSTGRES_ADMIN_URL = os.environ.get(
    "QRPARK_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoProcess]:
    """A private Mosquitto (set_tcp_nodelay true) on a free port for the test session."""
    if mosquitto_binary() is None:
        missing_service("mosquitto binary not installed (apt-get install mosquitto)")
    with MosquittoProcess() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    yield from _fresh_postgres_database()


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    yield from _fresh_postgres_database()


def _fresh_postgres_database() -> Iterator[str]:
    if not port_open("127.0.0.1", 5432):
        missing_service("PostgreSQL is not listening on 127.0.0.1:5432")
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"qrpark_e2e_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        missing_service(f"PostgreSQL unusable: {exc}")
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
