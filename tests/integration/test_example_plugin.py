"""Install tests/example_plugin into a temp target and check Cyclone finds and runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[1] / "example_plugin"

CHECK = textwrap.dedent(
    """
    import json
    import numpy as np
    from cyclone import plugins
    from cyclone.metrics_api import Window
    from cyclone.plan import parse_plan
    from services.monitor.evaluate import evaluate

    facade = plugins.get_plugins()
    spec = facade.metrics["example_mean_prediction"]
    info = {i.name: i for i in plugins.plugin_infos()}["example"]
    plan = parse_plan("model: m\\nmetrics: [example_mean_prediction, mae]\\n")
    window = Window({}, np.array([1.0, 2.0, 6.0]), labels=np.array([1.0, 2.0, 3.0]),
                    task="regression")
    ev = evaluate(plan, window)
    print(json.dumps({
        "plugin": spec.plugin,
        "distribution": info.distribution,
        "version": info.version,
        "value": ev.metrics["example_mean_prediction"].value,
        "mae_status": ev.metrics["mae"].status,
    }))
    """
)


def run_check(target: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(target), **env}
    return subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, env=full_env, timeout=120
    )


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A temp --target keeps the venv untouched; the directory goes away with tmp_path.
    out = tmp_path_factory.mktemp("example_plugin_site")
    # Build from a copy so setuptools' build/ and egg-info never land in the source tree.
    source = tmp_path_factory.mktemp("example_plugin_src") / "example_plugin"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(out),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    return out


def test_example_metric_is_found_and_computed(target: Path) -> None:
    proc = run_check(target)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["plugin"] == "example"
    assert got["distribution"] == "cyclone-example-plugin" and got["version"] == "0.1.0"
    assert got["value"] == pytest.approx(3.0)
    assert got["mae_status"] == "not_enough_data"  # 3 labelled rows < default min_labelled_rows


def test_example_plugin_can_be_disabled(target: Path) -> None:
    proc = run_check(target, CYCLONE_DISABLE_PLUGINS="example")
    assert proc.returncode != 0
    assert "example_mean_prediction" in proc.stderr
