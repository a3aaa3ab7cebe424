"""Keeps every registered model served: the trainer's start-up reconciliation.

At start-up (and after `cyclone up` restarts) every version in the model repository is in the
registry, each model has a serving version, and each serving version runs as a revision behind
the router at 100 % -- unless an active rollout owns the model's traffic (the rollout controller
resumed it already).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from cyclone.models.registration import register
from cyclone.models.repository import ModelRepository
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.traffic import Revision, TrafficRouter, TrafficSplit, revision_name
from services.trainer.rollout import Orchestrator, RolloutController

log = logging.getLogger(__name__)


class ServingKeeper:
    def __init__(
        self,
        store: store_grpc.StoreServiceStub,
        repository: Path,
        orchestrator: Orchestrator,
        router: TrafficRouter,
        controller: RolloutController,
        replicas: int = 1,
    ) -> None:
        self.store = store
        self.repository = ModelRepository(repository)
        self.orchestrator = orchestrator
        self.router = router
        self.controller = controller
        self.replicas = replicas

    async def register_repository(self) -> None:
        """Every version on disk is registered; a model without a serving version gets its latest."""
        for model in self.repository.models():
            versions = self.repository.versions(model)
            for version in versions:
                files = self.repository.files(model, version)
                try:
                    await register(self.store, files, serve_if_first=version == versions[-1])
                except grpc.RpcError as exc:
                    # One bad model must not keep the others from being served.
                    log.error("cannot register %s %s: %s", model, version, exc)

    async def serving_versions(self) -> dict[str, str]:
        listed = await self.store.ListModelVersions(store_pb.ListModelVersionsRequest(), timeout=10)
        return {
            v.model: v.version
            for v in listed.model_versions
            if v.status == store_pb.MODEL_STATUS_SERVING
        }

    async def reconcile(self) -> dict[str, str]:
        """Serve every model's serving version; returns model -> version served.

        Revisions start first, then every route goes in as one config where the router can
        (`apply_all`: one validation for hundreds of models instead of one each), then each
        revision is awaited healthy."""
        await self.register_repository()
        active = {r.model for r in await self.controller.list(None, 1000) if r.state.active}
        running = {r.name: r for r in await self.orchestrator.running()}
        started: dict[str, Revision] = {}
        for model, version in sorted((await self.serving_versions()).items()):
            if model in active:
                continue
            try:
                started[model] = running.get(
                    revision_name(model, version)
                ) or await self.orchestrator.start(model, version, self.replicas)
            except Exception:
                log.exception("cannot serve %s %s", model, version)
        splits = [TrafficSplit(m, {r.name: 100}, {r.name: r}) for m, r in started.items()]
        routed = await self._route(splits)
        served: dict[str, str] = {}
        for model, revision in started.items():
            if model not in routed:
                continue
            try:
                await self.router.wait_healthy(revision, 60)
            except Exception:
                log.exception("%s is not healthy behind the router", revision.name)
                continue
            served[model] = revision.version
            log.info(
                "serving %s %s as %s (%s)",
                model,
                revision.version,
                revision.name,
                "pooled" if revision.pooled else f"{len(revision.endpoints)} replica(s)",
            )
        return served

    async def _route(self, splits: list[TrafficSplit]) -> set[str]:
        """Install the splits, together when the router can; the models now routed. Should
        the whole config be refused, each goes alone, so one bad model keeps no other out."""
        apply_all = getattr(self.router, "apply_all", None)
        if apply_all is not None and splits:
            try:
                await apply_all(splits)
                return {split.model for split in splits}
            except Exception:
                log.exception(
                    "installing %d models' routes at once failed; one by one", len(splits)
                )
        routed = set()
        for split in splits:
            try:
                await self.router.apply(split)
                routed.add(split.model)
            except Exception:
                log.exception("cannot route %s", split.model)
        return routed
