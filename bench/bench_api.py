"""The read endpoints the operator panel polls, against a real ``python -m server``.

Starts the central service as its own process (uvicorn with uvloop + httptools, one worker,
SQLite, MQTT off: the bridge has nothing to do with these reads), provisions a lot with
gates, gateway statuses and open sessions, then loads each endpoint from a separate process
at 50 keep-alive connections:

* lot occupancy  ``GET /api/v1/lots/{id}``
* gate status    ``GET /api/v1/lots/{id}/gates``

The load generator is ``wrk`` (``apt-get install -y wrk``) when installed, else — said so
loudly, as its figures are not comparable — a small asyncio HTTP/1.1 client in a child
process (``--client``), itself slower than the service. Both share this machine's cores with
the service, so the figures are a floor for a dedicated API host; each line carries the
1-minute load average before and after the run, as a busy shared machine shows up in p99
first (``--rounds N`` repeats the 50-connection runs).

    python bench/bench_api.py [--seconds 10] [--connections 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure, print_table
from qrpark.services import free_port, port_open

LOT = "bench"
GATES = 8
OPEN_SESSIONS = 400
TARGET_RPS = 4000.0
TARGET_P99_MS = 50.0


def bearer_token() -> str:
    """The API token to send: ``QRPARK_API_TOKEN`` when set, else one we bootstrap."""
    return os.environ.get("QRPARK_API_TOKEN") or secrets.token_urlsafe(24)


class ApiServer:
    """``python -m server`` on SQLite in a temporary directory, API only."""

    def __init__(self, token: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="qrpark-bench-api-"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.db_path = self.work / "api.db"
        env = {
            **os.environ,
            "QRPARK_DATABASE_URL": f"sqlite:///{self.db_path}",
            "QRPARK_MQTT_ENABLED": "false",
            "QRPARK_KEY_FILE": str(self.work / "keys" / "signing.pem"),
            # Used only if the service has API tokens (the bootstrap convention).
            "QRPARK_BOOTSTRAP_API_TOKEN": token,
        }
        self.log = (self.work / "server.log").open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--port",
                str(self.port),
                "--log-level",
                "WARNING",
                "--no-access-log",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the service did not start; see {self.work / 'server.log'}")
            time.sleep(0.1)

    def call(self, method: str, path: str, body: object | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"content-type": "application/json", "authorization": f"Bearer {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 409:
                return None
            raise

    def provision(self) -> None:
        self.call(
            "POST",
            "/api/v1/lots",
            {
                "lot_id": LOT,
                "name": "Bench",
                "capacity": 2000,
                "tariff": {
                    "grace_minutes": 0,
                    "hourly_minor": 500,
                    "daily_cap_minor": 6000,
                    "currency": "CNY",
                },
            },
        )
        for i in range(GATES):
            direction = "entry" if i % 2 == 0 else "exit"
            self.call(
                "POST", f"/api/v1/lots/{LOT}/gates", {"gate_id": f"g{i}", "direction": direction}
            )
        self._seed_state()

    def _seed_state(self) -> None:
        """Gateway statuses and open sessions, written by the service's own data layer (as
        the bridge writes them), so both reads return what a busy lot's panel sees."""
        from sqlmodel import Session

        import server.tables  # noqa: F401 - every table registered for the ORM
        from parking_protocol.messages import GatewayState, GatewayStatus, new_id
        from parking_protocol.types import Direction
        from server.db import make_engine
        from server.gateways.service import record_status
        from server.sessions.service import open_session

        now = datetime.now(UTC)
        for i in range(OPEN_SESSIONS):
            self.call("POST", "/api/v1/accounts", {"account_id": f"bench-d{i}", "name": "D"})
        engine = make_engine(f"sqlite:///{self.db_path}")
        try:
            with Session(engine) as db, db.begin():
                for i in range(GATES):
                    status = GatewayStatus(
                        status_id=new_id(),
                        lot_id=LOT,
                        gate_id=f"g{i}",
                        state=GatewayState.ONLINE,
                        direction=Direction.ENTRY if i % 2 == 0 else Direction.EXIT,
                        firmware_version="bench",
                        boot=1,
                        sent_at=now,
                        camera_fps=15.0,
                        last_decode_ms=1.0,
                    )
                    record_status(db, status, now=now)
                for i in range(OPEN_SESSIONS):
                    open_session(
                        db,
                        account_id=f"bench-d{i}",
                        lot_id=LOT,
                        gate_id="g0",
                        event_id=new_id(),
                        entered_at=now,
                        currency="CNY",
                    )
        finally:
            engine.dispose()

    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


# -- load generators --------------------------------------------------------------------------
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_P99 = re.compile(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_ERRORS = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_DONE = re.compile(r"(\d+) requests in ")
_WRK_TIMEOUTS = re.compile(r"Socket errors:.*timeout (\d+)")
WRK_TIMEOUT_MS = 2000.0


def run_wrk(url: str, token: str, connections: int, seconds: float) -> tuple[float, float, int]:
    """req/s, p99 ms and failed (non-2xx or timed out) requests from one ``wrk`` run.

    One wrk thread: the other core is left for the service."""
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = _WRK_RPS.search(out)
    p99 = _WRK_P99.search(out)
    if rps is None or p99 is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = _WRK_ERRORS.search(out)
    failed = int(errors.group(1)) if errors else 0
    p99_ms = float(p99.group(1)) * scale
    done = _WRK_DONE.search(out)
    if done is None or int(done.group(1)) < connections:
        # Most connections never got an answer within the run: their latency is at least
        # the run's length, whatever wrk's percentiles of the few that did say.
        p99_ms = max(p99_ms, seconds * 1000)
    timeouts = _WRK_TIMEOUTS.search(out)
    if timeouts is not None and int(timeouts.group(1)) > 0:
        # wrk leaves requests it gave up on (after 2 s) out of its percentiles.
        failed += int(timeouts.group(1))
        p99_ms = max(p99_ms, WRK_TIMEOUT_MS)
    return float(rps.group(1)), p99_ms, failed


async def _client(
    host: str, port: int, path: str, token: str, connections: int, seconds: float
) -> dict[str, object]:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            errors += not head.startswith(b"HTTP/1.1 2")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) > 1 else 0.0
    return {"rps": len(latencies) / elapsed, "p99_ms": p99, "errors": errors}


def run_client(url: str, token: str, connections: int, seconds: float) -> tuple[float, float, int]:
    """The fallback load generator: this file with ``--client`` in a child process."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--client",
            url,
            "--connections",
            str(connections),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "QRPARK_API_TOKEN": token},
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return float(result["rps"]), float(result["p99_ms"]), int(result["errors"])


def load(url: str, token: str, connections: int, seconds: float) -> tuple[float, float, int, str]:
    if shutil.which("wrk"):
        return (*run_wrk(url, token, connections, seconds), "wrk")
    return (*run_client(url, token, connections, seconds), "asyncio client, NOT wrk")


def load_average() -> str:
    """The 1-minute load average and the core count, e.g. ``load 3.1/2``."""
    try:
        return f"load {os.getloadavg()[0]:.1f}/{os.cpu_count()}"
    except OSError:  # pragma: no cover - no getloadavg on this platform
        return "load ?"


def warn_without_wrk() -> None:
    if shutil.which("wrk") is None:
        print(
            "bench_api: wrk is not installed (apt-get install -y wrk); falling back to the"
            " asyncio client, which saturates before the service does: these req/s and p99"
            " figures are NOT comparable with wrk's",
            file=sys.stderr,
            flush=True,
        )


def run(
    quick: bool = True,
    *,
    connections: int = 50,
    seconds: float | None = None,
    rounds: int = 1,
) -> list[Figure]:
    """req/s and p99 of the two panel reads at ``connections`` connections (with ``rounds``
    > 1, each endpoint is loaded that many times and the median round is reported)."""
    seconds = seconds or (8.0 if quick else 20.0)
    warn_without_wrk()
    token = bearer_token()
    server = ApiServer(token)
    figures: list[Figure] = []
    try:
        server.provision()
        endpoints = {
            "lot occupancy GET /lots/{id}": f"/api/v1/lots/{LOT}",
            "gate status GET /lots/{id}/gates": f"/api/v1/lots/{LOT}/gates",
        }
        # One connection, one request at a time, first: what a request costs when nothing
        # waits (a 50-connection run can leave the service wedged for seconds after it).
        for label, path in endpoints.items():
            single, single_p99, _, _ = load(server.base + path, token, 1, 3.0)
            print(
                f"API: {label:<34} {single:>8.1f} req/s  p99 {single_p99:6.1f} ms  (1 connection)"
            )
            figures.append(Figure(f"API: {label}, 1 connection", single, "req/s"))
        for label, path in endpoints.items():
            url = server.base + path
            load(url, token, connections, 2.0)  # warm up: connections, pool, caches
            results = []
            for _ in range(max(1, rounds)):
                before = load_average()
                rps, p99, errors, tool = load(url, token, connections, seconds)
                print(
                    f"API: {label:<34} {rps:>8.1f} req/s  p99 {p99:6.1f} ms  failed {errors}"
                    f"  ({tool}, {connections} connections, {seconds:g} s;"
                    f" {before} -> {load_average()})",
                    flush=True,
                )
                results.append((p99, rps, errors))
            p99, rps, errors = sorted(results)[len(results) // 2]  # the median round by p99
            figures += [
                Figure(f"API: {label}, {connections} conns", rps, "req/s", TARGET_RPS, True),
                Figure(f"API: {label} p99, {connections} conns", p99, "ms", TARGET_P99_MS),
                Figure(f"API: {label} non-2xx or timed out", float(errors), ""),
            ]
    finally:
        server.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--rounds", type=int, default=1, help="50-connection runs per endpoint")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        match = re.match(r"http://([^:/]+):(\d+)(/.*)", args.client)
        if match is None:
            parser.error("--client needs http://host:port/path")
        result = asyncio.run(
            _client(
                match.group(1),
                int(match.group(2)),
                match.group(3),
                os.environ.get("QRPARK_API_TOKEN", ""),
                args.connections,
                args.seconds or 8.0,
            )
        )
        print(json.dumps(result))
        return 0
    figures = run(
        not args.full, connections=args.connections, seconds=args.seconds, rounds=args.rounds
    )
    print_table(figures, "panel read endpoints")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
