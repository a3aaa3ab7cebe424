"""The trainer's traffic plane: Envoy, the model revisions and the rollouts that move between them.

Started when a trainer running with `envoy` on leads the traffic plane (one trainer at a time,
`services.trainer.leader`; a lone trainer leads at once): it starts Envoy, resumes (or rolls
back) the rollouts a previous process left, then serves every registered model. With
`idle_timeout_seconds` it also scales idle revisions to zero (`services.trainer.idle`). Stopped
in reverse: rollouts pause where they are (they resume on the next start), the revisions stop,
Envoy stops.

With `envoy_apart` (as under `cyclone up`) the data plane outlives the trainer: Envoy runs
under the mesh's supervisor and the revisions in sessions of their own. The trainer attaches to
that Envoy, adopts the revisions a previous trainer left running, and at stop leaves both as
they are, so a trainer that dies or restarts fails no request. With several trainers, the one
elected next does the same; its writes are fenced (`may_write`, `fence`) so one that lost the
lead writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cyclone.envoy import EnvoyProxy
from cyclone.envoy.edge import edge_settings
from cyclone.errors import NotLeader
from cyclone.plugins import orchestrators
from cyclone.rollout_strategies import StrategyName
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.trainer.idle import IdleWatcher
from services.trainer.rollout import (
    ControllerSettings,
    ProbeSmokeTester,
    Rollout,
    RolloutController,
)
from services.trainer.rollout.calibrations import RepositoryCalibrations
from services.trainer.rollout.store_gateway import StoreGateway
from services.trainer.serving import ServingKeeper

log = logging.getLogger(__name__)


class TrafficPlane:
    def __init__(
        self,
        settings: Any,
        store: store_grpc.StoreServiceStub,
        *,
        may_write: Callable[[], Awaitable[bool]] | None = None,
        fence: Callable[[], Awaitable[store_pb.RoleFence | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # Fencing when several trainers elect a leader (services.trainer.leader): Envoy's
        # writes ask `may_write`, rollout writes carry `fence`.
        self.may_write = may_write
        self.fence = fence
        self.proxy: EnvoyProxy | None = None
        self.orchestrator: Any = None
        self.controller: RolloutController | None = None
        self.keeper: ServingKeeper | None = None
        self.idle: IdleWatcher | None = None
        self._gateway: StoreGateway | None = None
        # True once start() is done: a rollout started while the controller still resumes the
        # store's active rollouts could be resumed (driven) a second time.
        self.ready = False

    async def start(self, trainer_port: int) -> None:
        s = self.settings
        if s.idle_timeout_seconds < 0:
            raise ValueError(
                f"idle_timeout_seconds: must be 0 (never) or more, got {s.idle_timeout_seconds:g}"
            )
        spec = orchestrators().get(s.orchestrator)
        if spec is None:
            raise ValueError(
                f"orchestrator: unknown {s.orchestrator!r}; known: {sorted(orchestrators())}"
            )
        self.orchestrator = spec.create(
            {
                "model_repository": str(s.model_repository),
                "store": s.store,
                "data_dir": str(s.data_dir),
                # Apart: revisions outlive this process and are adopted by the next one.
                "detached": s.envoy_apart,
                "pool_processes": s.pool_processes,
                "pool_memory_mb": s.pool_memory_mb,
                "pool_threshold_mb": s.pool_threshold_mb,
            }
        )
        self.proxy = EnvoyProxy(
            edge_settings(
                s.data_dir,
                public_host=s.public_host,
                public_port=s.public_port,
                control_port=s.control_port,
                admin_port=s.envoy_admin_port,
                monitor=s.monitor or None,
                # Several stores or trainers (`cyclone up --stores/--trainers N`): Envoy's
                # clusters hold them all, in the order every trainer is given them.
                store=(s.envoy_stores or (s.store,))[0],
                extra_stores=s.envoy_stores[1:],
                trainer=(s.envoy_trainers or (f"127.0.0.1:{trainer_port}",))[0],
                extra_trainers=s.envoy_trainers[1:],
            ),
            may_write=self.may_write,
        )
        if s.envoy_apart:
            await self.proxy.attach()
            adopt = getattr(self.orchestrator, "adopt", None)
            if adopt is not None:
                adopted = await adopt()
                log.info("adopted %d running revision(s)", len(adopted))
        else:
            await self.proxy.start()
        self._gateway = StoreGateway(s.store, fence=self.fence)
        self.controller = RolloutController(
            self.orchestrator,
            self.proxy,
            self._gateway,
            ControllerSettings(),
            smoke=ProbeSmokeTester(s.model_repository),
            calibrations=RepositoryCalibrations(s.model_repository),
        )
        await self.controller.start_up()
        self.keeper = ServingKeeper(
            self.store,
            s.model_repository,
            self.orchestrator,
            self.proxy,
            self.controller,
            replicas=s.replicas,
        )
        served = await self.keeper.reconcile()
        if s.idle_timeout_seconds > 0:
            self.idle = IdleWatcher(
                self.orchestrator, self.proxy, self._rollout_active, s.idle_timeout_seconds
            )
            self.idle.start()
        self.ready = True
        log.info(
            "traffic plane up: public %s, control %s, serving %s",
            self.proxy.public_address,
            self.proxy.control_address,
            ", ".join(f"{m} {v}" for m, v in served.items()) or "no model yet",
        )

    async def start_rollout(self, model: str, version: str, job_id: int) -> str:
        """The retraining job's hand-off: roll the new version out with the plan's strategy."""
        return (await self.rollout(model, version)).id

    async def rollout(
        self, model: str, version: str, strategy: StrategyName | None = None
    ) -> Rollout:
        """Start a rollout (the plan's strategy unless given) from a running revision."""
        if self.controller is None:
            raise NotLeader("the traffic plane is not started on this trainer")
        if not self.ready:
            raise NotLeader("the traffic plane is starting on this trainer; retry")
        if self.idle is not None:
            await self.idle.wake_model(model)  # the rollout starts from a running revision
        return await self.controller.start(model, version, strategy)

    async def resume(self) -> None:
        """After a lapse of leadership nobody else used: drive again the rollouts whose writes
        were refused meanwhile, from what the store recorded."""
        if self.controller is not None:
            await self.controller.start_up()

    async def _rollout_active(self, model: str) -> bool:
        if self.controller is None:
            return False
        return any(r.state.active for r in await self.controller.list(model, 10))

    async def stop(self) -> None:
        """Stop driving traffic; it can start again (a trainer elected anew)."""
        self.ready = False
        idle, self.idle = self.idle, None
        controller, self.controller = self.controller, None
        self.keeper = None
        orchestrator, self.orchestrator = self.orchestrator, None
        proxy, self.proxy = self.proxy, None
        gateway, self._gateway = self._gateway, None
        if idle is not None:
            await idle.close()
        if controller is not None:
            await controller.close()
        if orchestrator is not None:
            await orchestrator.close()
        if proxy is not None:
            await proxy.stop()
        if gateway is not None:
            await gateway.close()
