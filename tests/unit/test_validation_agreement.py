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
from cyclone.oip.v2 import open_inference_pb2 as oip_pb
from services.inference.convert import (
    columns_from_proto,
    columns_from_tensors,
    prepared_from_proto,
    quick_prepared_from_proto,
    quick_prepared_from_tensors,
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


# -- Open Inference Protocol tensors -------------------------------------------------------------


@pytest.fixture(scope="module")
def numeric_columns(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """All-numeric, one ONNX input per feature (a ColumnTransformer over named columns)."""
    import pandas as pd
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LinearRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from cyclone.models.convert import import_pipeline

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    pipeline = Pipeline(
        [
            ("scale", ColumnTransformer([("num", StandardScaler(), ["a", "b", "c"])])),
            ("lr", LinearRegression()),
        ]
    ).fit(frame, frame["a"] * 2 + frame["c"])
    root = tmp_path_factory.mktemp("numeric-columns")
    import_pipeline(pipeline, "numeric", root)
    model = LoadedModel(ModelRepository(root).files("numeric"), max_batch_rows=MAX_ROWS)
    assert model.schema.input_layout == "columns" and model.all_numeric
    return model


def _add_tensor(
    request: oip_pb.ModelInferRequest, name: str, values: np.ndarray, datatype: str, raw: bool
) -> None:
    """`values` (1-D or 2-D) as one input tensor, raw little-endian or typed contents."""
    tensor = request.inputs.add(name=name, datatype=datatype, shape=list(values.shape))
    flat = values.ravel()
    if datatype == "BYTES":
        items = [str(v).encode() for v in flat.tolist()]
        if raw:
            request.raw_input_contents.append(
                b"".join(len(b).to_bytes(4, "little") + b for b in items)
            )
        else:
            tensor.contents.bytes_contents.extend(items)
        return
    with np.errstate(over="ignore", invalid="ignore"):
        flat = flat.astype({"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}[datatype])
    if raw:
        request.raw_input_contents.append(flat.tobytes())
    else:
        field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents"}
        getattr(tensor.contents, field[datatype]).extend(flat.tolist())


TENSOR_MUTATIONS = ("none", "none", "none", "truncate_raw", "duplicate", "wrong_width", "int64")


@st.composite
def infer_requests(draw: st.DrawFn, model: LoadedModel) -> oip_pb.ModelInferRequest:
    """`requests` as OIP tensors: one [N, F] `input` matrix (when every column is numbers of one
    length) or one [N] / [N, 1] tensor per feature, FP32 or FP64, raw or typed, plus a few
    tensor-level mistakes."""
    request = draw(requests(model))
    datatype = draw(st.sampled_from(["FP32", "FP64"]))
    raw = draw(st.booleans())
    mutation = draw(st.sampled_from(TENSOR_MUTATIONS))
    event(f"tensor mutation: {mutation}")
    if mutation == "int64":
        datatype = "INT64"
    message = oip_pb.ModelInferRequest(model_name=model.name)
    numbers = [c.numbers for c in request.values() if not c.strings]
    lengths = {len(n) for n in numbers}
    if (
        len(numbers) == len(request)
        and len(lengths) == 1
        and list(request) == list(model.feature_names)
        and draw(st.booleans())
    ):
        matrix = np.array(numbers, dtype=np.float64).T
        if mutation == "wrong_width":
            matrix = matrix[:, :-1]
        if mutation == "int64" and not np.isfinite(matrix).all():
            datatype = "FP64"
        _add_tensor(message, "input", matrix, datatype, raw)
    else:
        shape_2d = draw(st.booleans())
        for name, column in request.items():
            if column.strings and column.numbers:
                values = np.array(column.numbers, dtype=np.float64)  # strings dropped
            elif column.strings:
                _add_tensor(message, name, np.array(column.strings, dtype=object), "BYTES", raw)
                continue
            else:
                values = np.array(column.numbers, dtype=np.float64)
            kind = datatype if np.isfinite(values).all() or datatype != "INT64" else "FP64"
            _add_tensor(message, name, values.reshape(-1, 1) if shape_2d else values, kind, raw)
        if mutation == "duplicate" and len(message.inputs) > 1:
            message.inputs[0].name = message.inputs[1].name
    if mutation == "truncate_raw" and message.raw_input_contents:
        message.raw_input_contents[0] = message.raw_input_contents[0][:-1]
    return message


def _exact(
    model: LoadedModel, request: oip_pb.ModelInferRequest
) -> tuple[int, dict[str, np.ndarray]] | InvalidArgument:
    try:
        columns = columns_from_tensors(model, request)
        return model.validate(columns), columns
    except InvalidArgument as exc:
        return exc


@pytest.mark.parametrize("name", ["credit", "constrained", "bench", "numeric_columns"])
@PROPERTY
@given(data=st.data())
def test_tensor_fast_path_accepts_only_what_validate_accepts(
    models: dict[str, LoadedModel],
    numeric_columns: LoadedModel,
    name: str,
    data: st.DataObject,
) -> None:
    model = numeric_columns if name == "numeric_columns" else models[name]
    request = data.draw(infer_requests(model))
    quick = quick_prepared_from_tensors(model, request)
    verdict = _exact(model, request)  # anything but InvalidArgument fails the test
    if quick is None:
        event("fast path: not sure")
        return
    event("fast path: accepted")
    assert not isinstance(verdict, InvalidArgument), f"fast path accepted; exact: {verdict}"
    rows, columns = verdict
    assert quick.rows == rows
    assert quick.columns.keys() == columns.keys()
    for feature, values in columns.items():
        assert np.array_equal(quick.columns[feature], values), feature
    assert quick.block is not None
    numeric = [columns[n].astype(np.float64) for n in model.numeric_names]
    assert np.array_equal(quick.block.astype(np.float64), np.array(numeric))


@pytest.mark.parametrize("layout", ["matrix", "per_feature_raw", "per_feature_typed"])
@pytest.mark.parametrize("name", ["bench", "numeric_columns"])
def test_all_numeric_models_take_both_tensor_layouts(
    models: dict[str, LoadedModel], numeric_columns: LoadedModel, name: str, layout: str
) -> None:
    """One [N, F] matrix and one tensor per feature score the same, on either ONNX layout;
    a matrix request to a matrix model is fed to onnxruntime without a copy."""
    model = numeric_columns if name == "numeric_columns" else models[name]
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(3, len(model.feature_names))).astype(np.float32)
    request = oip_pb.ModelInferRequest(model_name=model.name)
    if layout == "matrix":
        _add_tensor(request, "input", matrix, "FP32", raw=True)
    else:
        for j, feature in enumerate(model.feature_names):
            column = matrix[:, j].astype(np.float64)
            _add_tensor(request, feature, column, "FP64", raw=layout == "per_feature_raw")
    quick = quick_prepared_from_tensors(model, request)
    assert quick is not None and quick.rows == 3
    columns = columns_from_tensors(model, request)
    assert model.validate(columns) == 3
    expected = model.predict({f: matrix[:, j] for j, f in enumerate(model.feature_names)})
    fed = model.feed_block(quick.block, quick.columns)
    got = model.run(fed, quick.rows)
    assert got.values is not None and expected.values is not None
    np.testing.assert_allclose(got.values, expected.values, rtol=1e-6)
    np.testing.assert_allclose(model.predict(columns).values, expected.values, rtol=1e-6)  # type: ignore[arg-type]
    if layout == "matrix" and model.takes_block:
        assert quick.block is not None and np.shares_memory(fed["input"], quick.block)


def test_tensor_fast_path_leaves_errors_to_the_exact_path(models: dict[str, LoadedModel]) -> None:
    model = models["bench"]
    matrix = np.ones((2, 12), dtype=np.float32)
    matrix[1, 3] = np.nan
    request = oip_pb.ModelInferRequest(model_name="bench")
    _add_tensor(request, "input", matrix, "FP32", raw=True)
    assert quick_prepared_from_tensors(model, request) is None
    with pytest.raises(InvalidArgument, match=r"features\.f3: row 1 is NaN"):
        model.validate(columns_from_tensors(model, request))

    per_feature = oip_pb.ModelInferRequest(model_name="bench")
    for j in range(12):
        _add_tensor(per_feature, f"f{min(j, 10)}", np.ones(2), "FP64", raw=False)  # f10 twice
    assert quick_prepared_from_tensors(model, per_feature) is None
    with pytest.raises(InvalidArgument, match=r"features\.f11: missing"):
        model.validate(columns_from_tensors(model, per_feature))

    wrong_name = oip_pb.ModelInferRequest(model_name="bench")
    _add_tensor(wrong_name, "x", np.ones((2, 12)), "FP32", raw=True)
    assert quick_prepared_from_tensors(model, wrong_name) is None
    with pytest.raises(InvalidArgument, match="one tensor named 'input'"):
        columns_from_tensors(model, wrong_name)
