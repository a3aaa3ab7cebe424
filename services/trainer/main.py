"""Builds and runs the trainer server from `TrainerSettings`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cyclone.channels import aio_channel
from cyclone.nomad.api import NomadClient, NomadError
from cyclone.nomad.dispatch import dispatch_retrain
from cyclone.nomad.render import RETRAIN_JOB
from cyclone.plugins import get_plugins
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings, SettingsError
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.handoff import LeaderHandoff
from services.trainer.jobs import (
    LEASE_SECONDS,
    MAX_LEASE_SECONDS,
    REMOTE_TIMEOUT_SECONDS,
    JobRunner,
    RolloutStarter,
    ServeImmediately,
    StoreJobGateway,
)
from services.trainer.leader import DEFAULT_LEASE_SECONDS, LeaderElection
from services.trainer.servicer import TrainerServicer
from services.trainer.traffic import TrafficPlane

log = logging.getLogger(__name__)

TRAINER_SERVICE = "cyclone.trainer.v1.TrainerService"
JOB_EXECUTORS = ("local", "nomad")
# Below this a lease is renewed more often than a loaded store answers.
MIN_LEADER_LEASE_SECONDS = 1.0


@dataclasses.dataclass(frozen=True)
class TrainerSettings(ServerSettings):
    port: int = 8004
    store: str = "127.0.0.1:8002"
    # Where new versions are written (the inference servers' model repository).
    model_repository: Path = Path("models")
    # Models retrained at the same time (each in its own worker process).
    max_parallel_jobs: int = 2
    # Run Envoy and drive it: serve every registered model as revisions, roll new versions out.
    envoy: bool = False
    public_host: str = "0.0.0.0"
    public_port: int = 8080
    control_port: int = 8081
    envoy_admin_port: int = 0
    # With `envoy`: Envoy and the revisions run apart from this process (`cyclone up`
    # supervises Envoy): attach to Envoy, adopt running revisions, leave both at stop.
    envoy_apart: bool = False
    monitor: str = "127.0.0.1:8003"
    orchestrator: str = "local"
    replicas: int = 1
    # Serving pool (local orchestrator): this many shared inference processes serve every
    # version whose model.onnx is at most `pool_threshold_mb`, each holding up to
    # `pool_memory_mb` of models (least recently used evicted). 0 = a revision per version.
    pool_processes: int = 0
    pool_memory_mb: float = 1024.0
    pool_threshold_mb: float = 64.0
    # Run the one queued job whose id this file holds, then exit (a Nomad dispatched batch job).
    run_job_file: Path | None = None
    # Scale to zero: stop a revision without requests for this long; its next request starts
    # it again (held by Envoy meanwhile). 0 = never.
    idle_timeout_seconds: float = 0.0
    # Where retraining jobs run: "local" (worker processes here) or "nomad" (each job a
    # dispatch of the `nomad_retrain_job` parameterized batch job; this trainer rolls out).
    job_executor: str = "local"
    nomad_address: str = "http://127.0.0.1:4646"
    nomad_token: str = ""
    nomad_namespace: str = ""
    nomad_retrain_job: str = RETRAIN_JOB
    # How long a dispatched job may take (on top of the plan's `retrain.wait`).
    remote_job_timeout_seconds: float = REMOTE_TIMEOUT_SECONDS
    # How long this trainer holds its jobs without renewing them (three times per lease): a
    # trainer that died loses its jobs to another (or to its restart) this long after.
    job_lease_seconds: float = LEASE_SECONDS
    # Several trainers (docs/scaling-out.md): with `envoy`, the one holding the traffic role's
    # lease in the store runs the traffic plane; the others stand by and take over this long
    # after the leader stopped renewing (a clean stop hands over at once).
    leader_lease_seconds: float = DEFAULT_LEASE_SECONDS
    # This process's lease holder id (default: host, pid and a random part). Give each live
    # trainer its own; a restart under the same id takes its old lease over at once.
    instance_id: str = ""
    # Where other trainers reach this one (HOST:PORT); default: this server's host and port.
    advertise_address: str = ""
    # Every store and every trainer Envoy's clusters hold, in one order all trainers share
    # (`cyclone up --stores/--trainers N`); empty: `store` and this trainer.
    envoy_stores: tuple[str, ...] = ()
    envoy_trainers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.job_executor not in JOB_EXECUTORS:
            raise SettingsError(
                f"job_executor: must be one of {', '.join(JOB_EXECUTORS)},"
                f" got {self.job_executor!r}"
            )
        if self.remote_job_timeout_seconds <= 0:
            raise SettingsError("remote_job_timeout_seconds: must be positive")
        if not 0 < self.job_lease_seconds <= MAX_LEASE_SECONDS:
            raise SettingsError(
                f"job_lease_seconds: must be more than 0 and at most {MAX_LEASE_SECONDS:g},"
                f" got {self.job_lease_seconds:g}"
            )
        if not MIN_LEADER_LEASE_SECONDS <= self.leader_lease_seconds <= MAX_LEASE_SECONDS:
            raise SettingsError(
                f"leader_lease_seconds: must be between {MIN_LEADER_LEASE_SECONDS:g} and"
                f" {MAX_LEASE_SECONDS:g}, got {self.leader_lease_seconds:g}"
            )
        if self.pool_processes < 0:
            raise SettingsError(
                f"pool_processes: must be 0 (no pool) or more, got {self.pool_processes}"
            )
        for name in ("pool_memory_mb", "pool_threshold_mb"):
            value = getattr(self, name)
            if not value > 0:
                raise SettingsError(f"{name}: must be more than 0 MiB, got {value:g}")


@dataclasses.dataclass(frozen=True)
class Trainer:
    """What a running trainer holds: the job runner and, with `envoy`, its traffic plane."""

    runner: JobRunner
    traffic: TrafficPlane | None
    election: LeaderElection | None = None


def build_trainer_server(
    settings: TrainerSettings, *, rollout: RolloutStarter | None = None
) -> tuple[CycloneServer, Trainer]:
    get_plugins()  # a broken plugin set fails at start-up, not mid-job
    channel = aio_channel(settings.store)
    store = store_grpc.StoreServiceStub(channel)
    server = CycloneServer("trainer", settings)
    traffic: TrafficPlane | None = None
    election: LeaderElection | None = None
    if settings.envoy:
        election, traffic = _elected_traffic_plane(settings, store, server)
        if rollout is None:
            rollout = LeaderHandoff(election, traffic, store=store)
    runner = JobRunner(
        StoreJobGateway(store, settings.model_repository),
        settings.model_repository,
        max_parallel=settings.max_parallel_jobs,
        rollout=rollout or ServeImmediately(store),
        dispatcher=NomadDispatcher(settings) if settings.job_executor == "nomad" else None,
        remote_timeout=settings.remote_job_timeout_seconds,
        lease_seconds=settings.job_lease_seconds,
    )
    server.add_service(
        TRAINER_SERVICE,
        lambda s: pb_grpc.add_TrainerServiceServicer_to_server(
            TrainerServicer(runner, traffic, election), s
        ),
    )

    async def start() -> None:
        if election is not None:
            # A standby is up (health "" SERVING) but not the trainer service's server.
            await server.hold_back(TRAINER_SERVICE, True)
            election.address = settings.advertise_address or _own_address(settings, server.port)
            await election.start()
        await runner.start()

    async def stop() -> None:
        await runner.stop()
        if election is not None:
            await election.stop()
        await channel.close()

    server.on_start(start)
    server.on_shutdown(stop)
    return server, Trainer(runner, traffic, election)


def _elected_traffic_plane(
    settings: TrainerSettings, store: store_grpc.StoreServiceStub, server: CycloneServer
) -> tuple[LeaderElection, TrafficPlane]:
    """The traffic plane, run only while this trainer holds the traffic role's lease."""

    async def lead() -> None:
        await traffic.start(server.port)
        await server.hold_back(TRAINER_SERVICE, False)

    async def step_down() -> None:
        await server.hold_back(TRAINER_SERVICE, True)
        await traffic.stop()

    async def traffic_resume() -> None:
        await traffic.resume()

    election = LeaderElection(
        store,
        on_elected=lead,
        on_deposed=step_down,
        on_resumed=traffic_resume,
        holder=settings.instance_id,
        lease_seconds=settings.leader_lease_seconds,
        # Apart, a standby can take Envoy and the revisions over; with its own Envoy this
        # trainer stopping them on a store outage would fail every request.
        step_down_when_cut_off=settings.envoy_apart,
    )
    traffic = TrafficPlane(settings, store, may_write=election.ensure_leading, fence=election.fence)
    return election, traffic


def _own_address(settings: TrainerSettings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host
    return f"{host}:{port}"


class NomadDispatcher:
    """Each job: a dispatch of the retrain batch job with the job id as payload."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.client = NomadClient(
            settings.nomad_address,
            token=settings.nomad_token or None,
            namespace=settings.nomad_namespace or None,
        )
        self.job = settings.nomad_retrain_job

    async def dispatch(self, job_id: int, model: str) -> str:
        return await dispatch_retrain(self.client, job_id, model, job=self.job)

    async def ended(self, remote: str) -> str:
        try:
            job = await self.client.read(remote)
        except NomadError as exc:  # Nomad busy or away: ask again later
            log.warning("%s", exc)
            return ""
        if job is None:
            return "Nomad no longer knows it"
        return "dead" if job.get("Status") == "dead" else ""


async def run_one_job(settings: TrainerSettings) -> int:
    """`cyclone serve trainer --run-job-file F`: run job `F`'s id to its end; 0 unless it failed."""
    assert settings.run_job_file is not None
    text = settings.run_job_file.read_text().strip()
    if not text.isdigit() or int(text) <= 0:
        raise ValueError(f"run_job_file: {settings.run_job_file} must hold a job id, got {text!r}")
    get_plugins()
    async with aio_channel(settings.store) as channel:
        store = store_grpc.StoreServiceStub(channel)
        runner = JobRunner(
            StoreJobGateway(store, settings.model_repository),
            settings.model_repository,
            rollout=ServeImmediately(store),
            max_parallel=1,
        )
        job = await runner.run_one(int(text))
    log.info("job %d of %s ended %s: %s", job.id, job.model, job.state, job.message)
    return 1 if job.state == "failed" else 0
