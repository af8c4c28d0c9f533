"""The ASGI API tests' client and credentials: the bootstrap admin token and its header."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

API_TOKEN = "qrp_test-admin-token-0123456789abcdef"
"""Set as ``bootstrap_api_token``: an admin API token from the first start."""
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@contextlib.asynccontextmanager
async def asgi_client(
    app: FastAPI, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client calling it in process (as admin,
    unless ``headers`` say otherwise; server errors come back as 500 responses)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://test",
            headers=AUTH if headers is None else headers,
        ) as client:
            yield client
