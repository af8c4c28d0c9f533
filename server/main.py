"""The HTTP composition root: ``create_app(settings)`` -> a FastAPI app (OpenAPI at /docs)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from parking_protocol.clock import Clock
from parking_protocol.transport import Transport
from server import system_router
from server.accounts import router as accounts_router
from server.central import build_central
from server.config import ServerSettings
from server.driver import router as driver_router
from server.errors import DomainError
from server.gateways import router as gateways_router
from server.lots import router as lots_router
from server.panel.app import install_panel, start_panel
from server.payments import router as payments_router
from server.pricing import router as pricing_router
from server.sessions import router as sessions_router

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(
    settings: ServerSettings | None = None,
    *,
    clock: Clock | None = None,
    transport: Transport | None = None,
) -> FastAPI:
    """Build the app; its lifespan starts (and stops) a :class:`~server.central.Central`.

    ``app.state.central`` is the running service once the lifespan has started.
    """
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        central = build_central(settings, clock=clock, transport=transport)
        await central.start()
        app.state.central = central
        panel = await start_panel(app, central)
        try:
            yield
        finally:
            await panel.stop()
            await central.stop()

    app = FastAPI(
        title="qrpark central",
        version="0.1.0",
        summary="Dynamic QR parking: lots, gates, accounts, sessions and codes",
        lifespan=lifespan,
    )
    app.state.settings = settings

    @app.exception_handler(DomainError)
    async def _domain_error(_request: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    for module in (
        system_router,
        lots_router,
        gateways_router,
        accounts_router,
        sessions_router,
        driver_router,
        pricing_router,
        payments_router,
    ):
        app.include_router(module.router)
    install_panel(app)
    return app
