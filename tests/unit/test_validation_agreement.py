"""The fast validation paths never accept what the full validation rejects.

Three functions decide whether a request is valid: `LoadedModel.validate` (the one that words
errors), `LoadedModel.quick_validate` (numpy columns, used by the Open Inference Protocol) and
`convert.quick_prepared_from_proto` (protobuf columns, used by Predict and PredictStream). The
fast ones may say "not sure" (None) whenever they like, but when they accept a request,
`validate` must accept it too, with the same rows and values. Requests are drawn as a valid
request plus a few mutations: wrong names, wrong types, NaN and infinities, out-of-range
values, unknown categories, ragged or wrong shapes, too many or no rows.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cyclone.errors import InvalidArgument
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.models.repository import ModelRepository
from cyclone.models.schema import FeatureSchema
from services.inference.convert import (
    columns_from_proto,
    prepared_from_proto,
    quick_prepared_from_proto,
)
from services.inference.model import LoadedModel

if TYPE_CHECKING:
    from tests.conftest import ModelRepo

MAX_ROWS = 4  # small, so "too many rows" is drawn often
PROPERTY = settings(
    max_examples=250,
    deadline=None,  # the machine is shared; a slow example is not a failure
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def models(
    model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LoadedModel]:
    """`credit` (columns, open categories), `constrained` (credit with bounds, NaN allowed for
    income, known cities) and `bench` (matrix layout, 12 numeric features)."""
    directory = tmp_path_factory.mktemp("agreement") / "repo" / "constrained" / "1"
    shutil.copytree(model_repo.root / "credit" / "1", directory)
    schema_path = directory / "model.yaml"
    raw = yaml.safe_load(schema_path.read_text())
    raw["name"] = "constrained"
    for feature in raw["features"]:
        if feature["name"] == "age":
            feature.update(min=18, max=100)
        if feature["name"] == "income":
            feature.update(min=0, allow_missing=True)
        if feature["name"] == "city":
            feature["categories"] = ["lisbon", "porto", "braga", "faro"]
    schema_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    session = ModelRepository(model_repo.root)
    return {
        "credit": LoadedModel(session.files("credit"), max_batch_rows=MAX_ROWS),
        "bench": LoadedModel(session.files("bench"), max_batch_rows=MAX_ROWS),
        "constrained": LoadedModel(
            ModelRepository(directory.parent.parent).files("constrained"),
            max_batch_rows=MAX_ROWS,
        ),
    }


# -- drawing requests ---------------------------------------------------------------------------


@dataclasses.dataclass
class Column:
    numbers: list[float] = dataclasses.field(default_factory=list)
    strings: list[str] = dataclasses.field(default_factory=list)


def _valid_number(f: FeatureSchema) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=-1e6 if f.min is None else f.min,
        max_value=1e6 if f.max is None else f.max,
        allow_nan=False,
        allow_infinity=False,
    )


def _bad_number(f: FeatureSchema) -> st.SearchStrategy[float]:
    bad: list[float] = []
    if f.min is not None:
        bad += [f.min - 1, float(np.nextafter(f.min, -np.inf))]
    if f.max is not None:
        bad += [f.max + 1, float(np.nextafter(f.max, np.inf))]
    return st.sampled_from([*bad, float("nan"), float("inf"), float("-inf"), 1e308, -1e308])


def _valid_category(f: FeatureSchema) -> st.SearchStrategy[str]:
    return st.sampled_from(f.categories) if f.categories else st.text(max_size=8)


MUTATIONS = (
    "drop_feature",
    "unknown_feature",
    # Bad values are listed twice: they are the mistakes the fast paths check element-wise.
    "bad_number",
    "bad_number",
    "text_for_number",
    "numbers_for_category",
    "unknown_category",
    "unknown_category",
    "numbers_and_strings",
    "ragged",
    "empty_column",
)


@st.composite
def requests(draw: st.DrawFn, model: LoadedModel) -> dict[str, Column]:
    """A valid request for `model` with up to two mutations that may make it invalid."""
    rows = draw(st.integers(min_value=0, max_value=MAX_ROWS + 1))
    request: dict[str, Column] = {}
    for f in model.schema.features:
        if f.kind == "numeric":
            request[f.name] = Column(
                numbers=draw(st.lists(_valid_number(f), min_size=rows, max_size=rows))
            )
        else:
            request[f.name] = Column(
                strings=draw(st.lists(_valid_category(f), min_size=rows, max_size=rows))
            )
    features = {f.name: f for f in model.schema.features}
    for _ in range(draw(st.integers(0, 2))):
        mutation = draw(st.sampled_from(MUTATIONS))
        if mutation == "unknown_feature":
            unknown = draw(st.sampled_from(["Age", "zzz", "", "city ", "f12"]))
            request[unknown] = Column(numbers=[1.0] * rows)
            event(mutation)
            continue
        # Each mutation goes to a feature it can break: numbers of a numeric feature, strings
        # of a categorical one, any feature for the others.
        wanted_kind = {
            "bad_number": "numeric",
            "text_for_number": "numeric",
            "numbers_for_category": "categorical",
            "unknown_category": "categorical",
        }.get(mutation)
        names = sorted(
            name
            for name, column in request.items()
            if name in features
            and (wanted_kind is None or features[name].kind == wanted_kind)
            and (column.numbers if wanted_kind == "numeric" else True)
            and (column.strings if wanted_kind == "categorical" else True)
        )
        if not names:
            continue
        event(mutation)
        name = draw(st.sampled_from(names))
        column = request[name]
        if mutation == "drop_feature":
            del request[name]
        elif mutation == "bad_number":
            row = draw(st.integers(0, len(column.numbers) - 1))
            column.numbers[row] = draw(_bad_number(features[name]))
        elif mutation == "text_for_number":
            request[name] = Column(strings=["12"] * len(column.numbers))
        elif mutation == "numbers_for_category":
            request[name] = Column(numbers=[1.0] * len(column.strings))
        elif mutation == "unknown_category":
            row = draw(st.integers(0, len(column.strings) - 1))
            column.strings[row] = draw(st.sampled_from(["coimbra", "", "Lisbon", "lisbon "]))
        elif mutation == "numbers_and_strings":
            column.numbers.append(1.0)
            column.strings.append("porto")
        elif mutation == "ragged":
            if column.numbers:
                column.numbers.append(column.numbers[0])
            elif column.strings:
                column.strings.pop()
        elif mutation == "empty_column":
            request[name] = Column()
    return request


def _proto(request: Mapping[str, Column]) -> dict[str, pb.FeatureColumn]:
    message = pb.PredictRequest()
    for name, column in request.items():
        message.features[name].numbers.extend(column.numbers)
        message.features[name].strings.extend(column.strings)
    return dict(message.features)


@st.composite
def numpy_requests(draw: st.DrawFn, model: LoadedModel) -> dict[str, np.ndarray]:
    """`requests` as numpy columns, in the dtypes and shapes OIP tensors arrive in (mostly the
    usual ones, so that the fast path has something to accept)."""
    request = draw(requests(model))
    number_kind = draw(st.sampled_from(["float64"] * 4 + ["float32", "int64", "bool", "object"]))
    text_kind = draw(st.sampled_from(["object"] * 3 + ["unicode", "bytes"]))
    two_dimensional = draw(st.sampled_from([None] * 4 + sorted(request))) if request else None
    columns: dict[str, np.ndarray] = {}
    for name, column in request.items():
        if column.strings:
            if text_kind == "bytes":
                array = np.array([s.encode() for s in column.strings], dtype=bytes)
            else:
                array = np.array(column.strings, dtype=object if text_kind == "object" else str)
        else:
            values = np.array(column.numbers, dtype=np.float64)
            kind = number_kind
            if kind in ("int64", "bool") and not np.isfinite(values).all():
                kind = "float64"
            with np.errstate(over="ignore", invalid="ignore"):
                array = values.astype(kind)
        if name == two_dimensional:
            array = array.reshape(-1, 1)  # [N, 1] where a column is expected
        columns[name] = array
    return columns


# -- the properties ------------------------------------------------------------------------------


def _full(model: LoadedModel, columns: Mapping[str, np.ndarray]) -> int | InvalidArgument:
    try:
        return model.validate(columns)
    except InvalidArgument as exc:
        return exc


@pytest.mark.parametrize("name", ["credit", "constrained", "bench"])
@PROPERTY
@given(data=st.data())
def test_proto_fast_path_accepts_only_what_validate_accepts(
    models: dict[str, LoadedModel], name: str, data: st.DataObject
) -> None:
    model = models[name]
    features = _proto(data.draw(requests(model)))
    quick = quick_prepared_from_proto(model, features)
    try:
        exact = prepared_from_proto(model, features)
    except InvalidArgument:
        exact = None  # rejected, with the one exact path's message
    if quick is None:
        event("fast path: not sure")
        return
    event("fast path: accepted")
    columns = columns_from_proto(features)
    verdict = _full(model, columns)
    assert not isinstance(verdict, InvalidArgument), f"fast path accepted; validate: {verdict}"
    assert exact is not None and quick.rows == verdict == exact.rows
    assert quick.columns.keys() == columns.keys()
    for feature, values in columns.items():
        assert np.array_equal(quick.columns[feature], values), feature
    if quick.block is not None:
        numeric = [columns[n] for n in model.numeric_names]
        assert np.array_equal(quick.block, np.array(numeric, dtype=np.float64))


@pytest.mark.parametrize("name", ["credit", "constrained", "bench"])
@PROPERTY
@given(data=st.data())
def test_numpy_fast_path_accepts_only_what_validate_accepts(
    models: dict[str, LoadedModel], name: str, data: st.DataObject
) -> None:
    model = models[name]
    columns = data.draw(numpy_requests(model))
    quick = model.quick_validate(columns)
    verdict = _full(model, columns)  # anything but InvalidArgument fails the test
    if quick is None:
        event("fast path: not sure")
        return
    event("fast path: accepted")
    rows, block = quick
    assert not isinstance(verdict, InvalidArgument), f"fast path accepted; validate: {verdict}"
    assert rows == verdict
    if block is not None:
        numeric = [columns[n].astype(np.float64) for n in model.numeric_names]
        assert np.array_equal(block, np.array(numeric))


@pytest.mark.parametrize("name", ["credit", "constrained", "bench"])
def test_fast_paths_take_plainly_valid_requests(models: dict[str, LoadedModel], name: str) -> None:
    """Keeps the properties above from passing by a fast path that always says "not sure"."""
    model = models[name]
    request = {
        f.name: Column(numbers=[20.0, 30.0])
        if f.kind == "numeric"
        else Column(strings=["porto"] * 2)
        for f in model.schema.features
    }
    prepared = quick_prepared_from_proto(model, _proto(request))
    assert prepared is not None and prepared.rows == 2
    columns = {
        name: np.array(c.numbers) if c.numbers else np.array(c.strings, dtype=object)
        for name, c in request.items()
    }
    assert model.quick_validate(columns) is not None
