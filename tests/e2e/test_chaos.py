"""Serving never stops (the short chaos run; `python -m bench.chaos` is the long one): steady
gRPC and REST load through Envoy under `cyclone up` while the trainer, the monitor, the store
and every replica of the serving revision are SIGKILLed one at a time. No request fails, the
revisions outlive the trainer (same processes), every prediction answered while a control-plane
process was down is logged, and nothing is left behind after Ctrl-C. (Predictions a revision
answered but had not yet flushed when it was SIGKILLed are lost: at most one flush interval.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from bench.chaos import ROW, Load, Mesh, kill_component, kill_revision, run_faults, wait_for
from cyclone.client import InferenceClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]


def _left_behind(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def _stored(mesh: Mesh, model: str) -> int:
    status = json.loads(mesh.cli("status", "--json"))
    return int(status["models"][model].get("traffic", {}).get("predictions", 0))


def test_no_request_fails_whatever_single_process_dies(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "data")
    mesh.start()
    try:
        mesh.import_credit(tmp_path)
        public = f"127.0.0.1:{mesh.ports['public']}"
        wait_for(lambda: InferenceClient(public).predict("credit", [ROW], categorical={"city"}), 60)
        revisions = mesh.revision_pids("credit")
        assert revisions, "the serving version has no revision process"
        # The control plane: every answered prediction is logged (spooled while the store
        # was down, replayed), and the revisions outlive the trainer (the same processes).
        load = Load(mesh.ports["public"], "credit", clients=2)
        load.start()
        time.sleep(2)
        try:
            control = list(
                run_faults(
                    mesh,
                    load,
                    {
                        "trainer": kill_component(mesh, "trainer"),
                        "monitor": kill_component(mesh, "monitor"),
                        "store": kill_component(mesh, "store"),
                    },
                    settle_s=3,
                )
            )
            assert set(mesh.revision_pids("credit")) == set(revisions)
        finally:
            load.stop()
        for result in control:
            assert result.requests > 0, result.fault
            assert result.failures == 0, (
                f"{result.fault}: {result.failures} failed: {result.errors}"
            )
        answered = sum(s.ok for s in load.samples)  # (plus the first prediction, above)
        assert wait_for(lambda: _stored(mesh, "credit") >= answered, 60)

        # The data plane: every replica of the serving revision dies; Envoy holds the
        # requests while they restart.
        load = Load(mesh.ports["public"], "credit", clients=2)
        load.start()
        time.sleep(1)
        try:
            (revision,) = run_faults(
                mesh, load, {"revision": kill_revision(mesh, "credit")}, settle_s=3
            )
        finally:
            load.stop()
        assert revision.requests > 0
        assert revision.failures == 0, f"{revision.failures} failed: {revision.errors}"
        assert not set(mesh.revision_pids("credit")) & set(revisions)
        status = json.loads(mesh.cli("status", "--json"))
        assert status["problems"] == []
        assert status["models"]["credit"]["serving"] == "1"
    finally:
        assert mesh.stop() == 0, mesh.log_tail()
    assert _left_behind(str(tmp_path / "data")) == []
