"""Gateway figures: the decode pipeline per 640x480 frame, and the firmware idling at 15 fps.

    .venv/bin/python bench/bench_gateway.py            # ~30 s
    .venv/bin/python bench/bench_gateway.py --idle-s 20 --frames 200

1. The full pipeline the scan loop runs on a frame (to_gray + the configured decoder, as
   built by ``make_decoder``): median time and share of frames read, over rendered frames
   with random blur/noise/tilt/glare (``random_variant``), for each backend and with the
   ROI / downscale settings; and the time for a frame with no code (most frames at a lane).
2. A real ``python -m gateway_firmware --hardware sim`` process (SimCamera at 15 fps, real
   decoder, real MQTT to a private Mosquitto) left idle for N seconds: its RSS and CPU %
   from /proc/<pid>/stat and /proc/<pid>/status.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure
from gateway_firmware.hardware.decoders import DecoderUnavailable, make_decoder
from parking_protocol.qr_token import issue_code, public_key_text
from qrpark.services import MosquittoProcess
from sim_devices.render import random_variant, render_frame

CLK_TCK = os.sysconf("SC_CLK_TCK")


def frames(n: int, seed: int) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
    rng = np.random.default_rng(seed)
    key = Ed25519PrivateKey.generate()
    out = []
    for i in range(n):
        from datetime import UTC, datetime

        code = issue_code(key, kid="k1", account_id=f"driver-{i}", now=datetime.now(UTC))
        out.append((code, render_frame(code, random_variant(rng), rng)))
    blank = render_frame(None, random_variant(rng), rng)
    return out, blank


def bench_pipeline(n: int, seed: int) -> list[tuple[str, float, float, float]]:
    shots, blank = frames(n, seed)
    configs = [
        ("zxing", {}),
        ("zxing roi 480x400", {"roi": (80, 40, 480, 400)}),
        ("zxing downscale 0.5", {"downscale": 0.5}),
        ("pyzbar", {}),
        ("opencv", {}),
    ]
    rows = []
    for label, options in configs:
        backend = label.split()[0]
        try:
            decoder = make_decoder(backend, **options)  # type: ignore[arg-type]
        except DecoderUnavailable as exc:
            print(f"  {label}: unavailable ({exc})")
            continue
        times, reads = [], 0
        for code, frame in shots:
            started = time.perf_counter()
            texts = decoder.decode(frame)
            times.append(time.perf_counter() - started)
            reads += code in texts
        empty = []
        for _ in range(max(20, n // 2)):
            started = time.perf_counter()
            decoder.decode(blank)
            empty.append(time.perf_counter() - started)
        rows.append(
            (
                label,
                statistics.median(times) * 1000,
                100 * reads / len(shots),
                statistics.median(empty) * 1000,
            )
        )
    return rows


def _proc(pid: int) -> tuple[float, int]:
    """CPU seconds (user+system) and RSS in KiB of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return cpu, rss


def bench_idle(seconds: float, fps: float) -> tuple[float, float, int]:
    """(CPU % of one core, RSS MiB, frames/s reported) of an idle firmware process."""
    key = Ed25519PrivateKey.generate()
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess() as broker:
        config = Path(tmp) / "gateway.toml"
        config.write_text(
            f'lot_id = "bench"\ngate_id = "in1"\ndirection = "entry"\nhardware = "sim"\n'
            f'broker_url = "{broker.url}"\noutbox_path = "{tmp}/outbox.db"\n'
            f'heartbeat_s = 5\nlog_level = "WARNING"\n'
            f'[public_keys]\nk1 = "{public_key_text(key.public_key())}"\n'
            f"[camera]\nfps = {fps}\n"
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway_firmware",
                "--config",
                str(config),
                "--hardware",
                "sim",
            ],
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(3)  # imports, connect, first frames
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "exited")
            cpu0, _ = _proc(proc.pid)
            t0 = time.monotonic()
            time.sleep(seconds)
            cpu1, rss = _proc(proc.pid)
            elapsed = time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(10)
        return 100 * (cpu1 - cpu0) / elapsed, rss / 1024, proc.returncode


def run(quick: bool = True) -> list[Figure]:
    """The firmware idling (``bench/run_all.py``; the decode figures are bench_decode's)."""
    fps = 15.0
    cpu, rss, _ = bench_idle(10.0 if quick else 30.0, fps)
    return [
        Figure(f"gateway: firmware idle at {fps:g} fps, CPU (of one core)", cpu, "%", 25.0),
        Figure(f"gateway: firmware idle at {fps:g} fps, RSS", rss, "MiB", 150.0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=15.0)
    args = parser.parse_args()

    print(f"decode pipeline, {args.frames} rendered 640x480 frames (random blur/noise/tilt/glare)")
    print(f"  {'pipeline':<22} {'median ms':>10} {'read %':>8} {'no-code ms':>11}")
    for label, median, read, empty in bench_pipeline(args.frames, args.seed):
        print(f"  {label:<22} {median:>10.2f} {read:>8.1f} {empty:>11.2f}")

    print(f"\nfirmware process idle at {args.fps:g} fps for {args.idle_s:g} s (sim camera)")
    cpu, rss, _ = bench_idle(args.idle_s, args.fps)
    print(f"  {'CPU % of one core':<22} {cpu:>10.1f}")
    print(f"  {'RSS MiB':<22} {rss:>10.1f}")


if __name__ == "__main__":
    main()
