"""What the job runner drives and reads, as protocols: the real implementations talk to the
store over gRPC (`store_gateway.py`), fit in worker processes (`worker.py`), dispatch to Nomad
(`services/trainer/main.py`) and roll out through the traffic plane; the unit tests pass
in-memory ones."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from cyclone.plan import Plan
from services.trainer.data import LabelledWindow
from services.trainer.fit import FitOutcome, FitTask, WrittenVersion

from .model import Champion, Claimed, Job, TrainedVersion

if TYPE_CHECKING:
    import pandas as pd


class JobStore(Protocol):
    """The `training_jobs` table, the registry, plans, health and labelled windows.

    Every method raises `StoreFailure` when the store fails; `update` and `register` raise
    `JobGone` when the job ended or is no longer the caller's."""

    async def create(
        self, model: str, alert_id: int, reason: str, owner: str, lease_seconds: float
    ) -> tuple[Job, bool]:
        """Queue a job leased to `owner`; an alert's existing job instead (created False)."""

    async def get(self, job_id: int) -> Job:
        """NotFound when there is no such job."""

    async def list_jobs(self, model: str, state: str, limit: int) -> list[Job]: ...

    async def update(
        self, job_id: int, *, expected: str = "running", owner: str = "", **changes: Any
    ) -> Job:
        """Set `changes` (Job field names) while the job is `expected` ("" any unended state)
        and, with `owner`, still that trainer's."""

    async def heartbeat(self, owner: str, lease_seconds: float) -> list[int]:
        """Renew the lease of `owner`'s unfinished jobs; their ids."""

    async def claim(self, owner: str, lease_seconds: float, reason: str) -> Claimed:
        """Take over the unfinished jobs whose lease expired (queued ones to run, running ones
        failed with `reason`)."""

    async def champion(self, model: str) -> Champion:
        """The serving (else latest) version; NotFound for an unknown model, JobFailure for one
        without a usable schema."""

    async def plan(self, model: str, task: str) -> Plan:
        """The model's plan, the default one when it has none; JobFailure when it is broken."""

    async def window(
        self, model: str, champion: Champion, plan: Plan, since: datetime | None = None
    ) -> LabelledWindow:
        """The labelled rows `plan.retrain` asks for (with `since`: those predicted after it)."""

    async def versions(self, model: str) -> list[str]:
        """Every registered version of `model`."""

    async def register(self, job_id: int, version: TrainedVersion) -> None:
        """Register `version` (staged) and record it on the running job, in one transaction."""

    async def active_rollout(self, model: str) -> str:
        """ "rollout N of version V" when one of `model` is under way, else ""."""

    async def levels(self, model: str) -> dict[str, str]:
        """The monitor's last level of each version of `model`."""


class Worker(Protocol):
    """Runs the CPU-heavy halves of a job away from the event loop. Raises `WorkerDied` when the
    process running one dies; the runner then starts a new worker."""

    async def fit(self, task: FitTask) -> FitOutcome: ...

    async def write_version(
        self,
        pipeline: bytes,
        model: str,
        repository: str,
        version: str,
        sample: pd.DataFrame,
        extra: dict[str, Any],
    ) -> WrittenVersion: ...

    def close(self) -> None: ...


class RolloutStarter(Protocol):
    """Takes a registered (staged) version live; returns the rollout id ("" when none).

    The integrator wires the rollout engine here; the default makes the version SERVING."""

    async def __call__(self, model: str, version: str, job_id: int) -> str: ...


class JobDispatcher(Protocol):
    """Runs jobs elsewhere (the `nomad` executor: a dispatch of the retrain batch job)."""

    async def dispatch(self, job_id: int, model: str) -> str:
        """Start job `job_id` of `model`; returns the run's id. Raises, naming why, when the
        cluster refuses."""
        ...

    async def ended(self, remote: str) -> str:
        """ "" while run `remote` may still be going; once it is over, how it ended."""
        ...
