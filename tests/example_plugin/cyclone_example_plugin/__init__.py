"""Example Cyclone plugin registering the ``example_mean_prediction`` metric."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import MetricContext, MetricResult, MetricSpec, Window


def mean_prediction(window: Window, ctx: MetricContext) -> MetricResult:
    values = np.asarray(window.predictions, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return MetricResult.not_enough_data("no finite predictions")
    return MetricResult.ok(float(values.mean()))


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    register(
        MetricSpec(
            name="example_mean_prediction",
            fn=mean_prediction,
            needs_labels=False,
            task="regression",
            description="mean of the window's predictions",
        )
    )
