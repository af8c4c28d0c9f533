from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway_firmware.core.debounce import Debouncer

T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_same_code_within_window_is_one_scan() -> None:
    debouncer = Debouncer(timedelta(seconds=5))
    assert debouncer.accept("QP1.a", at(0)) is True
    assert debouncer.accept("QP1.a", at(0.1)) is False
    assert debouncer.accept("QP1.a", at(4.9)) is False


def test_code_held_in_view_stays_one_scan_until_it_is_gone_for_the_window() -> None:
    debouncer = Debouncer(timedelta(seconds=5))
    assert debouncer.accept("QP1.a", at(0))
    # Seen every 2 s for 20 s: still the same scan.
    assert not any(debouncer.accept("QP1.a", at(t)) for t in range(2, 22, 2))
    # Out of view for 5 s: a new scan.
    assert debouncer.accept("QP1.a", at(25)) is True


def test_different_codes_are_different_scans() -> None:
    debouncer = Debouncer(timedelta(seconds=5))
    assert debouncer.accept("QP1.a", at(0))
    assert debouncer.accept("QP1.b", at(0.5))
    assert not debouncer.accept("QP1.a", at(1))


def test_memory_is_bounded() -> None:
    debouncer = Debouncer(timedelta(seconds=5), max_entries=3)
    for i in range(10):
        debouncer.accept(f"code{i}", at(0))
    assert len(debouncer._last_seen) == 3
    assert debouncer.accept("code0", at(1)) is True  # evicted, so counted again


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Debouncer(timedelta(0))
