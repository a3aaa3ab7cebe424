"""Zero-downtime rollouts: the transport-free engine behind the trainer's rollout RPCs.

controller = RolloutController(orchestrator, router, StoreGateway(store_address),
                               smoke=ProbeSmokeTester(model_repository))  # blue-green's gate
await controller.start_up()          # resume or roll back what a previous process left
rollout = await controller.start("credit", "2")            # strategy from the plan
async for step in controller.watch(rollout.id): ...
await controller.promote(rollout.id) / rollback(rollout.id, "why")
await controller.close()
"""

from .controller import ControllerSettings, RolloutController
from .model import Phase, Progress, Rollout, RolloutState, RolloutStep
from .ports import Orchestrator, RolloutStore, Rows, SmokeResult, SmokeTester, VersionInfo
from .smoke import ProbeSmokeTester

__all__ = [
    "ControllerSettings",
    "Orchestrator",
    "Phase",
    "ProbeSmokeTester",
    "Progress",
    "Rollout",
    "RolloutController",
    "RolloutState",
    "RolloutStep",
    "RolloutStore",
    "Rows",
    "SmokeResult",
    "SmokeTester",
    "VersionInfo",
]
