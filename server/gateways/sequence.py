"""Sequence-gap detection per gateway (pure: data in, data out; no IO, no clock).

Every scan event carries the gateway's ``seq`` (one more per event) and ``boot``. An event
that arrives with a ``seq`` past the next expected one means events in between have not
reached us: lost by nobody yet (the gateway keeps each in its outbox until acknowledged,
and replays them after a reconnect), but the operator should know a lane is behind, and
the service must not treat the later ones as the whole story. The tracker records the
missing numbers, and closes them as they arrive.

Gateways with a counter that continues across restarts (this firmware) and ones that start
again at every boot are both understood: a new ``boot`` whose ``seq`` is not above the
highest seen so far is a counter reset, and what was still missing from the earlier run
is reported as abandoned (those events can only arrive with their old boot number, which
is not tracked any more).

>>> t = SeqTracker()
>>> t.observe("lot1", "in1", boot=1, seq=1).opened
()
>>> t.observe("lot1", "in1", boot=1, seq=4).opened
(2, 3)
>>> t.observe("lot1", "in1", boot=1, seq=2).closed
(2,)
>>> t.missing()
{('lot1', 'in1'): (3,)}
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GapChange", "SeqTracker"]

MAX_MISSING = 1000
"""Per gate, at most this many missing seqs are kept (the newest; a larger jump is
recorded as its first ``MAX_MISSING`` numbers)."""


@dataclass(frozen=True, slots=True)
class GapChange:
    """What one observed event changed: seqs now missing, arrived, or given up on."""

    opened: tuple[int, ...] = ()
    closed: tuple[int, ...] = ()
    abandoned: tuple[int, ...] = ()


@dataclass(slots=True)
class _Lane:
    boot: int
    highest: int
    missing: set[int] = field(default_factory=set)


class SeqTracker:
    """The sequence state of every gateway seen by this process."""

    def __init__(self) -> None:
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self.gaps_opened = 0

    def observe(self, lot_id: str, gate_id: str, *, boot: int, seq: int) -> GapChange:
        key = (lot_id, gate_id)
        lane = self._lanes.get(key)
        if lane is None:
            # The first event of a gateway seen by this process: nothing to compare with.
            self._lanes[key] = _Lane(boot=boot, highest=seq)
            return GapChange()
        if boot > lane.boot and seq <= lane.highest:
            abandoned = tuple(sorted(lane.missing))
            self._lanes[key] = _Lane(boot=boot, highest=seq)
            return GapChange(abandoned=abandoned)
        lane.boot = max(lane.boot, boot)
        if seq > lane.highest:
            opened = tuple(range(lane.highest + 1, min(seq, lane.highest + 1 + MAX_MISSING)))
            lane.highest = seq
            if opened:
                lane.missing.update(opened)
                self.gaps_opened += 1
                while len(lane.missing) > MAX_MISSING:
                    lane.missing.discard(min(lane.missing))
            return GapChange(opened=opened)
        if seq in lane.missing:
            lane.missing.discard(seq)
            return GapChange(closed=(seq,))
        return GapChange()  # a redelivery or a replay of an event already seen

    def missing(self) -> dict[tuple[str, str], tuple[int, ...]]:
        """Gateways with events not yet arrived, and their seqs."""
        return {
            key: tuple(sorted(lane.missing)) for key, lane in self._lanes.items() if lane.missing
        }
