"""The panel and auth modules keep their ``__all__`` honest; the panel needs no CDN."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

MODULES = [
    "server.auth.models",
    "server.auth.passwords",
    "server.auth.service",
    "server.auth.throttle",
    "server.auth.web",
    "server.driver.router",
    "server.panel.actions",
    "server.panel.alarms",
    "server.panel.amounts",
    "server.panel.app",
    "server.panel.charts",
    "server.panel.dead_letters",
    "server.panel.live",
    "server.panel.models",
    "server.panel.money",
    "server.panel.permits",
    "server.panel.queries",
    "server.panel.router",
    "server.panel.runtime",
    "server.panel.service",
    "server.panel.tariffs",
    "server.panel.templating",
]
ROOT = Path(__file__).resolve().parents[2] / "server"


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)

    for attr in module.__all__:
        assert hasattr(module, attr), f"{name}.__all__ names missing {attr}"


def test_templates_and_assets_load_nothing_from_another_host() -> None:
    files = [
        *(ROOT / "panel" / "templates").glob("*.html"),
        *(ROOT / "panel" / "static").glob("*.*"),
        *(ROOT / "driver" / "templates").glob("*.html"),
    ]
    assert files
    for path in files:
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path
        assert "https://" not in text, path
