"""Monitoring plans: YAML in, frozen typed dataclasses out, every problem reported at once.

Example::

    model: churn
    window: {kind: sliding, duration: 1h, min_labelled_rows: 200}
    schedule: {every: 1m}
    metrics: [accuracy, {name: f1, params: {average: macro}, key: f1_macro}]
    drift: {tests: [ks, psi], features: all, thresholds: {psi: 0.05}}
    triggers:
      - {metric: accuracy, condition: relative_drop, threshold: 0.10, level: RED}
      - {drift: any, condition: above, threshold: 0, level: AMBER}
    actions: {AMBER: [notify], RED: [retrain, notify]}
    notify: [{sink: slack, config: {url: "https://hooks.slack.com/..."}}]

A drift trigger compares the number of drifted features (by the named test, or by any test) with
its threshold. ``relative_drop`` compares a metric with the version's baseline, in the metric's
"worse" direction (a rise for errors such as ``mae``). A trigger with ``until_labelled: true``
applies only while the window has fewer than ``min_labelled_rows`` labelled rows: the default plan
watches estimated performance (``estimated_accuracy``) that way until labels arrive, and realized
performance (``accuracy``, which needs the labels) after.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import yaml

from cyclone.plugin_api import Level
from cyclone.plugins import Plugins, get_plugins
from cyclone.rollout_plan import RolloutSpec, check_rollout, rollout_to_dict

ACTIONS = ("retrain", "rollback", "notify")
CONDITIONS = ("below", "above", "relative_drop")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")


class PlanError(ValueError):
    """An invalid plan; ``problems`` holds one "field.path: reason" per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid monitoring plan:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class WindowSpec:
    kind: Literal["sliding", "expanding"] = "sliding"
    duration_seconds: int | None = 3600
    rows: int | None = None
    min_labelled_rows: int = 100


@dataclass(frozen=True)
class MetricRef:
    """A metric in a plan; ``key`` names its result (defaults to ``name``)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def result_key(self) -> str:
        return self.key or self.name


@dataclass(frozen=True)
class DriftSpec:
    tests: tuple[str, ...] = ()
    features: Literal["all"] | tuple[str, ...] = "all"
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Trigger:
    """Fires when ``metric`` (a result key) or ``drift`` (a test name or "any") meets the condition."""

    condition: Literal["below", "above", "relative_drop"]
    threshold: float
    level: Level
    metric: str | None = None
    drift: str | None = None
    # Only while the window has fewer than the plan's min_labelled_rows labelled rows.
    until_labelled: bool = False

    def describe(self) -> str:
        subject = f"metric {self.metric}" if self.metric else f"drift {self.drift}"
        until = " until labelled" if self.until_labelled else ""
        return f"{subject} {self.condition.replace('_', ' ')} {self.threshold:g}{until}"


@dataclass(frozen=True)
class SinkRef:
    sink: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetrainSpec:
    """The plan's ``retrain:`` section: which labelled rows a retraining job uses and when the
    challenger replaces the champion.

    ``window``: ``auto`` (the default) reads the newest ``rows`` labelled rows, finds where the
    loss of the served predictions rose (the change point), waits up to ``wait`` for
    ``fresh_rows`` labelled rows after it, fits candidates on the rows since the change and on
    all of them, and keeps the one that does best on the newest rows; without a change point it
    is ``sliding`` over ``rows``. ``sliding`` keeps the newest ``rows`` labelled rows or those of
    the last ``duration``; ``expanding`` takes every labelled row. ``holdout`` is the fraction of the
    newest rows kept out of fitting for the comparison. ``metric`` (default: the plan's primary
    quality metric) must improve by ``margin``, relative to the champion's value, and a paired
    bootstrap on the holdout must be ``confidence`` sure the improvement is not noise.

    ``attempts``: a job an alert asked for whose challenger was rejected tries again while the
    model stays RED (with more rows after the change, after a doubling backoff), up to this
    many attempts in all, then tells the plan's notify sinks that retraining did not help.

    ``since_alert``: train only on rows predicted after the retraining was asked for (the
    world after the change, not a mix of before and after); the job waits up to ``wait`` for
    ``min_rows`` of them to be labelled, else it ends "not enough data".
    """

    kind: Literal["auto", "sliding", "expanding"] = "auto"
    duration_seconds: int | None = None
    rows: int | None = 50_000
    min_rows: int = 200
    holdout: float = 0.2
    margin: float = 0.01
    metric: MetricRef | None = None
    family: str = "refit"
    params: dict[str, Any] = field(default_factory=dict)
    confidence: float = 0.95
    resamples: int = 500
    since_alert: bool = False
    wait_seconds: int = 3600
    # auto: labelled rows after the change point a job waits for before fitting.
    fresh_rows: int = 2000
    # While the model stays RED after a rejected challenger: attempts per alert in all.
    attempts: int = 3


RETRAIN_WINDOWS = ("auto", "sliding", "expanding")


@dataclass(frozen=True)
class ProbesSpec:
    """The plan's ``probes:`` section: known-answer probes of the serving version.

    Every ``every``, the monitor sends the rows kept with the version at import (its
    ``probes.json``) to ``address`` (the public listener or an inference server, HOST:PORT;
    empty: the monitor's own ``probe_address``, and no probes when neither is known) and
    compares the answers with the recorded ones: a value, or a class probability, further than
    ``tolerance`` from the recorded one, or a different label, is a wrong answer (RED); no
    answer is AMBER.
    """

    every_seconds: int = 60
    tolerance: float = 1e-4
    address: str = ""


@dataclass(frozen=True)
class Plan:
    model: str
    window: WindowSpec = field(default_factory=WindowSpec)
    every_seconds: int = 60
    metrics: tuple[MetricRef, ...] = ()
    drift: DriftSpec | None = None
    triggers: tuple[Trigger, ...] = ()
    actions: dict[Level, tuple[str, ...]] = field(default_factory=dict)
    notify: tuple[SinkRef, ...] = ()
    retrain: RetrainSpec = field(default_factory=RetrainSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    probes: ProbesSpec = field(default_factory=ProbesSpec)


def parse_duration(text: str) -> int:
    """ "30s", "1m", "1h", "7d", "2w" -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"expected a duration like '30m', '1h' or '7d', got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def format_duration(seconds: int) -> str:
    for unit, size in sorted(_UNITS.items(), key=lambda u: -u[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"  # pragma: no cover - "s" always divides


class _Checker:
    """Collects problems so a plan author sees all of them in one go."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append(f"{path}: {reason}")

    def number(self, value: object, path: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"expected a number, got {value!r}")
            return None
        return float(value)

    def count(self, value: object, path: str, minimum: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {value!r}")
            return None
        if value < minimum:
            self.fail(path, f"must be at least {minimum}, got {value}")
            return None
        return value

    def duration(self, value: object, path: str) -> int | None:
        try:
            seconds = parse_duration(str(value)) if isinstance(value, str) else None
        except ValueError as exc:
            self.fail(path, str(exc))
            return None
        if seconds is None:
            self.fail(path, f"expected a duration like '30m', '1h' or '7d', got {value!r}")
        elif seconds == 0:
            self.fail(path, "must be greater than zero")
            return None
        return seconds

    def mapping(self, value: object, path: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        return value

    def listing(self, value: object, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {type(value).__name__}")
            return []
        return value

    def unknown_keys(self, data: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in data:
            if key not in allowed:
                prefix = f"{path}." if path else ""
                self.fail(f"{prefix}{key}", f"unknown field (expected one of {sorted(allowed)})")

    def level(self, value: object, path: str) -> Level | None:
        if isinstance(value, str) and value.upper() in Level.__members__:
            return Level(value.upper())
        self.fail(path, f"expected AMBER or RED, got {value!r}")
        return None


@dataclass(frozen=True)
class Registry:
    """Names a plan may use; taken from the plugin registry unless given."""

    metrics: Mapping[str, Any]
    drift_tests: Mapping[str, Any]
    alert_sinks: Mapping[str, Any]
    # None: families are not checked (the trainer checks them again when it fits).
    model_families: Mapping[str, Any] | None = None

    @classmethod
    def from_plugins(cls, plugins: Plugins | None = None) -> Registry:
        facade = plugins if plugins is not None else get_plugins()
        return cls(facade.metrics, facade.drift_tests, facade.alert_sinks, facade.model_families)


def task_problems(plan: Plan, task: str, registry: Registry | None = None) -> list[str]:
    """Metrics of the plan that do not apply to a `task` model (rmse on a classifier), each
    naming the metric, its task and the metrics that do apply."""
    reg = registry if registry is not None else Registry.from_plugins()
    fitting = sorted(
        n for n, m in reg.metrics.items() if getattr(m, "task", "any") in ("any", task)
    )
    problems = []
    for i, ref in enumerate(plan.metrics):
        metric_task = getattr(reg.metrics.get(ref.name), "task", "any")
        if metric_task not in ("any", task):
            problems.append(
                f"metrics[{i}]: {ref.name!r} is a {metric_task} metric and {plan.model or 'the'}"
                f" model is a {task} model (its metrics: {', '.join(fitting)})"
            )
    return problems


def parse_plan(text: str, registry: Registry | None = None) -> Plan:
    """Parse and validate YAML; raises :class:`PlanError` listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError([f"<yaml>: {exc}"]) from exc
    if not isinstance(data, Mapping):
        raise PlanError([f"<root>: expected a mapping, got {type(data).__name__}"])
    return plan_from_dict(data, registry)


def plan_from_dict(data: Mapping[str, Any], registry: Registry | None = None) -> Plan:
    reg = registry if registry is not None else Registry.from_plugins()
    c = _Checker()
    c.unknown_keys(
        data,
        {
            "model",
            "window",
            "schedule",
            "metrics",
            "drift",
            "triggers",
            "actions",
            "notify",
            "retrain",
            "rollout",
            "probes",
        },
        "",
    )
    model = data.get("model")
    if not isinstance(model, str) or not model:
        c.fail("model", f"expected a non-empty string, got {model!r}")
        model = ""
    window = _window(c, data.get("window"))
    schedule = c.mapping(data.get("schedule"), "schedule")
    c.unknown_keys(schedule, {"every"}, "schedule")
    every = c.duration(schedule.get("every", "1m"), "schedule.every") or 60
    metrics = _metrics(c, data.get("metrics"), reg)
    drift = _drift(c, data.get("drift"), reg)
    triggers = _triggers(c, data.get("triggers"), metrics, drift)
    actions = _actions(c, data.get("actions"))
    notify = _notify(c, data.get("notify"), reg)
    retrain = _retrain(c, data.get("retrain"), reg)
    rollout, rollout_problems = check_rollout(data.get("rollout"), "rollout")
    c.problems.extend(rollout_problems)
    probes = _probes(c, data.get("probes"))
    if c.problems:
        raise PlanError(c.problems)
    return Plan(
        model, window, every, metrics, drift, triggers, actions, notify, retrain, rollout, probes
    )


_ADDRESS = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


def _probes(c: _Checker, raw: object) -> ProbesSpec:
    data = c.mapping(raw, "probes")
    c.unknown_keys(data, {"every", "tolerance", "address"}, "probes")
    default = ProbesSpec()
    every = c.duration(data["every"], "probes.every") if "every" in data else None
    tolerance = c.number(data.get("tolerance", default.tolerance), "probes.tolerance")
    if tolerance is not None and tolerance < 0:
        c.fail("probes.tolerance", f"must be at least 0, got {tolerance:g}")
    address = data.get("address", "")
    if not isinstance(address, str) or (address and not _ADDRESS.match(address)):
        c.fail("probes.address", f"expected HOST:PORT, got {address!r}")
        address = ""
    return ProbesSpec(
        every or default.every_seconds,
        default.tolerance if tolerance is None else tolerance,
        address,
    )


def _window(c: _Checker, raw: object) -> WindowSpec:
    data = c.mapping(raw, "window")
    c.unknown_keys(data, {"kind", "duration", "rows", "min_labelled_rows"}, "window")
    kind = data.get("kind", "sliding")
    if kind not in ("sliding", "expanding"):
        c.fail("window.kind", f"expected 'sliding' or 'expanding', got {kind!r}")
        kind = "sliding"
    duration = rows = None
    if "duration" in data and "rows" in data:
        c.fail("window", "give either duration or rows, not both")
    if "rows" in data:
        rows = c.count(data["rows"], "window.rows", 1)
    elif "duration" in data:
        duration = c.duration(data["duration"], "window.duration")
    elif kind == "sliding":
        duration = 3600
    min_labelled = c.count(data.get("min_labelled_rows", 100), "window.min_labelled_rows", 1)
    return WindowSpec(cast(Any, kind), duration, rows, min_labelled or 100)


def _metrics(c: _Checker, raw: object, reg: Registry) -> tuple[MetricRef, ...]:
    refs: list[MetricRef] = []
    keys: set[str] = set()
    for i, item in enumerate(c.listing(raw, "metrics")):
        path = f"metrics[{i}]"
        if isinstance(item, str):
            ref = MetricRef(item)
        elif isinstance(item, Mapping):
            c.unknown_keys(item, {"name", "params", "key"}, path)
            name = item.get("name")
            if not isinstance(name, str):
                c.fail(f"{path}.name", f"expected a metric name, got {name!r}")
                continue
            params = dict(c.mapping(item.get("params"), f"{path}.params"))
            ref = MetricRef(name, params, str(item.get("key") or ""))
        else:
            c.fail(path, f"expected a metric name or mapping, got {item!r}")
            continue
        if ref.name not in reg.metrics:
            c.fail(path, f"unknown metric {ref.name!r} (known: {', '.join(sorted(reg.metrics))})")
        if ref.result_key in keys:
            c.fail(path, f"duplicate metric key {ref.result_key!r}; set 'key' to tell them apart")
        keys.add(ref.result_key)
        refs.append(ref)
    return tuple(refs)


def _drift(c: _Checker, raw: object, reg: Registry) -> DriftSpec | None:
    if raw is None:
        return None
    data = c.mapping(raw, "drift")
    c.unknown_keys(data, {"tests", "features", "thresholds"}, "drift")
    tests: list[str] = []
    for i, name in enumerate(c.listing(data.get("tests"), "drift.tests")):
        if name not in reg.drift_tests:
            known = ", ".join(sorted(reg.drift_tests))
            c.fail(f"drift.tests[{i}]", f"unknown drift test {name!r} (known: {known})")
        tests.append(str(name))
    features_raw = data.get("features", "all")
    features: Literal["all"] | tuple[str, ...] = "all"
    if features_raw != "all":
        if isinstance(features_raw, list) and all(isinstance(f, str) for f in features_raw):
            features = tuple(features_raw)
        else:
            c.fail("drift.features", f"expected 'all' or a list of names, got {features_raw!r}")
    thresholds: dict[str, float] = {}
    for name, value in c.mapping(data.get("thresholds"), "drift.thresholds").items():
        path = f"drift.thresholds.{name}"
        if name not in tests:
            c.fail(path, f"{name!r} is not in drift.tests")
        number = c.number(value, path)
        if number is not None:
            thresholds[str(name)] = number
    return DriftSpec(tuple(tests), features, thresholds)


def _triggers(
    c: _Checker, raw: object, metrics: tuple[MetricRef, ...], drift: DriftSpec | None
) -> tuple[Trigger, ...]:
    keys = {m.result_key for m in metrics}
    tests = set(drift.tests) if drift else set()
    out: list[Trigger] = []
    for i, item in enumerate(c.listing(raw, "triggers")):
        path = f"triggers[{i}]"
        if not isinstance(item, Mapping):
            c.fail(path, f"expected a mapping, got {item!r}")
            continue
        c.unknown_keys(
            item, {"metric", "drift", "condition", "threshold", "level", "until_labelled"}, path
        )
        until_labelled = item.get("until_labelled", False)
        if not isinstance(until_labelled, bool):
            c.fail(f"{path}.until_labelled", f"expected true or false, got {until_labelled!r}")
        metric, drift_name = item.get("metric"), item.get("drift")
        if (metric is None) == (drift_name is None):
            c.fail(path, "set exactly one of 'metric' or 'drift'")
        elif metric is not None and metric not in keys:
            c.fail(f"{path}.metric", f"{metric!r} is not one of the plan's metrics")
        elif drift_name is not None and drift_name != "any" and drift_name not in tests:
            c.fail(f"{path}.drift", f"{drift_name!r} is not 'any' or one of drift.tests")
        condition = item.get("condition")
        if condition not in CONDITIONS:
            c.fail(f"{path}.condition", f"expected one of {list(CONDITIONS)}, got {condition!r}")
        elif condition == "relative_drop" and drift_name is not None:
            c.fail(f"{path}.condition", "relative_drop applies to metrics only")
        threshold = c.number(item.get("threshold"), f"{path}.threshold")
        if condition == "relative_drop" and threshold is not None and not 0 < threshold < 1:
            c.fail(f"{path}.threshold", f"relative_drop must be in (0, 1), got {threshold}")
        level = c.level(item.get("level"), f"{path}.level")
        if level is Level.GREEN:
            c.fail(f"{path}.level", "expected AMBER or RED, got 'GREEN'")
        if threshold is None or level is None or condition not in CONDITIONS:
            continue
        out.append(
            Trigger(
                cast(Any, condition),
                threshold,
                level,
                None if metric is None else str(metric),
                None if drift_name is None else str(drift_name),
                until_labelled is True,
            )
        )
    return tuple(out)


def _actions(c: _Checker, raw: object) -> dict[Level, tuple[str, ...]]:
    out: dict[Level, tuple[str, ...]] = {}
    for key, value in c.mapping(raw, "actions").items():
        path = f"actions.{key}"
        level = c.level(key, path)
        names = c.listing(value, path)
        for i, name in enumerate(names):
            if name not in ACTIONS:
                c.fail(f"{path}[{i}]", f"expected one of {list(ACTIONS)}, got {name!r}")
        if level is not None:
            out[level] = tuple(str(n) for n in names)
    return out


def _notify(c: _Checker, raw: object, reg: Registry) -> tuple[SinkRef, ...]:
    out: list[SinkRef] = []
    for i, item in enumerate(c.listing(raw, "notify")):
        path = f"notify[{i}]"
        data = c.mapping(item, path)
        c.unknown_keys(data, {"sink", "config"}, path)
        sink = data.get("sink")
        if sink not in reg.alert_sinks:
            known = ", ".join(sorted(reg.alert_sinks))
            c.fail(f"{path}.sink", f"unknown alert sink {sink!r} (known: {known})")
            continue
        out.append(SinkRef(str(sink), dict(c.mapping(data.get("config"), f"{path}.config"))))
    return tuple(out)


_RETRAIN_KEYS = {
    "window",
    "duration",
    "rows",
    "min_rows",
    "holdout",
    "margin",
    "metric",
    "family",
    "params",
    "confidence",
    "resamples",
    "since_alert",
    "wait",
    "fresh_rows",
    "attempts",
}


def _retrain(c: _Checker, raw: object, reg: Registry) -> RetrainSpec:
    data = c.mapping(raw, "retrain")
    c.unknown_keys(data, _RETRAIN_KEYS, "retrain")
    default = RetrainSpec()
    # A duration alone kept its meaning from before `auto`: the rows of the last duration.
    kind = data.get("window", "sliding" if "duration" in data else default.kind)
    if kind not in RETRAIN_WINDOWS:
        c.fail("retrain.window", f"expected 'auto', 'sliding' or 'expanding', got {kind!r}")
        kind = default.kind
    rows, duration = default.rows, default.duration_seconds
    if "rows" in data and "duration" in data:
        c.fail("retrain", "give either duration or rows, not both")
    if kind == "expanding":
        rows = duration = None
        for key in ("rows", "duration"):
            if key in data:
                c.fail(f"retrain.{key}", "only a sliding window has a size")
    elif "rows" in data:
        rows = c.count(data["rows"], "retrain.rows", 1)
    elif "duration" in data and kind == "auto":
        c.fail("retrain.duration", "an auto window is sized by rows (the newest rows it reads)")
    elif "duration" in data:
        rows, duration = None, c.duration(data["duration"], "retrain.duration")
    min_rows = c.count(data.get("min_rows", default.min_rows), "retrain.min_rows", 10)
    holdout = _fraction(c, data.get("holdout", default.holdout), "retrain.holdout", 0.05, 0.5)
    margin = _fraction(c, data.get("margin", default.margin), "retrain.margin", 0.0, 1.0)
    confidence = _fraction(
        c, data.get("confidence", default.confidence), "retrain.confidence", 0.5, 0.999
    )
    resamples = c.count(data.get("resamples", default.resamples), "retrain.resamples", 50)
    metric = _retrain_metric(c, data.get("metric"), reg)
    family = data.get("family", default.family)
    if not isinstance(family, str) or not family:
        c.fail("retrain.family", f"expected a model family name, got {family!r}")
        family = default.family
    elif "family" in data and reg.model_families is not None and family not in reg.model_families:
        known = ", ".join(sorted(reg.model_families))
        c.fail("retrain.family", f"unknown model family {family!r} (known: {known})")
    params = dict(c.mapping(data.get("params"), "retrain.params"))
    if rows is not None and min_rows is not None and rows < min_rows:
        c.fail("retrain.rows", f"must be at least retrain.min_rows ({min_rows}), got {rows}")
    since_alert = data.get("since_alert", default.since_alert)
    if not isinstance(since_alert, bool):
        c.fail("retrain.since_alert", f"expected true or false, got {since_alert!r}")
        since_alert = default.since_alert
    wait = c.duration(data["wait"], "retrain.wait") if "wait" in data else default.wait_seconds
    fresh_rows = c.count(data.get("fresh_rows", default.fresh_rows), "retrain.fresh_rows", 1)
    attempts = c.count(data.get("attempts", default.attempts), "retrain.attempts", 1)
    for key in ("fresh_rows",):
        if key in data and kind != "auto":
            c.fail(f"retrain.{key}", "only an auto window waits for rows after the change")
    return RetrainSpec(
        cast(Any, kind),
        duration,
        rows,
        min_rows or default.min_rows,
        default.holdout if holdout is None else holdout,
        default.margin if margin is None else margin,
        metric,
        family,
        params,
        default.confidence if confidence is None else confidence,
        resamples or default.resamples,
        since_alert,
        default.wait_seconds if wait is None else wait,
        fresh_rows or default.fresh_rows,
        attempts or default.attempts,
    )


def _fraction(c: _Checker, value: object, path: str, low: float, high: float) -> float | None:
    number = c.number(value, path)
    if number is not None and not low <= number <= high:
        c.fail(path, f"must be between {low:g} and {high:g}, got {number:g}")
        return None
    return number


def _retrain_metric(c: _Checker, raw: object, reg: Registry) -> MetricRef | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        ref = MetricRef(raw)
    elif isinstance(raw, Mapping):
        c.unknown_keys(raw, {"name", "params"}, "retrain.metric")
        ref = MetricRef(str(raw.get("name")), dict(c.mapping(raw.get("params"), "retrain.metric")))
    else:
        c.fail("retrain.metric", f"expected a metric name or mapping, got {raw!r}")
        return None
    spec = reg.metrics.get(ref.name)
    if spec is None:
        known = ", ".join(sorted(reg.metrics))
        c.fail("retrain.metric", f"unknown metric {ref.name!r} (known: {known})")
        return None
    if not getattr(spec, "needs_labels", True):
        c.fail("retrain.metric", f"{ref.name!r} does not use labels, so it cannot judge a model")
        return None
    return ref


def primary_metric(plan: Plan, task: str) -> MetricRef:
    """The metric a challenger must improve: ``retrain.metric``, else the metric of the plan's
    first ``relative_drop`` trigger, else accuracy (classification) or rmse (regression)."""
    if plan.retrain.metric is not None:
        return plan.retrain.metric
    by_key = {m.result_key: m for m in plan.metrics}
    for trigger in plan.triggers:
        if trigger.condition == "relative_drop" and trigger.metric in by_key:
            return by_key[trigger.metric]
    return MetricRef("accuracy" if task == "classification" else "rmse")


def _retrain_to_yaml(spec: RetrainSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"window": spec.kind}
    if spec.rows is not None:
        out["rows"] = spec.rows
    elif spec.duration_seconds is not None:
        out["duration"] = format_duration(spec.duration_seconds)
    out.update(min_rows=spec.min_rows, holdout=spec.holdout, margin=spec.margin)
    if spec.metric is not None:
        out["metric"] = _metric_to_yaml(spec.metric)
    out["family"] = spec.family
    if spec.params:
        out["params"] = dict(spec.params)
    out.update(confidence=spec.confidence, resamples=spec.resamples)
    if spec.since_alert:
        out.update(since_alert=True, wait=format_duration(spec.wait_seconds))
    elif spec.kind == "auto":
        out.update(fresh_rows=spec.fresh_rows, wait=format_duration(spec.wait_seconds))
    if spec.attempts != RetrainSpec.attempts:
        out["attempts"] = spec.attempts
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    window: dict[str, Any] = {"kind": plan.window.kind}
    if plan.window.rows is not None:
        window["rows"] = plan.window.rows
    elif plan.window.duration_seconds is not None:
        window["duration"] = format_duration(plan.window.duration_seconds)
    window["min_labelled_rows"] = plan.window.min_labelled_rows
    data: dict[str, Any] = {
        "model": plan.model,
        "window": window,
        "schedule": {"every": format_duration(plan.every_seconds)},
        "metrics": [_metric_to_yaml(m) for m in plan.metrics],
    }
    if plan.drift is not None:
        drift: dict[str, Any] = {
            "tests": list(plan.drift.tests),
            "features": plan.drift.features
            if plan.drift.features == "all"
            else list(plan.drift.features),
        }
        if plan.drift.thresholds:
            drift["thresholds"] = dict(plan.drift.thresholds)
        data["drift"] = drift
    data["triggers"] = [_trigger_to_yaml(t) for t in plan.triggers]
    data["actions"] = {level.value: list(names) for level, names in plan.actions.items()}
    if plan.notify:
        data["notify"] = [{"sink": s.sink, "config": dict(s.config)} for s in plan.notify]
    data["retrain"] = _retrain_to_yaml(plan.retrain)
    if plan.rollout != RolloutSpec():
        data["rollout"] = rollout_to_dict(plan.rollout)
    if plan.probes != ProbesSpec():
        data["probes"] = {
            "every": format_duration(plan.probes.every_seconds),
            "tolerance": plan.probes.tolerance,
            **({"address": plan.probes.address} if plan.probes.address else {}),
        }
    return data


def _metric_to_yaml(m: MetricRef) -> str | dict[str, Any]:
    if not m.params and not m.key:
        return m.name
    out: dict[str, Any] = {"name": m.name}
    if m.params:
        out["params"] = dict(m.params)
    if m.key:
        out["key"] = m.key
    return out


def _trigger_to_yaml(t: Trigger) -> dict[str, Any]:
    subject = {"metric": t.metric} if t.metric is not None else {"drift": t.drift}
    out = {**subject, "condition": t.condition, "threshold": t.threshold, "level": t.level.value}
    if t.until_labelled:
        out["until_labelled"] = True
    return out


def plan_to_yaml(plan: Plan) -> str:
    return yaml.safe_dump(plan_to_dict(plan), sort_keys=False)


def default_plan(model: str, task: Literal["classification", "regression"]) -> Plan:
    """A sensible starting plan: quality vs baseline, prediction sanity, feature validity, drift.

    Quality is estimated from the predictions alone (``estimated_*``, triggers ``until_labelled``)
    until the window has ``min_labelled_rows`` labels, and measured on the labels after.
    """
    red, amber = Level.RED, Level.AMBER
    common = (
        MetricRef("feature_missing_rate"),
        MetricRef("feature_out_of_range_rate"),
        MetricRef("latency_p50_ms"),
        MetricRef("latency_p99_ms"),
        MetricRef("throughput_rps"),
    )
    metrics: tuple[MetricRef, ...]
    quality: tuple[Trigger, ...]
    if task == "classification":
        metrics = (
            MetricRef("accuracy"),
            MetricRef("f1_macro"),
            MetricRef("roc_auc"),
            MetricRef("log_loss"),
            MetricRef("estimated_accuracy"),
            MetricRef("estimated_f1", {"average": "macro"}, key="estimated_f1_macro"),
            MetricRef("estimated_roc_auc"),
            MetricRef("invalid_probability_rate"),
            MetricRef("constant_predictions"),
            *common,
        )
        quality = (
            Trigger("relative_drop", 0.05, amber, metric="accuracy"),
            Trigger("relative_drop", 0.10, red, metric="accuracy"),
            Trigger("relative_drop", 0.05, amber, metric="estimated_accuracy", until_labelled=True),
            Trigger("relative_drop", 0.10, red, metric="estimated_accuracy", until_labelled=True),
            Trigger("above", 0.01, red, metric="invalid_probability_rate"),
        )
    else:
        metrics = (
            MetricRef("mae"),
            MetricRef("rmse"),
            MetricRef("r2"),
            MetricRef("estimated_mae"),
            MetricRef("prediction_mean"),
            MetricRef("prediction_out_of_range_rate"),
            MetricRef("constant_predictions"),
            *common,
        )
        quality = (
            Trigger("relative_drop", 0.10, amber, metric="rmse"),
            Trigger("relative_drop", 0.25, red, metric="rmse"),
            # Sees only shifts that move the predictions: AMBER at most.
            Trigger("relative_drop", 0.25, amber, metric="estimated_mae", until_labelled=True),
            Trigger("below", 0.0, red, metric="r2"),
        )
    triggers = (
        *quality,
        Trigger("above", 0.5, red, metric="constant_predictions"),
        Trigger("above", 0.05, amber, metric="feature_missing_rate"),
        # A tabular model answering in seconds is broken; no per-version latency baseline yet.
        Trigger("above", 1000.0, amber, metric="latency_p99_ms"),
        Trigger("above", 0.0, amber, drift="any"),
    )
    return Plan(
        model=model,
        window=WindowSpec("sliding", 3600, None, 200),
        every_seconds=60,
        metrics=metrics,
        drift=DriftSpec(("ks", "wasserstein", "psi", "chi_square")),
        triggers=triggers,
        actions={amber: ("notify",), red: ("retrain", "notify")},
    )
