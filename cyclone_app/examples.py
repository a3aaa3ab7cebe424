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


BIKE_FEATURES = ["hour", "weekday", "holiday", "season", "temperature", "humidity", "wind"]
SEASONS = ("winter", "spring", "summer", "autumn")


def bike_frame(
    hours: int, *, start: str = "2026-01-01", seed: int = 0, lanes: float = 0.0
) -> pd.DataFrame:
    """Hourly bike-rental demand (`rentals`) from `start`, one row per hour.

    Weather follows the calendar (cold wet winters, warm summers). `lanes` (0..1) is how far a
    new network of bike lanes has been opened: commuters then ride at rush hour on workdays,
    and rain puts them off less -- a real change in how demand depends on the inputs, which a
    model trained before the lanes opened has never seen.
    """
    rng = np.random.default_rng(seed)
    when = pd.date_range(start, periods=hours, freq="h")
    day_of_year = when.dayofyear.to_numpy()
    hour = when.hour.to_numpy()
    weekday = when.weekday.to_numpy()
    holiday = ((rng.uniform(size=hours) < 0.03) | (weekday >= 5)).astype(int)
    season_index = ((when.month.to_numpy() % 12) // 3).astype(int)
    warmth = -np.cos(2 * np.pi * (day_of_year - 15) / 365.0)  # -1 mid-January, +1 mid-July
    temperature = (14 + 10 * warmth + 4 * np.sin(2 * np.pi * (hour - 9) / 24)).round(1)
    temperature = (temperature + rng.normal(0, 2.5, hours)).round(1)
    humidity = np.clip(70 - 15 * warmth + rng.normal(0, 12, hours), 15, 100).round(0)
    wind = np.clip(rng.gamma(2.0, 6.0, hours), 0, 70).round(1)

    workday = 1 - holiday
    rush = np.exp(-((hour - 8) ** 2) / 2.0) + np.exp(-((hour - 18) ** 2) / 3.0)
    leisure = np.exp(-((hour - 14) ** 2) / 10.0)
    base = 40 + 120 * workday * rush * (1 + 2.5 * lanes) + 90 * holiday * leisure + 25 * leisure
    comfort = np.clip(1 + 0.04 * (temperature - 15), 0.2, 1.8)
    wet = np.clip((humidity - 60) / 40, 0, 1)
    rain_penalty = 1 - (0.6 - 0.45 * lanes) * wet
    wind_penalty = np.clip(1 - 0.01 * wind, 0.3, 1)
    night = np.where((hour < 6) | (hour > 22), 0.25, 1.0)
    mean = base * comfort * rain_penalty * wind_penalty * night
    rentals = rng.poisson(np.maximum(mean, 0.5)).astype(float)
    return pd.DataFrame(
        {
            "hour": hour.astype(float),
            "weekday": weekday.astype(float),
            "holiday": holiday.astype(float),
            "season": np.asarray(SEASONS, dtype=object)[season_index],
            "temperature": temperature,
            "humidity": humidity,
            "wind": wind,
            "rentals": rentals,
        },
        index=when,
    )


def bike_pipeline(frame: pd.DataFrame) -> Any:
    """Gradient-boosted trees over the hourly features, one-hot season: a typical regressor."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    numeric = [f for f in BIKE_FEATURES if f != "season"]
    pre = ColumnTransformer(
        [
            ("num", "passthrough", numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore", categories=[list(SEASONS)]), ["season"]),
        ]
    )
    model = HistGradientBoostingRegressor(max_iter=150, learning_rate=0.1, random_state=0)
    pipeline = Pipeline([("pre", pre), ("gbr", model)])
    pipeline.fit(frame[BIKE_FEATURES], frame["rentals"])
    return pipeline
