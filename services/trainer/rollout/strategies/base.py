"""What a rollout strategy is, and the controller's helpers it drives a rollout with."""

from __future__ import annotations

import builtins
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from cyclone.rollout_strategies import StrategyName
from cyclone.traffic import Revision

from ..analysis import Check
from ..model import Phase, Rollout
from ..ports import RolloutStore, Rows, SmokeTester


class Engine(Protocol):
    """The controller as a strategy sees it: shared steps every strategy is built from.

    Each call records what it decided (a step a user can read) before returning.
    """

    store: RolloutStore
    smoke: SmokeTester | None
    clock: Callable[[], float]

    async def running(self, name: str) -> Revision:
        """The running revision `name` (FailedPrecondition when it is not)."""
        ...

    async def champion_revision(self, r: Rollout) -> Revision | None:
        """The champion's revision, started again if it is not running."""
        ...

    async def apply(
        self, r: Rollout, weights: dict[str, int], revisions: builtins.list[Revision]
    ) -> None:
        """Give the proxy a split (and `r.progress.shadow`'s mirror when it is one of them)."""
        ...

    async def set_status(self, model: str, version: str, status: str) -> None: ...

    async def snapshot(self, r: Rollout) -> dict[str, builtins.list[int]]:
        """Both revisions' counters now: a baseline to judge the coming interval from."""
        ...

    async def record(
        self, r: Rollout, decision: str, reason: str, numbers: dict[str, float] | None = None
    ) -> None: ...

    async def checks(self, r: Rollout) -> tuple[builtins.list[Check], int]:
        """Error rate, latency, stability, quality (and estimated quality) of the new revision
        since its step began; and how many requests it answered meanwhile."""
        ...

    async def estimated_check(
        self, r: Rollout, champion_rows: Rows, candidate_rows: Rows, metric: str
    ) -> Check | None: ...

    async def count_failures(self, r: Rollout, checks: builtins.list[Check]) -> bool:
        """Record failed checks; roll back at the failure limit. True when the rollout ended."""
        ...

    async def waiting(
        self, r: Rollout, what: str, reason: str, numbers: dict[str, float]
    ) -> None: ...

    async def on_deadline(self, r: Rollout, why: str, numbers: dict[str, float]) -> None:
        """The plan's `on_deadline`: promote, roll back or hold for a person."""
        ...

    async def enter_confirm(self, r: Rollout, reason: str, numbers: dict[str, float]) -> None:
        """Promoted on estimates: the new revision takes all traffic while labels confirm."""
        ...

    async def finalize(
        self, r: Rollout, reason: str, numbers: dict[str, float] | None = None
    ) -> None:
        """Promote: all traffic on the new revision, the old one drained and stopped."""
        ...

    async def roll_back_to_champion(
        self, r: Rollout, reason: str, numbers: dict[str, float] | None = None
    ) -> None:
        """The champion back to 100 %, then the challenger stopped and retired."""
        ...


def rows_since(epoch: float) -> datetime:
    """The time to read a version's rows from, for a rollout event at `epoch` (a second early:
    a prediction logged as the event happened counts)."""
    return datetime.fromtimestamp(epoch, UTC) - timedelta(seconds=1)


Handler = Callable[[Engine, Rollout], Awaitable[None]]


@dataclass(frozen=True)
class Strategy:
    """One rollout strategy: the phases it goes through, how it starts, what each phase does.

    The controller owns the phases every strategy shares (START, CONFIRM, FINALIZE); `ticks`
    holds the strategy's own, each run once per interval while the rollout is in it.
    """

    name: StrategyName
    phases: tuple[Phase, ...]  # in the order a rollout goes through them
    begin: Handler  # once the new revision is healthy at 0 % of the traffic
    ticks: Mapping[Phase, Handler] = field(default_factory=dict)
    needs_smoke_tester: bool = False  # refused at start by a controller without one

    def __post_init__(self) -> None:
        unlisted = set(self.ticks) - set(self.phases)
        if unlisted:
            raise ValueError(f"strategy {self.name}: ticks for phases it does not list: {unlisted}")
