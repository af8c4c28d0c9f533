"""Skip on a developer's laptop, fail in CI, when a real service a test needs is missing.

Importable from any test module (``from service_guard import missing_service``): the tests
folder is on ``sys.path`` because its conftest.py lives there.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["REQUIRE_SERVICES", "missing_service"]

REQUIRE_SERVICES = os.environ.get("QRPARK_REQUIRE_SERVICES") == "1"


def missing_service(reason: str) -> None:
    """Skip (laptop) or fail (CI: ``QRPARK_REQUIRE_SERVICES=1``) with ``reason``."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)
