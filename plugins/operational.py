"""Operational metrics of a model version over the plan's window: latency and throughput.

They come from what the store keeps with every prediction: the model's latency (measured by the
inference server around scoring) and the serving time. Rows without a recorded latency are left
out of the quantiles. Not here, on purpose: ``error_rate`` (failed requests are not logged to the
store, only counted in each inference server's Prometheus ``/metrics``, which the monitor does
not read) and ``uptime`` (it needs known-answer probes). See docs/monitoring.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import MetricContext, MetricResult, MetricSpec, Window

NO_LATENCY: Final = "the window has no latencies (store without them, or a schema it does not know)"


def _latency_quantile(window: Window, q: float) -> MetricResult:
    if window.latency_ms is None:
        return MetricResult.not_enough_data(NO_LATENCY)
    latency = window.latency_ms[np.isfinite(window.latency_ms)]
    if len(latency) == 0:
        return MetricResult.not_enough_data("no row has a recorded latency")
    return MetricResult.ok(float(np.quantile(latency, q)), f"over {len(latency)} rows")


def _fixed_quantile(q: float) -> Callable[[Window, MetricContext], MetricResult]:
    def fn(window: Window, ctx: MetricContext) -> MetricResult:
        return _latency_quantile(window, q)

    return fn


def latency_quantile_ms(window: Window, ctx: MetricContext) -> MetricResult:
    q = ctx.params.get("q")
    if isinstance(q, bool) or not isinstance(q, int | float) or not 0 < q < 1:
        return MetricResult.error(f"params.q: expected a quantile between 0 and 1, got {q!r}")
    return _latency_quantile(window, float(q))


def throughput_rps(window: Window, ctx: MetricContext) -> MetricResult:
    """Rows per second over the plan's window length; for a window of rows (no length), over
    the time from its first row to its last."""
    if window.n_rows == 0:
        return MetricResult.not_enough_data("no rows")
    seconds = ctx.window_seconds
    how = "the plan window"
    if seconds is None:
        if window.created_at is None:
            return MetricResult.not_enough_data("the window has no serving times")
        seconds = float(window.created_at.max() - window.created_at.min())
        how = "first to last row"
    if seconds <= 0:
        return MetricResult.not_enough_data("the rows span no time")
    return MetricResult.ok(
        window.n_rows / seconds, f"{window.n_rows} rows over {seconds:g} s ({how})"
    )


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    for name, q in (("latency_p50_ms", 0.5), ("latency_p99_ms", 0.99)):
        register(
            MetricSpec(
                name,
                _fixed_quantile(q),
                False,
                "any",
                f"{q:.0%} quantile of the model's latency per prediction, ms",
                higher_is_better=False,
            )
        )
    register(
        MetricSpec(
            "latency_quantile_ms",
            latency_quantile_ms,
            False,
            "any",
            "quantile params.q (0 < q < 1) of the model's latency per prediction, ms",
            higher_is_better=False,
        )
    )
    register(
        MetricSpec(
            "throughput_rps",
            throughput_rps,
            False,
            "any",
            "predictions per second over the window",
        )
    )
