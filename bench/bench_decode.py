"""How fast and how reliably each QR decoder reads rendered 640x480 lane frames.

    python bench/bench_decode.py [--frames N] [--seed S]

Renders N frames per variant (clean, blur 1.5, noise, tilt, low contrast, rotation, glare),
each with a fresh, real parking code, plus N frames without a code, then times every
backend and pipeline on the same frames. A read counts only if the decoder returns exactly
the code that was rendered.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure
from gateway_firmware.hardware.decoders import (
    OpenCVDecoder,
    PipelineDecoder,
    PyzbarDecoder,
    ZxingDecoder,
)
from gateway_firmware.hardware.interfaces import Decoder, Frame
from parking_protocol.qr_token import issue_code
from sim_devices.render import (
    BLUR_1_5,
    CLEAN,
    GLARE,
    LOW_CONTRAST,
    NOISY,
    ROTATED,
    TILTED,
    FrameVariant,
    random_variant,
    render_frame,
)

VARIANTS: tuple[FrameVariant, ...] = (CLEAN, BLUR_1_5, NOISY, TILTED, LOW_CONTRAST, ROTATED, GLARE)
# Not in the headline read rate: a realistic mix of all effects at once (random_variant).
RANDOM = "random"


@dataclass
class Result:
    name: str
    times_ms: list[float]
    empty_ms: list[float]
    reads: dict[str, int]
    total: int

    @property
    def read_rate(self) -> float:
        return sum(n for variant, n in self.reads.items() if variant != RANDOM) / self.total


def build_frames(
    per_variant: int, seed: int
) -> tuple[list[tuple[str, str, Frame]], list[Frame], tuple[float, float]]:
    rng = np.random.default_rng(seed)
    key = Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big"))  # same frames per seed
    now = datetime(2026, 1, 1, tzinfo=UTC)
    frames: list[tuple[str, str, Frame]] = []
    started = time.perf_counter()
    for variant in (*VARIANTS, None):
        for i in range(per_variant):
            code = issue_code(key, kid="k1", account_id=f"acc_{seed:04x}{i:012x}", now=now)
            shown = variant if variant is not None else random_variant(rng)
            name = variant.name if variant is not None else RANDOM
            frames.append((name, code, render_frame(code, shown, rng)))
    empty = [render_frame(None, CLEAN, rng) for _ in range(per_variant)]
    new_code_ms = (time.perf_counter() - started) * 1000 / (len(frames) + len(empty))
    started = time.perf_counter()
    for _ in range(per_variant):  # a known code: its QR matrix is cached (SimCamera's case)
        render_frame(frames[0][1], CLEAN, rng)
    known_code_ms = (time.perf_counter() - started) * 1000 / per_variant
    return frames, empty, (new_code_ms, known_code_ms)


def measure(decoder: Decoder, frames: list[tuple[str, str, Frame]], empty: list[Frame]) -> Result:
    decoder.decode(frames[0][2])  # warm up (lazy initialisation, caches)
    times: list[float] = []
    reads = dict.fromkeys((*(v.name for v in VARIANTS), RANDOM), 0)
    for variant, code, frame in frames:
        started = time.perf_counter()
        texts = decoder.decode(frame)
        elapsed = (time.perf_counter() - started) * 1000
        reads[variant] += texts == [code]
        if variant != RANDOM:
            times.append(elapsed)
    empty_ms = []
    for frame in empty:
        started = time.perf_counter()
        texts = decoder.decode(frame)
        empty_ms.append((time.perf_counter() - started) * 1000)
        if texts:
            print(f"!! {decoder.name} read {texts!r} in a frame without a code")
    return Result(decoder.name, times, empty_ms, reads, len(times))


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def decoders() -> list[Decoder]:
    made: list[Decoder] = []
    for factory in (ZxingDecoder, PyzbarDecoder, OpenCVDecoder):
        try:
            made.append(factory())
        except RuntimeError as exc:
            print(f"skipping: {exc}")
    # The pipeline: a half-size frame first, full resolution only when that finds nothing.
    made += [PipelineDecoder(inner, downscale=0.5) for inner in list(made)]
    return made


def report(results: list[Result], per_variant: int, render_ms: tuple[float, float]) -> None:
    summary_head = ["decoder", "median ms", "p95 ms", "read rate", "no-code median ms"]
    summary = [
        [
            r.name,
            f"{statistics.median(r.times_ms):.2f}",
            f"{p95(r.times_ms):.2f}",
            f"{r.read_rate:.1%}",
            f"{statistics.median(r.empty_ms):.2f}",
        ]
        for r in results
    ]
    names = [*(v.name for v in VARIANTS), RANDOM]
    variant_head = ["decoder", *names]
    per_variant_rows = [[r.name, *(f"{r.reads[n]}/{per_variant}" for n in names)] for r in results]
    title = (
        f"QR decode, 640x480 grayscale, {per_variant} frames per variant "
        f"({len(VARIANTS) * per_variant} with a code, {per_variant} without; "
        f"'{RANDOM}' is a mix of all effects, not in the read rate)"
    )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        plain_table(summary_head, summary)
        print("\nreads per variant")
        plain_table(variant_head, per_variant_rows)
    else:
        console = Console(width=max(Console().width, 110))
        for name, head, rows in (
            (title, summary_head, summary),
            ("reads per variant", variant_head, per_variant_rows),
        ):
            table = Table(title=name)
            for i, column in enumerate(head):
                table.add_column(column, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            console.print(table)
    print(
        f"rendering: {render_ms[0]:.1f} ms/frame for a new code (builds its QR matrix), "
        f"{render_ms[1]:.1f} ms for a known one\n"
        f"python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )


def plain_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(head, *rows, strict=True)]
    for row in (head, *rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def run(quick: bool = True) -> list[Figure]:
    """The default decoder's figures against issue 7's gateway targets."""
    per_variant = 10 if quick else 30
    frames, empty, _ = build_frames(per_variant, seed=1)
    chosen = ZxingDecoder()
    result = measure(chosen, frames, empty)
    return [
        Figure(
            f"decode median per 640x480 frame ({chosen.name})",
            statistics.median(result.times_ms),
            "ms",
            2.0,
        ),
        Figure(
            "decode reads across variants", result.read_rate * 100, "%", 98.0, higher_is_better=True
        ),
        Figure("decode of a frame with no code", statistics.median(result.empty_ms), "ms", 0.5),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--frames", type=int, default=30, help="frames per variant (30)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (1)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    frames, empty, render_ms = build_frames(args.frames, args.seed)
    results = [measure(decoder, frames, empty) for decoder in decoders()]
    report(results, args.frames, render_ms)
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
