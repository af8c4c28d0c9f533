"""Run the central service: ``python -m server [--host H] [--port P]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import socket
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.config import ServerSettings

__all__ = ["main", "serve"]

log = logging.getLogger(__name__)


def serve(
    settings: ServerSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Serve the API and run the MQTT bridge until interrupted (blocks).

    One worker on uvloop with the httptools parser. Once the app has started (imports,
    migrations, the first connections made), everything alive is moved out of the
    collector's sight (``gc.freeze``): a full collection under load then walks only what
    was allocated since, not the whole heap (150-250 ms pauses in ``bench/bench_api.py``
    before, every one of them in the polled reads' p99).
    """
    import uvicorn

    from server.main import create_app

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            gc.collect()
            gc.freeze()
            log.info(
                "serving on %s with %s; %d objects frozen out of the collector",
                type(asyncio.get_running_loop()).__module__,
                self.config.http,
                gc.get_freeze_count(),
            )

    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=log_level.lower(),
        access_log=access_log,
    )
    server = Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise SystemExit(3)  # what uvicorn.run exits with when the app did not start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-access-log", action="store_true", help="do not log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        settings = ServerSettings()
    except ValidationError as exc:
        print(f"invalid settings (QRPARK_*):\n{exc}", file=sys.stderr)
        return 2
    serve(
        settings,
        args.host,
        args.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
    )
    return 0
