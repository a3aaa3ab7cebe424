"""What the rollout controller drives and reads, as protocols: real implementations talk to the
store over gRPC (`store_gateway.py`), start processes (`plugins/orchestrator_local.py`) and
program Envoy (`cyclone.envoy`); the unit tests pass in-memory ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cyclone.reference import Calibration
from cyclone.rollout_plan import RolloutSpec
from cyclone.traffic import Revision

from .model import Rollout, RolloutStep


class Orchestrator(Protocol):
    """Starts and stops model revisions (local subprocesses, Nomad allocations, ...)."""

    async def start(self, model: str, version: str, replicas: int) -> Revision:
        """Start `replicas` processes serving `model` `version`; return once they answer health.

        Raises on failure, leaving nothing running. Starting a revision that runs is a no-op.
        """

    async def stop(self, revision_name: str) -> None:
        """Stop every process of a revision (graceful, then forced); unknown names are a no-op."""

    async def running(self) -> Sequence[Revision]:
        """The revisions this orchestrator runs now."""


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: str
    status: str  # staged | canary | serving | retired
    task: str  # classification | regression


@dataclass(frozen=True)
class Rows:
    """Rows one version served, in time order: an input fingerprint (pairs the same request
    across versions), the prediction, the label (None when unlabelled) and, for classifiers,
    the served class probabilities (columns in `classes` order)."""

    keys: Sequence[str]
    predictions: Sequence[Any]
    labels: Sequence[Any]
    probabilities: Sequence[Sequence[float]] | None = None
    classes: Sequence[str] = ()

    def labelled(self) -> Rows:
        return self.subset([i for i, label in enumerate(self.labels) if label is not None])

    def subset(self, idx: Sequence[int]) -> Rows:
        probabilities = self.probabilities
        return Rows(
            [self.keys[i] for i in idx],
            [self.predictions[i] for i in idx],
            [self.labels[i] for i in idx],
            None if probabilities is None else [probabilities[i] for i in idx],
            self.classes,
        )

    def newest(self, n: int) -> Rows:
        return self.subset(range(max(len(self.keys) - n, 0), len(self.keys)))


@dataclass(frozen=True)
class Calibrated:
    """A version's own calibration (fitted on labelled rows when it was registered) and the
    class order its maps apply to."""

    classes: tuple[str, ...]
    calibration: Calibration


class Calibrations(Protocol):
    """Where a version's calibration is kept (its reference profile)."""

    async def calibration(self, model: str, version: str) -> Calibrated | None:
        """None when the version has none (imported without labelled rows, or a regressor)."""


@dataclass(frozen=True)
class SmokeResult:
    requests: int
    failures: int
    correct: int  # answers equal to the known label (classification) / within tolerance
    detail: str = ""


class SmokeTester(Protocol):
    """Sends requests with known answers straight to a revision (blue-green's gate)."""

    async def smoke(self, revision: Revision, rows: int) -> SmokeResult: ...


class RolloutStore(Protocol):
    """The registry, plans, labelled predictions and the `rollouts` table."""

    async def model_version(self, model: str, version: str) -> VersionInfo | None: ...

    async def serving_version(self, model: str) -> str | None: ...

    async def registered(self, model: str | None = None) -> list[VersionInfo]:
        """Registered versions of `model` (every model's when None): for NOT_FOUND messages."""

    async def set_status(self, model: str, version: str, status: str) -> None: ...

    async def rollout_spec(self, model: str) -> RolloutSpec:
        """The plan's `rollout:` section (defaults when the model has no plan)."""

    async def rows(self, model: str, version: str, since: datetime) -> Rows:
        """Every row `version` served since `since`, labelled or not."""

    async def create(self, rollout: Rollout, first: RolloutStep) -> Rollout:
        """Record a new rollout (assigns its id); FailedPrecondition if the model has one active."""

    async def save(self, rollout: Rollout, steps: Sequence[RolloutStep]) -> None:
        """Record the rollout's state, weights and progress and append `steps`."""

    async def get(self, rollout_id: str) -> Rollout | None: ...

    async def list(
        self, model: str | None = None, active_only: bool = False, limit: int = 50
    ) -> list[Rollout]: ...


Weights = Mapping[str, int]
