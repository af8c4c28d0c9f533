"""``qrpark sim``: fault specs, argument checks, and a short real fleet run with faults."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from qrpark.services import MosquittoProcess
from sim_devices.cli import main
from sim_devices.fleet import Fault, FaultError, FleetConfig, parse_fault


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("cut-gateway:lot1/out1@30+60", Fault("cut-gateway", 30, 60, "lot1", "out1")),
        ("cut-lot:sim2@5.5+10", Fault("cut-lot", 5.5, 10, "sim2")),
        ("camera-fail:sim1/in1@10+20", Fault("camera-fail", 10, 20, "sim1", "in1")),
        ("broker-restart@45", Fault("broker-restart", 45)),
        ("slow-server@20+8", Fault("slow-server", 20, 8)),
    ],
)
def test_fault_specs_parse(spec: str, fault: Fault) -> None:
    assert parse_fault(spec) == fault
    assert str(fault) == spec


@pytest.mark.parametrize(
    "spec",
    [
        "cut-gateway:lot1@30+60",  # needs a gate
        "cut-gateway:lot1/out1@30",  # needs a duration
        "broker-restart:lot1@4",  # takes no target
        "unplug-everything@3",
        "cut-lot:lot1/in1@1+2",
    ],
)
def test_bad_fault_specs_are_refused(spec: str) -> None:
    with pytest.raises(FaultError):
        parse_fault(spec)


def test_gate_plan_splits_entries_and_exits() -> None:
    plan = FleetConfig(gates=5).gate_plan()
    assert [g for g, _ in plan] == ["in1", "in2", "in3", "out1", "out2"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--local", "--fault", "bogus@1"],
        ["--server", "http://127.0.0.1:1"],  # no --broker
        ["--server", "http://x", "--broker", "mqtt://x", "--fault", "slow-server@1+2"],
        ["--local", "--gates", "1"],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "qrpark sim" in capsys.readouterr().err


def _run_local_fleet(tmp_path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "summary.json"
    code = main(
        [
            "--local",
            "--lots", "2",
            "--gates", "2",
            "--drivers", "6",
            "--rate", "40",
            "--dwell", "1", "3",
            *args,
            "--data-dir", str(tmp_path / "run"),
            "--no-progress",
            "--json", str(out),
        ]
    )  # fmt: skip
    return code, json.loads(out.read_text())


def assert_books_right(data_dir: Path, summary: dict[str, Any]) -> None:
    """The service's database after the run (the service has stopped): one session per
    lift of an entry barrier, closed by exactly the lifts of the exit barriers, each charged
    at most once, and a ledger whose every transaction balances.

    (Barrier lifts, not the drivers' completed visits: the end of the run can cut a visit
    short after its barrier opened.)"""
    with sqlite3.connect(data_dir / "qrpark.db") as db:
        states = dict(
            db.execute(
                "SELECT state, COUNT(*) FROM parking_sessions "
                "WHERE lot_id LIKE 'sim%' GROUP BY state"
            ).fetchall()
        )
        unbalanced = db.execute(
            "SELECT transaction_id, SUM(amount_minor) FROM ledger_postings "
            "GROUP BY transaction_id, currency HAVING SUM(amount_minor) != 0"
        ).fetchall()
        charged_twice = db.execute(
            "SELECT charge_transaction_id FROM parking_sessions "
            "WHERE charge_transaction_id IS NOT NULL "
            "GROUP BY charge_transaction_id HAVING COUNT(*) > 1"
        ).fetchall()
        charges = db.execute(
            "SELECT COUNT(*) FROM ledger_transactions WHERE kind = 'charge'"
        ).fetchone()[0]
        session_charges = db.execute(
            "SELECT COUNT(*) FROM parking_sessions WHERE charge_transaction_id IS NOT NULL"
        ).fetchone()[0]
        dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    assert unbalanced == []
    assert charged_twice == []
    assert charges == session_charges  # no charge outside a session, none doubled
    opens = summary["barrier_opens"]
    assert states.get("closed", 0) == opens["exit"] >= summary["exits"], (states, opens)
    assert states.get("closed", 0) + states.get("open", 0) == opens["entry"], (states, opens)
    assert opens["entry"] >= summary["entries"]
    assert dead == 0


@pytest.mark.slow
def test_local_fleet_with_a_cut_gateway_reconciles_everything(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """Broker + service subprocesses, 2 lots x 2 gates, one exit lane cut for 6 s."""
    del mosquitto  # only to fail (not skip) in CI when Mosquitto is missing
    code, summary = _run_local_fleet(
        tmp_path,
        "--duration", "14",
        "--fault", "cut-gateway:sim1/out1@2+6",
        "--fault", "camera-fail:sim2/in1@1+2",
    )  # fmt: skip
    assert code == 0, summary
    assert summary["settled"] and summary["outbox_remaining"] == 0
    assert summary["gates"] == 4
    assert summary["entries"] > 0 and summary["exits"] > 0
    assert summary["scans"] >= summary["entries"] + summary["exits"]
    assert summary["camera_errors"] >= 1
    # Every offline decision was replayed and answered (the outboxes are empty).
    assert summary["replayed_events"] >= summary["offline_decisions"]
    assert summary["latency_p50_ms"] is not None
    assert summary["frames_decoded"] < summary["frames"]  # idle frames are not decoded
    assert_books_right(tmp_path / "run", summary)


@pytest.mark.slow
def test_local_fleet_through_a_broker_restart_and_a_stalled_server_settles(
    mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    """The broker restarts under traffic, then the service stops answering (SIGSTOP) for
    longer than the decision timeout: scans caught in either are decided by the lanes
    (how many depends on the traffic's timing), every event is answered once both are
    back, and the books match what the barriers did."""
    del mosquitto
    code, summary = _run_local_fleet(
        tmp_path,
        "--duration", "16",
        "--fault", "broker-restart@3",
        "--fault", "slow-server@8+5",
    )  # fmt: skip
    assert code == 0, summary
    assert summary["settled"] and summary["outbox_remaining"] == 0
    assert summary["faults"] == ["broker-restart@3", "slow-server@8+5"]
    assert summary["entries"] > 0 and summary["exits"] > 0
    assert summary["broker_connects"] >= 2 * summary["gates"]  # every gateway came back
    assert_books_right(tmp_path / "run", summary)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Insufficient balance - top up in the app", "insufficient_balance"),
        ("Insufficient balance: ¥15.00 due - top up in the app", "insufficient_balance"),
        ("Code expired - refresh your code", "code_expired"),
        (None, "no_answer"),
        ("Lane closed for maintenance", "Lane closed for maintenance"),
    ],
)
def test_refusal_texts_map_to_reasons(text: str | None, reason: str) -> None:
    from sim_devices.traffic import reason_for_text

    assert reason_for_text(text) == reason
