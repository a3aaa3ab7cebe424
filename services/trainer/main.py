"""Builds and runs the trainer server from `TrainerSettings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from grpc import aio

from cyclone.plugins import get_plugins
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.jobs import JobRunner, RolloutStarter
from services.trainer.servicer import TrainerServicer

TRAINER_SERVICE = "cyclone.trainer.v1.TrainerService"


@dataclasses.dataclass(frozen=True)
class TrainerSettings(ServerSettings):
    port: int = 8004
    store: str = "127.0.0.1:8002"
    # Where new versions are written (the inference servers' model repository).
    model_repository: Path = Path("models")
    # Models retrained at the same time (each in its own worker process).
    max_parallel_jobs: int = 2


def build_trainer_server(
    settings: TrainerSettings, *, rollout: RolloutStarter | None = None
) -> tuple[CycloneServer, JobRunner]:
    get_plugins()  # a broken plugin set fails at start-up, not mid-job
    channel = aio.insecure_channel(settings.store)
    runner = JobRunner(
        store_grpc.StoreServiceStub(channel),
        settings.model_repository,
        max_parallel=settings.max_parallel_jobs,
        rollout=rollout,
    )
    server = CycloneServer("trainer", settings)
    server.add_service(
        TRAINER_SERVICE,
        lambda s: pb_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(runner), s),
    )

    async def stop() -> None:
        await runner.stop()
        await channel.close()

    server.on_start(runner.start)
    server.on_shutdown(stop)
    return server, runner


async def run_trainer(settings: TrainerSettings) -> None:
    server, _ = build_trainer_server(settings)
    await server.serve_until_signalled()
