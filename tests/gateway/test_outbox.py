from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway_firmware.core.local_verify import SpentNonce
from gateway_firmware.uplink.outbox import Outbox
from parking_protocol.messages import CommandOutcome, OfflineDecision, ScanEvent
from parking_protocol.types import Direction, GateAction, Reason

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def add(box: Outbox, event_id: str, code: str = "QP1.x") -> ScanEvent:
    return box.add(
        lambda seq, boot: ScanEvent(
            event_id=event_id,
            lot_id="lot1",
            gate_id="in1",
            seq=seq,
            boot=boot,
            direction=Direction.ENTRY,
            code=code,
            scanned_at=T0,
        )
    )


def test_event_is_durable_before_it_is_published(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    event = add(box, "event-0001")
    # Another connection (a process after a power cut) already sees it.
    with sqlite3.connect(path) as other:
        (count,) = other.execute("SELECT COUNT(*) FROM outbox").fetchone()
    assert count == 1
    box.close()
    with Outbox(path) as reopened:
        assert reopened.pending() == [event]


def test_removed_only_when_answered(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        add(box, "event-0001")
        add(box, "event-0002")
        box.mark_published("event-0001")
        assert box.depth == 2  # publishing is not an answer
        assert box.remove("event-0001") is True
        assert box.remove("event-0001") is False  # a second answer is harmless
        assert [e.event_id for e in box.pending()] == ["event-0002"]


def test_seq_is_monotonic_across_restarts_and_boot_increments(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as first:
        assert first.boot == 1
        seqs = [add(first, f"event-a{i:03d}").seq for i in range(3)]
        first.remove("event-a000")
    with Outbox(path) as second:
        assert second.boot == 2
        later = add(second, "event-b001")
    assert seqs == [1, 2, 3]
    assert (later.seq, later.boot) == (4, 2)
    with Outbox(path) as third:
        assert third.boot == 3
        assert third.last_seq == 4


def test_pending_is_in_sequence_order_for_replay(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        for i in range(5):
            add(box, f"event-{i:04d}")
        box.remove("event-0002")
        assert [e.seq for e in box.pending()] == [1, 2, 4, 5]


def test_offline_decision_is_stored_for_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    decision = OfflineDecision(action=GateAction.OPEN, reason=Reason.WELCOME, decided_at=T0)
    with Outbox(path) as box:
        add(box, "event-0001")
        updated = box.set_offline("event-0001", decision)
        assert updated is not None
        assert box.set_offline("event-9999", decision) is None
    with Outbox(path) as box:
        (event,) = box.pending()
        assert event.offline == decision
        assert event.seq == 1


def test_a_failed_build_allocates_nothing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:

        def broken(seq: int, boot: int) -> ScanEvent:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            box.add(broken)
        assert add(box, "event-0001").seq == 1
        assert box.depth == 1


def test_database_runs_in_wal_mode(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        (mode,) = box._conn.execute("PRAGMA journal_mode").fetchone()
    assert mode == "wal"


def test_command_answers_survive_a_reopen_bounded_and_updated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        for i in range(5):
            box.save_command_answer(f"c{i}", CommandOutcome.REJECTED, "not awaiting", keep=3)
        box.save_command_answer("c3", CommandOutcome.DONE, "closed", keep=3)  # accepted -> done
    with Outbox(path) as reopened:
        assert reopened.load_command_answers() == [
            ("c2", CommandOutcome.REJECTED, "not awaiting"),
            ("c3", CommandOutcome.DONE, "closed"),
            ("c4", CommandOutcome.REJECTED, "not awaiting"),
        ]
        assert [cid for cid, _, _ in reopened.load_command_answers(limit=2)] == ["c3", "c4"]


def test_spent_nonces_survive_a_reopen_until_they_expire(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    exp = T0 + timedelta(seconds=60)
    with Outbox(path) as box:
        box.save_spent_nonce(SpentNonce("n-early", T0 + timedelta(seconds=10)), now=T0)
        box.save_spent_nonce(SpentNonce("n-late", exp), now=T0)
    with Outbox(path) as reopened:
        assert reopened.load_spent_nonces(T0) == [
            SpentNonce("n-early", T0 + timedelta(seconds=10)),
            SpentNonce("n-late", exp),
        ]
        # Expired ones are pruned from the file, not only filtered out.
        assert reopened.load_spent_nonces(T0 + timedelta(seconds=10)) == [SpentNonce("n-late", exp)]
        (rows,) = reopened._conn.execute("SELECT COUNT(*) FROM spent_nonces").fetchone()
        assert rows == 1
        assert reopened.load_spent_nonces(exp) == []


def test_spent_nonces_are_bounded_and_pruned_on_save(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        box.save_spent_nonce(SpentNonce("old", T0 + timedelta(seconds=1)), now=T0)
        later = T0 + timedelta(seconds=5)
        for i in range(5):
            box.save_spent_nonce(
                SpentNonce(f"n{i}", later + timedelta(seconds=60)), now=later, keep=3
            )
        assert [s.nonce for s in box.load_spent_nonces(later)] == ["n2", "n3", "n4"]
