"""Serving never stops (the short chaos run; `python -m bench.chaos` is the long one): steady
gRPC and REST load through Envoy under `cyclone up` while the trainer, the monitor, the store
and every replica of the serving revision are SIGKILLed one at a time. No request fails, the
revisions outlive the trainer (same processes), every answered prediction is logged (spooled
while the store was down; journaled by a revision killed before its flush and logged by its
successor), and nothing is left behind after Ctrl-C."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest
import yaml

from bench.chaos import ROW, Load, Mesh, kill_component, kill_revision, run_faults, wait_for
from cyclone.client import InferenceClient
from cyclone_app.examples import credit_frame

ACTIVE = ("pending", "progressing", "paused")
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


def _rollout_ended(mesh: Mesh, model: str) -> dict[str, object] | None:
    status = json.loads(mesh.cli("status", "--json"))
    found = [r for r in status["rollouts"] if r["model"] == model]
    return found[0] if found and found[0]["state"] not in ACTIVE else None


def _rollout_weight(mesh: Mesh, model: str) -> float:
    status = json.loads(mesh.cli("status", "--json"))
    found = [r for r in status["rollouts"] if r["model"] == model]
    return float(found[0]["weight"]) if found else 0.0


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

        # A rollout of v2 (short steps, decided by its deadline) loses its trainer midway,
        # resumes and promotes; then every replica of the now serving v2 dies at once, and
        # Envoy holds the requests while they restart.
        monitor = ("--monitor", f"127.0.0.1:{mesh.ports['monitor']}")
        plan = yaml.safe_load(mesh.cli("plan", "get", "credit", *monitor))
        plan["rollout"] = {
            "steps": [50, 100],
            "step_duration": "3s",
            "min_requests": 20,
            "deadline": "12s",
            "confirm": 0,
        }
        (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
        mesh.cli("plan", "set", "credit", str(tmp_path / "plan.yaml"), *monitor)
        mesh.import_credit(tmp_path, seed=1)  # version 2, staged
        load = Load(mesh.ports["public"], "credit", clients=2)
        load.start()
        try:
            mesh.cli("rollout", "credit", "2", "--strategy", "canary")
            wait_for(lambda: _rollout_weight(mesh, "credit") > 0, 60)  # v2 takes traffic
            (during,) = run_faults(
                mesh, load, {"trainer": kill_component(mesh, "trainer")}, settle_s=1
            )
            ended = wait_for(lambda: _rollout_ended(mesh, "credit"), 120)
            assert ended["state"] == "promoted", f"{ended}"
            served_by_v1 = set(revisions)
            (revision,) = run_faults(
                mesh, load, {"revision": kill_revision(mesh, "credit")}, settle_s=3
            )
        finally:
            load.stop()
        for result in (during, revision):
            assert result.requests > 0, result.fault
            assert result.failures == 0, (
                f"{result.fault}: {result.failures} failed: {result.errors}"
            )
        assert {s.version for s in load.samples if s.ok} == {"1", "2"}
        assert not set(mesh.revision_pids("credit")) & served_by_v1  # v1 stopped once drained
        # Every prediction answered in both phases is in the store, the killed replicas' too.
        answered += sum(s.ok for s in load.samples)
        assert wait_for(lambda: _stored(mesh, "credit") >= answered, 60)
        status = json.loads(mesh.cli("status", "--json"))
        assert status["problems"] == []
        assert status["models"]["credit"]["serving"] == "2"

        # And the loop still closes through the restarted trainer and store: labelled traffic,
        # then a retrain that fits, evaluates and decides.
        world = credit_frame(600, seed=5)
        rows = world[list(ROW)].to_dict("records")
        load = Load(mesh.ports["public"], "credit", clients=1, rows=rows)  # gRPC: ids known
        load.start()
        wait_for(lambda: sum(s.ok for s in load.samples) >= 600, 120)
        load.stop()
        truth = world["defaulted"].astype(str).tolist()
        labels = [(s.prediction_id, truth[s.row]) for s in load.samples if s.ok]
        lines = ["prediction_id,label", *(f"{pid},{label}" for pid, label in labels)]
        (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
        mesh.cli("label", "--model", "credit", "--file", str(tmp_path / "labels.csv"))
        job = mesh.cli("retrain", "credit")
        assert re.search(r" (succeeded|rejected) \[", job), job
    finally:
        assert mesh.stop() == 0, mesh.log_tail()
    assert _left_behind(str(tmp_path / "data")) == []
