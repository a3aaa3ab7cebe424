"""LoadedModel: every input rule, with the field named; loading failures."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import yaml

from cyclone.errors import InvalidArgument, ModelLoadError
from cyclone.models.repository import ModelRepository
from services.inference.model import LoadedModel

if TYPE_CHECKING:
    from tests.conftest import ModelRepo

CREDIT = "credit"
BENCH = "bench"


@pytest.fixture(scope="module")
def credit(model_repo: ModelRepo) -> LoadedModel:
    return LoadedModel(ModelRepository(model_repo.root).files(CREDIT), max_batch_rows=50)


@pytest.fixture(scope="module")
def bench(model_repo: ModelRepo) -> LoadedModel:
    return LoadedModel(ModelRepository(model_repo.root).files(BENCH))


def _columns(model_repo: ModelRepo, rows: int = 3, start: int = 0) -> dict[str, np.ndarray]:
    frame = model_repo.credit_rows.iloc[start : start + rows]
    return {
        "age": frame["age"].to_numpy(dtype=np.float64),
        "income": frame["income"].to_numpy(dtype=np.float64),
        "debt_ratio": frame["debt_ratio"].to_numpy(dtype=np.float64),
        "city": frame["city"].to_numpy(dtype=object),
    }


def _copy_model(model_repo: ModelRepo, tmp_path: Path, name: str = CREDIT) -> Path:
    directory = tmp_path / "repo" / name / "1"
    shutil.copytree(model_repo.root / name / "1", directory)
    return directory


def _edit_schema(directory: Path, edit: Any) -> None:
    path = directory / "model.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def _load(directory: Path, **kwargs: Any) -> LoadedModel:
    return LoadedModel(
        ModelRepository(directory.parent.parent).files(directory.parent.name), **kwargs
    )


# -- predictions --------------------------------------------------------------------------------


def test_classifier_predictions_match_sklearn(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo, rows=40)
    outputs = credit.predict(columns)
    frame = model_repo.credit_rows.iloc[:40]
    expected_proba = model_repo.credit_pipeline.predict_proba(frame)
    expected_labels = model_repo.credit_pipeline.predict(frame).astype(str)
    assert outputs.rows == 40
    assert outputs.values is None
    assert outputs.probabilities is not None and outputs.labels is not None
    np.testing.assert_allclose(outputs.probabilities, expected_proba, atol=1e-5)
    np.testing.assert_allclose(outputs.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert list(outputs.labels) == list(expected_labels)
    assert set(outputs.labels) <= set(credit.schema.class_labels)


def test_regressor_predictions_match_sklearn(bench: LoadedModel, model_repo: ModelRepo) -> None:
    x = model_repo.bench_x[:30]
    outputs = bench.predict({f"f{i}": x[:, i] for i in range(x.shape[1])})
    assert outputs.values is not None and outputs.labels is None
    np.testing.assert_allclose(
        outputs.values, model_repo.bench_model.predict(x), rtol=1e-4, atol=1e-3
    )


def test_validate_returns_row_count(credit: LoadedModel, model_repo: ModelRepo) -> None:
    assert credit.validate(_columns(model_repo, rows=7)) == 7


def test_numeric_feature_accepts_integers(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo, rows=2)
    columns["age"] = np.array([30, 40], dtype=np.int64)
    assert credit.predict(columns).rows == 2


def test_unseen_category_reaches_lenient_model(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo, rows=2)
    columns["city"] = np.array(["coimbra", "lisbon"], dtype=object)
    assert credit.predict(columns).rows == 2


# -- bad input ----------------------------------------------------------------------------------


def _expect_invalid(model: LoadedModel, columns: dict[str, np.ndarray], *fragments: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        model.predict(columns)
    message = info.value.message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_feature(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    del columns["income"]
    assert _expect_invalid(credit, columns) == "features.income: missing"


def test_unknown_feature(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["salary"] = np.ones(3)
    _expect_invalid(
        credit, columns, "features.salary: unknown feature", "age, income, debt_ratio, city"
    )


def test_text_for_numeric_feature(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["age"] = np.array(["30", "40", "50"], dtype=object)
    _expect_invalid(credit, columns, "features.age: expected numbers, got text")


def test_numbers_for_categorical_feature(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["city"] = np.array([1.0, 2.0, 3.0])
    _expect_invalid(credit, columns, "features.city: expected strings, got numbers")


def test_two_dimensional_column(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["age"] = columns["age"].reshape(-1, 1)
    _expect_invalid(credit, columns, "features.age: expected one value per row")


def test_mismatched_column_lengths(credit: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["debt_ratio"] = columns["debt_ratio"][:2]
    _expect_invalid(
        credit, columns, "features.debt_ratio: has 2 values, but the other features have 3"
    )


def test_mismatched_first_column_is_the_one_named(
    credit: LoadedModel, model_repo: ModelRepo
) -> None:
    """The first feature short (REST `[null]` reads as no value): it is named, not the next."""
    columns = _columns(model_repo)
    first = credit.schema.feature_names[0]
    columns[first] = columns[first][:0]
    _expect_invalid(
        credit, columns, f"features.{first}: has 0 values, but the other features have 3"
    )


@pytest.mark.parametrize(("value", "shown"), [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_not_allowed(
    credit: LoadedModel, model_repo: ModelRepo, value: float, shown: str
) -> None:
    columns = _columns(model_repo)
    columns["income"] = columns["income"].copy()
    columns["income"][1] = value
    _expect_invalid(credit, columns, f"features.income: row 1 is {shown}")


def test_no_rows(credit: LoadedModel, bench: LoadedModel) -> None:
    _expect_invalid(
        bench,
        {f"f{i}": np.array([], dtype=np.float64) for i in range(12)},
        "features: the request has no rows",
    )
    empty = {
        "age": np.array([], dtype=np.float64),
        "income": np.array([], dtype=np.float64),
        "debt_ratio": np.array([], dtype=np.float64),
        "city": np.array([], dtype=object),
    }
    _expect_invalid(credit, empty, "features: the request has no rows")


def test_no_columns_says_the_body_needs_the_features_wrapper(credit: LoadedModel) -> None:
    _expect_invalid(
        credit,
        {},
        "features: none given; model 'credit' takes age, income, debt_ratio, city",
        'a REST body needs them under "features": {"features": {"age": {"numbers": [...]}, '
        '"income": {"numbers": [...]}, ...}}',
    )


def test_more_rows_than_max_batch_rows(credit: LoadedModel, model_repo: ModelRepo) -> None:
    assert credit.validate(_columns(model_repo, rows=50)) == 50
    _expect_invalid(
        credit, _columns(model_repo, rows=51), "features: 51 rows is more than the limit of 50"
    )


@pytest.fixture(scope="module")
def constrained(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """The classifier with limits in model.yaml: age in [18, 100], income may be NaN, known cities."""
    directory = _copy_model(model_repo, tmp_path_factory.mktemp("constrained"))

    def edit(raw: dict[str, Any]) -> None:
        for feature in raw["features"]:
            if feature["name"] == "age":
                feature.update(min=18, max=100)
            if feature["name"] == "income":
                feature["allow_missing"] = True
            if feature["name"] == "city":
                feature["categories"] = ["lisbon", "porto", "braga", "faro"]

    _edit_schema(directory, edit)
    return _load(directory)


def test_value_out_of_range(constrained: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["age"] = np.array([30.0, 17.0, 50.0])
    _expect_invalid(constrained, columns, "features.age: row 1 is 17.0", "[18.0, 100.0]")
    columns["age"] = np.array([30.0, 40.0, 100.5])
    _expect_invalid(constrained, columns, "features.age: row 2")
    columns["age"] = np.array([18.0, 100.0, 55.0])
    assert constrained.predict(columns).rows == 3


def test_nan_allowed_where_schema_allows_missing(
    constrained: LoadedModel, model_repo: ModelRepo
) -> None:
    columns = _columns(model_repo)
    columns["income"] = np.array([np.nan, 30000.0, 40000.0])
    # The schema lets NaN through validation; the (non-imputing) model then sees it.
    assert constrained.validate(columns) == 3


def test_inf_rejected_even_where_missing_allowed(
    constrained: LoadedModel, model_repo: ModelRepo
) -> None:
    columns = _columns(model_repo)
    columns["income"] = np.array([np.nan, np.inf, 40000.0])
    _expect_invalid(constrained, columns, "features.income: row 1 is inf")


def test_unknown_category(constrained: LoadedModel, model_repo: ModelRepo) -> None:
    columns = _columns(model_repo)
    columns["city"] = np.array(["lisbon", "porto", "coimbra"], dtype=object)
    _expect_invalid(
        constrained, columns, "features.city: row 2 has unknown category 'coimbra'", "lisbon"
    )


# -- loading ------------------------------------------------------------------------------------


def test_corrupt_onnx_is_a_load_error(model_repo: ModelRepo, tmp_path: Path) -> None:
    directory = _copy_model(model_repo, tmp_path)
    (directory / "model.onnx").write_bytes(b"this is not an onnx model")
    _edit_schema(directory, lambda raw: raw.pop("sha256"))
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load it") as info:
        _load(directory)
    assert "model.onnx" in info.value.message


def test_sha256_mismatch_detected(model_repo: ModelRepo, tmp_path: Path) -> None:
    directory = _copy_model(model_repo, tmp_path)
    data = bytearray((directory / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (directory / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"sha256 .* does not match model\.yaml"):
        _load(directory)


def test_schema_not_matching_onnx_inputs(model_repo: ModelRepo, tmp_path: Path) -> None:
    directory = _copy_model(model_repo, tmp_path)
    _edit_schema(
        directory, lambda raw: raw["features"].append({"name": "extra", "kind": "numeric"})
    )
    with pytest.raises(ModelLoadError, match="features do not match the ONNX inputs"):
        _load(directory)


def test_matrix_layout_needs_input_tensor(model_repo: ModelRepo, tmp_path: Path) -> None:
    directory = _copy_model(model_repo, tmp_path)
    _edit_schema(directory, lambda raw: raw.update(input_layout="matrix"))
    with pytest.raises(ModelLoadError, match="input_layout matrix"):
        _load(directory)


def test_missing_onnx_file(model_repo: ModelRepo, tmp_path: Path) -> None:
    directory = _copy_model(model_repo, tmp_path)
    (directory / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx is missing"):
        ModelRepository(directory.parent.parent).files(CREDIT)


def test_name_and_version_come_from_directory(model_repo: ModelRepo, tmp_path: Path) -> None:
    directory = tmp_path / "repo" / "renamed" / "7"
    shutil.copytree(model_repo.root / CREDIT / "1", directory)
    loaded = _load(directory)
    assert (loaded.name, loaded.version) == ("renamed", "7")
