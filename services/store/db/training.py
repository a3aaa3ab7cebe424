"""Retraining jobs and the registration of retrained versions (migration 0004); job ownership
is a lease a trainer renews (migration 0010), so several trainers share one store."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Final

from psycopg.types.json import Jsonb

from cyclone.errors import FailedPrecondition, InvalidArgument
from cyclone.wire import ACTIVE_JOB_STATES, DISPATCHED_STAGE
from cyclone.wire import TrainingJob as TrainingJob  # the shared record, re-exported

from ._base import StoreBase
from .registry import RegistryMixin
from .types import ModelVersion, NotFoundError, StoreError


class JobEndedError(StoreError, FailedPrecondition):
    """The job has ended (or is not in the expected state); it can no longer change."""


# The shared record's field names are the table's columns.
_COLS = [f.name for f in fields(TrainingJob)]
_RETURNING = " RETURNING " + ", ".join(_COLS)
_SELECT = "SELECT " + ", ".join(_COLS) + " FROM training_jobs"
# Columns UpdateTrainingJob may set; the JSON ones are wrapped for psycopg.
UPDATABLE: Final = (
    "state",
    "stage",
    "message",
    "started_at",
    "finished_at",
    "window_start",
    "window_end",
    "window_rows",
    "train_rows",
    "holdout_rows",
    "champion_metrics",
    "challenger_metrics",
    "decision",
    "rollout_id",
    "champion_version",
    "family",
)
_JSON = {"champion_metrics", "challenger_metrics"}


class TrainingMixin(RegistryMixin, StoreBase):
    async def create_training_job(
        self, model: str, alert_id: int | None, reason: str, owner: str, lease_seconds: float
    ) -> tuple[TrainingJob, bool]:
        """Queue a job; with an alert id, return the alert's existing job instead (created=False)."""
        async with self.pool.connection() as c:
            cur = await c.execute(
                "INSERT INTO training_jobs (model, alert_id, reason, owner, lease_expires_at)"
                " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (alert_id) WHERE alert_id IS NOT NULL DO NOTHING" + _RETURNING,
                (model, alert_id, reason, owner, lease_seconds),
            )
            row = await cur.fetchone()
            if row is not None:
                return TrainingJob(*row), True
            cur = await c.execute(_SELECT + " WHERE alert_id = %s", (alert_id,))
            row = await cur.fetchone()
        if row is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
            raise StoreError(f"job for alert {alert_id} vanished")
        return TrainingJob(*row), False

    async def get_training_job(self, job_id: int) -> TrainingJob | None:
        async with self.pool.connection() as c:
            cur = await c.execute(_SELECT + " WHERE id = %s", (job_id,))
            row = await cur.fetchone()
        return TrainingJob(*row) if row else None

    async def list_training_jobs(
        self, model: str | None, state: str | None, limit: int
    ) -> list[TrainingJob]:
        async with self.pool.connection() as c:
            cur = await c.execute(
                _SELECT + " WHERE (%(m)s::text IS NULL OR model = %(m)s::text)"
                " AND (%(s)s::text IS NULL OR state = %(s)s::text) ORDER BY id DESC LIMIT %(l)s",
                {"m": model, "s": state, "l": limit},
            )
            return [TrainingJob(*r) for r in await cur.fetchall()]

    async def update_training_job(
        self,
        job_id: int,
        changes: dict[str, Any],
        expected_state: str | None = None,
        expected_owner: str | None = None,
    ) -> TrainingJob:
        """Set ``changes`` on a job that has not ended (and is in ``expected_state`` and owned by
        ``expected_owner``, if given)."""
        unknown = set(changes) - set(UPDATABLE)
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        sets = ["updated_at = now()"] + [f"{name} = %({name})s" for name in changes]
        params: dict[str, Any] = {
            k: Jsonb(v) if k in _JSON and v is not None else v for k, v in changes.items()
        }
        params["_id"] = job_id
        params["_expected"] = expected_state
        params["_owner"] = expected_owner
        async with self.pool.connection() as c:
            cur = await c.execute(
                "UPDATE training_jobs SET " + ", ".join(sets) + " WHERE id = %(_id)s"
                " AND state IN ('queued', 'running')"
                " AND (%(_expected)s::text IS NULL OR state = %(_expected)s::text)"
                " AND (%(_owner)s::text IS NULL OR owner = %(_owner)s::text)" + _RETURNING,
                params,
            )
            row = await cur.fetchone()
        if row is not None:
            return TrainingJob(*row)
        job = await self.get_training_job(job_id)
        if job is None:
            raise NotFoundError(f"job_id: {job_id} not found")
        if (
            expected_owner is not None
            and job.state in ACTIVE_JOB_STATES
            and job.owner != expected_owner
        ):
            raise JobEndedError(f"job_id: job {job_id} was taken over by {job.owner}")
        raise JobEndedError(
            f"job_id: job {job_id} is {job.state}"
            + (
                f", not {expected_state}"
                if expected_state and job.state in ACTIVE_JOB_STATES
                else ""
            )
        )

    async def fail_orphaned_training_jobs(self, owner: str, reason: str) -> list[TrainingJob]:
        """Fail the unfinished jobs of other owners whose lease expired."""
        async with self.pool.connection() as c:
            cur = await c.execute(
                "UPDATE training_jobs SET state = 'failed', stage = 'done', message = %s,"
                " finished_at = now(), updated_at = now()"
                " WHERE state IN ('queued', 'running') AND owner <> %s"
                " AND lease_expires_at <= now()" + _RETURNING,
                (reason, owner),
            )
            return [TrainingJob(*r) for r in await cur.fetchall()]

    async def heartbeat_training_jobs(self, owner: str, lease_seconds: float) -> list[int]:
        """Renew the lease of `owner`'s unfinished jobs; their ids."""
        async with self.pool.connection() as c:
            cur = await c.execute(
                "UPDATE training_jobs SET lease_expires_at = now() + make_interval(secs => %s)"
                " WHERE owner = %s AND state IN ('queued', 'running') RETURNING id",
                (lease_seconds, owner),
            )
            return sorted(int(r[0]) for r in await cur.fetchall())

    async def claim_training_jobs(
        self, owner: str, lease_seconds: float, reason: str, limit: int
    ) -> tuple[list[TrainingJob], list[TrainingJob]]:
        """Take over the unfinished jobs whose lease expired: (claimed queued jobs, now
        `owner`'s to run; running or dispatched ones, failed with `reason`). SKIP LOCKED:
        trainers claiming at the same time each take different jobs, none takes one twice."""
        ends = f"(t.state = 'running' OR t.stage = '{DISPATCHED_STAGE}')"
        async with self.transaction() as c:
            cur = await c.execute(
                "WITH expired AS (SELECT id FROM training_jobs"
                " WHERE state IN ('queued', 'running') AND lease_expires_at <= now()"
                " ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE training_jobs t SET owner = %(owner)s, updated_at = now(),"
                " lease_expires_at = now() + make_interval(secs => %(lease)s),"
                f" state = CASE WHEN {ends} THEN 'failed' ELSE t.state END,"
                f" stage = CASE WHEN {ends} THEN 'done' ELSE t.stage END,"
                f" message = CASE WHEN {ends} THEN %(reason)s ELSE t.message END,"
                f" finished_at = CASE WHEN {ends} THEN now() ELSE t.finished_at END"
                " FROM expired WHERE t.id = expired.id"
                + _RETURNING.replace(", ", ", t.").replace(" RETURNING ", " RETURNING t."),
                {"owner": owner, "lease": lease_seconds, "reason": reason, "limit": limit},
            )
            jobs = sorted((TrainingJob(*r) for r in await cur.fetchall()), key=lambda j: j.id)
        return [j for j in jobs if j.state == "queued"], [j for j in jobs if j.state == "failed"]

    async def register_trained_version(
        self, job_id: int, mv: ModelVersion
    ) -> tuple[ModelVersion, TrainingJob]:
        """Register ``mv`` (staged) and record it on the running job, in one transaction."""
        async with self.transaction() as c:
            cur = await c.execute(
                "SELECT model, state FROM training_jobs WHERE id = %s FOR UPDATE", (job_id,)
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"job_id: {job_id} not found")
            if row[0] != mv.model:
                raise InvalidArgument(f"model_version.model: job {job_id} retrains {row[0]!r}")
            if row[1] != "running":
                raise JobEndedError(f"job_id: job {job_id} is {row[1]}, not running")
            # AlreadyExistsError propagates and rolls the whole transaction back.
            stored = await self.register_model_version(mv, conn=c)
            cur = await c.execute(
                "UPDATE training_jobs SET new_version = %s, updated_at = now() WHERE id = %s"
                + _RETURNING,
                (mv.version, job_id),
            )
            job_row = await cur.fetchone()
        assert job_row is not None
        return stored, TrainingJob(*job_row)
