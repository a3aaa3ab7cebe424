"""Feature validity: missing values, out-of-range values, unseen categories, type errors.

Each metric is a share of cells over the checked features (all of them, or ``params:
{features: [...]}``); ``detail`` names the worst feature so an alert says where to look.
Ranges come from the schema (``model.yaml``) when declared, else from the reference min/max.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import (
    CategoricalProfile,
    MetricContext,
    MetricResult,
    MetricSpec,
    NumericProfile,
    Window,
    to_float,
)


def _missing(name: str, values: npt.NDArray[np.generic], ctx: MetricContext) -> tuple[int, int]:
    import pandas as pd  # lazy: the monitor loads every plugin at start; pandas costs ~0.3 s

    return int(pd.isna(values).sum()), len(values)


def _kind(name: str, ctx: MetricContext) -> str | None:
    ref = ctx.reference
    if ref is None:
        return None
    if name in ref.schema:
        return ref.schema[name].kind
    col = ref.features.get(name)
    return None if col is None else col.kind


def _out_of_range(
    name: str, values: npt.NDArray[np.generic], ctx: MetricContext
) -> tuple[int, int] | None:
    ref = ctx.reference
    if ref is None or _kind(name, ctx) != "numeric":
        return None
    schema = ref.schema.get(name)
    col = ref.features.get(name)
    lo = schema.min if schema and schema.min is not None else None
    hi = schema.max if schema and schema.max is not None else None
    if isinstance(col, NumericProfile) and col.count > 0:
        lo = col.min if lo is None else lo
        hi = col.max if hi is None else hi
    if lo is None and hi is None:
        return None
    x = to_float(values)
    x = x[np.isfinite(x)]
    bad = np.zeros(len(x), dtype=bool)
    if lo is not None:
        bad |= x < lo
    if hi is not None:
        bad |= x > hi
    return int(bad.sum()), len(x)


def _unseen(
    name: str, values: npt.NDArray[np.generic], ctx: MetricContext
) -> tuple[int, int] | None:
    ref = ctx.reference
    if ref is None or _kind(name, ctx) != "categorical":
        return None
    schema = ref.schema.get(name)
    col = ref.features.get(name)
    if schema is not None and schema.categories is not None:
        known: list[str] = list(schema.categories)
    elif isinstance(col, CategoricalProfile):
        known = list(col.frequencies)
    else:
        return None
    import pandas as pd  # lazy, see _missing

    series = pd.Series(np.asarray(values, dtype=object))
    present = series[~series.isna()].astype(str)
    return int((~present.isin(known)).sum()), len(present)


def _type_errors(
    name: str, values: npt.NDArray[np.generic], ctx: MetricContext
) -> tuple[int, int] | None:
    if ctx.reference is not None and _kind(name, ctx) != "numeric":
        return None
    if values.dtype.kind in "fiub":
        return 0, len(values)
    if ctx.reference is None:
        return None
    import pandas as pd  # lazy, see _missing

    # Present values that do not parse as numbers.
    present = ~pd.isna(values)
    parsed = pd.to_numeric(pd.Series(values), errors="coerce").notna().to_numpy()
    return int((present & ~parsed).sum()), int(present.sum())


def _share_metric(
    check: Callable[[str, npt.NDArray[np.generic], MetricContext], tuple[int, int] | None],
    what: str,
) -> Callable[[Window, MetricContext], MetricResult]:
    def fn(window: Window, ctx: MetricContext) -> MetricResult:
        wanted = ctx.params.get("features")
        names = list(window.features) if wanted in (None, "all") else list(wanted)
        bad_total = seen_total = 0
        worst: tuple[float, str] = (-1.0, "")
        for name in names:  # a loop over features, not rows
            values = window.features.get(name)
            if values is None:
                continue
            got = check(name, np.asarray(values), ctx)
            if got is None or got[1] == 0:
                continue
            bad, seen = got
            bad_total += bad
            seen_total += seen
            worst = max(worst, (bad / seen, name))
        if seen_total == 0:
            return MetricResult.not_enough_data(f"no features to check for {what}")
        detail = f"worst: {worst[1]} ({worst[0]:.2%})" if worst[0] > 0 else ""
        return MetricResult.ok(bad_total / seen_total, detail)

    return fn


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    specs = (
        ("feature_missing_rate", _missing, "missing values"),
        ("feature_out_of_range_rate", _out_of_range, "numeric values outside the allowed range"),
        ("feature_unseen_category_rate", _unseen, "categories not seen in training"),
        ("feature_type_error_rate", _type_errors, "non-numeric values in numeric features"),
    )
    for name, check, what in specs:
        register(
            MetricSpec(
                name,
                _share_metric(check, what),
                False,
                "any",
                f"share of cells with {what}",
                higher_is_better=False,
            )
        )
