"""`model.yaml`: parse errors name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cyclone.errors import ModelLoadError
from cyclone.models.schema import (
    FeatureSchema,
    ModelSchema,
    parse_schema,
    read_schema,
    validate_name,
)


def _good() -> dict[str, Any]:
    return {
        "name": "credit",
        "version": "3",
        "task": "classification",
        "input_layout": "columns",
        "features": [
            {"name": "age", "kind": "numeric", "dtype": "float32", "min": 18, "max": 99},
            {"name": "city", "kind": "categorical", "categories": ["lisbon", "porto"]},
        ],
        "class_labels": [0, 1],
        "sha256": "abc",
    }


def test_parse_good_schema() -> None:
    schema = parse_schema(_good(), "model.yaml")
    assert schema.task == "classification"
    assert schema.feature_names == ["age", "city"]
    assert schema.features[0].min == 18.0 and schema.features[0].max == 99.0
    assert schema.features[1].dtype == "string"
    assert schema.features[1].categories == ("lisbon", "porto")
    assert schema.class_labels == ("0", "1")
    assert schema.extra == {"sha256": "abc"}


def test_defaults_kind_numeric_and_layout_columns() -> None:
    raw = {"task": "regression", "features": [{"name": "x"}]}
    schema = parse_schema(raw, "m.yaml")
    assert schema.input_layout == "columns"
    assert schema.features[0] == FeatureSchema("x", "numeric", "float32")


def test_write_read_round_trip(tmp_path: Path) -> None:
    schema = parse_schema(_good(), "model.yaml")
    path = tmp_path / "model.yaml"
    schema.write(path)
    assert read_schema(path) == schema


def _mutate(**changes: Any) -> dict[str, Any]:
    raw = _good()
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (_mutate(task="clustering"), "task"),
        (_mutate(task=None), "task"),
        (_mutate(input_layout="rows"), "input_layout"),
        (_mutate(features=[]), "features"),
        (_mutate(features={"age": 1}), "features"),
        (_mutate(features=None), "features"),
        (_mutate(features=[{"kind": "numeric"}]), "features[0]"),
        (_mutate(features=["age"]), "features[0]"),
        (_mutate(features=[{"name": "a"}, {"name": "b", "kind": "text"}]), "features[1].kind"),
        (_mutate(features=[{"name": "a", "dtype": "string"}]), "features[0].dtype"),
        (
            _mutate(features=[{"name": "a", "kind": "categorical", "dtype": "int64"}]),
            "features[0].dtype",
        ),
        (_mutate(features=[{"name": "a", "min": "low"}]), "features[0]"),
        (_mutate(features=[{"name": "a"}, {"name": "a"}]), "features"),
        (_mutate(class_labels=["only"]), "class_labels"),
        (_mutate(class_labels=None), "class_labels"),
    ],
)
def test_parse_errors_name_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        parse_schema(raw, "repo/credit/3/model.yaml")
    message = info.value.message
    assert message.startswith("repo/credit/3/model.yaml: ")
    assert field in message


def test_not_a_mapping() -> None:
    with pytest.raises(ModelLoadError, match=r"m\.yaml: expected a mapping"):
        parse_schema(["task"], "m.yaml")


def test_regressor_needs_no_class_labels() -> None:
    assert parse_schema({"task": "regression", "features": [{"name": "x"}]}, "m").class_labels == ()


def test_read_schema_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_text("task: [regression\n")
    with pytest.raises(ModelLoadError, match="not valid YAML") as info:
        read_schema(path)
    assert str(path) in info.value.message


def test_read_schema_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_schema(tmp_path / "model.yaml")


def test_model_load_error_maps_to_failed_precondition() -> None:
    import grpc

    assert ModelLoadError.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("name", ["credit", "m1", "a.b-c_d", "9lives", "x" * 128])
def test_valid_names(name: str) -> None:
    assert validate_name("name", name) == name


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "a b", "x" * 129, "ü"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match=r"^name: "):
        validate_name("name", name)


def test_to_dict_omits_empty_optionals() -> None:
    schema = ModelSchema("m", "1", "regression", (FeatureSchema("x", "numeric", "float32"),))
    assert schema.to_dict() == {
        "name": "m",
        "version": "1",
        "task": "regression",
        "input_layout": "columns",
        "features": [{"name": "x", "kind": "numeric", "dtype": "float32"}],
    }
