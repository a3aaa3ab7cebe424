"""Run a retraining job on the cluster: dispatch the `cyclone-retrain` parameterized batch job
with the training job's id as payload (`POST /v1/job/cyclone-retrain/dispatch`)."""

from __future__ import annotations

from cyclone.nomad.api import NomadClient, NomadError
from cyclone.nomad.render import RETRAIN_JOB


async def dispatch_retrain(
    client: NomadClient, training_job_id: int, model: str = "", job: str = RETRAIN_JOB
) -> str:
    """Dispatch one retraining run; returns the dispatched Nomad job id."""
    if training_job_id <= 0:
        raise ValueError(f"training_job_id: must be positive, got {training_job_id}")
    reply = await client.dispatch(
        job, str(training_job_id).encode(), meta={"model": model} if model else None
    )
    dispatched = reply.get("DispatchedJobID")
    if not dispatched:
        raise NomadError(
            job, "POST", f"/v1/job/{job}/dispatch", 200, f"no DispatchedJobID: {reply}"
        )
    return str(dispatched)
