"""A retraining job as the trainer keeps it, and what a job's stages hand each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import grpc

from cyclone.errors import CycloneError
from cyclone.wire import DISPATCHED_STAGE, TERMINAL_JOB_STATES
from services.trainer.auto import AutoWindow
from services.trainer.data import LabelledWindow
from services.trainer.fit import FitOutcome

TERMINAL: Final = TERMINAL_JOB_STATES
DISPATCHED: Final = DISPATCHED_STAGE


@dataclass(frozen=True)
class Job:
    """One retraining job: what asked for it, where it is, what it found and decided."""

    id: int
    model: str
    state: str
    alert_id: int = 0
    reason: str = ""
    stage: str = ""
    message: str = ""
    owner: str = ""
    new_version: str = ""
    champion_version: str = ""
    family: str = ""
    decision: str = ""
    rollout_id: str = ""
    window_rows: int = 0
    train_rows: int = 0
    holdout_rows: int = 0
    window_start: datetime | None = None
    window_end: datetime | None = None
    champion_metrics: dict[str, float] = field(default_factory=dict)
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    lease_expires_at: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Claimed:
    """What taking over jobs of expired leases gave: jobs to run, jobs failed."""

    queued: list[Job]
    failed: list[Job]


@dataclass(frozen=True)
class Champion:
    version: str
    directory: Path
    task: str
    features: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Prepared:
    """One attempt's rows: the window, how it was cut, the candidate windows to fit (first is
    the preferred one on a tie) and the holdout."""

    window: LabelledWindow
    auto: AutoWindow
    trains: list[tuple[str, Any]]
    holdout: Any
    fields: dict[str, Any]
    lineage: dict[str, Any]

    @property
    def fresh(self) -> int:
        return self.auto.fresh_rows


@dataclass(frozen=True)
class TrainedVersion:
    """A challenger written to the repository, with the lineage it is registered under."""

    model: str
    version: str
    directory: str
    sha256: str
    schema: dict[str, Any]
    task: str
    parent_version: str
    window_start: datetime | None
    window_end: datetime | None
    alert_id: int
    evaluation: dict[str, Any] | None
    reference_profile: dict[str, Any] | None
    training_rows: int
    family: str
    hyperparameters: dict[str, Any]
    holdout_metrics: dict[str, Any]


class JobGone(Exception):
    """The job ended elsewhere (cancelled, failed by a trainer that took it over): stop
    quietly, write nothing more."""


class WorkerDied(Exception):
    """The process running a fit or a conversion died (killed, out of memory)."""


class StoreFailure(CycloneError):
    """The store failed a call: a request answers with its status, a job fails with `reason`."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        # A missed deadline is worth retrying, like the store being away.
        passed = grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.DEADLINE_EXCEEDED else code
        super().__init__(f"store: {details or code.name}")
        self.code = passed
        self.reason = f"store: {code.name}: {details}"


def window_text(outcome: FitOutcome, prepared: Prepared) -> str:
    """Which window the challenger was fitted on, and why that one, for the job's record."""
    text = f"window {outcome.window} ({outcome.train_rows} rows)"
    change = prepared.auto.change
    if change is not None:
        text += f", change point: {change.describe(prepared.window.rows)}"
    if len(outcome.candidates) > 1:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in outcome.candidates.items())
        text += f"; candidates on the holdout: {scores}"
    novel = prepared.lineage.get("novel_values")
    if novel:
        # Learned, not refused (`auto.novel_features`): said, so a person can tell a new world
        # from a pipeline that changed its units or codes.
        text += f"; new values since the change, retrained on them: {'; '.join(novel)}"
    return text
