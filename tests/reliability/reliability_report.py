"""What ``tests/reliability/`` tried, counted by its tests (see conftest.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Report"]


@dataclass
class Report:
    events_sent: int = 0
    events_lost: int = 0
    events_doubled: int = 0
    crashes: int = 0
    seeds: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    bad_inputs: Counter[str] = field(default_factory=Counter)

    def events(self, sent: int, *, lost: int = 0, doubled: int = 0) -> None:
        self.events_sent += sent
        self.events_lost += lost
        self.events_doubled += doubled

    def empty(self) -> bool:
        return not (self.events_sent or self.faults or self.bad_inputs or self.seeds)

    def lines(self) -> list[str]:
        rows: list[tuple[str, str]] = [
            ("events sent", f"{self.events_sent:,}"),
            ("events lost", f"{self.events_lost:,}"),
            ("events doubled", f"{self.events_doubled:,}"),
            ("processes crashed by bad input", f"{self.crashes:,}"),
            ("simulation seeds run", f"{self.seeds:,}"),
            ("faults injected", f"{sum(self.faults.values()):,}"),
        ]
        rows += [(f"  {kind}", f"{n:,}") for kind, n in sorted(self.faults.items())]
        rows.append(("bad inputs tried", f"{sum(self.bad_inputs.values()):,}"))
        rows += [(f"  {kind}", f"{n:,}") for kind, n in sorted(self.bad_inputs.items())]
        width = max(len(name) for name, _ in rows)
        return [f"{name:<{width}}  {value:>12}" for name, value in rows]
