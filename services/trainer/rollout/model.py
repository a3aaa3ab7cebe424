"""A rollout as the controller keeps it: state, recorded steps and resumable progress."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from cyclone.rollout_plan import RolloutSpec
from cyclone.traffic import revision_name


class RolloutState(StrEnum):
    PENDING = "pending"  # starting the new revision
    PROGRESSING = "progressing"  # moving traffic / analysing
    PAUSED = "paused"  # held: waiting for a person (promote or rollback)
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"  # could not start (health); traffic never moved

    @property
    def active(self) -> bool:
        return self in (RolloutState.PENDING, RolloutState.PROGRESSING, RolloutState.PAUSED)


class Phase(StrEnum):
    """Where a rollout is within its strategy; persisted by value (records stay readable)."""

    START = "start"  # starting the new revision, until the proxy sees it healthy at 0 %
    SMOKE = "smoke"  # blue-green: smoke requests straight to the new revision
    STEPS = "steps"  # weight steps, each analysed before the next
    KEEP_WARM = "keep_warm"  # red-black: all traffic on the new revision, the old one warm at 0 %
    SHADOW = "shadow"  # mirrored traffic, the two versions compared on paired rows
    CONFIRM = "confirm"  # promoted on estimates: labels may still undo it
    FINALIZE = "finalize"  # promoting: the old revision out of the split, drained, stopped
    UNKNOWN = "unknown"  # a phase this controller does not know (a newer one recorded it)

    @classmethod
    def load(cls, value: object) -> Phase:
        """A persisted phase; one this build does not know is UNKNOWN (rolled back on resume)."""
        try:
            return cls(str(value))
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class RolloutStep:
    """One event a user can read: what was decided, at which weight, why, with which numbers."""

    time: datetime
    state: RolloutState
    weight: float
    decision: str
    reason: str = ""
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass
class Progress:
    """What a restarted controller needs to carry on where the last one stopped."""

    phase: Phase = Phase.START
    step_index: int = -1
    step_started_at: float = 0.0  # epoch seconds
    started_at: float = 0.0
    failed_checks: int = 0
    baseline: dict[str, list[int]] = field(default_factory=dict)  # at step start
    rollout_baseline: dict[str, list[int]] = field(default_factory=dict)  # at rollout start
    waiting: str = ""  # what the current step waits for (an event is recorded on change)
    shadow: str = ""  # revision name mirrored to, if any
    shadow_percent: float = 100.0
    latency_judged_at: float = 0.0  # epoch seconds: a recent latency window counts once

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "phase" in known:
            known["phase"] = Phase.load(known["phase"])
        return cls(**known)


@dataclass
class Rollout:
    id: str
    model: str
    from_version: str | None
    to_version: str
    spec: RolloutSpec
    state: RolloutState = RolloutState.PENDING
    weight: float = 0.0  # percent of traffic on to_version
    weights: dict[str, int] = field(default_factory=dict)  # the split last applied
    reason: str = ""
    progress: Progress = field(default_factory=Progress)
    steps: list[RolloutStep] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @property
    def strategy(self) -> str:
        return self.spec.strategy

    @property
    def new_revision(self) -> str:
        """The revision name of the version being rolled out."""
        return revision_name(self.model, self.to_version)
