"""Pure evaluation of a monitoring plan over one window: metrics, drift, triggers, RAG level.

No I/O and no gRPC: the monitor service fetches the window, reference profile and baseline, calls
:func:`evaluate`, then persists and alerts on the result.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from cyclone.plan import MetricRef, Plan, Trigger
from cyclone.plugin_api import (
    CurrentColumn,
    DriftResult,
    Level,
    MetricContext,
    MetricResult,
    MetricSpec,
    ReferenceProfile,
    Window,
)
from cyclone.plugins import Plugins, get_plugins
from services.monitor.explain import explain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriggerResult:
    trigger: Trigger
    fired: bool
    value: float | None
    detail: str


@dataclass(frozen=True)
class Evaluation:
    """Outcome of one plan over one window.

    ``drift`` maps test name -> feature -> result; ``drifted`` maps test name (and "any") to the
    features it flagged.
    """

    level: Level
    reasons: tuple[str, ...]
    actions: tuple[str, ...]
    metrics: dict[str, MetricResult]
    drift: dict[str, dict[str, DriftResult]] = field(default_factory=dict)
    drifted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    triggers: tuple[TriggerResult, ...] = ()
    notes: tuple[str, ...] = ()
    n_rows: int = 0
    n_labelled: int = 0


def evaluate(
    plan: Plan,
    window: Window,
    reference: ReferenceProfile | None = None,
    baseline: Mapping[str, float] | None = None,
    plugins: Plugins | None = None,
) -> Evaluation:
    """Compute every metric and drift test of ``plan`` and apply its triggers.

    :param baseline: the version's metric values at registration, keyed like the plan's metrics;
        needed by ``relative_drop`` triggers.
    :param plugins: registry to use (the process-wide one by default).
    """
    facade = plugins if plugins is not None else get_plugins()
    notes: list[str] = []
    ctx_ref = reference
    metrics = {
        ref.result_key: _metric(ref, facade.metrics.get(ref.name), window, ctx_ref, plan)
        for ref in plan.metrics
    }
    drift: dict[str, dict[str, DriftResult]] = {}
    if plan.drift is not None and plan.drift.tests:
        if reference is None:
            notes.append("drift skipped: no reference profile for this version")
        else:
            drift = _drift(plan, window, reference, facade, notes)
    drifted = _drifted(drift)
    specs = {ref.result_key: facade.metrics.get(ref.name) for ref in plan.metrics}
    labelled = window.n_labelled >= plan.window.min_labelled_rows
    results = tuple(
        TriggerResult(t, False, None, "")
        if t.until_labelled and labelled
        else _trigger(t, metrics, drifted, specs, baseline or {}, notes)
        for t in plan.triggers
    )
    notes.extend(estimated_vs_realized(metrics, window.n_labelled))
    fired = [r for r in results if r.fired]
    level = max((r.trigger.level for r in fired), key=lambda lv: lv.rank, default=Level.GREEN)
    reasons = tuple(r.detail for r in fired)
    if level == Level.RED and labelled:
        # A RED says why: alerts and the status carry the reasons.
        why = explain(window, reference, _baseline_error(window.task, baseline or {}))
        if why is not None:
            reasons += (why.text(),)
    return Evaluation(
        level=level,
        reasons=reasons,
        actions=plan.actions.get(level, ()),
        metrics=metrics,
        drift=drift,
        drifted=drifted,
        triggers=results,
        notes=tuple(notes),
        n_rows=window.n_rows,
        n_labelled=window.n_labelled,
    )


def _baseline_error(task: str, baseline: Mapping[str, float]) -> float | None:
    """The per-row loss the version had at registration, in `explain`'s units."""
    if task == "classification" and "accuracy" in baseline:
        return 1.0 - baseline["accuracy"]
    return baseline.get("mae") if task == "regression" else None


@dataclass(frozen=True)
class ProbeSummary:
    """Known-answer probe rounds of one model: counts since the monitor started, and the verdict
    of the latest round (`wrong`: reasons naming differing rows; `error`: why no answer came)."""

    rounds: int
    answered: int
    wrong: tuple[str, ...] = ()
    error: str = ""


def with_probes(ev: Evaluation, probes: ProbeSummary | None, plan: Plan) -> Evaluation:
    """`ev` with the latest probe round folded in: wrong answers are RED, no answer AMBER, and
    an ``uptime`` metric (share of probe rounds answered). Unchanged without probe rounds."""
    if probes is None or probes.rounds == 0:
        return ev
    uptime = MetricResult.ok(
        probes.answered / probes.rounds,
        f"{probes.answered} of {probes.rounds} probe rounds answered since the monitor started",
    )
    reasons: tuple[str, ...] = ()
    level = Level.GREEN
    if probes.wrong:
        level, reasons = Level.RED, probes.wrong
    elif probes.error:
        level, reasons = Level.AMBER, (probes.error,)
    if level.rank <= ev.level.rank:
        return replace(ev, metrics={**ev.metrics, "uptime": uptime}, reasons=ev.reasons + reasons)
    actions = plan.actions.get(level, ())
    if probes.wrong:
        # A version answering its own known rows wrongly is a serving fault: a model refitted
        # on the labels would not mend the artifact. Roll back or notify; never retrain.
        actions = tuple(a for a in actions if a != "retrain")
    return replace(
        ev,
        level=level,
        reasons=ev.reasons + reasons,
        actions=actions,
        metrics={**ev.metrics, "uptime": uptime},
    )


ESTIMATED_PREFIX = "estimated_"


def estimated_vs_realized(metrics: Mapping[str, MetricResult], n_labelled: int) -> list[str]:
    """One line per estimated metric whose realized twin (the key without ``estimated_``) has a
    value too, so users see how far the estimate can be trusted."""
    lines = []
    for key, estimate in metrics.items():
        realized = metrics.get(key.removeprefix(ESTIMATED_PREFIX))
        if not key.startswith(ESTIMATED_PREFIX) or realized is None:
            continue
        if estimate.value is None or realized.value is None:
            continue
        realized_key = key.removeprefix(ESTIMATED_PREFIX)
        lines.append(
            f"{key} {estimate.value:.4g} vs realized {realized_key} {realized.value:.4g} "
            f"on {n_labelled} labelled rows (gap {estimate.value - realized.value:+.4g})"
        )
    return lines


def _metric(
    ref: MetricRef,
    spec: MetricSpec | None,
    window: Window,
    reference: ReferenceProfile | None,
    plan: Plan,
) -> MetricResult:
    if spec is None:
        return MetricResult.error(f"unknown metric {ref.name!r} (plugin not loaded?)")
    if spec.task != "any" and window.task != "any" and spec.task != window.task:
        return MetricResult.error(f"{ref.name} applies to {spec.task} models, not {window.task}")
    if spec.needs_labels:
        needed = plan.window.min_labelled_rows
        have = window.n_labelled
        if have < needed:
            return MetricResult.not_enough_data(f"{have} labelled rows, the plan needs {needed}")
    try:
        seconds = plan.window.duration_seconds
        context = MetricContext(ref.params, reference, None if seconds is None else float(seconds))
        result = spec.fn(window, context)
    except Exception as exc:
        log.exception("metric %r of plugin %r raised", ref.name, spec.plugin)
        return MetricResult.error(f"plugin {spec.plugin!r} raised {type(exc).__name__}: {exc}")
    if not isinstance(result, MetricResult):
        return MetricResult.error(
            f"plugin {spec.plugin!r} returned {type(result).__name__}, not MetricResult"
        )
    if result.value is not None and not math.isfinite(result.value):
        return MetricResult.not_enough_data(result.detail or f"value is {result.value}")
    return result


def _drift(
    plan: Plan, window: Window, reference: ReferenceProfile, facade: Plugins, notes: list[str]
) -> dict[str, dict[str, DriftResult]]:
    assert plan.drift is not None
    wanted = plan.drift.features
    names = list(reference.features) if wanted == "all" else list(wanted)
    columns: dict[str, CurrentColumn] = {}
    for name in names:
        if name not in window.features or name not in reference.features:
            notes.append(f"drift skipped for {name}: not in both window and reference")
            continue
        # One column object per feature so every test shares its binning.
        columns[name] = CurrentColumn(name, window.features[name], reference.features[name])
    out: dict[str, dict[str, DriftResult]] = {}
    for test in plan.drift.tests:
        spec = facade.drift_tests.get(test)
        if spec is None:
            notes.append(f"unknown drift test {test!r} (plugin not loaded?)")
            continue
        threshold = plan.drift.thresholds.get(test, spec.default_threshold)
        per_feature: dict[str, DriftResult] = {}
        for name, column in columns.items():
            if column.reference.kind != spec.kind:
                continue
            try:
                per_feature[name] = spec.fn(column, threshold)
            except Exception as exc:
                log.exception("drift test %r of plugin %r raised on %s", test, spec.plugin, name)
                per_feature[name] = DriftResult.skipped(
                    "error", f"plugin {spec.plugin!r} raised {type(exc).__name__}: {exc}", threshold
                )
        out[test] = per_feature
    return out


def _drifted(drift: Mapping[str, Mapping[str, DriftResult]]) -> dict[str, tuple[str, ...]]:
    out = {test: tuple(f for f, r in res.items() if r.drifted) for test, res in drift.items()}
    out["any"] = tuple(sorted({f for features in out.values() for f in features}))
    return out


def _trigger(
    trigger: Trigger,
    metrics: Mapping[str, MetricResult],
    drifted: Mapping[str, tuple[str, ...]],
    specs: Mapping[str, MetricSpec | None],
    baseline: Mapping[str, float],
    notes: list[str],
) -> TriggerResult:
    if trigger.drift is not None:
        flagged = drifted.get(trigger.drift, ())
        count = float(len(flagged))
        fired = _compare(trigger, count)
        detail = f"{len(flagged)} features drifted ({trigger.drift}): {', '.join(flagged)}"
        return TriggerResult(trigger, fired, count, detail if fired else "")
    key = trigger.metric or ""
    result = metrics.get(key)
    value = None if result is None else result.value
    if value is None:
        return TriggerResult(trigger, False, None, "")
    if trigger.condition != "relative_drop":
        fired = _compare(trigger, value)
        detail = f"{key} = {value:.4g} is {trigger.condition} {trigger.threshold:g}"
        return TriggerResult(trigger, fired, value, detail if fired else "")
    base = baseline.get(key)
    spec = specs.get(key)
    if base is None or not math.isfinite(base) or base == 0 or spec is None:
        notes.append(f"relative_drop on {key} skipped: no usable baseline")
        return TriggerResult(trigger, False, value, "")
    # "Drop" means getting worse: falling for accuracy-like metrics, rising for errors.
    drop = (base - value) / abs(base) if spec.higher_is_better else (value - base) / abs(base)
    fired = drop >= trigger.threshold
    detail = (
        f"{key} = {value:.4g} is {drop:.1%} worse than baseline {base:.4g} "
        f"(limit {trigger.threshold:.0%})"
    )
    return TriggerResult(trigger, fired, value, detail if fired else "")


def _compare(trigger: Trigger, value: float) -> bool:
    if trigger.condition == "below":
        return value < trigger.threshold
    return value > trigger.threshold
