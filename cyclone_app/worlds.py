"""Generated worlds that change, for the retraining loop's scenario tests and `bench/loop.py`.

A world is a binary classification over four numeric features and one categorical one, whose
label rule (a logistic model) and input distributions are those of its phase: ``before`` the
change, ``after`` it. Each scenario changes one thing:

- ``stable``: nothing.
- ``concept``: the same inputs, a new rule (``x1`` matters the other way round, ``x2`` more).
- ``covariate_benign``: ``x4``, which the rule ignores, moves: drift that does not hurt.
- ``broken``: ``x1`` is stuck at 0 (a sensor that broke): a data fault, not a new world.
- ``gradual``: the concept's new rule fades in over ``ramp`` rows.
- ``covariate_harmful``: ``x4`` moves to where the rule bends (a square term the old data
  barely showed): the same rule, inputs the model never learned.
- ``prior``: the label's base rate moves (far more positives at the same inputs).

Seeds change the coefficients a little as well as the noise, so tests do not tune to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

Scenario = Literal[
    "stable", "concept", "covariate_benign", "broken", "gradual", "covariate_harmful", "prior"
]
SCENARIOS: tuple[Scenario, ...] = (
    "stable",
    "concept",
    "covariate_benign",
    "broken",
    "gradual",
    "covariate_harmful",
    "prior",
)
FEATURES = ["x1", "x2", "x3", "x4", "region"]
LABEL = "y"
REGIONS = ("north", "south", "east")
# Scenarios after which retraining can help, and those where it must not happen.
RECOVERABLE: tuple[Scenario, ...] = ("concept", "gradual", "covariate_harmful", "prior")
# The feature a RED's explanation should put first: what changed, or what broke (a prior shift
# has none).
CAUSE = {"concept": "x1", "gradual": "x1", "broken": "x1", "covariate_harmful": "x4"}


@dataclass(frozen=True)
class World:
    scenario: Scenario
    seed: int
    ramp: int = 1500

    def _coefficients(self, rng: np.random.Generator) -> tuple[Any, Any]:
        jitter = rng.normal(0.0, 0.15, 3)
        old = np.array([2.0, 1.0, -1.0]) + jitter
        new = np.array([-2.0, 2.0, -1.0]) + jitter
        return old, new

    def rows(self, n: int, start: int, rng: np.random.Generator) -> pd.DataFrame:
        """Rows ``start .. start + n`` counted from the change (negative: before it)."""
        old, new = self._coefficients(np.random.default_rng(self.seed))
        position = np.arange(start, start + n)
        after = position >= 0
        x = rng.normal(0.0, 1.0, (n, 4))
        region = rng.choice(REGIONS, n, p=(0.5, 0.3, 0.2))
        if self.scenario in ("covariate_benign", "covariate_harmful"):
            x[after, 3] += 2.5
        if self.scenario == "concept":
            mix = after.astype(np.float64)
        elif self.scenario == "gradual":
            mix = np.clip(position / self.ramp, 0.0, 1.0)
        else:
            mix = np.zeros(n)
        w = (1 - mix)[:, None] * old[None, :] + mix[:, None] * new[None, :]
        effect = pd.Series(region).map({"north": 0.0, "south": 0.8, "east": -0.8}).to_numpy()
        logit = 1.5 * ((w * x[:, :3]).sum(axis=1) + effect)
        if self.scenario == "prior":
            logit += 3.5 * after
        if self.scenario == "covariate_harmful":
            # Flat where the old inputs were (|x4| < 1.5), steep where they go.
            logit += 2.0 * np.clip(x[:, 3] - 1.5, 0.0, None) ** 2
        y = (rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-logit))).astype(int)
        if self.scenario == "broken":
            x[after, 0] = 0.0  # after the label was drawn: the world is the same, the data not
        frame = pd.DataFrame(x, columns=FEATURES[:4])
        frame["region"] = region
        frame[LABEL] = y.astype(str)
        return frame


def stream(world: World, before: int, after: int) -> pd.DataFrame:
    """``before`` rows of the old world then ``after`` rows from the change on, oldest first."""
    rng = np.random.default_rng(world.seed + 1000)
    return pd.concat(
        [world.rows(before, -before, rng), world.rows(after, 0, rng)], ignore_index=True
    )


def champion_pipeline(frame: pd.DataFrame) -> Any:
    """What a user would have imported: scaling + one-hot + logistic regression."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    pipeline = Pipeline(
        [
            (
                "prep",
                ColumnTransformer(
                    [
                        ("num", StandardScaler(), FEATURES[:4]),
                        ("cat", OneHotEncoder(handle_unknown="ignore"), ["region"]),
                    ]
                ),
            ),
            ("clf", LogisticRegression(max_iter=500)),
        ]
    )
    return pipeline.fit(frame[FEATURES], frame[LABEL])
