"""What plugins register and return: specs for metrics, drift tests, alert sinks, model
families and orchestrators, and the results a metric or drift test hands back.

Everything here is plain data over numpy columns, so a plugin needs neither gRPC nor a database.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from cyclone.columns import CurrentColumn, Task, Window
from cyclone.reference import ReferenceProfile

Status = Literal["ok", "not_enough_data", "error"]


class Level(StrEnum):
    """RAG level of a model; ordered GREEN < AMBER < RED."""

    GREEN = "GREEN"
    AMBER = "AMBER"
    RED = "RED"

    @property
    def rank(self) -> int:
        return ("GREEN", "AMBER", "RED").index(self.value)


@dataclass(frozen=True)
class MetricResult:
    """One metric value; ``value`` is None unless ``status`` is "ok" (never NaN)."""

    value: float | None
    status: Status = "ok"
    detail: str = ""

    @classmethod
    def ok(cls, value: float, detail: str = "") -> MetricResult:
        if not math.isfinite(value):
            return cls(None, "not_enough_data", detail or f"value is {value}")
        return cls(float(value), "ok", detail)

    @classmethod
    def not_enough_data(cls, detail: str) -> MetricResult:
        return cls(None, "not_enough_data", detail)

    @classmethod
    def error(cls, detail: str) -> MetricResult:
        return cls(None, "error", detail)


@dataclass(frozen=True)
class DriftResult:
    """Outcome of one drift test on one feature.

    ``effect_size`` is what the decision uses; ``statistic`` is the test's raw statistic (often the
    same number); ``p_value`` is informative only and None when the test has none.
    """

    statistic: float
    p_value: float | None
    effect_size: float
    drifted: bool
    threshold: float
    status: Status = "ok"
    detail: str = ""

    @classmethod
    def skipped(cls, status: Status, detail: str, threshold: float = math.nan) -> DriftResult:
        return cls(math.nan, None, math.nan, False, threshold, status, detail)


@dataclass(frozen=True)
class MetricContext:
    """What a metric gets besides the window: plan params, the reference profile and, for
    rates, the plan window's length in seconds (None for a window of rows)."""

    params: Mapping[str, Any] = field(default_factory=dict)
    reference: ReferenceProfile | None = None
    window_seconds: float | None = None


MetricFn = Callable[[Window, MetricContext], MetricResult]


@dataclass(frozen=True)
class MetricSpec:
    """A metric a plugin registers.

    :param name: unique metric name used in plans (``accuracy``).
    :param fn: ``fn(window, ctx) -> MetricResult``; vectorised over the window's columns.
    :param needs_labels: True if it uses ground truth; the engine then passes a window that has
        at least the plan's ``min_labelled_rows`` labelled rows, else reports not_enough_data.
    :param task: which models it applies to.
    :param higher_is_better: direction used by ``relative_drop`` triggers.
    :param plugin: filled in by the registry with the registering plugin's name.
    """

    name: str
    fn: MetricFn
    needs_labels: bool
    task: Task = "any"
    description: str = ""
    higher_is_better: bool = True
    plugin: str = ""


DriftFn = Callable[[CurrentColumn, float], DriftResult]


@dataclass(frozen=True)
class DriftTestSpec:
    """A drift test a plugin registers.

    :param name: unique test name used in plans (``psi``).
    :param fn: ``fn(column, threshold) -> DriftResult`` comparing one current column with its
        reference profile; ``drifted`` must be decided from the effect size vs ``threshold``.
    :param kind: the feature kind it applies to.
    :param default_threshold: effect-size threshold when the plan sets none.
    """

    name: str
    fn: DriftFn
    kind: Literal["numeric", "categorical"]
    default_threshold: float
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class Alert:
    """A level change of one model version, as delivered to alert sinks."""

    id: str
    model: str
    version: str
    level: str
    previous_level: str
    reasons: list[str]
    actions: list[str]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        return cls(
            id=str(data["id"]),
            model=str(data["model"]),
            version=str(data["version"]),
            level=str(data["level"]),
            previous_level=str(data["previous_level"]),
            reasons=[str(r) for r in data["reasons"]],
            actions=[str(a) for a in data["actions"]],
            created_at=datetime.fromisoformat(str(data["created_at"])),
        )


@dataclass(frozen=True)
class AlertSinkSpec:
    """An alert sink: ``deliver(alert, config)`` raises on failure (the monitor retries)."""

    name: str
    deliver: Callable[[Alert, Mapping[str, Any]], None]
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class FamilyContext:
    """What a model family may build on besides its params.

    :param task: "classification" or "regression".
    :param features: the model's input features as ``(name, kind)``, kind numeric/categorical.
    :param champion: the serving version's fitted scikit-learn pipeline, when the repository
        has one (``pipeline.joblib``); None otherwise.
    """

    task: Literal["classification", "regression"]
    features: tuple[tuple[str, Literal["numeric", "categorical"]], ...]
    champion: Any | None = None


@dataclass(frozen=True)
class ModelFamilySpec:
    """A trainable model family: ``build(params)`` returns an unfitted scikit-learn estimator.

    With ``needs_context=True`` it is called as ``build(params, context)`` with a
    :class:`FamilyContext` (the schema and the champion's pipeline, e.g. to refit it).
    """

    name: str
    build: Callable[..., Any]
    task: Task = "any"
    description: str = ""
    plugin: str = ""
    needs_context: bool = False

    def estimator(self, params: Mapping[str, Any], context: FamilyContext) -> Any:
        """An unfitted estimator for ``context``."""
        return self.build(params, context) if self.needs_context else self.build(params)


@dataclass(frozen=True)
class OrchestratorSpec:
    """A way to start model revisions: ``create(config)`` returns an orchestrator object."""

    name: str
    create: Callable[[Mapping[str, Any]], Any]
    description: str = ""
    plugin: str = ""
