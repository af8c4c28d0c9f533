"""How much simulation one process carries.

(a) The fleet simulator (``sim_devices.fleet``, what ``qrpark sim`` runs): N simulated gates
    of the real gateway firmware, each with a rendering camera at ``--fps``, in ONE process,
    against a private Mosquitto and the central service (``sim_devices.cli.LocalBackend``).
    Each N runs in a fresh child process; its setup (provisioning, starting the gateways,
    until every one is connected) is timed, then traffic runs for the measured seconds. It
    "keeps up" when the cameras deliver >= 95 % of the frames asked for, every gateway is
    online and no event is left unanswered. Reports the largest N that keeps up, with its
    frames/s, CPU (the event loop's thread, and the whole process with its render and
    decode threads, each of one core), RSS and setup time. The machine's load average is
    printed with each run: other work on the cores shows in the figures.

    Every simulated gateway commits its outbox synchronously, as on its Pi, but here a
    thousand of them share one event loop and one disk: each fsync (~1.5 ms on the
    development machine, ~80/s at this traffic) stalls every lane. ``--outboxes-in-ram``
    puts the outboxes on a RAM disk (/dev/shm) to measure the simulator without that;
    the service's database and the broker stay on disk either way.
(b) The deterministic simulation (``qrpark simtest``): virtual seconds per real second over
    a few seeds of ``Runner(SimConfig()).run_seed``.

    python bench/bench_sim.py [--full] [--gates 100 300 1000] [--outboxes-in-ram]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure, print_table

GATES_PER_LOT = 4
KEEP_UP = 0.95


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _fleet_child(
    gates: int, seconds: float, fps: float, data_dir: Path, gateway_dir: Path | None
) -> dict[str, Any]:
    """Run in the child: start a fleet of ``gates`` gates, drive it, measure this process."""
    import logging

    from parking_protocol.clock import SystemClock
    from sim_devices.cli import LocalBackend
    from sim_devices.fleet import Fleet, FleetConfig

    logging.basicConfig(level=logging.ERROR)
    begun = time.monotonic()

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - begun:6.1f} s] {what}", file=sys.stderr, flush=True)

    backend = LocalBackend(data_dir)
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(backend.healthy):
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become healthy")
            await asyncio.sleep(0.2)
        lots = max(1, gates // GATES_PER_LOT)
        config = FleetConfig(
            lots=lots,
            gates=GATES_PER_LOT,
            drivers=2,
            rate=3.0,  # arrivals per minute per lot: a busy lane's ~400 vehicles/h at 1,000
            dwell_s=(2.0, 6.0),
            short_of_money=0.0,
            fps=fps,
            data_dir=data_dir / "fleet",
            gateway_dir=gateway_dir,
            prefix="b",
        )
        progress("service healthy")
        fleet = Fleet(config, backend, SystemClock())
        setup_started = time.monotonic()
        await fleet.start()  # provisions over REST, starts the gateways (both concurrently)
        progress(f"{len(fleet.lanes)} gateways started")
        all_online = await fleet.wait_online(60)
        setup_s = time.monotonic() - setup_started
        progress(f"online: {all_online}")
        frames0 = fleet.gateway_totals().get("frames", 0)
        cpu0, loop0, wall0 = _cpu_s(), time.thread_time(), time.monotonic()
        load0 = os.getloadavg()[0]
        await fleet.run(seconds)
        progress("traffic done")
        wall = time.monotonic() - wall0
        cpu = _cpu_s() - cpu0
        loop_cpu = time.thread_time() - loop0  # this thread runs the event loop
        totals = fleet.gateway_totals()
        rss = _rss_mb()
        settled = await fleet.settle(15.0)
        summary = fleet.summary()
        progress(f"settled: {settled}")
        result = {
            "gates": len(fleet.lanes),
            "outboxes": "disk" if gateway_dir is None else "ram",
            "setup_s": setup_s,
            "frames_per_s": (totals.get("frames", 0) - frames0) / wall,
            "frames_asked_per_s": len(fleet.lanes) * fps,
            "cpu_share": cpu / wall,
            "loop_cpu_share": loop_cpu / wall,
            "load_average": max(load0, os.getloadavg()[0]),
            "rss_mb": rss,
            "online": totals.get("online", 0),
            "settled": settled,
            "outbox_remaining": summary["outbox_remaining"],
            "entries": summary["entries"],
            "exits": summary["exits"],
            "latency_p99_ms": summary["latency_p99_ms"],
        }
        # Printed before the teardown: stopping 1,000 gateways is slow, and not measured.
        print(json.dumps(result), flush=True)
        try:
            await asyncio.wait_for(fleet.stop(), 60)
        except TimeoutError:
            progress("fleet stop timed out")
        progress("fleet stopped")
    finally:
        backend.close()
    return result


def fleet_run(
    gates: int,
    seconds: float,
    fps: float,
    timeout_s: float = 300.0,
    *,
    outboxes_in_ram: bool = False,
) -> dict[str, Any] | None:
    """One fleet size in a fresh child process; None when it failed to start or finish."""
    work = Path(tempfile.mkdtemp(prefix="qrpark-bench-sim-"))
    ram = Path("/dev/shm")  # a private directory is made in it, and removed after
    outboxes: Path | None = None
    if outboxes_in_ram and ram.is_dir() and os.access(ram, os.W_OK):
        outboxes = Path(tempfile.mkdtemp(prefix="qrpark-bench-sim-gw-", dir=ram))
    # Its own process group: on a timeout the child's broker and service go with it.
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            str(gates),
            "--seconds",
            str(seconds),
            "--fps",
            str(fps),
            "--data-dir",
            str(work),
            *(["--gateway-dir", str(outboxes)] if outboxes is not None else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = child.communicate(timeout=seconds + timeout_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, sig)
            time.sleep(2)
        out, err = child.communicate()
        print(f"    fleet of {gates}: timed out; last progress:\n{err[-1500:]}", flush=True)
        if '"gates"' not in out:
            return None
        # Measured, then stuck in the teardown: the figures stand.
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if outboxes is not None:
            shutil.rmtree(outboxes, ignore_errors=True)
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    if not lines:
        print(f"    fleet of {gates} failed:\n{err[-2000:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def keeps_up(result: dict[str, Any]) -> bool:
    return bool(
        result["frames_per_s"] >= KEEP_UP * result["frames_asked_per_s"]
        and result["online"] == result["gates"]
        and result["outbox_remaining"] == 0
    )


def simtest_speed(seeds: list[int]) -> tuple[float, float, float]:
    """Virtual and real seconds over ``seeds``, and the worst seed's speed-up."""
    from qrpark.simtest import Runner, SimConfig, quiet_logs

    quiet_logs()
    runner = Runner(SimConfig())
    virtual = real = 0.0
    worst = float("inf")
    try:
        for seed in seeds:
            result = runner.run_seed(seed)
            virtual += result.virtual_s
            real += result.real_s
            worst = min(worst, result.virtual_s / result.real_s)
            print(
                f"    simtest seed {seed}: {'ok' if result.ok else 'FAILED'}, "
                f"{result.virtual_s / 3600:.2f} h in {result.real_s:.2f} s "
                f"({result.virtual_s / result.real_s:.0f}x)",
                flush=True,
            )
    finally:
        runner.close()
    return virtual, real, worst


def run(
    quick: bool = True,
    *,
    gates: list[int] | None = None,
    fps: float = 10.0,
    outboxes_in_ram: bool = False,
) -> list[Figure]:
    """(a) the largest fleet one process keeps up with; (b) simtest's speed-up."""
    sizes = gates or ([100, 300, 600, 1000] if quick else [100, 250, 500, 750, 1000])
    seconds = 10.0 if quick else 30.0
    best: dict[str, Any] | None = None
    for size in sizes:
        result = fleet_run(size, seconds, fps, outboxes_in_ram=outboxes_in_ram)
        if result is None:
            break
        ok = keeps_up(result)
        print(
            f"sim: fleet {result['gates']:>5} gates @ {fps:g} fps: "
            f"{result['frames_per_s']:>7.0f}/{result['frames_asked_per_s']:.0f} frames/s, "
            f"CPU loop {result['loop_cpu_share']:.0%} / process {result['cpu_share']:.0%} of a "
            f"core, RSS {result['rss_mb']:.0f} MB, online {result['online']}, "
            f"in/out {result['entries']}/{result['exits']}, "
            f"outbox left {result['outbox_remaining']}, setup {result['setup_s']:.0f} s, "
            f"outboxes on {result['outboxes']}, load average {result['load_average']:.1f}"
            f" -> {'keeps up' if ok else 'FALLS BEHIND'}",
            flush=True,
        )
        if not ok:
            break
        best = result
    figures = [
        Figure(
            "sim: fleet: gates one process keeps up with",
            float(best["gates"]) if best else 0.0,
            "gates",
            1000.0,
            higher_is_better=True,
        )
    ]
    if best is not None:
        figures += [
            Figure(f"sim: fleet of {best['gates']}: camera frames/s", best["frames_per_s"], "/s"),
            Figure(
                f"sim: fleet of {best['gates']}: event loop CPU (of one core)",
                best["loop_cpu_share"] * 100,
                "%",
                80.0,
            ),
            Figure(
                f"sim: fleet of {best['gates']}: process CPU (of one core)",
                best["cpu_share"] * 100,
                "%",
            ),
            Figure(f"sim: fleet of {best['gates']}: RSS", best["rss_mb"], "MB"),
            Figure(f"sim: fleet of {best['gates']}: setup until all online", best["setup_s"], "s"),
        ]
    virtual, real, worst = simtest_speed([1, 2] if quick else [1, 2, 3, 4, 5])
    figures += [
        Figure(
            "sim: simtest speed (virtual s / real s)",
            virtual / real if real else 0.0,
            "x",
            100.0,
            higher_is_better=True,
        ),
        Figure("sim: simtest slowest seed", worst, "x", 100.0, higher_is_better=True),
    ]
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--gates", type=int, nargs="*", default=None, help="fleet sizes to try")
    parser.add_argument("--fps", type=float, default=10.0)
    parser.add_argument(
        "--outboxes-in-ram", action="store_true", help="the gateways' outboxes on /dev/shm"
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gateway-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        asyncio.run(
            _fleet_child(args.child, args.seconds, args.fps, args.data_dir, args.gateway_dir)
        )
        return 0
    figures = run(
        not args.full, gates=args.gates, fps=args.fps, outboxes_in_ram=args.outboxes_in_ram
    )
    print_table(figures, "simulation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
