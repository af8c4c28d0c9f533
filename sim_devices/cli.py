"""``qrpark sim``: a simulated fleet (N lots x M gates of real firmware) with fault injection.

Against a running service and broker::

    qrpark sim --server http://127.0.0.1:8000 --broker mqtt://127.0.0.1:1883 --lots 2 --gates 4

Or self-contained (a private Mosquitto and the service as a subprocess, like ``qrpark demo``)::

    qrpark sim --local --lots 3 --gates 2 --drivers 20 --duration 120 \\
        --fault cut-gateway:sim1/out1@20+40 --fault slow-server@70+6 --fault broker-restart@90

Runs in real time (the service's clock is real); dwell times default to seconds. A live
progress table shows while it runs and a summary at the end (``--json`` writes it too).
Exit status: 0 when every gateway ended online with an empty outbox, 3 when some events
were still unanswered, 1 when the fleet could not start, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from parking_protocol.clock import SystemClock
from parking_protocol.mqtt import parse_broker_url
from sim_devices.fleet import Fault, FaultError, Fleet, FleetConfig, parse_fault

__all__ = ["main"]

log = logging.getLogger("sim_devices.cli")


class SimError(RuntimeError):
    pass


class RemoteBackend:
    """A service and broker that someone else runs: REST calls only, no process faults.

    The calls (the drivers' phones fetching codes, provisioning) wait for the service in
    threads of their own, never in the event loop's default pool: there the gateways
    decode and the cameras render, and a slow service must not hold their frames up.
    """

    REST_THREADS = 16

    def __init__(self, server_url: str, broker_url: str) -> None:
        from qrpark.demo import Api

        self.api = Api(server_url.rstrip("/"))
        self.broker_url = broker_url
        self._rest = ThreadPoolExecutor(self.REST_THREADS, thread_name_prefix="sim-rest")

    async def call(self, method: str, path: str, body: object | None = None, **headers: str) -> Any:
        call = functools.partial(self.api.call, method, path, body, **headers)
        return await asyncio.get_running_loop().run_in_executor(self._rest, call)

    def broker_address(self) -> tuple[str, int]:
        address = parse_broker_url(self.broker_url)
        return address.host, address.port

    async def restart_broker(self) -> None:
        raise FaultError("broker-restart needs --local (the fleet must run the broker)")

    async def pause_service(self, paused: bool) -> None:
        if paused:
            raise FaultError("slow-server needs --local (the fleet must run the service)")

    def healthy(self) -> bool:
        return self.api.healthy()

    def close(self) -> None:
        self._rest.shutdown(wait=False, cancel_futures=True)


class LocalBackend(RemoteBackend):
    """A private Mosquitto and the central service as a subprocess, owned by this run."""

    def __init__(self, data_dir: Path) -> None:
        from qrpark.demo import start_server
        from qrpark.services import MosquittoProcess, free_port, mosquitto_binary

        if mosquitto_binary() is None:
            raise SimError("--local needs Mosquitto: apt-get install mosquitto")
        self.broker = MosquittoProcess(persistence=True, workdir=data_dir / "mosquitto")
        self.broker.workdir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
        self.broker.start()
        port = free_port()
        self.server: subprocess.Popen[bytes] = start_server(data_dir, self.broker.url, port)
        self.paused = False
        super().__init__(f"http://127.0.0.1:{port}", self.broker.url)

    async def restart_broker(self) -> None:
        await asyncio.to_thread(self.broker.restart)

    async def pause_service(self, paused: bool) -> None:
        if paused != self.paused and self.server.poll() is None:
            self.server.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)
            self.paused = paused

    def close(self) -> None:
        if self.paused:
            self.server.send_signal(signal.SIGCONT)
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.broker.stop()
        super().close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qrpark sim",
        description="A simulated fleet of real gateway firmware against the central service.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="faults (seconds from the start): cut-gateway:LOT/GATE@START+DUR, "
        "cut-lot:LOT@START+DUR, camera-fail:LOT/GATE@START+DUR, broker-restart@START, "
        "slow-server@START+DUR (SIGSTOP of the service; --local only)",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="start a private broker and service")
    where.add_argument("--server", help="the service's URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--broker", help="the broker's URL (with --server)")
    parser.add_argument("--lots", type=int, default=1)
    parser.add_argument("--gates", type=int, default=2, help="gates per lot (half entries)")
    parser.add_argument("--drivers", type=int, default=10, help="drivers per lot")
    parser.add_argument("--rate", type=float, default=6.0, help="arrivals per minute per lot")
    parser.add_argument("--dwell", type=float, nargs=2, default=(5.0, 20.0), metavar=("MIN", "MAX"))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument("--fps", type=float, default=10.0, help="camera frames/s per gate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefix", default="sim", help="lot ids are PREFIX1..PREFIXN")
    parser.add_argument("--fault", action="append", default=[], metavar="SPEC")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds to wait for replays")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--gateway-dir",
        type=Path,
        default=None,
        help="where the gateways keep their outboxes (default DATA_DIR/gateways); a RAM "
        "disk such as /dev/shm/... keeps hundreds of gateways' synchronous commits from "
        "stalling the one event loop they share",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--no-progress", action="store_true", help="no live table (logs, CI)")
    return parser


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Fault, ...]:
    if args.server and not args.broker:
        parser.error("--server needs --broker")
    for name in ("lots", "gates", "drivers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.gates < 2:
        parser.error("--gates must be at least 2 (an entry and an exit)")
    if args.rate <= 0 or args.fps <= 0 or args.duration <= 0:
        parser.error("--rate, --fps and --duration must be positive")
    try:
        faults = tuple(parse_fault(spec) for spec in args.fault)
    except FaultError as exc:
        parser.error(str(exc))
    if not args.local:
        for fault in faults:
            if fault.kind in ("broker-restart", "slow-server"):
                parser.error(f"{fault}: needs --local (the fleet must own the broker/service)")
    return faults


def _progress_table(fleet: Fleet, started: float, duration: float) -> Any:
    from rich.table import Table

    totals = fleet.gateway_totals()
    stats = fleet.stats
    p50, p99 = stats.percentile(50), stats.percentile(99)
    table = Table(title=f"qrpark sim: {fleet.config.lots} lots x {len(fleet.lanes)} gates")
    table.add_column("elapsed")
    for name in ("online", "arrivals", "in", "out", "denied", "offline", "replayed", "outbox"):
        table.add_column(name, justify="right")
    table.add_column("p50/p99 ms", justify="right")
    table.add_column("faults")
    elapsed = time.monotonic() - started
    table.add_row(
        f"{min(elapsed, duration):.0f}/{duration:.0f}s",
        f"{totals.get('online', 0)}/{len(fleet.lanes)}",
        str(stats.arrivals),
        str(stats.entries),
        str(stats.exits),
        str(sum(stats.denials.values())),
        str(totals.get("offline_decisions", 0)),
        str(totals.get("replayed", 0)),
        str(totals.get("outbox", 0)),
        "-" if p50 is None or p99 is None else f"{p50 * 1000:.0f}/{p99 * 1000:.0f}",
        ", ".join(sorted(fleet.active_faults)) or "-",
    )
    return table


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qrpark sim: summary", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            text = ", ".join(map(str, value)) or "none"
        else:
            text = "-" if value is None else str(value)
        table.add_row(key.replace("_", " "), text)
    Console().print(table)


async def _run(args: argparse.Namespace, config: FleetConfig, backend: RemoteBackend) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not await asyncio.to_thread(backend.healthy):
        server = getattr(backend, "server", None)
        if server is not None and server.poll() is not None:
            raise SimError(f"the service exited; see {config.data_dir / 'server.log'}")
        if loop.time() > deadline:
            raise SimError(f"the service at {backend.api.base} did not become healthy")
        await asyncio.sleep(0.2)
    fleet = Fleet(config, backend, SystemClock())
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        started_setup = time.monotonic()
        await fleet.start()
        online = await fleet.wait_online(30.0)
        setup_s = time.monotonic() - started_setup
        up = len(fleet.lanes) if online else fleet.gateway_totals().get("online", 0)
        print(
            f"{len(fleet.lanes)} gateways started, {up} online, in {setup_s:.1f}s; "
            f"traffic for {args.duration:g}s"
        )
        started = time.monotonic()
        if args.no_progress:
            await fleet.run(args.duration, stop)
        else:
            from rich.live import Live

            with Live(_progress_table(fleet, started, args.duration), refresh_per_second=2) as live:

                async def refresh() -> None:
                    while True:
                        await asyncio.sleep(0.5)
                        live.update(_progress_table(fleet, started, args.duration))

                painter = asyncio.create_task(refresh())
                try:
                    await fleet.run(args.duration, stop)
                finally:
                    painter.cancel()
                    live.update(_progress_table(fleet, started, args.duration))
        settled = await fleet.settle(args.settle)
        summary = fleet.summary()
        summary["setup_s"] = round(setup_s, 1)
        summary["settled"] = settled
    finally:
        await fleet.stop()
    _print_summary(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if settled and summary["outbox_remaining"] == 0 else 3


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    faults = _check(args, parser)
    data_dir: Path = (
        args.data_dir or Path("var/sim") / time.strftime(f"run-%Y%m%d-%H%M%S-{os.getpid()}")
    ).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=str(data_dir / "sim.log"),
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    config = FleetConfig(
        lots=args.lots,
        gates=args.gates,
        drivers=args.drivers,
        rate=args.rate,
        dwell_s=(args.dwell[0], args.dwell[1]),
        fps=args.fps,
        seed=args.seed,
        data_dir=data_dir,
        faults=faults,
        prefix=args.prefix,
        gateway_password=os.environ.get("QRPARK_GATEWAY_PASSWORD"),
        gateway_dir=args.gateway_dir,
    )
    backend: RemoteBackend | None = None
    try:
        backend = LocalBackend(data_dir) if args.local else RemoteBackend(args.server, args.broker)
        print(f"qrpark sim: data and logs in {data_dir}", flush=True)
        return asyncio.run(_run(args, config, backend))
    except (SimError, FaultError) as exc:
        print(f"qrpark sim: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if backend is not None:
            backend.close()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
