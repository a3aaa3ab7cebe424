"""The loop on generated worlds, through the mesh `cyclone up` starts, with the default plan.

Per scenario of `cyclone_app/worlds.py` (one run each): a champion fitted on the old world is
imported with its sample and labels, `cyclone up` starts (store, trainer + Envoy + revisions,
monitor), the generated default plan is kept except for the schedule and the monitoring
window (the sizes a user tunes; the default canary's pace stays), and requests with their labels
stream through Envoy at about `RATE` rows a second: `STABLE_SECONDS` of the old world, then the changed one.

Reported per scenario: retraining jobs while stable; for a world retraining can fix, the time
from the change to a new version serving all traffic (the rollout's promotion), the realized
accuracy of what served before the change, of the new version after it, and of an oracle
fitted on exactly the post-change rows that were labelled when the new version was promoted
(scored on the same rows as the new version); for the others, jobs and versions after the
change (want: none registered) and how the jobs ended.

Usage: python -m bench.loop --scenarios concept,gradual,covariate_benign,broken,stable
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cyclone_app.worlds import FEATURES, LABEL, RECOVERABLE, World, champion_pipeline

MODEL = "world"
RATE = 300.0  # rows a second
BATCH = 10
STABLE_SECONDS = 45.0
RECOVERY_LIMIT = 240.0
QUIET_SECONDS = 90.0  # after a change retraining cannot help: how long to watch


def bench_plan(plan_yaml: str) -> str:
    """The generated plan with only the schedule and the window's size changed (the default
    canary's pace included: the time to recovery is what a user gets)."""
    plan = yaml.safe_load(plan_yaml)
    plan["window"] = {"kind": "sliding", "rows": 1000, "min_labelled_rows": 200}
    plan["schedule"] = {"every": "2s"}
    return str(yaml.safe_dump(plan, sort_keys=False))


class Stream:
    """Rows of the world through Envoy from a thread, labels right after; per row: the phase
    (rows from the change, negative before it), the version that answered, right or wrong."""

    def __init__(self, public: str, world: World) -> None:
        from cyclone.client import InferenceClient, StoreClient

        self.world = world
        self.inference = InferenceClient(public)
        self.labels = StoreClient(public)
        self.rng = np.random.default_rng(world.seed + 500)
        self.position = -(10**9)  # before the change until `change()`
        self.changed_at = 0.0
        self.rows: list[tuple[int, str, bool]] = []
        self.sent: list[pd.DataFrame] = []  # post-change rows sent, for the oracle
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.inference.close()
        self.labels.close()

    def change(self) -> None:
        self.position, self.changed_at = 0, time.monotonic()

    def _run(self) -> None:
        from cyclone.client import build_request

        while not self._stop.wait(BATCH / RATE):
            start = self.position
            frame = self.world.rows(BATCH, start, self.rng)
            if start >= 0:
                self.position += BATCH
                self.sent.append(frame)
            try:
                request = build_request(
                    MODEL, frame[FEATURES].to_dict(orient="records"), categorical=("region",)
                )
                response = self.inference.predict_request(request)
                self.labels.add_labels(
                    MODEL, list(zip(response.prediction_ids, frame[LABEL], strict=True))
                )
            except Exception:
                self.failed += 1
                continue
            right = np.asarray(response.labels) == frame[LABEL].to_numpy()
            self.rows.extend(
                (start + i if start >= 0 else -1, response.version, bool(r))
                for i, r in enumerate(right)
            )


@dataclasses.dataclass
class Outcome:
    scenario: str
    jobs_while_stable: int
    before: float  # accuracy served before the change
    recovery_seconds: float | None = None
    after: float | None = None  # the new version's accuracy on the new world
    oracle: float | None = None
    jobs_after: list[str] = dataclasses.field(default_factory=list)
    new_versions: int = 0
    failed_requests: int = 0


def _accuracy(rows: list[tuple[int, str, bool]]) -> float:
    return float(np.mean([r for _, _, r in rows])) if rows else float("nan")


def run_scenario(scenario: str, seed: int = 0) -> Outcome:
    from cyclone.client import MonitorClient, TrainerClient
    from cyclone.models.convert import import_pipeline
    from services.launch import free_port
    from services.mesh import Mesh, MeshSettings, hold_data_dir

    world = World(scenario, seed)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="cyclone-bench-worlds-") as tmp:
        data = Path(tmp) / "data"
        os.environ["CYCLONE_DATA_DIR"] = str(data)
        sample = world.rows(4000, -50_000, np.random.default_rng(seed))
        champion = champion_pipeline(sample)
        import_pipeline(champion, MODEL, data / "models", sample=sample, label_column=LABEL)
        names = ("public", "control", "store", "monitor", "trainer", "dashboard")
        settings = MeshSettings(data_dir=data, ports={n: free_port() for n in names})
        with hold_data_dir(data):
            mesh = Mesh(settings, lambda *_: None)
            info = mesh.start()
            os.environ["CYCLONE_TOKEN"] = (data / "token").read_text().strip()
            stream = Stream(info.public, world)
            try:
                monitor = MonitorClient(info.components["monitor"].address)
                trainer = TrainerClient(info.components["trainer"].address)
                plan_yaml, _ = monitor.get_plan(MODEL)
                monitor.set_plan(MODEL, bench_plan(plan_yaml))
                stream.start()
                time.sleep(STABLE_SECONDS)
                outcome = Outcome(scenario, len(trainer.jobs(MODEL)), _accuracy(list(stream.rows)))
                stream.change()
                if scenario in RECOVERABLE:
                    _recover(outcome, stream, trainer, world)
                else:
                    time.sleep(QUIET_SECONDS)
                jobs = trainer.jobs(MODEL)
                outcome.jobs_after = [
                    f"{j.id}:{j.stage or j.state} {j.message[:90]}" for j in jobs[::-1]
                ][outcome.jobs_while_stable :]
                outcome.new_versions = sum(1 for j in jobs if j.new_version)
                outcome.failed_requests = stream.failed
                return outcome
            finally:
                stream.stop()
                mesh.stop()


def _recover(outcome: Outcome, stream: Stream, trainer: Any, world: World) -> None:
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    deadline = time.monotonic() + RECOVERY_LIMIT
    promoted = None
    while time.monotonic() < deadline and promoted is None:
        time.sleep(1.0)
        promoted = next(
            (r for r in trainer.rollouts(MODEL) if r.state == tpb.ROLLOUT_STATE_PROMOTED), None
        )
    if promoted is None:
        return
    outcome.recovery_seconds = time.monotonic() - stream.changed_at
    registered_rows = len(pd.concat(stream.sent)) if stream.sent else 0
    time.sleep(10.0)  # rows answered by the new version alone
    new = [r for r in list(stream.rows) if r[1] == promoted.to_version and r[0] >= 0]
    outcome.after = _accuracy(new)
    # The oracle: the same pipeline fitted on exactly the post-change rows labelled by then,
    # scored on the rows the new version answered.
    post = pd.concat(stream.sent).iloc[:registered_rows]
    oracle = champion_pipeline(post)
    everything = pd.concat(stream.sent)
    answered = everything.iloc[[p for p, _, _ in new if p < len(everything)]]
    outcome.oracle = float(np.mean(oracle.predict(answered[FEATURES]) == answered[LABEL]))


def report(outcomes: list[Outcome]) -> None:
    print(
        f"{'scenario':<18}{'stable jobs':>12}{'before':>8}{'recovery s':>12}{'after':>8}"
        f"{'oracle':>8}{'after/oracle':>14}{'after/before':>14}{'new versions':>14}"
    )
    for o in outcomes:

        def f(v: float | None, fmt: str = ".3f") -> str:
            return "-" if v is None else format(v, fmt)

        ratio = None if o.after is None or not o.oracle else o.after / o.oracle
        kept = None if o.after is None else o.after / o.before
        print(
            f"{o.scenario:<18}{o.jobs_while_stable:>12}{f(o.before):>8}"
            f"{f(o.recovery_seconds, '.0f'):>12}{f(o.after):>8}{f(o.oracle):>8}"
            f"{f(ratio):>14}{f(kept):>14}{o.new_versions:>14}"
        )
        for job in o.jobs_after:
            print(f"    job {job}")
        if o.failed_requests:
            print(f"    {o.failed_requests} failed requests")
