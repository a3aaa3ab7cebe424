"""Service start-up stays cheap: the entry modules, plus the plugin load every service does at
start, must not import scipy, sklearn, skl2onnx or pandas. Those cost seconds per process and
the test suite and `cyclone up` start dozens of processes; the code that needs them imports
them where frames are built or statistics computed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("scipy", "sklearn", "skl2onnx", "pandas")

_PROBE = """
import json, sys
import importlib
importlib.import_module(sys.argv[1])
from cyclone.plugins import get_plugins
get_plugins()  # what monitor and trainer do at start: every built-in plugin is imported
exec(sys.argv[2])
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _top_level_modules_after(module: str, then: str = "") -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module, then],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    [
        "services.monitor.main",
        "services.store.main",
        "services.inference.main",
        "services.trainer.main",
    ],
)
def test_a_service_starts_without_the_heavy_libraries(module: str) -> None:
    loaded = _top_level_modules_after(module)
    assert "cyclone" in loaded and "plugins" in loaded  # the probe really ran the start path
    assert not loaded & set(HEAVY), f"{module} imports {sorted(loaded & set(HEAVY))} at start"


def test_the_probe_sees_a_lazy_import_once_it_runs() -> None:
    # Positive control: running a drift test and a window's label mask does load scipy and
    # pandas, so an empty intersection above means "not imported", not "probe is blind".
    then = (
        "import numpy as np\n"
        "from plugins.drift import _chi2_sf\n"
        "from cyclone.columns import _encode\n"
        "assert _chi2_sf(3.84, 1) < 0.051\n"
        "assert list(_encode(np.array(['b', 'a']), ['a', 'b'])) == [1, 0]\n"
    )
    loaded = _top_level_modules_after("services.monitor.main", then)
    assert {"scipy", "pandas"} <= loaded
