"""The HTTP composition root: ``create_app(settings)`` -> a FastAPI app (OpenAPI at /docs)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from parking_protocol.clock import Clock
from parking_protocol.transport import Transport
from server import metrics as metrics_module
from server import system_router
from server.accounts import router as accounts_router
from server.audit import service as audit
from server.auth import router as tokens_router
from server.auth import tokens
from server.auth.api import ApiLimits, staff
from server.auth.models import Role
from server.central import Central, build_central
from server.config import ServerSettings
from server.driver import router as driver_router
from server.errors import DomainError
from server.gateways import router as gateways_router
from server.lots import router as lots_router
from server.metrics import install_metrics
from server.panel.app import install_panel, start_panel
from server.payments import router as payments_router
from server.pricing import router as pricing_router
from server.readcache import CachedReads, ForgetOnWrite, ReadCache, TokenCache
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
        await asyncio.to_thread(_bootstrap_token, central)
        install_metrics(app, central)
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
    app.state.api_limits = ApiLimits.from_settings(settings)

    @app.exception_handler(DomainError)
    async def _domain_error(_request: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # server/sessions/router.py is read-only and owned elsewhere: it gets its viewer check here.
    app.include_router(sessions_router.router, dependencies=[Depends(staff(Role.VIEWER))])
    # Prometheus scrapes with a viewer token (bearer credentials in its scrape config).
    app.include_router(metrics_module.router, dependencies=[Depends(staff(Role.VIEWER))])
    for module in (
        system_router,
        lots_router,
        gateways_router,
        accounts_router,
        driver_router,
        pricing_router,
        payments_router,
        tokens_router,
    ):
        app.include_router(module.router)
    install_panel(app)

    def forget_cached_reads() -> None:
        central: Central | None = getattr(app.state, "central", None)
        if central is not None:
            central.forget_cached_reads()

    def caches() -> tuple[ReadCache, TokenCache] | None:
        central: Central | None = getattr(app.state, "central", None)
        return None if central is None else (central.reads, central.tokens)

    app.add_middleware(ForgetOnWrite, forget=forget_cached_reads)
    app.add_middleware(CachedReads, caches=caches)  # outermost: a hit skips the whole stack
    return app


def _bootstrap_token(central: Central) -> None:
    """Register ``QRPARK_BOOTSTRAP_API_TOKEN`` as an admin API token (once; audited)."""
    secret = central.settings.bootstrap_api_token
    if secret is None:
        return
    with central.db() as db:
        now = central.clock.now()
        record = tokens.bootstrap_token(db, secret.get_secret_value(), now=now)
        if record is None:
            return
        audit.record(
            db,
            actor="system",
            action="token.bootstrap",
            target_type="api_token",
            target_id=record.token_id,
            now=now,
            reason="admin token from QRPARK_BOOTSTRAP_API_TOKEN",
            details={"role": record.role},
        )
    log.info("registered the bootstrap API token %s", record.token_id)
