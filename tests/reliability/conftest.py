"""The reliability report: what ``tests/reliability/`` tried, printed at the end of the run.

Each test adds what it did to the session's :class:`Report` (fixture ``report``): events
sent and how many were lost or doubled, faults injected by kind, bad inputs tried by
kind, processes that crashed, seeds run. ``pytest_terminal_summary`` prints one table;
a test that failed still shows what it had counted.
"""

from __future__ import annotations

import pytest
from reliability_report import Report

_KEY = pytest.StashKey["Report"]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_KEY] = Report()


@pytest.fixture(scope="session")
def report(pytestconfig: pytest.Config) -> Report:
    return pytestconfig.stash[_KEY]


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    found = config.stash.get(_KEY, None)
    if found is None or found.empty():
        return
    terminalreporter.section("reliability: what was tried")
    for line in found.lines():
        terminalreporter.write_line(line)
