"""Bar charts as geometry, pure: the money page draws them as inline SVG (no script, no CDN).

Amounts stay integers (minor units) until they are labelled; a bar's height is the only float.

>>> chart = columns(["Mon", "Tue"], [Series("Main", (500, 1500))], label=str)
>>> [round(bar.height) for bar in chart.bars], chart.ticks[-1].text
([60, 180], '2000')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["PALETTE", "Bar", "Chart", "Row", "Series", "Tick", "columns", "nice_step", "rows"]

PALETTE = ("#2563eb", "#0d9488", "#f59e0b", "#db2777", "#7c3aed", "#64748b")

WIDTH = 960
HEIGHT = 280
LEFT, RIGHT, TOP, BOTTOM = 72, 8, 12, 28
MAX_LABELS = 12


@dataclass(frozen=True, slots=True)
class Series:
    """One stack of a column chart (a lot): a value per category (a day)."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    fill: str
    title: str


@dataclass(frozen=True, slots=True)
class Tick:
    x: float
    y: float
    text: str


@dataclass(frozen=True, slots=True)
class Row:
    """A labelled horizontal bar (``percent`` of the longest) with its value written after it."""

    label: str
    value_text: str
    percent: float
    fill: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    bars: tuple[Bar, ...] = ()
    ticks: tuple[Tick, ...] = ()  # y-axis values, with a grid line each
    labels: tuple[Tick, ...] = ()  # x-axis category names
    rows: tuple[Row, ...] = ()
    legend: tuple[tuple[str, str], ...] = ()  # (colour, name)
    empty: bool = False


def nice_step(top: int, steps: int = 4, unit: int = 1) -> int:
    """A round step (1, 2, 2.5 or 5 times a power of ten, at least ``unit``) covering ``top``."""
    raw = max(unit, -(-max(top, 1) // steps))
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    for factor in (1, 2, 5, 10):
        if factor == 5 and magnitude >= 10 and raw <= magnitude * 5 // 2:
            return magnitude * 5 // 2
        if raw <= magnitude * factor:
            return magnitude * factor
    return magnitude * 10  # pragma: no cover - the loop always returns


def columns(
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    label: Callable[[int], str],
    unit: int = 1,
) -> Chart:
    """Stacked columns, one per category; negative values are drawn as zero (titles say why)."""
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    totals = [sum(max(0, s.values[i]) for s in series) for i in range(len(categories))]
    step = nice_step(max(totals, default=0), unit=unit)
    scale_top = step * 4
    ticks = tuple(Tick(LEFT - 6, TOP + plot_h - plot_h * k / 4, label(step * k)) for k in range(5))
    slot = plot_w / max(1, len(categories))
    bar_w = max(2.0, slot * 0.7)
    bars: list[Bar] = []
    for i, category in enumerate(categories):
        base: float = TOP + plot_h
        x = LEFT + slot * i + (slot - bar_w) / 2
        for n, item in enumerate(series):
            value = item.values[i]
            if value <= 0:
                continue
            height = plot_h * value / scale_top
            base -= height
            title = f"{item.name}, {category}: {label(value)}"
            bars.append(Bar(x, base, bar_w, height, PALETTE[n % len(PALETTE)], title))
    every = max(1, -(-len(categories) // MAX_LABELS))
    labels = tuple(
        Tick(LEFT + slot * i + slot / 2, HEIGHT - 8, name)
        for i, name in enumerate(categories)
        if i % every == 0
    )
    legend = tuple((PALETTE[n % len(PALETTE)], s.name) for n, s in enumerate(series))
    return Chart(WIDTH, HEIGHT, tuple(bars), ticks, labels, legend=legend, empty=not any(totals))


def rows(items: Sequence[tuple[str, int]], *, label: Callable[[int], str]) -> Chart:
    """One horizontal bar per item (a lot), the largest value full length; none below zero."""
    top = max((value for _name, value in items), default=0)
    drawn = tuple(
        Row(
            name,
            label(value),
            round(100 * max(0, value) / top, 2) if top > 0 else 0.0,
            PALETTE[i % len(PALETTE)],
        )
        for i, (name, value) in enumerate(items)
    )
    return Chart(WIDTH, 0, rows=drawn, empty=top <= 0)
