"""What every benchmark returns, and the table ``bench/run_all.py`` prints."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Figure", "print_table"]


@dataclass(frozen=True)
class Figure:
    """One measured figure against its target (``None``: reported, no target)."""

    name: str
    measured: float
    unit: str
    target: float | None = None
    higher_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        """How many times over the target is met (>= 1 means met)."""
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.measured / self.target
        if self.measured == 0:
            return float("inf")
        return self.target / self.measured

    def cells(self) -> list[str]:
        sign = ">=" if self.higher_is_better else "<="
        target = "" if self.target is None else f"{sign} {self.target:g} {self.unit}"
        ratio = self.ratio
        verdict = "" if ratio is None else ("ok" if ratio >= 1 else "MISSED")
        return [
            self.name,
            target,
            f"{self.measured:.4g} {self.unit}",
            "" if ratio is None else f"{ratio:.2f}",
            verdict,
        ]


def print_table(figures: list[Figure], title: str = "qrpark benchmarks") -> None:
    head = ["figure", "target", "measured", "ratio", ""]
    rows = [figure.cells() for figure in figures]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is in the sim extra
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        print(title)
        for row in [head, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        return
    table = Table(title=title)
    for column in head:
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in rows:
        table.add_row(*row, style="red" if row[-1] == "MISSED" else None)
    Console(width=140).print(table)
