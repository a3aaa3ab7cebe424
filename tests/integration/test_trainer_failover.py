"""Two trainers over one store and one Envoy, the leader killed under prediction load.

Real processes as `cyclone up --trainers 2` runs them: both with `--envoy --envoy-apart`
attached to one Envoy (run here, as the mesh's supervisor runs it), revisions in sessions of
their own. Trainer 1 starts first and leads the traffic plane; trainer 2 stands by. Clients
predict through Envoy's public listener the whole time; trainer 1's process group is killed
(SIGKILL). Then:

- no prediction fails (the data plane is apart from the trainers);
- trainer 2 holds the traffic role within the lease time (plus one try) of the kill;
- trainer calls through Envoy's control listener reach it, and a rollout started after the
  kill moves the traffic to a new version and is promoted;
- a retraining job asked for after the kill is run once, by trainer 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc import aio
from support import eventually
from typer.testing import CliRunner

from cyclone.client import MODEL_HEADER
from cyclone.envoy import EnvoyProxy
from cyclone.envoy.edge import edge_settings
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.registration import register
from cyclone.models.repository import ModelRepository
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.rollout_plan import RedBlackSpec
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.cli import app
from services.launch import Spawned, free_port, spawn, start_store
from services.store.main import StoreSettings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "credit"
cli = CliRunner()
LEASE_SECONDS = 3.0
CLIENTS = 4


@contextlib.contextmanager
def _cleanup(repository: Path) -> Iterator[list[Spawned]]:
    """The trainers, then the revisions they left (sessions of their own, as under the mesh)."""
    running: list[Spawned] = []
    try:
        yield running
    finally:
        for process in running:
            process.stop(10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.process.pid, signal.SIGKILL)
        _stop_revisions(repository)


def _stop_revisions(repository: Path) -> None:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "serve inference" in cmdline and str(repository) in cmdline:
            found.append(proc)
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(found, timeout=10)


def _two_trainer_edge(
    data_dir: Path, ports: dict[str, int], store: str, trainer_ports: list[int]
) -> EnvoyProxy:
    """The supervisor's Envoy for two trainers: the same description the trainers write their
    clusters from."""
    return EnvoyProxy(
        edge_settings(
            data_dir,
            public_host="127.0.0.1",
            public_port=ports["public"],
            control_port=ports["control"],
            store=store,
            monitor=None,
            trainer=f"127.0.0.1:{trainer_ports[0]}",
            extra_trainers=[f"127.0.0.1:{trainer_ports[1]}"],
        )
    )


def _trainer_args(
    name: str, store: str, repository: Path, data_dir: Path, ports: dict[str, int], peers: str
) -> list[str]:
    return [
        "--store",
        store,
        "--model-repository",
        str(repository),
        "--data-dir",
        str(data_dir),
        "--envoy",
        "--envoy-apart",
        "--public-host",
        "127.0.0.1",
        "--public-port",
        str(ports["public"]),
        "--control-port",
        str(ports["control"]),
        "--monitor",
        "",
        "--envoy-trainers",
        peers,
        "--instance-id",
        name,
        "--leader-lease",
        f"{LEASE_SECONDS:g}",
        "--pool-processes",
        "0",
        "--replicas",
        "1",
    ]


async def _holder(url: str) -> tuple[str, int] | None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT holder, epoch FROM role_leases WHERE role = 'trainer-traffic'"
            " AND expires_at > now()"
        )
        row = await cur.fetchone()
    return (str(row[0]), int(row[1])) if row else None


def _request() -> inference_pb.PredictRequest:
    request = inference_pb.PredictRequest(model=MODEL)
    for name, value in {"age": 41.0, "income": 52000.0, "debt_ratio": 0.31}.items():
        request.features[name].numbers.append(value)
    request.features["city"].strings.append("porto")
    return request


@dataclasses.dataclass
class Load:
    answered: dict[str, int] = dataclasses.field(default_factory=dict)
    failed: list[str] = dataclasses.field(default_factory=list)
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    async def client(self, public: str) -> None:
        async with aio.insecure_channel(public) as channel:
            stub = inference_grpc.InferenceServiceStub(channel)
            while not self.stop.is_set():
                try:
                    reply = await stub.Predict(
                        _request(), metadata=((MODEL_HEADER, MODEL),), timeout=30
                    )
                    self.answered[reply.version] = self.answered.get(reply.version, 0) + 1
                except aio.AioRpcError as exc:
                    self.failed.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.01)


async def test_the_standby_takes_the_traffic_plane_when_the_leader_is_killed_under_load(
    fresh_database_url: str, tmp_path: Path
) -> None:
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import credit_frame, credit_pipeline

    repository = (tmp_path / "models").resolve()
    data_dir = tmp_path / "data"
    frame = credit_frame(400, seed=0)
    import_pipeline(
        credit_pipeline(frame), MODEL, repository, sample=frame, label_column="defaulted"
    )
    ports = {"public": free_port(), "control": free_port()}
    trainer_ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{p}" for p in trainer_ports)
    store_settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(store_settings) as store:
        # The supervisor's Envoy: the same description the trainers write their clusters from.
        proxy = _two_trainer_edge(data_dir, ports, store.address, trainer_ports)
        await proxy.start()
        public, control = proxy.public_address, proxy.control_address
        try:
            with _cleanup(repository) as running:
                for index, port in enumerate(trainer_ports, start=1):
                    name = f"trainer-{index}"
                    args = _trainer_args(name, store.address, repository, data_dir, ports, peers)
                    running.append(
                        await asyncio.to_thread(
                            spawn,
                            "trainer",
                            args,
                            tmp_path / f"{name}.log",
                            port=port,
                            timeout=120,
                            new_session=True,
                        )
                    )
                await _run_failover(
                    fresh_database_url, store.address, public, control, running, repository
                )
                # Trainer 2 has led since the kill (no flapping) and nothing else took the role.
                assert await _holder(fresh_database_url) == ("trainer-2", 2)
        finally:
            await proxy.stop()


async def _run_failover(
    url: str,
    store_address: str,
    public: str,
    control: str,
    trainers: list[Spawned],
    repository: Path,
) -> None:
    assert await _holder(url) == ("trainer-1", 1)  # the first started leads at once
    async with (
        aio.insecure_channel(control) as control_channel,
        aio.insecure_channel(trainers[1].address) as standby_channel,
        aio.insecure_channel(store_address) as store_channel,
    ):
        via_envoy = pb_grpc.TrainerServiceStub(control_channel)
        standby = pb_grpc.TrainerServiceStub(standby_channel)
        store = store_grpc.StoreServiceStub(store_channel)
        with pytest.raises(aio.AioRpcError) as refused:
            await standby.ListRollouts(pb.ListRolloutsRequest(model=MODEL), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "standby" in (refused.value.details() or "")
        # The CLI pointed at the standby quotes it (not "nothing answered").
        said = await asyncio.to_thread(
            cli.invoke, app, ["rollouts", "--trainer", trainers[1].address]
        )
        assert said.exit_code == 1 and "this trainer is a standby" in said.output, said.output

        async def reaches_leader() -> bool:
            try:
                await via_envoy.ListRollouts(pb.ListRolloutsRequest(model=MODEL), timeout=5)
            except aio.AioRpcError:
                return False
            return True

        await eventually(reaches_leader, 30, "trainer calls through Envoy reach the leader")

        load = Load()
        clients = [asyncio.create_task(load.client(public)) for _ in range(CLIENTS)]
        try:
            await eventually(
                lambda: _true(sum(load.answered.values()) >= 20), 60, "predictions flowing"
            )
            os.killpg(trainers[0].process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            # A user's `cyclone rollouts` right after the kill waits the failover out.
            listed = asyncio.create_task(
                asyncio.to_thread(
                    cli.invoke, app, ["rollouts", "--model", MODEL, "--trainer", control]
                )
            )

            async def standby_leads() -> bool:
                held = await _holder(url)
                return held is not None and held[0] == "trainer-2"

            await eventually(standby_leads, 30, "trainer 2 holding the traffic role", every=0.05)
            takeover = time.monotonic() - killed_at
            await eventually(reaches_leader, 60, "trainer calls through Envoy reach trainer 2")
            serving = time.monotonic() - killed_at
            said = await listed
            assert said.exit_code == 0, said.output
            print(f"takeover {takeover:.2f}s, trainer calls served again {serving:.2f}s")
            # The lease ran out and the standby's next try took it (one try per third).
            assert takeover <= LEASE_SECONDS * (1 + 1 / 3) + 1.5, takeover

            await _roll_out_version_2(store, via_envoy, repository)
            before = load.answered.get("2", 0)
            await eventually(
                lambda: _true(load.answered.get("2", 0) >= before + 20), 30, "v2 answering"
            )
            job = await via_envoy.Retrain(
                pb.RetrainRequest(model=MODEL, reason="after the kill"), timeout=30
            )
            ended = await _wait_job_ended(via_envoy, job.job.id)
        finally:
            load.stop.set()
            await asyncio.gather(*clients)
        print(f"predictions answered {load.answered}, failed {len(load.failed)}; job {ended.state}")
        assert not load.failed, load.failed[:5]
        assert load.answered.get("1", 0) > 0 and load.answered.get("2", 0) > 0, load.answered
        # Run by trainer 2, the only one alive (jobs are claimed under leases in the store).
        owners = await _job_owners(url, job.job.id)
        assert len(owners) == 1 and f":{trainers[1].process.pid}:" in owners[0], (owners, ended)


async def _true(value: bool) -> bool:
    return value


async def _roll_out_version_2(
    store: store_grpc.StoreServiceStub, trainer: pb_grpc.TrainerServiceStub, repository: Path
) -> None:
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import credit_frame, credit_pipeline

    frame = credit_frame(400, seed=3)
    await asyncio.to_thread(
        import_pipeline,
        credit_pipeline(frame),
        MODEL,
        repository,
        sample=frame,
        label_column="defaulted",
    )
    await register(store, ModelRepository(repository).files(MODEL, "2"), serve_if_first=False)
    plan = default_plan(MODEL, "classification")
    plan = dataclasses.replace(
        plan,
        rollout=dataclasses.replace(plan.rollout, red_black=RedBlackSpec(keep_old_for_seconds=1.0)),
    )
    await store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=plan_to_yaml(plan)))
    started = await trainer.Rollout(
        pb.RolloutRequest(model=MODEL, version="2", strategy=pb.ROLLOUT_STRATEGY_RED_BLACK),
        timeout=30,
    )
    deadline = time.monotonic() + 90
    while True:
        current = (
            await trainer.GetRollout(pb.GetRolloutRequest(rollout_id=started.rollout.id))
        ).rollout
        if current.state not in (pb.ROLLOUT_STATE_PENDING, pb.ROLLOUT_STATE_PROGRESSING):
            break
        assert time.monotonic() < deadline, current
        await asyncio.sleep(0.2)
    assert current.state == pb.ROLLOUT_STATE_PROMOTED, current


async def _wait_job_ended(trainer: pb_grpc.TrainerServiceStub, job_id: int) -> Any:
    deadline = time.monotonic() + 90
    running = (pb.JOB_STATE_UNSPECIFIED, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    while True:
        job = (await trainer.GetJob(pb.GetJobRequest(job_id=job_id))).job
        if job.state not in running:
            return job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.2)


async def _job_owners(url: str, job_id: int) -> list[str]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT owner FROM training_jobs WHERE id = %s", (job_id,))
        return [str(row[0]) for row in await cur.fetchall()]
