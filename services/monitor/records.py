"""The monitor's domain records: what it reads from the store, what it keeps and what it writes.

No protobuf here: `convert.py` translates at the edges (the store client, the servicer, the
dashboard), and `Monitor`, window building and the dispatcher work on these.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cyclone.plugin_api import Level, ReferenceProfile
from services.monitor.evaluate import Evaluation


@dataclass(frozen=True)
class ModelInfo:
    """A registered model version as the monitor needs it."""

    model: str
    version: str
    task: str
    created_at: datetime | None = None
    reference: ReferenceProfile | None = None
    # Metrics measured at registration (the evaluation's numeric "metrics").
    baseline: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WindowChunk:
    """One columnar chunk of a monitoring window, as the store streams it.

    Predictions and labels are numbers (regression) or strings (classification); unlabelled
    rows hold placeholders, `labelled` says which. `probabilities` is rows x classes, row-major.
    """

    # Feature columns: strings for the names in `categorical`, numbers (NaN missing) otherwise.
    features: Mapping[str, Sequence[Any]]
    categorical: Collection[str]
    predictions: Sequence[Any]
    labels: Sequence[Any]
    labelled: Sequence[bool]
    probabilities: Sequence[float] = ()
    class_labels: Sequence[str] = ()
    # Per row: model latency in ms (NaN unknown) and serving time in Unix microseconds.
    latency_ms: Sequence[float] = ()
    created_at_micros: Sequence[int] = ()


@dataclass(frozen=True)
class ModelStatus:
    """The latest evaluation of one model version."""

    model: str
    version: str
    evaluation: Evaluation
    plan_revision: int
    evaluated_at: datetime

    @property
    def level(self) -> Level:
        return self.evaluation.level


@dataclass(frozen=True)
class MetricPoint:
    """One point of metric history; `value` None means no value (never NaN)."""

    created_at: datetime
    metric: str
    value: float | None
    details: dict[str, Any] | None = None


@dataclass(frozen=True)
class AlertTarget:
    """One action of an alert and the sink that delivers it."""

    action: str
    sink: str
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueuedAlert:
    """An alert in the store's outbox."""

    id: int
    model: str
    version: str
    level: str
    previous_level: str
    reasons: list[str]
    targets: list[AlertTarget]
    created_at: datetime | None = None
    status: str = "pending"
    attempts: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class EvaluationOutcome:
    """What the store did with an evaluation."""

    previous_level: str
    level_changed: bool
    alert_ids: list[int]


# --- what the dashboard shows besides evaluations (read from the store) ------------------------


@dataclass(frozen=True)
class VersionLineage:
    """A registered version with where it came from (the parent it was trained to replace)."""

    model: str
    version: str
    status: str
    created_at: datetime | None = None
    parent_version: str = ""
    family: str = ""
    training_rows: int = 0
    triggering_alert_id: int = 0
    training_window_start: datetime | None = None
    training_window_end: datetime | None = None


@dataclass(frozen=True)
class TrainingJobSummary:
    """A retraining job as the dashboard lists it."""

    id: int
    model: str
    state: str
    stage: str = ""
    reason: str = ""
    alert_id: int = 0
    champion_version: str = ""
    new_version: str = ""
    decision: str = ""
    message: str = ""
    created_at: datetime | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class RolloutStep:
    """One recorded step of a rollout."""

    seq: int
    time: datetime | None
    state: str
    weight: float
    decision: str
    reason: str


@dataclass(frozen=True)
class RolloutSummary:
    """A rollout with the traffic split it last applied and its steps."""

    id: int
    model: str
    from_version: str
    to_version: str
    strategy: str
    state: str
    current_weight: float
    weights: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""
    updated_at: datetime | None = None
    steps: Sequence[RolloutStep] = ()


@dataclass(frozen=True)
class TrafficPoint:
    """One minute of one version's traffic and serving latency."""

    version: str
    bucket: datetime
    predictions: int
    avg_latency_ms: float | None = None
    p50_latency_ms: float | None = None
    max_latency_ms: float | None = None


@dataclass(frozen=True)
class LiveCounts:
    """What the store holds for one model right now (the card shows it beside the last
    evaluation, whose window may be older or smaller)."""

    model: str
    predictions: int
    labels: int
