"""The `rollout:` section of a monitoring plan: how a new version of the model takes traffic.

Example (every field optional; the defaults suit one machine: steps of seconds, not hours)::

    rollout:
      strategy: canary            # canary | blue_green | red_black | shadow (rollout_strategies)
      steps: [10, 50, 100]        # percent of traffic on the new version, ending at 100
      interval: 2s                # the rollout is advanced (and analysed) once per interval
      step_duration: 10s          # minimum time at each step
      min_requests: 50            # minimum requests to the new version at each step
      deadline: 2m                # per step; then on_deadline decides
      on_deadline: promote        # promote | rollback | hold (pause for a person)
      replicas: 1
      health_timeout: 60s
      drain: 5s                   # most time the old revision gets to finish in-flight calls
      confirm: 2m                 # after a promotion judged on estimates, labels may undo it
      analysis:
        max_error_rate_increase: 0.02   # tolerated rise over the champion (one-sided test)
        max_p99_latency_ratio: 2.0
        min_p99_increase_ms: 25         # and at least this much slower (ms): 4 -> 10 ms is noise
        quality_metric: auto            # accuracy | mae | auto (by task)
        max_quality_drop: 0.02          # accuracy points, or MAE increase
        min_labelled_rows: 50
        significance: 0.05
        failure_limit: 2                # failed checks before an automatic rollback
        estimates: true                 # judge quality before labels, on calibrated estimates
      blue_green: {smoke_requests: 20, min_smoke_accuracy: 0.0}
      red_black: {keep_old_for: 30s}
      shadow: {mirror_percent: 100, min_paired_rows: 50, promote_if: not_worse}

Only the statistical tests decide: a raw difference within noise never fails a check.

Estimated, then confirmed: before labels come, a classifier's quality is judged on what each
version expects of itself on live traffic (its calibrated probabilities; the champion's realized
accuracy on recent labels when it has them). A promotion decided that way is confirmed: for
`confirm` the previous version stays warm at 0 %, and if the labels that arrive meanwhile show
the new version worse, the traffic goes back by itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, cast

from cyclone.rollout_strategies import STRATEGIES, StrategyName

OnDeadline = Literal["promote", "rollback", "hold"]
QualityMetric = Literal["auto", "accuracy", "mae"]
PromoteIf = Literal["not_worse", "better"]

ON_DEADLINE: tuple[OnDeadline, ...] = ("promote", "rollback", "hold")
QUALITY_METRICS: tuple[QualityMetric, ...] = ("auto", "accuracy", "mae")
PROMOTE_IF: tuple[PromoteIf, ...] = ("not_worse", "better")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class AnalysisSpec:
    max_error_rate_increase: float = 0.02
    max_p99_latency_ratio: float = 2.0
    # A p99 ratio alone flags noise on fast models (a cold start turns 4 ms into 10 ms): the
    # canary must also be this many milliseconds slower for the latency check to fail.
    min_p99_increase_ms: float = 25.0
    quality_metric: QualityMetric = "auto"
    max_quality_drop: float = 0.02
    min_labelled_rows: int = 50
    significance: float = 0.05
    failure_limit: int = 2
    # Judge quality on calibrated estimates before labels come (classifiers with calibration).
    estimates: bool = True


@dataclass(frozen=True)
class BlueGreenSpec:
    smoke_requests: int = 20
    min_smoke_accuracy: float = 0.0  # classification share right / regression unused


@dataclass(frozen=True)
class RedBlackSpec:
    keep_old_for_seconds: float = 30.0


@dataclass(frozen=True)
class ShadowSpec:
    mirror_percent: float = 100.0
    min_paired_rows: int = 50
    promote_if: PromoteIf = "not_worse"


@dataclass(frozen=True)
class RolloutSpec:
    strategy: StrategyName = "canary"
    steps: tuple[int, ...] = (10, 50, 100)
    interval_seconds: float = 2.0
    step_seconds: float = 10.0
    min_requests: int = 50
    deadline_seconds: float = 120.0
    on_deadline: OnDeadline = "promote"
    replicas: int = 1
    health_timeout_seconds: float = 60.0
    drain_seconds: float = 5.0
    # After a promotion decided without labels: how long the old version stays warm while
    # labels confirm the decision (0 = promote outright).
    confirm_seconds: float = 120.0
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
    blue_green: BlueGreenSpec = field(default_factory=BlueGreenSpec)
    red_black: RedBlackSpec = field(default_factory=RedBlackSpec)
    shadow: ShadowSpec = field(default_factory=ShadowSpec)

    def with_strategy(self, strategy: StrategyName | None) -> RolloutSpec:
        return self if strategy is None else replace(self, strategy=strategy)


def parse_seconds(value: object) -> float:
    """A duration: "500ms", "10s", "2m", "1h", or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '10s' or '2m', got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected a duration like '10s' or '2m', got {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_seconds(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class _Check:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, reason: str) -> None:
        self.problems.append(f"{path}: {reason}")

    def mapping(self, raw: object, path: str, allowed: set[str]) -> Mapping[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping):
            self.fail(path, f"expected a mapping, got {type(raw).__name__}")
            return {}
        for key in raw:
            if key not in allowed:
                self.fail(f"{path}.{key}", f"unknown field (expected one of {sorted(allowed)})")
        return raw

    def seconds(self, data: Mapping[str, Any], key: str, path: str, default: float) -> float:
        if key not in data:
            return default
        try:
            value = parse_seconds(data[key])
        except ValueError as exc:
            self.fail(f"{path}.{key}", str(exc))
            return default
        if value <= 0:
            self.fail(f"{path}.{key}", f"must be greater than zero, got {data[key]!r}")
            return default
        return value

    def integer(
        self, data: Mapping[str, Any], key: str, path: str, default: int, minimum: int
    ) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{path}.{key}", f"expected an integer, got {value!r}")
            return default
        if value < minimum:
            self.fail(f"{path}.{key}", f"must be at least {minimum}, got {value}")
            return default
        return value

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        path: str,
        default: float,
        low: float,
        high: float | None = None,
        low_open: bool = False,
    ) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"{path}.{key}", f"expected a number, got {value!r}")
            return default
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            self.fail(f"{path}.{key}", f"must be in {span}, got {value}")
            return default
        return float(value)

    def boolean(self, data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        value = data.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{path}.{key}", f"expected true or false, got {value!r}")
            return default
        return value

    def choice(
        self, data: Mapping[str, Any], key: str, path: str, options: tuple[str, ...], default: str
    ) -> str:
        value = data.get(key, default)
        if value not in options:
            self.fail(f"{path}.{key}", f"expected one of {list(options)}, got {value!r}")
            return default
        return str(value)


_TOP = {
    "strategy",
    "steps",
    "interval",
    "step_duration",
    "min_requests",
    "deadline",
    "on_deadline",
    "replicas",
    "health_timeout",
    "drain",
    "confirm",
    "analysis",
    "blue_green",
    "red_black",
    "shadow",
}


def check_rollout(raw: object, path: str = "rollout") -> tuple[RolloutSpec, list[str]]:
    """Validate a `rollout:` section: the spec (defaults where invalid) and every problem."""
    c = _Check()
    d = RolloutSpec()
    data = c.mapping(raw, path, _TOP)
    strategy = c.choice(data, "strategy", path, STRATEGIES, d.strategy)
    steps = _steps(c, data.get("steps"), f"{path}.steps", strategy)
    a = c.mapping(data.get("analysis"), f"{path}.analysis", set(AnalysisSpec.__annotations__))
    ap, ad = f"{path}.analysis", AnalysisSpec()
    analysis = AnalysisSpec(
        max_error_rate_increase=c.number(
            a, "max_error_rate_increase", ap, ad.max_error_rate_increase, 0, 1
        ),
        max_p99_latency_ratio=c.number(a, "max_p99_latency_ratio", ap, ad.max_p99_latency_ratio, 1),
        min_p99_increase_ms=c.number(a, "min_p99_increase_ms", ap, ad.min_p99_increase_ms, 0),
        quality_metric=cast(
            QualityMetric, c.choice(a, "quality_metric", ap, QUALITY_METRICS, ad.quality_metric)
        ),
        max_quality_drop=c.number(a, "max_quality_drop", ap, ad.max_quality_drop, 0),
        min_labelled_rows=c.integer(a, "min_labelled_rows", ap, ad.min_labelled_rows, 1),
        significance=c.number(a, "significance", ap, ad.significance, 0, 0.5, low_open=True),
        failure_limit=c.integer(a, "failure_limit", ap, ad.failure_limit, 1),
        estimates=c.boolean(a, "estimates", ap, ad.estimates),
    )
    bp, bd = f"{path}.blue_green", BlueGreenSpec()
    b = c.mapping(data.get("blue_green"), bp, set(BlueGreenSpec.__annotations__))
    blue_green = BlueGreenSpec(
        smoke_requests=c.integer(b, "smoke_requests", bp, bd.smoke_requests, 1),
        min_smoke_accuracy=c.number(b, "min_smoke_accuracy", bp, bd.min_smoke_accuracy, 0, 1),
    )
    rp = f"{path}.red_black"
    r = c.mapping(data.get("red_black"), rp, {"keep_old_for"})
    red_black = RedBlackSpec(c.seconds(r, "keep_old_for", rp, RedBlackSpec().keep_old_for_seconds))
    sp, sd = f"{path}.shadow", ShadowSpec()
    s = c.mapping(data.get("shadow"), sp, set(ShadowSpec.__annotations__))
    shadow = ShadowSpec(
        mirror_percent=c.number(s, "mirror_percent", sp, sd.mirror_percent, 0, 100, low_open=True),
        min_paired_rows=c.integer(s, "min_paired_rows", sp, sd.min_paired_rows, 1),
        promote_if=cast(PromoteIf, c.choice(s, "promote_if", sp, PROMOTE_IF, sd.promote_if)),
    )
    interval = c.seconds(data, "interval", path, d.interval_seconds)
    step_seconds = c.seconds(data, "step_duration", path, d.step_seconds)
    deadline = c.seconds(data, "deadline", path, d.deadline_seconds)
    if "deadline" in data and deadline < step_seconds:
        c.fail(f"{path}.deadline", f"must not be shorter than step_duration ({step_seconds:g}s)")
    spec = RolloutSpec(
        strategy=strategy,
        steps=steps,
        interval_seconds=interval,
        step_seconds=step_seconds,
        min_requests=c.integer(data, "min_requests", path, d.min_requests, 0),
        deadline_seconds=max(deadline, step_seconds),
        on_deadline=cast(
            OnDeadline, c.choice(data, "on_deadline", path, ON_DEADLINE, d.on_deadline)
        ),
        replicas=c.integer(data, "replicas", path, d.replicas, 1),
        health_timeout_seconds=c.seconds(data, "health_timeout", path, d.health_timeout_seconds),
        drain_seconds=c.seconds(data, "drain", path, d.drain_seconds),
        confirm_seconds=_confirm(c, data, path, d.confirm_seconds),
        analysis=analysis,
        blue_green=blue_green,
        red_black=red_black,
        shadow=shadow,
    )
    return spec, c.problems


def _confirm(c: _Check, data: Mapping[str, Any], path: str, default: float) -> float:
    """`confirm`: a duration, or 0 to promote without a confirmation phase."""
    if data.get("confirm") in (0, "0", "0s"):
        return 0.0
    return c.seconds(data, "confirm", path, default)


def _steps(c: _Check, raw: object, path: str, strategy: str) -> tuple[int, ...]:
    default = RolloutSpec().steps
    if raw is None:
        return default
    if not isinstance(raw, list) or not raw:
        c.fail(path, f"expected a non-empty list of percentages, got {raw!r}")
        return default
    out: list[int] = []
    for i, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 100:
            c.fail(f"{path}[{i}]", f"expected an integer percentage in 1..100, got {value!r}")
            return default
        if out and value <= out[-1]:
            c.fail(f"{path}[{i}]", f"steps must increase, got {value} after {out[-1]}")
            return default
        out.append(value)
    if out[-1] != 100:
        c.fail(path, f"the last step must be 100, got {out[-1]}")
        return default
    return tuple(out)


def parse_rollout(raw: object, path: str = "rollout") -> RolloutSpec:
    """Validate a `rollout:` section; raises `cyclone.plan.PlanError` listing every problem."""
    spec, problems = check_rollout(raw, path)
    if problems:
        from cyclone.plan import PlanError  # plan.py imports this module

        raise PlanError(problems)
    return spec


def rollout_to_dict(spec: RolloutSpec) -> dict[str, Any]:
    """The YAML form of `spec`; `parse_rollout(rollout_to_dict(s)) == s`."""
    return {
        "strategy": spec.strategy,
        "steps": list(spec.steps),
        "interval": format_seconds(spec.interval_seconds),
        "step_duration": format_seconds(spec.step_seconds),
        "min_requests": spec.min_requests,
        "deadline": format_seconds(spec.deadline_seconds),
        "on_deadline": spec.on_deadline,
        "replicas": spec.replicas,
        "health_timeout": format_seconds(spec.health_timeout_seconds),
        "drain": format_seconds(spec.drain_seconds),
        "confirm": format_seconds(spec.confirm_seconds),
        "analysis": asdict(spec.analysis),
        "blue_green": asdict(spec.blue_green),
        "red_black": {"keep_old_for": format_seconds(spec.red_black.keep_old_for_seconds)},
        "shadow": asdict(spec.shadow),
    }
