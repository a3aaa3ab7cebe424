"""Monitor benchmark: drift suite and metrics through the plugin layer vs raw scipy floors.

Run: ``python bench/monitor.py``. Human lines first, then one JSON object per figure:
``{"figure", "value", "unit", "floor", "ratio"}`` with ratio = ours against the floor, higher is
better (time: floor / ours).
"""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from cyclone.plan import DriftSpec, MetricRef, Plan, WindowSpec
from cyclone.plugin_api import ReferenceProfile, Window, build_profile
from cyclone.plugins import Plugins, build_plugin_manager
from services.monitor.evaluate import Evaluation, evaluate

N_FEATURES, N_SHIFTED, SHIFT = 20, 5, 0.2
DRIFT_TESTS = ("ks", "wasserstein", "psi")
FIGURES: list[dict[str, Any]] = []


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def figure(name: str, value: float, unit: str, floor: float | None, ratio: float | None) -> None:
    FIGURES.append({"figure": name, "value": value, "unit": unit, "floor": floor, "ratio": ratio})


def drift_data(rng: np.random.Generator, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ref = {f"f{i:02d}": rng.normal(0.0, 1.0, n) for i in range(N_FEATURES)}
    cur = {name: rng.normal(SHIFT if i < N_SHIFTED else 0.0, 1.0, n) for i, name in enumerate(ref)}
    return ref, cur


def drift_plan() -> Plan:
    return Plan("bench", WindowSpec(rows=1), drift=DriftSpec(DRIFT_TESTS))


def run_drift(plugins: Plugins, cur: dict[str, Any], profile: ReferenceProfile) -> Evaluation:
    window = Window(cur, np.zeros(len(next(iter(cur.values())))), task="regression")
    return evaluate(drift_plan(), window, profile, None, plugins=plugins)


def bench_drift(plugins: Plugins, n: int) -> None:
    rng = np.random.default_rng(n)
    ref, cur = drift_data(rng, n)
    t_profile, profile = timed(lambda: build_profile(ref), repeat=1)
    t_ours, ev = timed(lambda: run_drift(plugins, cur, profile))
    t_floor, pvals = timed(
        lambda: [stats.ks_2samp(ref[k], cur[k]).pvalue for k in ref], repeat=1 if n > 200_000 else 3
    )
    shifted = {f"f{i:02d}" for i in range(N_SHIFTED)}
    flagged = set(ev.drifted["any"])
    floor_flagged = {k for k, p in zip(ref, pvals, strict=True) if p < 0.05}
    tag = f"{n // 1000}k"
    print(f"[drift {tag}] profile build (training time): {t_profile:.3f} s")
    print(
        f"[drift {tag}] default suite {DRIFT_TESTS} via plugins: {t_ours:.3f} s; "
        f"ks_2samp x{N_FEATURES}: {t_floor:.3f} s"
    )
    print(
        f"[drift {tag}] caught {len(flagged & shifted)}/{N_SHIFTED}, false {len(flagged - shifted)}"
        f"; ks_2samp p<0.05 caught {len(floor_flagged & shifted)}, "
        f"false {len(floor_flagged - shifted)}"
    )
    figure(f"drift_suite_{tag}_seconds", t_ours, "s", t_floor, t_floor / t_ours)
    figure(f"profile_build_{tag}_seconds", t_profile, "s", None, None)
    figure(
        f"drift_{tag}_false_columns",
        len(flagged - shifted),
        "columns",
        len(floor_flagged - shifted),
        None,
    )
    figure(
        f"drift_{tag}_caught_columns",
        len(flagged & shifted),
        "columns",
        len(floor_flagged & shifted),
        len(flagged & shifted) / N_SHIFTED,
    )
    if n >= 1_000_000:
        raw = sum(v.nbytes for v in cur.values())
        tracemalloc.start()
        run_drift(plugins, cur, profile)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(
            f"[drift {tag}] peak memory {peak / 1e6:.1f} MB vs window {raw / 1e6:.1f} MB "
            f"({peak / raw:.2f}x)"
        )
        figure(f"drift_{tag}_peak_memory_ratio", peak / raw, "x window", 3.0, 3.0 / (peak / raw))


def metric_windows(rng: np.random.Generator, n: int) -> list[tuple[Plan, Window]]:
    y = rng.normal(10, 3, n)
    reg = Window({}, y + rng.normal(0, 1, n), labels=y, task="regression")
    labels = rng.integers(0, 2, n)
    p1 = np.clip(labels * 0.6 + rng.random(n) * 0.4, 0, 1)
    classes = np.array(["no", "yes"], dtype=object)
    cls = Window(
        {},
        classes[(p1 > 0.5).astype(int)],
        np.column_stack([1 - p1, p1]),
        ["no", "yes"],
        classes[labels],
        "classification",
    )
    reg_plan = Plan(
        "r", WindowSpec(rows=n), metrics=tuple(MetricRef(m) for m in ("mae", "rmse", "mape", "r2"))
    )
    cls_plan = Plan(
        "c",
        WindowSpec(rows=n),
        metrics=tuple(
            MetricRef(m)
            for m in ("accuracy", "precision", "recall", "f1", "f1_macro", "roc_auc", "log_loss")
        ),
    )
    return [(reg_plan, reg), (cls_plan, cls)]


def bench_metrics(plugins: Plugins, n: int) -> None:
    from sklearn import metrics as skm

    rng = np.random.default_rng(1)
    windows = metric_windows(rng, n)

    def ours() -> list[Evaluation]:
        # Fresh windows each time so cached label encodings do not flatter us.
        return [
            evaluate(
                p,
                Window(
                    w.features, w.predictions, w.probabilities, w.class_labels, w.labels, w.task
                ),
                None,
                None,
                plugins=plugins,
            )
            for p, w in windows
        ]

    t_ours, evs = timed(ours)
    assert all(r.status == "ok" for ev in evs for r in ev.metrics.values())
    (_, reg), (_, cls) = windows
    y, pred = cls.labels == "yes", cls.predictions == "yes"
    assert cls.probabilities is not None

    def floor() -> None:
        skm.mean_absolute_error(reg.labels, reg.predictions)
        skm.root_mean_squared_error(reg.labels, reg.predictions)
        skm.mean_absolute_percentage_error(reg.labels, reg.predictions)
        skm.r2_score(reg.labels, reg.predictions)
        skm.accuracy_score(y, pred)
        skm.precision_score(y, pred)
        skm.recall_score(y, pred)
        skm.f1_score(y, pred)
        skm.f1_score(y, pred, average="macro")
        skm.roc_auc_score(y, cls.probabilities[:, 1])  # type: ignore[index]
        skm.log_loss(y, cls.probabilities)

    t_floor, _ = timed(floor, repeat=1)
    print(
        f"[metrics {n // 1000}k] 11 regression+classification metrics via evaluate: "
        f"{t_ours:.3f} s; sklearn.metrics on pre-encoded arrays: {t_floor:.3f} s"
    )
    figure(f"metrics_{n // 1_000_000}M_seconds", t_ours, "s", t_floor, t_floor / t_ours)
    raw = sum(
        a.nbytes
        for a in (reg.predictions, reg.labels, cls.predictions, cls.labels, cls.probabilities)
        if a is not None
    )
    tracemalloc.start()
    ours()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(
        f"[metrics {n // 1000}k] peak memory {peak / 1e6:.1f} MB vs windows {raw / 1e6:.1f} MB "
        f"({peak / raw:.2f}x)"
    )
    figure(
        f"metrics_{n // 1_000_000}M_peak_memory_ratio",
        peak / raw,
        "x window",
        3.0,
        3.0 / (peak / raw),
    )


def main() -> None:
    plugins = Plugins(build_plugin_manager(env={}))
    _ = plugins.metrics, plugins.drift_tests  # load plugins outside the timings
    bench_drift(plugins, 100_000)
    bench_drift(plugins, 1_000_000)
    bench_metrics(plugins, 1_000_000)
    for fig in FIGURES:
        print(json.dumps(fig))


if __name__ == "__main__":
    main()
