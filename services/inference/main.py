"""Builds and runs the inference server from `InferenceSettings`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.oip.v2 import open_inference_pb2_grpc as oip_grpc
from cyclone.server import CycloneServer
from cyclone.settings import ServerSettings
from services.inference.catalog import ModelCatalog
from services.inference.oip import OpenInferenceServicer
from services.inference.servicer import InferenceServicer, Scorer
from services.inference.sink import PredictionSink

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
    )
    catalog.load_initial()
    scorer = Scorer(catalog, sink)
    server = CycloneServer("inference", settings)
    server.add_service(
        INFERENCE_SERVICE, lambda s: pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(scorer), s)
    )
    server.add_service(
        OIP_SERVICE, lambda s: oip_grpc.add_GRPCInferenceServiceServicer_to_server(OpenInferenceServicer(scorer), s)
    )
    return server, scorer


async def run_inference(settings: InferenceSettings) -> None:
    server, scorer = build_inference_server(settings)
    if not scorer.catalog.models:
        # Keep running: a model can still be loaded through the repository API.
        log.warning("no model loaded from %s; OIP ServerReady reports false", settings.model_repository)
    await server.serve_until_signalled()
