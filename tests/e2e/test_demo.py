"""The README's main command, as a user runs it: the whole mesh in separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cyclone", "demo", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    # Healthy traffic first, then the shifted world turns the model RED.
    assert out.index("level GREEN") < out.index("level RED")
    assert "features drifted" in out
    # The retrain request went through the outbox to its sink, once.
    recorded = [
        json.loads(line) for line in (tmp_path / "data" / "alerts.jsonl").read_text().splitlines()
    ]
    retrains = [a for a in recorded if a["actions"] == ["retrain"]]
    assert len(retrains) == 1 and retrains[0]["level"] == "RED"
    assert len({a["id"] for a in recorded}) == len(recorded)
