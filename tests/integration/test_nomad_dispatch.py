"""The trainer's `nomad` job executor: each retraining job is a dispatch of the `cyclone-retrain`
parameterized batch job. The fake Nomad (tests/nomad_fake.py) does what Nomad's dispatch does
with that job: it writes the payload to the task's `job-id` file and runs the task's command,
`cyclone serve trainer --run-job-file`, as a subprocess against the same real store."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpc import aio
from nomad_fake import FakeNomad, serve
from test_trainer_service import MODEL, PLAN, _register_champion, send_labelled

from cyclone.server import CycloneServer
from cyclone.settings import SettingsError
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.examples import credit_frame
from services.launch import start_store
from services.store.main import StoreSettings
from services.trainer.jobs import ServeImmediately
from services.trainer.main import TrainerSettings, build_trainer_server

pytestmark = pytest.mark.integration

RETRAIN_HCL = Path(__file__).parents[2] / "deploy" / "nomad" / "retrain.nomad.hcl"


@dataclass
class RecordingRollout:
    """The default rollout (version SERVING), recording who asked for which version."""

    store: store_grpc.StoreServiceStub
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def __call__(self, model: str, version: str, job_id: int) -> str:
        self.calls.append((model, version, job_id))
        await ServeImmediately(self.store)(model, version, job_id)
        return f"rollout-of-{version}"


@dataclass
class Cluster:
    store: store_grpc.StoreServiceStub
    trainer: pb_grpc.TrainerServiceStub
    nomad: FakeNomad
    rollout: RecordingRollout
    runs: list[subprocess.Popen[bytes]]
    repo: Path
    # Payload the fake's task gets instead of the dispatched one (a broken run), when set.
    task: dict[str, bytes]


@pytest.fixture
async def cluster(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    store_server = (
        await start_store(
            StoreSettings(
                port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
            )
        )
    ).server
    servers: list[CycloneServer] = [store_server]
    store_address = f"127.0.0.1:{store_server.port}"
    repo = tmp_path / "models"
    nomad = FakeNomad([])
    nomad.jobs["cyclone-retrain"] = nomad._job_json(RETRAIN_HCL.read_text())
    http = serve(nomad)
    runs: list[subprocess.Popen[bytes]] = []
    task: dict[str, bytes] = {}

    def run_task(dispatched: str, payload: bytes, meta: dict[str, str]) -> None:
        # The task's command from retrain.nomad.hcl, payload at ${NOMAD_TASK_DIR}/job-id.
        task_dir = tmp_path / dispatched.replace("/", "_")
        task_dir.mkdir()
        (task_dir / "job-id").write_bytes(task.get("payload", payload))
        command = [
            sys.executable,
            "-m",
            "cyclone_app",
            "serve",
            "trainer",
            "--store",
            store_address,
        ]
        command += ["--model-repository", str(repo), "--run-job-file", str(task_dir / "job-id")]
        with (task_dir / "out.log").open("wb") as out:
            run = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        runs.append(run)
        # Nomad marks a batch job dead once its task exits.
        threading.Thread(target=lambda: (run.wait(), nomad.finish(dispatched)), daemon=True).start()

    nomad.on_dispatch = run_task
    channel = aio.insecure_channel(store_address)
    try:
        store = store_grpc.StoreServiceStub(channel)
        await _register_champion(store, repo)
        await store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=PLAN))
        rollout = RecordingRollout(store)
        trainer_server, _ = build_trainer_server(
            TrainerSettings(
                port=0,
                store=store_address,
                model_repository=repo,
                log_level="WARNING",
                job_executor="nomad",
                nomad_address=f"http://127.0.0.1:{http.server_port}",
                nomad_namespace="ml",
            ),
            rollout=rollout,
        )
        await trainer_server.start()
        servers.append(trainer_server)
        trainer_channel = aio.insecure_channel(f"127.0.0.1:{trainer_server.port}")
        yield Cluster(
            store, pb_grpc.TrainerServiceStub(trainer_channel), nomad, rollout, runs, repo, task
        )
        await trainer_channel.close()
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
            run.wait()
        for server in reversed(servers):
            await server.stop(0)
        await channel.close()
        http.shutdown()
        http.server_close()


async def finished(cluster: Cluster, job_id: int) -> pb.Job:
    last = None
    async for event in cluster.trainer.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=110):
        last = event.job
    assert last is not None
    return last


@pytest.mark.slow
async def test_concept_shift_retrain_runs_as_a_dispatched_batch_job(cluster: Cluster) -> None:
    await send_labelled(cluster.store, credit_frame(2000, seed=5, shift=1.5))
    response = await cluster.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(cluster, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_SUCCEEDED", job.message
    assert job.new_version == "2" and job.champion_version == "1"
    assert job.rollout_id == "rollout-of-2"
    assert "ran as cyclone-retrain/dispatch-1-abc" in job.message

    # One dispatch, the job id as payload, the model as meta, in the configured namespace.
    [(method, path, body)] = [c for c in cluster.nomad.calls if c[1].endswith("/dispatch")]
    assert (method, path) == ("POST", "/v1/job/cyclone-retrain/dispatch")
    assert base64.b64decode(body["Payload"]) == str(response.job.id).encode()
    assert body["Meta"] == {"model": MODEL}
    # The dispatched run did the fit and registration, then exited cleanly ...
    [run] = cluster.runs
    assert run.wait(timeout=30) == 0
    assert (cluster.repo / MODEL / "2" / "model.onnx").exists()
    # ... and left the rollout to this trainer: called once, here.
    assert cluster.rollout.calls == [(MODEL, "2", response.job.id)]
    mv = (
        await cluster.store.GetModelVersion(
            store_pb.GetModelVersionRequest(model=MODEL, version="2")
        )
    ).model_version
    assert mv.status == store_pb.MODEL_STATUS_SERVING and mv.parent_version == "1"


async def test_refused_dispatch_fails_the_job_with_nomads_reason(cluster: Cluster) -> None:
    cluster.nomad.inject = (500, "no nodes were eligible for evaluation")
    response = await cluster.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(cluster, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_FAILED"
    assert job.message.startswith("dispatch: nomad job 'cyclone-retrain'"), job.message
    assert "HTTP 500" in job.message and "no nodes were eligible" in job.message
    assert cluster.runs == [] and cluster.rollout.calls == []

    # The model's queue goes on: the next job is dispatched (a parameterized-job check: 400).
    cluster.nomad.jobs["cyclone-retrain"]["ParameterizedJob"] = None
    again = await cluster.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(cluster, again.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_FAILED"
    assert "HTTP 400" in job.message and "not a parameterized job" in job.message


async def test_a_run_that_dies_without_recording_fails_the_job(cluster: Cluster) -> None:
    # The task cannot read its job id (a broken image, say): it exits before touching the job.
    cluster.task["payload"] = b"garbage"
    response = await cluster.trainer.Retrain(pb.RetrainRequest(model=MODEL), timeout=10)
    job = await finished(cluster, response.job.id)
    assert pb.JobState.Name(job.state) == "JOB_STATE_FAILED"
    assert "nomad job cyclone-retrain/dispatch-1-abc ended (dead)" in job.message, job.message
    assert "stage dispatched" in job.message
    [run] = cluster.runs
    assert run.returncode != 0 and cluster.rollout.calls == []


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        ({"job_executor": "kubernetes"}, "job_executor"),
        ({"remote_job_timeout_seconds": 0.0}, "remote_job_timeout_seconds"),
        ({"job_lease_seconds": 0.0}, "job_lease_seconds"),
        ({"job_lease_seconds": 3601.0}, "job_lease_seconds"),
    ],
)
def test_bad_executor_settings_are_refused(flags: dict[str, object], field: str) -> None:
    with pytest.raises(SettingsError) as info:
        TrainerSettings(**flags)  # type: ignore[arg-type]
    assert str(info.value).startswith(field)
