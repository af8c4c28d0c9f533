"""The tree stays lint-clean, type-clean and keeps its import boundaries (CI runs these)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_is_clean() -> None:
    result = run(str(BIN / "ruff"), "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_boundaries_hold() -> None:
    """parking_protocol imports nothing of ours; server and firmware never import each other."""
    result = run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr


FAKE_PYTHON3 = """#!/bin/sh
# python3 3.11 without ensurepip until "python3.11-venv" is installed (the marker file).
case "$*" in
  *"import ensurepip"*) [ -e "$FAKE_DIR/venv-installed" ] ;;
  *version_info*) echo 3.11 ;;
  *) echo "unexpected python3 $*" >&2; exit 99 ;;
esac
"""
FAKE_APT_GET = """#!/bin/sh
echo "$*" >> "$FAKE_DIR/apt.log"
case "$*" in
  *"install "*python3.11-venv*) touch "$FAKE_DIR/venv-installed" ;;
esac
"""


def _ensure_venv_support(tmp_path: Path, *, has_ensurepip: bool) -> tuple[int, str, str]:
    """Run scripts/dev's ensure_venv_support with a fake python3 and apt-get (as root)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in {"python3": FAKE_PYTHON3, "apt-get": FAKE_APT_GET, "id": "echo 0\n"}.items():
        (fake / name).write_text(text if text.startswith("#!") else f"#!/bin/sh\n{text}")
        (fake / name).chmod(0o755)
    if has_ensurepip:
        (tmp_path / "venv-installed").touch()
    env = {"PATH": f"{fake}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", "-c", "source scripts/dev && ensure_venv_support"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    log = tmp_path / "apt.log"
    return result.returncode, log.read_text() if log.exists() else "", result.stderr


def test_dev_script_installs_the_venv_package_when_ensurepip_is_missing(tmp_path: Path) -> None:
    """Stock Debian/Ubuntu python3 has no ensurepip: `python3 -m venv` needs python3.X-venv."""
    rc, apt_log, stderr = _ensure_venv_support(tmp_path, has_ensurepip=False)
    assert rc == 0, stderr
    installs = [line for line in apt_log.splitlines() if line.startswith("install ")]
    assert installs == ["install -y -qq --no-install-recommends python3.11-venv"], apt_log


def test_dev_script_installs_nothing_when_ensurepip_is_there(tmp_path: Path) -> None:
    rc, apt_log, stderr = _ensure_venv_support(tmp_path, has_ensurepip=True)
    assert rc == 0, stderr
    assert apt_log == ""
