"""The server's public entry points exist, and importing them builds nothing."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "server.accounts.ledger",
    "server.central",
    "server.cli",
    "server.config",
    "server.db",
    "server.keys",
    "server.main",
    "server.mqtt.bridge",
    "server.payments.debts",
    "server.payments.provider",
    "server.payments.receipts",
    "server.payments.service",
    "server.pricing.adjust",
    "server.pricing.engine",
    "server.pricing.models",
    "server.pricing.service",
    "server.sessions.flows",
]


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)

    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"


def test_entry_point_signatures() -> None:
    from server.central import build_central
    from server.cli import serve
    from server.main import create_app

    assert list(inspect.signature(create_app).parameters) == ["settings", "clock", "transport"]
    assert {"settings", "clock", "transport", "engine"} <= set(
        inspect.signature(build_central).parameters
    )
    assert list(inspect.signature(serve).parameters) == [
        "settings",
        "host",
        "port",
        "log_level",
        "access_log",
    ]


def test_create_app_builds_no_engine_until_started(tmp_path: object) -> None:
    from server.config import ServerSettings
    from server.main import create_app

    app = create_app(ServerSettings(database_url="sqlite:////nonexistent/dir/x.db"))

    assert not hasattr(app.state, "central")
