"""`cyclone model import --feature-names`: naming the columns of a pipeline fitted on numpy."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestRegressor
from typer.testing import CliRunner

from cyclone.models.repository import PIPELINE_FILE
from cyclone.models.schema import read_schema
from cyclone_app.cli import app

runner = CliRunner()
NAMES = ["age", "income", "visits"]


@pytest.fixture(scope="module")
def numpy_forest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A forest fitted on a bare numpy array, saved with joblib, and a CSV of named rows."""
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [rng.uniform(18, 80, 200).round(), rng.lognormal(10, 0.5, 200), rng.poisson(3, 200)]
    )
    model = RandomForestRegressor(n_estimators=5, max_depth=5, random_state=0)
    model.fit(x, x[:, 0] * 0.1 + x[:, 2])
    directory = tmp_path_factory.mktemp("numpy-forest")
    joblib.dump(model, directory / "forest.joblib")
    pd.DataFrame(x, columns=NAMES).to_csv(directory / "sample.csv", index=False)
    return directory / "forest.joblib", directory / "sample.csv"


def _import(pipeline: Path, repo: Path, *extra: str) -> tuple[int, str]:
    args = ["model", "import", str(pipeline), "--name", "forest", "--repository", str(repo)]
    result = runner.invoke(app, [*args, *extra])
    return result.exit_code, result.output


def test_feature_names_name_the_matrix_columns(
    numpy_forest: tuple[Path, Path], tmp_path: Path
) -> None:
    pipeline, sample = numpy_forest
    code, output = _import(
        pipeline, tmp_path, "--feature-names", ",".join(NAMES), "--sample", str(sample)
    )
    assert code == 0, output
    assert "imported forest version 1 (regression, 3 features)" in output
    schema = read_schema(tmp_path / "forest" / "1" / "model.yaml")
    assert schema.feature_names == NAMES
    assert schema.input_layout == "matrix"
    assert (tmp_path / "forest" / "1" / PIPELINE_FILE).is_file()


def test_without_feature_names_the_columns_are_f0_to_fn(
    numpy_forest: tuple[Path, Path], tmp_path: Path
) -> None:
    code, output = _import(numpy_forest[0], tmp_path)
    assert code == 0, output
    schema = read_schema(tmp_path / "forest" / "1" / "model.yaml")
    assert schema.feature_names == ["f0", "f1", "f2"]


def test_wrong_number_of_feature_names_refused(
    numpy_forest: tuple[Path, Path], tmp_path: Path
) -> None:
    code, output = _import(numpy_forest[0], tmp_path, "--feature-names", "age,income")
    assert code != 0
    assert "feature_names: 2 names given, the pipeline takes 3 features" in output
    assert not (tmp_path / "forest").exists()
