"""The `cyclone` command line: model import, serve inference, predict, models."""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from typer.testing import CliRunner

from cyclone.models.repository import ModelRepository
from cyclone.models.schema import read_schema
from cyclone_app.cli import app

pytestmark = pytest.mark.integration

runner = CliRunner()

if TYPE_CHECKING:
    from tests.conftest import ModelRepo

CREDIT = "credit"


@pytest.fixture(scope="module")
def pipeline_file(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipelines") / "credit.joblib"
    joblib.dump(model_repo.credit_pipeline, path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- cyclone model import -------------------------------------------------------------------------


def test_model_import_good_pipeline(
    pipeline_file: Path, model_repo: ModelRepo, tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    sample = tmp_path / "sample.csv"
    model_repo.credit_frame.head(100).to_csv(sample, index=False)
    result = runner.invoke(
        app,
        [
            "model",
            "import",
            str(pipeline_file),
            "--name",
            "credit",
            "--repository",
            str(repo),
            "--sample",
            str(sample),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "imported credit version 1 (classification, 4 features)" in result.output
    assert "on 100 rows" in result.output
    schema = read_schema(repo / "credit" / "1" / "model.yaml")
    assert schema.feature_names == ["age", "income", "debt_ratio", "city"]
    assert (repo / "credit" / "1" / "model.onnx").stat().st_size > 0

    again = runner.invoke(
        app, ["model", "import", str(pipeline_file), "--name", "credit", "--repository", str(repo)]
    )
    assert again.exit_code == 0, again.output
    assert "version 2" in again.output
    assert ModelRepository(repo).versions("credit") == ["1", "2"]

    clash = runner.invoke(
        app,
        [
            "model",
            "import",
            str(pipeline_file),
            "--name",
            "credit",
            "--repository",
            str(repo),
            "--version",
            "1",
        ],
    )
    assert clash.exit_code == 2
    assert "already exists" in clash.output


def test_model_import_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "model",
            "import",
            str(tmp_path / "absent.joblib"),
            "--name",
            "m",
            "--repository",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2
    assert "error: PIPELINE:" in result.output
    assert "does not exist" in result.output


def test_model_import_not_joblib(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    path.write_text("definitely not a pickle")
    result = runner.invoke(
        app, ["model", "import", str(path), "--name", "m", "--repository", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "is not a joblib file" in result.output
    assert not (tmp_path / "r").exists()


def test_model_import_bad_name(pipeline_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "model",
            "import",
            str(pipeline_file),
            "--name",
            "bad name!",
            "--repository",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 2
    assert "name: 'bad name!' is not a valid name" in result.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_model_import_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "dict.joblib"
    joblib.dump({"weights": [1, 2, 3]}, path)
    result = runner.invoke(
        app, ["model", "import", str(path), "--name", "m", "--repository", str(tmp_path / "r")]
    )
    assert result.exit_code == 2, result.output
    assert "neither a classifier nor a regressor" in result.output


def test_serve_inference_bad_repository(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["serve", "inference", "--model-repository", str(tmp_path / "absent")]
    )
    assert result.exit_code == 2
    assert "--model-repository" in result.output and "is not a directory" in result.output


def test_serve_inference_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "cyclone.yaml"
    config.write_text("prot: 1\n")
    result = runner.invoke(app, ["serve", "inference", "--config", str(config)])
    assert result.exit_code == 2
    assert "unknown setting(s) prot" in result.output


# -- against a server started with `cyclone serve inference` ----------------------------------------


def test_predict_json_matches_sklearn(cli_server: str, model_repo: ModelRepo) -> None:
    frame = model_repo.credit_rows.iloc[:3]
    rows = [json.dumps(r) for r in frame.to_dict(orient="records")]
    args = ["predict", "--model", CREDIT, "--address", cli_server, "--json"]
    for row in rows:
        args += ["--row", row]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(lines) == 3
    expected_proba = model_repo.credit_pipeline.predict_proba(frame)
    expected_labels = model_repo.credit_pipeline.predict(frame)
    for line, proba, label in zip(lines, expected_proba, expected_labels, strict=True):
        assert uuid.UUID(line["prediction_id"]).version == 7
        assert line["label"] == str(label)
        np.testing.assert_allclose(
            [line["probabilities"]["0"], line["probabilities"]["1"]], proba, atol=1e-5
        )
    assert len({line["prediction_id"] for line in lines}) == 3


def test_predict_regressor_from_file(
    cli_server: str, model_repo: ModelRepo, tmp_path: Path
) -> None:
    x = model_repo.bench_x[:4]
    path = tmp_path / "rows.jsonl"
    path.write_text(
        "\n".join(json.dumps({f"f{i}": v for i, v in enumerate(row)}) for row in x.tolist()) + "\n"
    )
    result = runner.invoke(
        app, ["predict", "--model", "bench", "--address", cli_server, "--file", str(path), "--json"]
    )
    assert result.exit_code == 0, result.output
    values = [json.loads(line)["value"] for line in result.output.strip().splitlines()]
    np.testing.assert_allclose(values, model_repo.bench_model.predict(x), rtol=1e-4, atol=1e-3)


def test_predict_table_output(cli_server: str, model_repo: ModelRepo) -> None:
    row = json.dumps(model_repo.credit_rows.iloc[0].to_dict())
    result = runner.invoke(
        app, ["predict", "--model", CREDIT, "--address", cli_server, "--row", row]
    )
    assert result.exit_code == 0, result.output
    assert "prediction_id" in result.output
    assert (
        str(model_repo.credit_pipeline.predict(model_repo.credit_rows.iloc[:1])[0]) in result.output
    )


def test_predict_server_error_is_reported(cli_server: str) -> None:
    result = runner.invoke(
        app,
        ["predict", "--model", CREDIT, "--address", cli_server, "--row", '{"age": 30}', "--json"],
    )
    assert result.exit_code == 1
    assert "error: INVALID_ARGUMENT: features." in result.output
    missing = runner.invoke(
        app, ["predict", "--model", "nope", "--address", cli_server, "--row", '{"a": 1}']
    )
    assert missing.exit_code == 1
    assert "NOT_FOUND" in missing.output


@pytest.mark.parametrize(
    ("row", "message"),
    [("{not json", "--row[0]: not JSON"), ("[1, 2]", "--row[0]: expected a JSON object")],
)
def test_predict_bad_row(row: str, message: str) -> None:
    # No server needed: the rows are checked before connecting.
    result = runner.invoke(
        app, ["predict", "--model", CREDIT, "--address", "127.0.0.1:1", "--row", row]
    )
    assert result.exit_code == 2
    assert message in result.output


def test_predict_without_rows() -> None:
    result = runner.invoke(app, ["predict", "--model", CREDIT])
    assert result.exit_code == 2
    assert "--row" in result.output


def test_predict_server_not_reachable() -> None:
    address = f"127.0.0.1:{_free_port()}"
    result = runner.invoke(
        app, ["predict", "--model", CREDIT, "--address", address, "--row", '{"age": 1}']
    )
    assert result.exit_code == 1
    assert (
        f"error: nothing answered at the public listener (Envoy) at {address} (from --address)"
        in result.output
    )
    assert "start it with `cyclone up`" in result.output


def test_models_lists_served_models(cli_server: str) -> None:
    result = runner.invoke(app, ["models", "--address", cli_server])
    assert result.exit_code == 0, result.output
    lines = sorted(result.output.strip().splitlines())
    assert lines[0].startswith("bench 1  [f0, f1, f2")
    assert lines[1] == "credit 1  [age, income, debt_ratio, city]"


def test_models_server_not_reachable() -> None:
    result = runner.invoke(app, ["models", "--address", f"127.0.0.1:{_free_port()}"])
    assert result.exit_code == 1
    assert "error: nothing answered at" in result.output and "`cyclone up`" in result.output


def test_serve_single_model_and_stop_on_sigterm(
    model_repo: ModelRepo, tmp_path: Path, cli_server_process_factory: Any
) -> None:
    with cli_server_process_factory(
        model_repo.root, tmp_path / "server.log", "--model", CREDIT
    ) as server:
        result = runner.invoke(app, ["models", "--address", server.address])
        assert result.exit_code == 0, result.output
        assert result.output.strip().splitlines() == ["credit 1  [age, income, debt_ratio, city]"]
        server.process.terminate()
        assert server.process.wait(15) == 0, server.log_path.read_text()
    assert "shutting down" in (tmp_path / "server.log").read_text()


# -- CSV with text categories: import and predict -------------------------------------------


def _zip_pipeline(tmp_path: Path) -> tuple[Any, pd.DataFrame, Path]:
    """A churn model whose categories look like numbers ("02134") and are sometimes missing
    (an empty CSV field); its rows as a CSV file."""
    rng = np.random.default_rng(5)
    rows = 240
    frame = pd.DataFrame(
        {
            "monthly income": rng.normal(50, 10, rows),
            "zip": rng.choice(["02134", "10001", "94105"], rows).astype(object),
            "plan": rng.choice(["a", "b"], rows).astype(object),
        }
    )
    frame.loc[frame.index % 6 == 0, "plan"] = np.nan
    frame["churn"] = (
        (frame["monthly income"] > 50) ^ (frame["zip"] == "02134") ^ (frame["plan"] == "b")
    ).astype(int)
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="most_frequent")),
            ("encode", OneHotEncoder(handle_unknown="error")),
        ]
    )
    pre = ColumnTransformer(
        [("num", StandardScaler(), ["monthly income"]), ("cat", categorical, ["zip", "plan"])]
    )
    pipeline = Pipeline([("pre", pre), ("model", LogisticRegression())])
    pipeline.fit(frame[["monthly income", "zip", "plan"]], frame["churn"])
    path = tmp_path / "sample.csv"
    frame.to_csv(path, index=False)
    return pipeline, frame, path


def test_csv_categories_that_look_like_numbers_import_and_predict(
    tmp_path: Path,
    cli_server_process_factory: Callable[..., contextlib.AbstractContextManager[Any]],
) -> None:
    pipeline, frame, sample = _zip_pipeline(tmp_path)
    joblib.dump(pipeline, tmp_path / "zip.joblib")
    repo = tmp_path / "models"
    imported = runner.invoke(
        app,
        [
            *("model", "import", str(tmp_path / "zip.joblib"), "--name", "zips"),
            *("--repository", str(repo), "--sample", str(sample), "--label-column", "churn"),
        ],
    )
    assert imported.exit_code == 0, imported.output
    rows = tmp_path / "rows.csv"
    frame.drop(columns="churn").head(12).to_csv(rows, index=False)
    lines_written = rows.read_text().splitlines()
    assert any(",02134," in line for line in lines_written)
    assert lines_written[1].endswith(",")  # row 0 has no plan: an empty field
    with cli_server_process_factory(repo, tmp_path / "serve.log") as server:
        result = runner.invoke(
            app,
            [
                *("predict", "--model", "zips", "--address", server.address),
                *("--file", str(rows), "--json"),
            ],
        )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    expected = pipeline.predict_proba(frame[["monthly income", "zip", "plan"]].head(12))
    got = [[line["probabilities"]["0"], line["probabilities"]["1"]] for line in lines]
    np.testing.assert_allclose(got, expected, atol=1e-5)
