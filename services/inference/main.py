"""Builds and runs the inference server from `InferenceSettings`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

import grpc

from cyclone.channels import aio_channel
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.models.registration import with_probes
from cyclone.models.repository import EVALUATION_FILE, REFERENCE_FILE
from cyclone.oip.v2 import open_inference_pb2_grpc as oip_grpc
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings, SettingsError
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.inference.catalog import ModelCatalog
from services.inference.dataplane import Scorer
from services.inference.oip import OpenInferenceServicer
from services.inference.servicer import InferenceServicer
from services.inference.sink import PredictionSink
from services.inference.store_sink import StoreSink

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "cyclone.inference.v1.InferenceService"
OIP_SERVICE = "inference.GRPCInferenceService"


@dataclasses.dataclass(frozen=True)
class InferenceSettings(ServerSettings):
    port: int = 8001
    model_repository: Path = Path("models")
    # With `model` set the process serves that one revision (the unit Envoy routes to);
    # without it, every model in the repository (for local use).
    model: str | None = None
    version: str | None = None
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    max_batch_rows: int = 10_000
    # Store address (host:port); predictions are logged there when set.
    store: str | None = None
    # Where batches wait while the store is down; default <data_dir>/spool/inference-<port>.
    spool_dir: Path | None = None
    spool_max_bytes: int = 1 << 30
    log_flush_interval: float = 0.2
    # The serving path is event-loop bound: uvloop's loop is worth ~10 % at concurrency 32.
    event_loop: str = "uvloop"
    # A serving pool member (no `model`): loads the versions requests name (Envoy's cluster
    # sets them in headers) and evicts the least recently used past this many MiB of models.
    pool_memory_mb: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_memory_mb is not None:
            if not self.pool_memory_mb > 0:
                raise SettingsError(
                    f"pool_memory_mb: must be more than 0 MiB, got {self.pool_memory_mb:g}"
                )
            if self.model is not None:
                raise SettingsError(
                    "pool_memory_mb: a pool member serves many models; do not also give model"
                )


def build_inference_server(
    settings: InferenceSettings, sink: PredictionSink | None = None
) -> tuple[CycloneServer, Scorer]:
    catalog = ModelCatalog(
        settings.model_repository,
        model=settings.model,
        version=settings.version,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        max_batch_rows=settings.max_batch_rows,
        pool_memory_mb=settings.pool_memory_mb,
    )
    catalog.load_initial()
    scorer = Scorer(catalog, sink)
    server = CycloneServer("inference", settings)
    server.add_service(
        INFERENCE_SERVICE,
        lambda s: pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(scorer), s),
    )
    server.add_service(
        OIP_SERVICE,
        lambda s: oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            OpenInferenceServicer(scorer), s
        ),
    )
    return server, scorer


async def register_models(address: str, catalog: ModelCatalog, retry_every: float = 2.0) -> None:
    """Put every served model version in the store's registry; keep trying while it is down."""
    async with aio_channel(address) as channel:
        stub = store_grpc.StoreServiceStub(channel)
        todo = list(catalog.models.values())
        while todo:
            model = todo[0]
            entry = store_pb.ModelVersion(
                model=model.name,
                version=model.version,
                task=model.schema.task,
                sha256=model.sha256,
                artifact_uri=str(model.files.directory.resolve()),
                schema_json=json.dumps(with_probes(model.schema.to_dict(), model.files.directory)),
                reference_profile_json=_read_optional(model.files.directory / REFERENCE_FILE),
                evaluation_json=_read_optional(model.files.directory / EVALUATION_FILE),
            )
            try:
                await stub.RegisterModelVersion(
                    store_pb.RegisterModelVersionRequest(model_version=entry, if_not_exists=True),
                    timeout=5,
                )
                serving = await stub.ListModelVersions(
                    store_pb.ListModelVersionsRequest(model=model.name), timeout=5
                )
                if not any(
                    v.status == store_pb.MODEL_STATUS_SERVING for v in serving.model_versions
                ):
                    await stub.SetModelStatus(
                        store_pb.SetModelStatusRequest(
                            model=model.name,
                            version=model.version,
                            status=store_pb.MODEL_STATUS_SERVING,
                        ),
                        timeout=5,
                    )
                todo.pop(0)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    log.error(
                        "store refused to register %s %s: %s",
                        model.name,
                        model.version,
                        exc.details(),
                    )
                    todo.pop(0)
                    continue
                await asyncio.sleep(retry_every)


def _read_optional(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def attach_store(settings: InferenceSettings, server: CycloneServer, scorer: Scorer) -> StoreSink:
    """Log every prediction to the store given in settings (started with the server)."""
    assert settings.store is not None
    spool_dir = (
        settings.spool_dir
        or settings.data_dir
        / "spool"
        / f"inference-{settings.model or ('pool' if settings.pool_memory_mb else 'all')}-{settings.port}"
    )
    sink = StoreSink(
        settings.store,
        spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
        flush_interval=settings.log_flush_interval,
    )
    scorer.sink = sink
    tasks: list[asyncio.Task[None]] = []

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await sink.stop()

    async def start() -> None:
        await sink.start()
        tasks.append(asyncio.create_task(register_models(sink.address, scorer.catalog)))

    server.on_start(start)
    server.on_shutdown(stop)
    return sink
