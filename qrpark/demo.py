"""``qrpark demo``: the whole system on one machine, with simulated driver traffic.

Starts a private Mosquitto (``set_tcp_nodelay true``) on a free port, the central service as
its own process (SQLite under ``./var/demo``), provisions a lot with an entry and an exit
gate and a few driver accounts through the REST API, then runs the *real* gateway firmware
for both gates on simulated cameras (rendering the drivers' real QR codes), barriers and
loop detectors, with drivers arriving at random. Ctrl-C stops everything.

``--external --server URL --broker URL`` runs only the simulated lot against a service and
broker that already run (docker-compose uses this).

The REST API needs an API token: the client sends ``QRPARK_API_TOKEN`` when it is set; a
service the demo starts itself gets a fresh random admin token through
``QRPARK_BOOTSTRAP_API_TOKEN`` (printed in the banner, for trying the API by hand).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from parking_protocol.clock import SystemClock
from parking_protocol.types import Direction
from qrpark.services import MosquittoProcess, free_port, mosquitto_binary, port_open

__all__ = ["main"]

log = logging.getLogger("qrpark.demo")

DEMO_ADMIN_PASSWORD = "demo-admin-1"  # noqa: S105 - the demo's published sign-in
DEMO_DRIVER_PIN = "0000"
TARIFF = {"grace_minutes": 0, "hourly_minor": 500, "daily_cap_minor": 6000, "currency": "CNY"}


class DemoError(RuntimeError):
    pass


@cache
def api_token() -> str:
    """``QRPARK_API_TOKEN``, or one random token for this process (its own service's)."""
    return os.environ.get("QRPARK_API_TOKEN") or "qrp_demo_" + secrets.token_urlsafe(32)


@dataclass
class Api:
    """A tiny blocking JSON client for the service's REST API (run in a thread)."""

    base: str
    token: str = field(default_factory=api_token, repr=False)

    def call(self, method: str, path: str, body: object | None = None, **headers: str) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own service
            self.base + path,
            data=data,
            method=method,
            headers={
                "content-type": "application/json",
                "authorization": f"Bearer {self.token}",
                **headers,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 409:  # already provisioned by an earlier run
                return None
            detail = exc.read().decode(errors="replace")[:300]
            raise DemoError(f"{method} {path} -> {exc.code}: {detail}") from None

    def healthy(self) -> bool:
        try:
            return bool(self.call("GET", "/health"))
        except (OSError, DemoError):
            return False


def provision(api: Api, lot: str, drivers: int) -> dict[str, str]:
    """Create the lot, its two gates and the demo accounts; return the public keys."""
    api.call(
        "POST",
        "/api/v1/lots",
        {"lot_id": lot, "name": "Demo Plaza", "capacity": 40, "tariff": TARIFF},
    )
    api.call(
        "POST",
        f"/api/v1/lots/{lot}/gates",
        {"gate_id": "in1", "direction": "entry", "name": "North entry"},
    )
    api.call(
        "POST",
        f"/api/v1/lots/{lot}/gates",
        {"gate_id": "out1", "direction": "exit", "name": "North exit"},
    )
    for i in range(1, drivers + 1):
        account = f"demo-{i}"
        api.call("POST", "/api/v1/accounts", {"account_id": account, "name": f"Driver {i}"})
        # The last driver is short of money, so the demo shows a refused exit too.
        amount = 300 if i == drivers else 20_000
        api.call(
            "POST",
            f"/api/v1/accounts/{account}/topups",
            {"amount_minor": amount},
            **{"Idempotency-Key": f"demo-initial-topup-{account}"},
        )
    keys = api.call("GET", "/api/v1/keys")["keys"]
    return {key["kid"]: key["public_key"] for key in keys}


def start_server(data_dir: Path, broker_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "QRPARK_DATABASE_URL": f"sqlite:///{data_dir}/qrpark.db",
        "QRPARK_MQTT_URL": broker_url,
        "QRPARK_KEY_FILE": str(data_dir / "keys" / "signing.pem"),
        # Demo sign-ins (development only; production refuses placeholder secrets).
        "QRPARK_ADMIN_PASSWORD": os.environ.get("QRPARK_ADMIN_PASSWORD", DEMO_ADMIN_PASSWORD),
        "QRPARK_DEMO_DRIVER_PIN": os.environ.get("QRPARK_DEMO_DRIVER_PIN", DEMO_DRIVER_PIN),
        # The admin API token the demo's own clients (Api) send.
        "QRPARK_BOOTSTRAP_API_TOKEN": api_token(),
    }
    log_file = (data_dir / "server.log").open("ab")
    try:
        return subprocess.Popen(  # noqa: S603 - our own service
            [
                sys.executable,
                "-m",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
                "--no-access-log",
            ],
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    finally:
        log_file.close()


async def run_lot(
    *,
    api: Api,
    broker_url: str,
    lot: str,
    drivers: int,
    data_dir: Path,
    rate: float,
    dwell: tuple[float, float],
    duration: float | None,
    gateway_password: str | None,
) -> int:
    from sim_devices.lot import SimLaneConfig, start_sim_lane
    from sim_devices.traffic import Driver, Phone, TrafficStats, run_traffic

    keys = await asyncio.to_thread(provision, api, lot, drivers)
    clock = SystemClock()

    def lane_config(gate: str, direction: Direction) -> SimLaneConfig:
        return SimLaneConfig(
            lot_id=lot,
            gate_id=gate,
            direction=direction,
            broker_url=broker_url,
            public_keys=keys,
            data_dir=data_dir / "gateways",
            mqtt_username=f"gw-{lot}-{gate}" if gateway_password else None,
            mqtt_password=gateway_password,
            heartbeat_s=10,
        )

    entry = await start_sim_lane(lane_config("in1", Direction.ENTRY), clock)
    exit_ = await start_sim_lane(lane_config("out1", Direction.EXIT), clock)

    async def fetch_code(account: str) -> str:
        issued = await asyncio.to_thread(api.call, "POST", f"/api/v1/accounts/{account}/codes")
        return str(issued["code"])

    people = [
        Driver(f"demo-{i}", Phone(f"demo-{i}", fetch_code, clock)) for i in range(1, drivers + 1)
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    if duration is not None:
        loop.call_later(duration, stop.set)

    def report(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)

    stats = TrafficStats()
    try:
        await run_traffic(
            people,
            entry.lane,
            exit_.lane,
            rng=random.Random(),  # noqa: S311 - traffic, not crypto
            arrivals_per_minute=rate,
            dwell_s=dwell,
            stop=stop,
            stats=stats,
            on_event=report,
        )
    finally:
        await entry.stop()
        await exit_.stop()
        print(f"\nsimulated traffic: {stats.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrpark demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the service")
    parser.add_argument("--lot", default="demo")
    parser.add_argument("--drivers", type=int, default=8)
    parser.add_argument("--rate", type=float, default=6.0, help="arrivals per minute")
    parser.add_argument(
        "--dwell",
        type=float,
        nargs=2,
        default=(20.0, 90.0),
        metavar=("MIN", "MAX"),
        help="seconds a car stays parked",
    )
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--data-dir", type=Path, default=Path("var/demo"))
    parser.add_argument(
        "--keep-data", action="store_true", help="continue with the previous run's database"
    )
    parser.add_argument(
        "--external",
        action="store_true",
        help="use an already running service and broker (--server, --broker)",
    )
    parser.add_argument("--server", default=None, help="service URL, e.g. http://central:8000")
    parser.add_argument("--broker", default=None, help="broker URL, e.g. mqtt://mosquitto:1883")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )

    data_dir: Path = args.data_dir.resolve()
    if not args.external and not args.keep_data and data_dir.exists():
        # A fresh lot every run: cars left "inside" by an interrupted run would be refused.
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    broker: MosquittoProcess | None = None
    server: subprocess.Popen[bytes] | None = None
    try:
        if args.external:
            if not args.server or not args.broker:
                parser.error("--external needs --server and --broker")
            api, broker_url = Api(args.server.rstrip("/")), args.broker
        else:
            if mosquitto_binary() is None:
                raise DemoError(
                    "Mosquitto is not installed: apt-get install mosquitto "
                    "(scripts/dev demo installs it for you)"
                )
            broker = MosquittoProcess(persistence=True, workdir=data_dir / "mosquitto")
            broker.workdir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            broker.start()
            broker_url = broker.url
            port = args.port if not port_open("127.0.0.1", args.port) else free_port()
            server = start_server(data_dir, broker_url, port)
            api = Api(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not api.healthy():
            if server is not None and server.poll() is not None:
                raise DemoError(f"the service exited; see {data_dir / 'server.log'}")
            if time.monotonic() > deadline:
                raise DemoError(f"the service at {api.base} did not become healthy")
            time.sleep(0.2)
        token_shown = api.token if server is not None else "$QRPARK_API_TOKEN"
        admin_password = os.environ.get("QRPARK_ADMIN_PASSWORD", DEMO_ADMIN_PASSWORD)
        driver_pin = os.environ.get("QRPARK_DEMO_DRIVER_PIN", DEMO_DRIVER_PIN)
        print(
            f"\nqrpark demo is running\n"
            f"  operator panel        : {api.base}/panel  (admin / {admin_password})\n"
            f"  driver page           : {api.base}/driver  (demo-1 / PIN {driver_pin})\n"
            f"  API docs              : {api.base}/docs\n"
            f"  API token (admin)     : {token_shown}\n"
            f"  MQTT broker           : {broker_url}\n"
            f"  data and logs         : {data_dir}\n"
            f"Ctrl-C stops it.\n",
            flush=True,
        )
        return asyncio.run(
            run_lot(
                api=api,
                broker_url=broker_url,
                lot=args.lot,
                drivers=args.drivers,
                data_dir=data_dir,
                rate=args.rate,
                dwell=(args.dwell[0], args.dwell[1]),
                duration=args.duration,
                gateway_password=os.environ.get("QRPARK_GATEWAY_PASSWORD"),
            )
        )
    except DemoError as exc:
        print(f"qrpark demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        if broker is not None:
            broker.stop()
