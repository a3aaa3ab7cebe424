"""Loop benchmark: from asking for a retrain to 100 % of traffic on the new version.

For each window size (10k and 100k labelled rows of the bike model by default) on a fresh
database and a fresh model repository:

1. a store and a trainer with Envoy (`--envoy`, local orchestrator) run as subprocesses; the
   champion (`bike_pipeline` on the world before the bike lanes) is version 1, served;
2. the window is loaded through `LogPredictions` + `AddLabels` (the world after the lanes, a
   real concept shift, so the challenger wins); the plan's `retrain:` takes exactly those rows
   with the default family (`refit`), its `rollout:` is `red_black` with a 1 ms keep-warm
   period (no observation period to speak of);
3. `Retrain`, then `WatchJob` timestamps each stage change (queue from the job's own
   created/started times), `WatchRollout`/`GetRollout` the rollout's steps: 100 % of traffic is
   the `cutover` step; the keep-warm time up to `promoted` is reported apart.

Floor: the same fit + convert done directly here -- `bike_pipeline` on the same training rows,
then `import_pipeline` (ONNX conversion, parity, reference profile, baseline metrics on the same
holdout) into a temporary repository. Targets: <= 30 s at 100k rows, overhead over the floor
<= 5 s.

Stage boundaries are server times where there are any (the job's created/started times, the
version's registration time, the rollout's steps) and otherwise the stage changes `WatchJob`
shows (the trainer polls the job every 100 ms: good to about a tenth of a second; a stage
shorter than that may be missed and then counts in the next one). The trainer scores champion
and challenger on the holdout inside its `fit` worker call, so `fit` includes that evaluation
and `evaluate` is only the recording of its result; `rollout` is starting the new revision,
waiting for its health and the cutover.

PostgreSQL: $CYCLONE_DATABASE_URL (a scratch database is created there and dropped after) or an
embedded server in a temp dir with fsync off.

With `--scenarios`, instead: the whole loop through `cyclone up` with the default plan on the
generated worlds of `cyclone_app/worlds.py` -- per scenario, retrains while stable, time from the
change to a new version serving all traffic, and the recovered accuracy against an oracle
fitted on exactly the post-change rows (`bench/loop_scenarios.py`; one run each).

Usage: python -m bench.loop [--rows 10000,100000] [--scenarios concept,gradual,...] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from grpc import aio

from bench._common import ROOT, Figures
from bench.store import scratch_database
from cyclone.models.convert import import_pipeline
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.rollout_plan import RedBlackSpec, RolloutSpec
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.examples import BIKE_FEATURES, bike_frame, bike_pipeline
from services.launch import Spawned, free_port, spawn
from services.store.db import uuid7

MODEL = "bike"
PER_MESSAGE = 5000
HOLDOUT = 0.2
SETTLE_SECONDS = 10.0
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
]


# --- data -----------------------------------------------------------------------------------


def window_frame(rows: int) -> pd.DataFrame:
    """The world after the bike lanes opened: what the challenger trains on."""
    return bike_frame(rows, start="2027-01-01", seed=1, lanes=1.0)


def split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trainer's split: the newest `HOLDOUT` share of the rows is held out, never shuffled."""
    holdout = round(len(frame) * HOLDOUT)
    return frame.iloc[: len(frame) - holdout], frame.iloc[len(frame) - holdout :]


def messages(frame: pd.DataFrame) -> tuple[list[store_pb.LogPredictionsRequest], list[bytes]]:
    """The rows as served predictions (1 ms apart, ending now) and their labels, in batches."""
    start = datetime.now(UTC) - timedelta(milliseconds=len(frame) + 1000)
    ids = [str(uuid7(start + timedelta(milliseconds=i))) for i in range(len(frame))]
    records = frame[BIKE_FEATURES].to_dict("records")
    logs, labels = [], []
    for i in range(0, len(frame), PER_MESSAGE):
        request = store_pb.LogPredictionsRequest()
        add = request.records.add
        for pid, features in zip(
            ids[i : i + PER_MESSAGE], records[i : i + PER_MESSAGE], strict=True
        ):
            add(
                prediction_id=pid,
                model=MODEL,
                version="1",
                input_json=json.dumps(features).encode(),
                output_json=b'{"value": 0.0}',
            )
        logs.append(request)
        label_request = store_pb.AddLabelsRequest(model=MODEL)
        for pid, y in zip(
            ids[i : i + PER_MESSAGE], frame["rentals"].iloc[i : i + PER_MESSAGE], strict=True
        ):
            label_request.labels.add(prediction_id=pid, number=float(y))
        labels.append(label_request.SerializeToString())
    return logs, labels


async def load(store: store_grpc.StoreServiceStub, frame: pd.DataFrame) -> None:
    logs, labels = messages(frame)

    async def stream() -> AsyncIterator[store_pb.LogPredictionsRequest]:
        for m in logs:
            yield m

    response = await store.LogPredictions(stream())
    assert response.inserted == len(frame), response
    for m in labels:
        await store.AddLabels(store_pb.AddLabelsRequest.FromString(m))


def plan_yaml(rows: int) -> str:
    plan = default_plan(MODEL, "regression")
    retrain = dataclasses.replace(plan.retrain, rows=rows, holdout=HOLDOUT)
    rollout = dataclasses.replace(
        RolloutSpec(),
        strategy="red_black",
        interval_seconds=0.1,
        red_black=RedBlackSpec(keep_old_for_seconds=0.001),
    )
    return plan_to_yaml(dataclasses.replace(plan, retrain=retrain, rollout=rollout))


# --- the floor ------------------------------------------------------------------------------


def floor_seconds(frame: pd.DataFrame) -> tuple[float, float]:
    """Fit and convert (parity, reference, baseline metrics) done directly: seconds of each."""
    train, holdout = split(frame)
    t0 = time.perf_counter()
    pipeline = bike_pipeline(train)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cyclone-bench-floor-") as tmp:
        import_pipeline(pipeline, MODEL, Path(tmp), sample=holdout, label_column="rentals")
    return t1 - t0, time.perf_counter() - t1


# --- one run through the mesh ---------------------------------------------------------------


@dataclasses.dataclass
class LoopTimes:
    stages: dict[str, float]  # queue, fetch, ..., rollout: seconds
    total: float  # Retrain asked -> cutover (100 % on the new version)
    observation: float  # cutover -> promoted
    revision_start: float  # rollout start -> new revision healthy (part of `rollout`)
    job: pb.Job
    rollout: pb.Rollout


def _seconds(stamp: Any) -> float:
    return float(stamp.seconds + stamp.nanos / 1e9)


async def retrain_to_full_traffic(
    store: store_grpc.StoreServiceStub, trainer: pb_grpc.TrainerServiceStub
) -> LoopTimes:
    asked = time.time()
    response = await trainer.Retrain(pb.RetrainRequest(model=MODEL, reason="bench"), timeout=30)
    seen: dict[str, float] = {}
    job = response.job
    async for event in trainer.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=600):
        job = event.job
        seen.setdefault(job.stage, time.time())
    if job.state != pb.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {pb.JobState.Name(job.state)}: {job.message}")
    rollout = (await trainer.GetRollout(pb.GetRolloutRequest(rollout_id=job.rollout_id))).rollout
    if rollout.state != pb.ROLLOUT_STATE_PROMOTED:
        async for _ in trainer.WatchRollout(
            pb.WatchRolloutRequest(rollout_id=job.rollout_id), timeout=300
        ):
            pass
        rollout = (
            await trainer.GetRollout(pb.GetRolloutRequest(rollout_id=job.rollout_id))
        ).rollout
    if rollout.state != pb.ROLLOUT_STATE_PROMOTED:
        raise RuntimeError(f"rollout {rollout.id} ended {rollout.state}: {rollout.reason}")
    steps = {s.decision: _seconds(s.time) for s in rollout.steps}
    registered = _seconds(
        (
            await store.GetModelVersion(
                store_pb.GetModelVersionRequest(model=MODEL, version=job.new_version)
            )
        ).model_version.created_at
    )
    # Stage boundaries, server times where there are any: queued and started (the job), the
    # version registered (the store), the rollout's steps (the controller); in between, the
    # stage changes WatchJob showed (a stage shorter than the trainer's 100 ms watch poll can be
    # missed: it then counts in the next one).
    fit_end = seen.get("evaluate", seen["convert"])
    bounds = {
        "queue": (_seconds(job.created_at), _seconds(job.started_at)),
        "fetch": (_seconds(job.started_at), seen["fit"]),
        "fit": (seen["fit"], fit_end),
        "evaluate": (fit_end, seen["convert"]),
        "convert": (seen["convert"], registered),
        "register": (registered, steps["start"]),
        "rollout": (steps["start"], steps["cutover"]),
    }
    stages = {name: max(0.0, end - start) for name, (start, end) in bounds.items()}
    return LoopTimes(
        stages,
        steps["cutover"] - asked,
        steps["promoted"] - steps["cutover"],
        steps["healthy"] - steps["start"],
        job,
        rollout,
    )


async def drive(store_address: str, trainer_address: str, frame: pd.DataFrame) -> LoopTimes:
    async with (
        aio.insecure_channel(store_address, options=CHANNEL_OPTIONS) as store_channel,
        aio.insecure_channel(trainer_address) as trainer_channel,
    ):
        store = store_grpc.StoreServiceStub(store_channel)
        await store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=plan_yaml(len(frame))))
        t0 = time.perf_counter()
        await load(store, frame)
        print(f"  loaded {len(frame):,} labelled rows in {time.perf_counter() - t0:.1f} s")
        # A trainer has been up a while when an alert comes: let its worker finish warming up.
        await asyncio.sleep(max(0.0, SETTLE_SECONDS - (time.perf_counter() - t0)))
        return await retrain_to_full_traffic(store, pb_grpc.TrainerServiceStub(trainer_channel))


def wait_started(trainer: Spawned, timeout: float = 120.0) -> None:
    """Health answers SERVING before the trainer's start-up hooks (Envoy, the champion's
    revision, the worker pool) are done; its "listening" line comes after them."""
    deadline = time.monotonic() + timeout
    while "trainer listening on" not in trainer.log_tail(1_000_000):
        if time.monotonic() > deadline:
            raise RuntimeError(f"trainer not started after {timeout:.0f} s:\n{trainer.log_tail()}")
        time.sleep(0.1)


def run_once(rows: int, champion: Any, champion_frame: pd.DataFrame) -> LoopTimes:
    frame = window_frame(rows)
    with scratch_database() as url, tempfile.TemporaryDirectory(prefix="cyclone-bench-loop-") as t:
        tmp = Path(t)
        repository = tmp / "models"
        import_pipeline(
            champion, MODEL, repository, version="1", sample=champion_frame, label_column="rentals"
        )
        logs = tmp / "logs"
        store = spawn(
            "store",
            ["--database-url", url, "--metrics-port", "-1", "--data-dir", str(tmp / "store")],
            logs / "store.log",
        )
        try:
            trainer = spawn(
                "trainer",
                [
                    "--store",
                    store.address,
                    "--model-repository",
                    str(repository),
                    "--envoy",
                    "--public-host",
                    "127.0.0.1",
                    "--public-port",
                    str(free_port()),
                    "--control-port",
                    str(free_port()),
                    "--monitor",
                    "",
                    "--data-dir",
                    str(tmp / "trainer"),
                    "--metrics-port",
                    "-1",
                ],
                logs / "trainer.log",
            )
            try:
                wait_started(trainer)
                return asyncio.run(drive(store.address, trainer.address, frame))
            except BaseException:
                print(trainer.log_tail())
                raise
            finally:
                trainer.stop()
        finally:
            store.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="10000,100000", help="window sizes, comma-separated")
    parser.add_argument(
        "--scenarios", default="", help="worlds to run through cyclone up (cyclone_app/worlds.py)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the --scenarios worlds")
    args = parser.parse_args()
    if args.scenarios:
        from bench.loop_scenarios import report, run_scenario

        outcomes = []
        for scenario in args.scenarios.split(","):
            print(f"scenario {scenario} (seed {args.seed}) ...", flush=True)
            outcomes.append(run_scenario(scenario, args.seed))
        report(outcomes)
        return
    figures = Figures()
    champion_frame = bike_frame(4000, seed=0)
    champion = bike_pipeline(champion_frame)
    for rows in (int(r) for r in args.rows.split(",")):
        print(f"window of {rows:,} labelled rows")
        # The floor before and after the loop, the faster of the two: the machine is shared.
        before = floor_seconds(window_frame(rows))
        times = run_once(rows, champion, champion_frame)
        after = floor_seconds(window_frame(rows))
        fit, convert = min(before, after, key=sum)
        floor = fit + convert
        print(
            f"  floor: fit {fit:.2f} s + convert {convert:.2f} s = {floor:.2f} s"
            f" (runs {sum(before):.2f} s, {sum(after):.2f} s)"
        )
        job = times.job
        print(
            f"  job {job.id}: {pb.JobState.Name(job.state)}, version {job.new_version},"
            f" {job.window.train_rows:,} train / {job.window.holdout_rows:,} holdout rows;"
            f" {job.decision}"
        )
        for stage, seconds in times.stages.items():
            print(f"  {stage:<10} {seconds:>7.2f} s")
        print(f"  (rollout: new revision started and healthy in {times.revision_start:.2f} s)")
        print(
            f"  retrain asked -> 100 % on version {job.new_version}: {times.total:.2f} s"
            f" (floor {floor:.2f} s, overhead {times.total - floor:.2f} s; target <= 30 s,"
            f" overhead <= 5 s); keep-warm observation after it {times.observation:.2f} s"
        )
        k = f"{rows // 1000}k"
        figures.add(f"loop_{k}_retrain_to_full_traffic", times.total, "s", floor, False)
        figures.add(f"loop_{k}_overhead_over_floor", times.total - floor, "s", 5.0, False)
        for stage, seconds in times.stages.items():
            floor_of_stage = {"fit": fit, "convert": convert}.get(stage, 0.0)
            figures.add(f"loop_{k}_{stage}", seconds, "s", floor_of_stage, False)
        figures.add(f"loop_{k}_observation", times.observation, "s", 0.0, False)
    figures.emit()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
