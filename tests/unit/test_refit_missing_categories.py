"""Retraining a model that imputes missing categories, from rows as they are logged ("" where
a request had no category): the refit challenger is fitted and scored with NaN there, and the
version written from it imports, passes parity and probes with the marker."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cyclone.models.convert import import_pipeline
from cyclone.models.registration import PROBES_FILE
from cyclone.models.schema import MISSING_CATEGORY
from cyclone.plan import MetricRef
from services.trainer.fit import LABEL, FitTask, fit_and_evaluate, write_version


def _world(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(18, 80, rows),
            "plan": rng.choice(["basic", "plus", "pro"], rows).astype(object),
        }
    )
    effect = frame["plan"].map({"basic": -1.0, "plus": 0.0, "pro": 1.5}).to_numpy()
    frame["churned"] = (effect + 0.03 * (frame["age"] - 45) + rng.logistic(size=rows) > 0).astype(
        np.int64
    )
    frame.loc[frame.index % 5 == 0, "plan"] = np.nan
    return frame


def _logged(frame: pd.DataFrame) -> pd.DataFrame:
    """As the store gives rows back: the marker for a missing category, labels as text."""
    return pd.DataFrame(
        {
            "age": frame["age"],
            "plan": frame["plan"].fillna(MISSING_CATEGORY),
            LABEL: frame["churned"].astype(str),
        }
    )


def test_refit_of_an_imputing_pipeline_on_logged_rows(tmp_path: Path) -> None:
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("encode", OneHotEncoder(handle_unknown="error")),
        ]
    )
    pre = ColumnTransformer([("num", StandardScaler(), ["age"]), ("cat", categorical, ["plan"])])
    champion = Pipeline([("pre", pre), ("model", LogisticRegression())])
    old = _world(400, 1)
    champion.fit(old[["age", "plan"]], old["churned"])
    directory, schema, _ = import_pipeline(champion, "churn", tmp_path, sample=old)

    new = _logged(_world(600, 2))
    assert (new["plan"] == MISSING_CATEGORY).any()
    outcome = fit_and_evaluate(
        FitTask(
            model="churn",
            task="classification",
            features=(("age", "numeric"), ("plan", "categorical")),
            train=new.iloc[:400],
            holdout=new.iloc[400:],
            champion_dir=str(directory),
            family="refit",
            params={},
            metric=MetricRef("accuracy"),
            margin=0.0,
            confidence=0.95,
            resamples=200,
        )
    )
    challenger = pickle.loads(outcome.pipeline)
    # Fitted on NaN where the logs said "": imputed before encoding, so the encoder never
    # learned "" as a category of its own (served, "" is imputed: the two must agree).
    branch = challenger.named_steps["pre"].named_transformers_["cat"]
    assert MISSING_CATEGORY not in branch.named_steps["encode"].categories_[0].tolist()
    assert branch.named_steps["impute"].statistics_.tolist() != [MISSING_CATEGORY]
    assert outcome.challenger_metrics["accuracy"] > 0.6

    written = write_version(outcome.pipeline, "churn", str(tmp_path), "2", new.iloc[:300], extra={})
    probes = json.loads((Path(written.directory) / PROBES_FILE).read_text())
    assert MISSING_CATEGORY in [row["plan"] for row in probes["rows"]]
    assert "nan" not in [row["plan"] for row in probes["rows"]]
    assert schema.features[1].allow_missing
