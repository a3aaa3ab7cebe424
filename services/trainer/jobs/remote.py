"""A job run elsewhere (`job_executor: nomad`): the trainer dispatches the queued job (a Nomad
parameterized batch job running `cyclone serve trainer --run-job-file`), follows it in the store,
and once the remote run registered the version (stage `rollout`, still running) hands it to the
rollout and ends the job: the remote run has no traffic router, so it never rolls out a job a
trainer dispatched."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from cyclone.errors import NotFound
from services.trainer.fit import JobFailure

from .model import DISPATCHED, JobGone, StoreFailure
from .ports import JobDispatcher
from .stages import JobStages

log = logging.getLogger(__name__)

# How often the dispatching trainer looks at a remote job, and how long it waits at most on top
# of the plan's `retrain.wait` (fit + convert of a large window on a busy cluster).
REMOTE_POLL_SECONDS = 0.5
# How often it asks the cluster whether the run is still there (a run that died before it
# could record anything, say a bad image, would otherwise be noticed only at the timeout).
REMOTE_CHECK_SECONDS = 2.0
REMOTE_TIMEOUT_SECONDS = 3600.0


async def run_remote(job: JobStages, dispatcher: JobDispatcher, timeout: float) -> None:
    """Dispatch the queued job, follow it in the store till it ends or hands back its
    registered version, then roll that out here."""
    try:
        # Marked before the dispatch: the remote run reads it when it starts.
        await job.update("queued", stage=DISPATCHED, message="dispatching")
    except JobGone:
        return  # cancelled while queued
    try:
        remote = await dispatcher.dispatch(job.job_id, job.model)
    except Exception as exc:
        # "" = any unended state: a dispatch that timed out may still have started.
        await job.finish("failed", f"dispatch: {exc}", expected="")
        return
    log.info("job %d of %s dispatched as %s", job.job_id, job.model, remote)
    with contextlib.suppress(JobGone):
        await job.update("", message=f"dispatched as nomad job {remote}")
    try:
        await _follow(job, remote, dispatcher, timeout)
    except JobGone as exc:
        log.info("job %d ended elsewhere (%s)", job.job_id, exc)
    except JobFailure as exc:
        await job.finish("failed", str(exc), expected="")
    except StoreFailure as exc:
        await job.finish("failed", exc.reason, expected="")


async def _follow(job: JobStages, remote: str, dispatcher: JobDispatcher, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + await _remote_limit(job, timeout)
    next_check = loop.time() + REMOTE_CHECK_SECONDS
    ended = ""
    while True:
        now = await job.store.get(job.job_id)
        if now.ended:
            log.info("job %d (%s) ended %s: %s", job.job_id, remote, now.state, now.message)
            return
        if now.state == "running" and now.stage == "rollout" and now.new_version:
            await job.roll_out(now.new_version, f"{now.decision} (ran as {remote})")
            return
        if ended:  # read the job once more after the run was over: it did not finish it
            raise JobFailure(
                f"dispatch: nomad job {remote} ended ({ended}) without finishing the job"
                f" (stage {now.stage}); see its allocation's logs"
            )
        if loop.time() >= next_check:
            next_check = loop.time() + REMOTE_CHECK_SECONDS
            ended = await dispatcher.ended(remote)
            continue
        if loop.time() >= deadline:
            raise JobFailure(
                f"dispatch: nomad job {remote} did not finish within"
                f" {timeout:g} s (stage {now.stage})"
            )
        await asyncio.sleep(REMOTE_POLL_SECONDS)


async def _remote_limit(job: JobStages, timeout: float) -> float:
    """The plan's `retrain.wait` (a since-alert job waits for labels) plus the default."""
    try:
        champion = await job.store.champion(job.model)
        plan = await job.store.plan(job.model, champion.task)
    except (JobFailure, NotFound):
        return timeout  # the remote run fails the job with the reason
    spec = plan.retrain
    waits = spec.since_alert or spec.kind == "auto"
    return timeout + (spec.wait_seconds * spec.attempts if waits else 0)
