"""Retraining jobs: the transport-free engine behind the trainer's job RPCs.

A job: fetch the labelled window (plan ``retrain:``) -> too few rows: NOT_ENOUGH_DATA -> split off
the newest rows as the holdout -> fit the family in a worker -> champion vs challenger on the
holdout -> not better (or maybe noise): REJECTED, nothing written -> convert + parity + reference
(the version directory appears atomically) -> register with lineage in one store transaction ->
hand to the rollout -> SUCCEEDED.

With ``retrain.window: auto`` (the default) the window is cut at the change point of the served
predictions' loss, a job an alert asked for first waits for labelled rows after it, features
that broke there end the job (a data fault, told to the plan's notify sinks), candidate windows
are fitted and the best on the newest rows is the challenger; a rejected one is tried again
while the model stays RED, up to ``retrain.attempts``, and the sinks hear when none won.

With tracing on, a job runs in a `trainer.job` span continuing the trace of the Retrain call that
queued it (for an alert: the monitor's evaluation), each stage an event on it, fit/convert/rollout
child spans; the trace id is logged and ends the job's final message.

runner = JobRunner(StoreJobGateway(store_stub, repository), repository, rollout=starter)
await runner.start()                    # take over expired jobs, keep this trainer's leases
job, created = await runner.retrain("credit", alert_id=7)
async for job in runner.watch(job.id): ...
await runner.stop()

`runner.py` the queues and leases, `stages.py` one job's stages, `remote.py` a job dispatched to
Nomad, `worker.py` the worker processes, `ports.py` the protocols, `store_gateway.py` the store
(the only module here that touches store protobufs), `model.py` the `Job` record.
"""

from .model import TERMINAL, Claimed, Job, JobGone, StoreFailure, WorkerDied
from .ports import JobDispatcher, JobStore, RolloutStarter, Worker
from .remote import REMOTE_TIMEOUT_SECONDS
from .runner import LEASE_SECONDS, MAX_LEASE_SECONDS, JobRunner, default_owner
from .store_gateway import ServeImmediately, StoreJobGateway
from .worker import ProcessWorker, spawn_pool

__all__ = [
    "LEASE_SECONDS",
    "MAX_LEASE_SECONDS",
    "REMOTE_TIMEOUT_SECONDS",
    "TERMINAL",
    "Claimed",
    "Job",
    "JobDispatcher",
    "JobGone",
    "JobRunner",
    "JobStore",
    "ProcessWorker",
    "RolloutStarter",
    "ServeImmediately",
    "StoreFailure",
    "StoreJobGateway",
    "Worker",
    "WorkerDied",
    "default_owner",
    "spawn_pool",
]
