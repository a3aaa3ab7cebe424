"""Retraining jobs as the trainer records them, and the registration of a retrained version
together with its job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cyclone.errors import InvalidArgument
from services.store.db import AlreadyExistsError, ModelVersion, StoreDB, TrainingJob
from services.store.db.training import JOB_STATES

from .checks import found, limit, name, not_negative, one_of, positive, require
from .registry import already_registered, check_new_version

MAX_JOBS = 1000
# The job's counters UpdateTrainingJob may set; a count is never negative.
JOB_COUNTS = ("window_rows", "train_rows", "holdout_rows")


@dataclass(frozen=True)
class JobUpdate:
    """UpdateTrainingJob: the fields the caller set (by the job's column names), applied only
    while the job has not ended and, when given, is in `expected_state`."""

    job_id: int
    changes: dict[str, Any]
    expected_state: str = ""


class TrainingArea:
    db: StoreDB

    async def create_training_job(
        self, model: str, alert_id: int, reason: str, owner: str
    ) -> tuple[TrainingJob, bool]:
        """The queued job and whether this call created it (an alert has at most one job)."""
        name("model", model)
        not_negative("alert_id", alert_id)
        job, created = await self.db.create_training_job(model, alert_id or None, reason, owner)
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
            update.job_id, update.changes, update.expected_state or None
        )

    async def get_training_job(self, job_id: int) -> TrainingJob:
        positive("job_id", job_id)
        return found(await self.db.get_training_job(job_id), f"job_id: {job_id} not found")

    async def list_training_jobs(self, model: str, state: str, count: int) -> list[TrainingJob]:
        if state:
            one_of("state", state, JOB_STATES)
        count = limit("limit", count, MAX_JOBS, 50)
        return await self.db.list_training_jobs(model or None, state or None, count)

    async def fail_orphaned_training_jobs(self, owner: str, reason: str) -> list[TrainingJob]:
        """End the unfinished jobs of every trainer but `owner` (which restarted)."""
        require("owner", owner)
        return await self.db.fail_orphaned_training_jobs(
            owner, reason or "the trainer restarted while the job was unfinished"
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
