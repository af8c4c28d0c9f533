"""Credentials of the ASGI API tests: the bootstrap admin token and its header."""

from __future__ import annotations

API_TOKEN = "qrp_test-admin-token-0123456789abcdef"
"""Set as ``bootstrap_api_token``: an admin API token from the first start."""
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
