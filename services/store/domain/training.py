"""Retraining jobs as the trainer records them, and the registration of a retrained version
together with its job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyclone.errors import InvalidArgument
from cyclone.wire import JOB_STATES
from services.store.db import AlreadyExistsError, ModelVersion, StoreDB, TrainingJob

from .checks import found, limit, name, not_negative, one_of, positive, require
from .registry import already_registered, check_new_version, require_known_model

MAX_JOBS = 1000
# A job's lease when the caller names none, and the longest one (a trainer that stopped must
# not hold its jobs for long).
DEFAULT_LEASE_SECONDS = 60.0
MAX_LEASE_SECONDS = 3600.0
# The job's counters UpdateTrainingJob may set; a count is never negative.
JOB_COUNTS = ("window_rows", "train_rows", "holdout_rows")


@dataclass(frozen=True)
class JobUpdate:
    """UpdateTrainingJob: the fields the caller set (by the job's column names), applied only
    while the job has not ended and, when given, is in `expected_state` and `expected_owner`'s."""

    job_id: int
    changes: dict[str, Any]
    expected_state: str = ""
    # Only while this trainer owns the job ("" whoever does): a job taken over is not its own.
    expected_owner: str = ""


class TrainingArea:
    db: StoreDB

    async def create_training_job(
        self, model: str, alert_id: int, reason: str, owner: str, lease_seconds: float = 0.0
    ) -> tuple[TrainingJob, bool]:
        """The queued job, leased to `owner`, and whether this call created it (an alert has at
        most one job)."""
        name("model", model)
        not_negative("alert_id", alert_id)
        lease = lease_of("lease_seconds", lease_seconds)
        job, created = await self.db.create_training_job(
            model, alert_id or None, reason, owner, lease
        )
        if job.model != model:
            raise InvalidArgument(
                f"alert_id: alert {alert_id} already has a job for model {job.model!r}"
            )
        return job, created

    async def update_training_job(self, update: JobUpdate) -> TrainingJob:
        positive("job_id", update.job_id)
        if update.expected_state:
            one_of("expected_state", update.expected_state, JOB_STATES)
        if "state" in update.changes:
            one_of("state", update.changes["state"], JOB_STATES)
        for count in JOB_COUNTS:
            if count in update.changes:
                not_negative(count, update.changes[count])
        if not update.changes:
            return await self.get_training_job(update.job_id)
        return await self.db.update_training_job(
            update.job_id,
            update.changes,
            update.expected_state or None,
            update.expected_owner or None,
        )

    async def get_training_job(self, job_id: int) -> TrainingJob:
        positive("job_id", job_id)
        return found(await self.db.get_training_job(job_id), f"job_id: {job_id} not found")

    async def list_training_jobs(self, model: str, state: str, count: int) -> list[TrainingJob]:
        if state:
            one_of("state", state, JOB_STATES)
        count = limit("limit", count, MAX_JOBS, 50)
        jobs = await self.db.list_training_jobs(model or None, state or None, count)
        if not jobs:
            await require_known_model(self.db, model)
        return jobs

    async def fail_orphaned_training_jobs(self, owner: str, reason: str) -> list[TrainingJob]:
        """End the unfinished jobs of every trainer but `owner` whose lease expired."""
        require("owner", owner)
        return await self.db.fail_orphaned_training_jobs(
            owner, reason or "the trainer restarted while the job was unfinished"
        )

    async def heartbeat_training_jobs(self, owner: str, lease_seconds: float) -> list[int]:
        """Renew the lease of `owner`'s unfinished jobs; their ids."""
        require("owner", owner)
        return await self.db.heartbeat_training_jobs(
            owner, lease_of("lease_seconds", lease_seconds)
        )

    async def claim_training_jobs(
        self, owner: str, lease_seconds: float, reason: str, count: int
    ) -> tuple[list[TrainingJob], list[TrainingJob]]:
        """(queued jobs now `owner`'s to run, running ones failed): those whose lease expired."""
        require("owner", owner)
        return await self.db.claim_training_jobs(
            owner,
            lease_of("lease_seconds", lease_seconds),
            reason or "its trainer stopped renewing the job's lease before it finished",
            limit("limit", count, MAX_JOBS, 100),
        )

    async def register_trained_version(
        self, job_id: int, mv: ModelVersion | None
    ) -> tuple[ModelVersion, TrainingJob]:
        """Register a retrained version (staged, with its sha256) and record it on its running
        job, in one transaction."""
        positive("job_id", job_id)
        if mv is None:
            raise InvalidArgument("model_version: missing")
        if mv.status != "staged":
            raise InvalidArgument("model_version.status: a retrained version starts as staged")
        check_new_version(mv)
        require("model_version.sha256", mv.sha256 or "")
        try:
            return await self.db.register_trained_version(job_id, mv)
        except AlreadyExistsError:
            raise already_registered(mv, None) from None


def lease_of(field: str, seconds: float) -> float:
    """A lease length: 0 means the default, otherwise more than 0 and at most an hour."""
    if seconds == 0:
        return DEFAULT_LEASE_SECONDS
    if not 0 < seconds <= MAX_LEASE_SECONDS:
        raise InvalidArgument(
            f"{field}: must be more than 0 and at most {MAX_LEASE_SECONDS:g} s, got {seconds:g}"
        )
    return seconds
