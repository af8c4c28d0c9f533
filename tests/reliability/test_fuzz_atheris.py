"""atheris (coverage-guided, libFuzzer) on every decoder of outside input, bounded.

Each target in ``fuzz_targets.py`` (codes, MQTT payloads, both MQTT edges) runs in its own
process, since libFuzzer owns the process and exits, from its valid seeds with a fixed
libFuzzer seed for ``RUNS`` inputs. A target passes when the process exits 0, ran them
all and left no crash, timeout or out-of-memory file. The deliberately broken target must
be caught with its crash file written, so a target that misbehaves fails here. Long runs
are by hand (see ``fuzz_targets.py``).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_targets import SELFTEST, TARGETS
from reliability_report import Report
from service_guard import missing_service

# atheris is a dev dependency. Missing, the tests skip on a laptop and FAIL in CI.
MISSING = None if importlib.util.find_spec("atheris") else "atheris is not installed"

RUNS = 3000
SCRIPT = Path(__file__).with_name("fuzz_targets.py")
FINDINGS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")

Fuzzers = dict[str, tuple[Path, "subprocess.Popen[str]"]]


def _start(name: str, work: Path) -> subprocess.Popen[str]:
    work.mkdir()
    command = [
        sys.executable,
        str(SCRIPT),
        name,
        f"-atheris_runs={RUNS}",
        "-seed=1",
        f"-artifact_prefix={work}/",
        "-max_total_time=60",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        str(work / "corpus"),
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work
    )


@pytest.fixture(scope="module")
def fuzzers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzers]:
    """Every target started at once (the machine has two cores): name -> (folder, process)."""
    if MISSING is not None:
        missing_service(f"{MISSING} (pip install -e '.[dev]')")
    base = tmp_path_factory.mktemp("atheris")
    started = {name: (base / name, _start(name, base / name)) for name in TARGETS}
    yield started
    for _, process in started.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def _finish(fuzzers: Fuzzers, name: str) -> tuple[Path, int, str, int]:
    work, process = fuzzers[name]
    output, _ = process.communicate(timeout=100)
    done = re.search(r"^Done (\d+) in ", output, re.MULTILINE)
    units = re.search(r"number_of_executed_units: (\d+)", output)
    runs = int(done[1]) if done else int(units[1]) if units else 0
    return work, process.returncode, output, runs


@pytest.mark.parametrize("name", [name for name in TARGETS if name != SELFTEST])
def test_target_lets_only_typed_rejections_through(
    fuzzers: Fuzzers, report: Report, name: str
) -> None:
    work, returncode, output, runs = _finish(fuzzers, name)
    report.bad_inputs["decoder inputs, coverage-guided (atheris)"] += runs
    found = sorted(path.name for path in work.iterdir() if path.name.startswith(FINDINGS))
    assert returncode == 0 and not found, f"{name}: exit {returncode}, {found}\n{output[-3000:]}"
    assert runs == RUNS, output[-2000:]
    assert any((work / "corpus").iterdir())  # it started from the seeds


def test_a_broken_target_is_caught(fuzzers: Fuzzers) -> None:
    work, returncode, output, _ = _finish(fuzzers, SELFTEST)
    crashes = [path for path in work.iterdir() if path.name.startswith("crash-")]
    assert returncode == 77, output[-3000:]  # atheris' code for an escaped Python exception
    assert "UnicodeDecodeError" in output
    assert len(crashes) == 1
    with pytest.raises(UnicodeDecodeError):
        crashes[0].read_bytes().decode("utf-8")  # the file holds the input that broke it
