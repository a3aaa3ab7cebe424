"""`cyclone up --trainers 2` as a user runs it: the leading trainer is SIGKILLed under load, no
request fails, and a rollout asked for afterwards through the CLI (which reaches whichever
trainer leads, through Envoy's control listener) is promoted."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from bench.chaos import ROW, Load, Mesh, kill_component, run_faults, wait_for
from cyclone.client import InferenceClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(600)]

ACTIVE = ("pending", "progressing", "paused")


def _rollout_ended(mesh: Mesh, model: str) -> dict[str, object] | None:
    status = json.loads(mesh.cli("status", "--json"))
    found = [r for r in status["rollouts"] if r["model"] == model]
    return found[0] if found and found[0]["state"] not in ACTIVE else None


def _trainer_answers(mesh: Mesh) -> bool:
    status = json.loads(mesh.cli("status", "--json"))
    return not [p for p in status["problems"] if p.startswith("trainer")]


def test_two_trainers_survive_losing_the_leader(tmp_path: Path) -> None:
    mesh = Mesh(tmp_path / "data", up_args=("--trainers", "2"))
    mesh.start()
    try:
        raw = json.loads((mesh.data_dir / "mesh.json").read_text())
        assert {"trainer", "trainer-2"} <= set(raw["components"])
        # Clients reach the trainer through Envoy's control listener, not one instance.
        assert raw["components"]["trainer"]["address"] == f"127.0.0.1:{mesh.ports['control']}"
        mesh.import_credit(tmp_path)
        public = f"127.0.0.1:{mesh.ports['public']}"
        wait_for(lambda: InferenceClient(public).predict("credit", [ROW], categorical={"city"}), 60)

        load = Load(mesh.ports["public"], "credit", clients=2)
        load.start()
        time.sleep(2)
        try:
            (killed,) = run_faults(
                mesh, load, {"trainer": kill_component(mesh, "trainer")}, settle_s=3
            )
            # A rollout after the kill: short steps, decided by its deadline.
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
            wait_for(lambda: _trainer_answers(mesh), 60)  # a leader behind the control listener
            mesh.cli("rollout", "credit", "2", "--strategy", "canary")
            ended = wait_for(lambda: _rollout_ended(mesh, "credit"), 120)
        finally:
            load.stop()
        assert killed.requests > 0
        assert killed.failures == 0, f"{killed.failures} failed: {killed.errors}"
        assert not [s for s in load.samples if not s.ok]
        assert ended["state"] == "promoted", f"{ended}"
        assert {s.version for s in load.samples if s.ok} == {"1", "2"}
    finally:
        assert mesh.stop() == 0, mesh.log_tail()
