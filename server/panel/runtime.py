"""What the panel runs beside the service: the live hub, status history, deny lists, first admin.

Started by ``server.main``'s lifespan after the :class:`~server.central.Central` started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from parking_protocol.messages import GatewayStatus
from parking_protocol.transport import TransportUnavailable
from server.audit import service as audit
from server.auth import service as auth
from server.auth.models import Role
from server.auth.throttle import LoginThrottle
from server.central import Central
from server.panel import service
from server.panel.live import EventHub

__all__ = ["PanelRuntime"]

log = logging.getLogger(__name__)


class PanelRuntime:
    def __init__(self, central: Central) -> None:
        self.central = central
        self.hub = EventHub()
        self.throttle = LoginThrottle()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.bootstrap_admin)
        self.central.batch_listeners.append(self.hub.on_batch)
        self._task = asyncio.create_task(self._keep_history(), name="panel:status-history")
        transport = self.central.transport
        if transport is not None:
            transport.on_connect(self._republish)
            if transport.connected:
                await self.publish_denylists()

    async def stop(self) -> None:
        self.hub.close()
        with contextlib.suppress(ValueError):
            self.central.batch_listeners.remove(self.hub.on_batch)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def bootstrap_admin(self) -> bool:
        """Create the first admin from settings when there is no user at all."""
        settings = self.central.settings
        if settings.admin_password is None:
            return False
        with self.central.db() as db:
            if auth.count_users(db) > 0:
                return False
            now = self.central.clock.now()
            auth.create_user(
                db,
                username=settings.admin_username,
                password=settings.admin_password.get_secret_value(),
                role=Role.ADMIN,
                now=now,
            )
            audit.record(
                db,
                actor="system",
                action="user.bootstrap",
                target_type="user",
                target_id=settings.admin_username,
                now=now,
                reason="first admin from QRPARK_ADMIN_PASSWORD",
                details={"role": Role.ADMIN.value},
            )
        log.info("created the first admin user %r", settings.admin_username)
        return True

    async def publish_denylists(self) -> int:
        """Publish every lot's retained deny list; returns how many could not be sent."""
        transport = self.central.transport
        if transport is None:
            return 0

        def build() -> list[tuple[str, bytes]]:
            with self.central.db() as db:
                return service.denylist(db, now=self.central.clock.now())

        failed = 0
        for topic, payload in await asyncio.to_thread(build):
            try:
                await transport.publish(topic, payload, qos=1, retain=True)
            except TransportUnavailable as exc:
                failed += 1
                log.warning("deny list for %s not sent (resent on reconnect): %s", topic, exc)
        return failed

    async def _republish(self) -> None:
        await self.publish_denylists()

    async def _keep_history(self) -> None:
        queue = self.hub.status_changes
        while True:
            batch: list[GatewayStatus] = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            try:
                await asyncio.to_thread(self._write_history, batch)
            except Exception:
                log.exception("gate status history not written")

    def _write_history(self, batch: list[GatewayStatus]) -> None:
        with self.central.db() as db:
            for status in batch:
                service.record_status_change(db, status, now=self.central.clock.now())
