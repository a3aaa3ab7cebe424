"""The command line's three doors: `python -m cyclone_app`, the `cyclone` script and the
`python -m cyclone` shim (old habits) all reach the same app."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _help(*command: str) -> str:
    result = subprocess.run(
        [*command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("module", ["cyclone_app", "cyclone"])
def test_python_dash_m_runs_the_cli(module: str) -> None:
    out = _help(sys.executable, "-m", module)
    assert "Usage: cyclone" in out
    # The mesh commands are registered too, not only the main file's.
    assert "up" in out.split() and "rollouts" in out.split()


def test_the_console_script_is_the_same_app() -> None:
    script = Path(sys.executable).parent / "cyclone"
    if not script.exists():
        script = Path(shutil.which("cyclone") or "")
    assert script.is_file(), "the `cyclone` console script is not installed"
    assert _help(str(script)) == _help(sys.executable, "-m", "cyclone_app")
