"""`cyclone demo`: the whole loop on one machine, through the mesh a user gets from `cyclone up`.

A city's bike-rental demand, hour by hour. A model trained on January serves February well
(GREEN). In March the city opens a network of bike lanes: commuters ride at rush hour and rain
puts them off less -- a change the January model never saw. Requests stream through Envoy
(gRPC and REST) with the true counts arriving as labels; the monitor catches the dip (RED), the
trainer retrains on the newest labelled hours, the challenger beats the champion on a holdout,
a canary moves the traffic over step by step, and the error recovers. Every figure printed is
measured in this run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from cyclone_app.examples import BIKE_FEATURES, bike_frame, bike_pipeline

console = Console()
MODEL = "bikes"
HOURS_PER_REQUEST = 8  # an application asks for a few hours at a time


def _until(check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


class Traffic:
    """Requests through Envoy from a background thread, one world at a time, labels right after.

    Every fifth request goes over REST; the rest over gRPC. Failures are counted, not hidden.
    """

    def __init__(self, public: str) -> None:
        from cyclone.client import InferenceClient, StoreClient

        self.public = public
        self.inference = InferenceClient(public)
        self.labels = StoreClient(public)
        self.sent = self.failed = self.rest = 0
        self.versions: dict[str, int] = {}
        self._world: pd.DataFrame | None = None
        self._cursor = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        # Fast enough that the hours after the shift pile up while the monitor decides.
        self.rows_per_second = 200.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.inference.close()
        self.labels.close()

    def world(self, frame: pd.DataFrame) -> None:
        with self._lock:
            self._world, self._cursor = frame, 0

    def sent_in_world(self) -> int:
        with self._lock:
            return self._cursor

    def _next(self) -> pd.DataFrame | None:
        with self._lock:
            if self._world is None:
                return None
            start = self._cursor % len(self._world)
            self._cursor += HOURS_PER_REQUEST
            return self._world.iloc[start : start + HOURS_PER_REQUEST]

    def _run(self) -> None:
        pause = HOURS_PER_REQUEST / self.rows_per_second
        while not self._stop.wait(pause):
            batch = self._next()
            if batch is None or batch.empty:
                continue
            try:
                ids, version = self._rest(batch) if self.sent % 5 == 4 else self._grpc(batch)
                self.versions[version] = self.versions.get(version, 0) + 1
                self.labels.add_labels(
                    MODEL, list(zip(ids, batch["rentals"].astype(float), strict=True))
                )
            except Exception as exc:  # counted and shown: the demo's bar is zero
                self.failed += 1
                console.print(f"    [red]request failed: {exc}[/red]")
            self.sent += 1

    def _grpc(self, batch: pd.DataFrame) -> tuple[list[str], str]:
        from cyclone.client import build_request

        request = build_request(MODEL, batch[BIKE_FEATURES].to_dict(orient="records"))
        response = self.inference.predict_request(request)
        return list(response.prediction_ids), response.version

    def _rest(self, batch: pd.DataFrame) -> tuple[list[str], str]:
        features: dict[str, Any] = {}
        for name in BIKE_FEATURES:
            column = batch[name].tolist()
            key = "strings" if name == "season" else "numbers"
            features[name] = {key: column}
        request = urllib.request.Request(
            f"http://{self.public}/v1/models/{MODEL}:predict",
            data=json.dumps({"features": features}).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        self.rest += 1
        return list(body["predictionIds"]), str(body["version"])


@dataclasses.dataclass
class Clock:
    started: float = dataclasses.field(default_factory=time.monotonic)

    def __call__(self) -> str:
        return f"[dim]{time.monotonic() - self.started:6.1f}s[/dim]"


def _metric(status: Any, name: str) -> float | None:
    for m in status.metrics:
        if m.name == name and m.HasField("value"):
            return float(m.value)
    return None


def _level(status: Any) -> str:
    from cyclone.monitor.v1 import monitor_service_pb2 as mpb

    return str(mpb.Level.Name(status.level)).removeprefix("LEVEL_")


def _demo_plan(plan_yaml: str) -> str:
    """The generated default plan, with windows and steps sized for a few minutes, not days."""
    import yaml

    plan = yaml.safe_load(plan_yaml)
    plan["window"] = {"kind": "sliding", "rows": 300, "min_labelled_rows": 150}
    plan["schedule"] = {"every": "2s"}
    # The default `auto` window finds the change itself; a month of hours is a small world,
    # so it waits for 500 labelled hours after the change rather than the default 2000.
    plan["retrain"] = {**plan.get("retrain", {}), "fresh_rows": 500, "wait": "2m"}
    plan["rollout"] = {
        "strategy": "canary",
        "steps": [20, 50, 100],
        "interval": "1s",
        "step_duration": "4s",
        "min_requests": 15,
        "deadline": "40s",
        "on_deadline": "promote",
        "analysis": {"min_labelled_rows": 20},
    }
    return str(yaml.safe_dump(plan, sort_keys=False))


def run_demo(workdir: Path | None = None, keep_running: bool = False) -> None:
    from cyclone.client import MonitorClient, TrainerClient
    from cyclone.models.convert import import_pipeline
    from services.launch import free_port
    from services.mesh import Mesh, MeshSettings, hold_data_dir

    root = (workdir or Path(tempfile.mkdtemp(prefix="cyclone-demo-"))).resolve()
    data = root / "data"
    os.environ["CYCLONE_DATA_DIR"] = str(data)  # this process's clients find the mesh's token
    clock = Clock()
    console.rule("[bold]Cyclone demo: bike rentals, hour by hour")
    console.print(f"working directory: {root}")

    console.print("\n[bold]1. A model trained on January[/bold]")
    january = bike_frame(24 * 31, start="2026-01-01", seed=0)
    train, holdout = january.iloc[: 24 * 24], january.iloc[24 * 24 :]
    target, schema, parity = import_pipeline(
        bike_pipeline(train), MODEL, data / "models", sample=holdout, label_column="rentals"
    )
    baseline = json.loads((target / "evaluation.json").read_text())["metrics"]
    console.print(
        f"  {clock()} {MODEL} v{schema.version}: gradient-boosted trees on "
        f"{', '.join(schema.feature_names)}; ONNX parity {parity.max_abs_diff:.1e}; "
        f"baseline MAE {baseline['mae']:.1f} rentals/hour on the last week of January"
    )

    console.print("\n[bold]2. `cyclone up`[/bold]: store, trainer + Envoy + revisions, monitor")
    ports = {name: free_port() for name in ("public", "control", "store", "monitor", "trainer")}
    ports["dashboard"] = free_port()
    settings = MeshSettings(data_dir=data, ports=ports)

    def progress(component: str, state: str, detail: str) -> None:
        if state in ("ready", "failed"):
            colour = "green" if state == "ready" else "red"
            console.print(f"  {clock()} [{colour}]{component} {state}[/{colour}] {detail}")

    with hold_data_dir(data):
        mesh = Mesh(settings, progress)
        info = mesh.start()
        # This process's clients send the mesh's token (not one from the caller's environment).
        os.environ["CYCLONE_TOKEN"] = (data / "token").read_text().strip()
        traffic: Traffic | None = None
        try:
            console.print(
                f"  requests and labels through Envoy on {info.public} (gRPC and REST)\n"
                f"  live dashboard: [bold]{info.dashboard}[/bold]"
            )
            monitor = MonitorClient(info.components["monitor"].address)
            trainer = TrainerClient(info.components["trainer"].address)
            plan_yaml, _ = monitor.get_plan(MODEL)
            monitor.set_plan(MODEL, _demo_plan(plan_yaml))
            traffic = Traffic(info.public)
            traffic.start()
            _story(clock, traffic, monitor, trainer, baseline["mae"])
            if keep_running:
                console.print(
                    f"\nThe mesh keeps running: dashboard {info.dashboard}, public {info.public}. "
                    "Ctrl-C stops it."
                )
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
        finally:
            if traffic is not None:
                traffic.stop()
            console.print(f"\n  {clock()} stopping the mesh")
            mesh.stop()
    console.rule("[bold]demo complete")


def _wait_level(monitor: Any, wanted: str, min_rows: int, timeout: float) -> Any:
    def check() -> Any:
        statuses = [s for s in monitor.status(MODEL) if s.labelled_rows >= min_rows]
        return next((s for s in statuses if _level(s) == wanted), None)

    return _until(check, timeout)


def _story(clock: Clock, traffic: Traffic, monitor: Any, trainer: Any, baseline_mae: float) -> None:
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    console.print("\n[bold]3. February[/bold]: the world the model knows")
    traffic.world(bike_frame(24 * 28, start="2026-02-01", seed=1))
    _until(lambda: traffic.sent_in_world() >= 300, 60)
    healthy = _wait_level(monitor, "GREEN", 150, 60)
    if healthy is None:
        status = monitor.status(MODEL)
        raise SystemExit(f"demo: expected GREEN in February, got {status}")
    console.print(
        f"  {clock()} level [green]GREEN[/green]: MAE {_metric(healthy, 'mae'):.1f} over "
        f"{healthy.labelled_rows} labelled hours (baseline {baseline_mae:.1f})"
    )

    console.print(
        "\n[bold]4. March: the bike lanes open[/bold]; rush hours double, rain matters less"
    )
    shifted_at = time.monotonic()
    traffic.world(bike_frame(24 * 31, start="2026-03-01", seed=2, lanes=1.0))
    red = _wait_level(monitor, "RED", 150, 90)
    if red is None:
        raise SystemExit(f"demo: the monitor did not turn RED: {monitor.status(MODEL)}")
    console.print(
        f"  {clock()} level [red]RED[/red] {time.monotonic() - shifted_at:.0f}s after the shift: "
        f"MAE {_metric(red, 'mae'):.1f}"
    )
    for reason in list(red.reasons)[:4]:  # the last says why (services/monitor/explain.py)
        console.print(f"    • {reason}")

    console.print("\n[bold]5. Retraining[/bold] (the alert went through the outbox to the trainer)")
    job = _until(lambda: next(iter(trainer.jobs(MODEL, limit=1)), None), 60)
    if job is None:
        raise SystemExit("demo: no retraining job was started")
    seen: set[str] = set()
    for update in trainer.watch(job.id):
        stage = update.stage.split(" (")[0]
        if stage and stage not in seen:
            seen.add(stage)
            console.print(f"  {clock()} job {update.id}: {update.stage}")
    job = trainer.jobs(MODEL, limit=1)[0]
    state = tpb.JobState.Name(job.state).removeprefix("JOB_STATE_")
    champion = dict(job.champion_metrics)
    challenger = dict(job.challenger_metrics)
    console.print(
        f"  {clock()} job {state}: {job.decision or job.message}\n"
        f"    holdout MAE champion {champion.get('mae', float('nan')):.1f} → "
        f"challenger {challenger.get('mae', float('nan')):.1f}, "
        f"the window held {job.window.rows} labelled hours"
    )
    if not job.new_version or not job.rollout_id:
        raise SystemExit(f"demo: the challenger was not rolled out: {job.message}")

    console.print(f"\n[bold]6. Canary[/bold] of v{job.new_version}, traffic still flowing")
    last = -1.0
    rollout = trainer.get_rollout(job.rollout_id)
    deadline = time.monotonic() + 120
    while rollout.state in (tpb.ROLLOUT_STATE_PENDING, tpb.ROLLOUT_STATE_PROGRESSING):
        if rollout.current_weight != last:
            last = rollout.current_weight
            console.print(f"  {clock()} v{rollout.to_version} at {last:.0f}% of traffic")
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: the rollout did not finish: {rollout}")
        time.sleep(0.5)
        rollout = trainer.get_rollout(job.rollout_id)
    for step in rollout.steps:
        if step.decision not in ("start",):
            console.print(f"    {step.weight:>5.1f}%  {step.decision:<14} {step.reason}")
    outcome = tpb.RolloutState.Name(rollout.state).removeprefix("ROLLOUT_STATE_")
    console.print(f"  {clock()} rollout {outcome}")
    if rollout.state != tpb.ROLLOUT_STATE_PROMOTED:
        raise SystemExit(f"demo: the rollout ended {outcome}: {rollout.reason}")

    console.print("\n[bold]7. The new model on the new world[/bold]")
    recovered = _until(
        lambda: next(
            (
                s
                for s in monitor.status(MODEL)
                if s.version == job.new_version and s.labelled_rows >= 150
            ),
            None,
        ),
        90,
    )
    if recovered is None:
        raise SystemExit("demo: the new version was not evaluated")
    console.print(
        f"  {clock()} v{recovered.version} level {_level(recovered)}: MAE "
        f"{_metric(recovered, 'mae'):.1f} (the January model: "
        f"{champion.get('mae', float('nan')):.1f} on the same world's holdout)"
    )
    for reason in list(recovered.reasons)[:3]:
        console.print(f"    • {reason}")
    console.print(
        f"\n[bold]Traffic[/bold]: {traffic.sent} requests through Envoy ({traffic.rest} REST), "
        f"{traffic.failed} failed; answered by "
        + ", ".join(f"v{v}: {n}" for v, n in sorted(traffic.versions.items()))
    )
    if traffic.failed:
        raise SystemExit(f"demo: {traffic.failed} requests failed")
