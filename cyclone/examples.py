"""Small example data sets and fitted pipelines, for the demo, tests and benchmarks.

Data is generated here (no downloads), with a `shift` knob so the demo can make a
model go stale on purpose.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

CITIES = ("lisbon", "porto", "braga", "faro")


def credit_frame(rows: int, *, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    """Loan applications with a `defaulted` label; `shift` moves income and the rule."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 80, rows).round(0)
    income = rng.lognormal(10.3 - shift * 0.5, 0.5, rows).round(2)
    debt_ratio = np.clip(rng.beta(2, 5, rows) + shift * 0.2, 0, 1).round(4)
    city = rng.choice(CITIES, rows, p=(0.4, 0.3, 0.2, 0.1))
    city_risk = (
        pd.Series(city).map({"lisbon": 0.0, "porto": 0.3, "braga": -0.2, "faro": 0.5}).to_numpy()
    )
    # After a shift the relationship itself changes: debt matters less, age more.
    logit = (
        -1.0
        + (4.0 - 3.0 * shift) * (debt_ratio - 0.3)
        - 0.8 * (np.log(income) - 10.3)
        + city_risk
        + shift * 0.05 * (age - 45)
    )
    defaulted = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(int)
    return pd.DataFrame(
        {
            "age": age,
            "income": income,
            "debt_ratio": debt_ratio,
            "city": city,
            "defaulted": defaulted,
        }
    )


CREDIT_FEATURES = ["age", "income", "debt_ratio", "city"]


def credit_pipeline(frame: pd.DataFrame) -> Any:
    """A typical tabular classifier: scaled numerics + one-hot city → logistic regression."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), ["age", "income", "debt_ratio"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    pipeline = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=500))])
    pipeline.fit(frame[CREDIT_FEATURES], frame["defaulted"])
    return pipeline


def bench_regressor() -> tuple[Any, np.ndarray]:
    """The benchmark model: RandomForestRegressor(50 trees, depth 10) on 12 float features."""
    from sklearn.datasets import make_regression
    from sklearn.ensemble import RandomForestRegressor

    x, y = make_regression(n_samples=2000, n_features=12, noise=0.1, random_state=0)
    model = RandomForestRegressor(n_estimators=50, max_depth=10, random_state=0, n_jobs=1)
    model.fit(x, y)
    return model, x
