"""One loaded model: validates named feature columns and runs onnxruntime on them.

Both front ends (Cyclone's Predict and the Open Inference Protocol) turn their
request into `dict[name, 1-D numpy column]` and call `LoadedModel.predict`, so
validation rules and error messages are the same whichever API a caller uses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnxruntime as ort

from cyclone.errors import InvalidArgument, ModelLoadError
from cyclone.models.repository import ModelFiles, sha256_of
from cyclone.models.schema import MISSING_CATEGORY, FeatureSchema, ModelSchema

log = logging.getLogger(__name__)

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(string)": np.object_,
    "tensor(bool)": np.bool_,
}


@dataclasses.dataclass(slots=True)
class Outputs:
    """Per-row model outputs; `values` for regression, `labels` + `probabilities` otherwise."""

    rows: int
    values: np.ndarray | None = None
    labels: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    # Raw onnxruntime outputs by name, for the Open Inference Protocol.
    raw: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _describe(value: float) -> str:
    return "NaN" if np.isnan(value) else repr(float(value))


class LoadedModel:
    def __init__(
        self,
        files: ModelFiles,
        *,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        max_batch_rows: int = 10_000,
    ) -> None:
        self.files = files
        self.schema: ModelSchema = files.read_schema()
        self.max_batch_rows = max_batch_rows
        self.sha256 = sha256_of(files.onnx_path)
        expected = self.schema.extra.get("sha256")
        if expected and expected != self.sha256:
            raise ModelLoadError(
                f"{files.onnx_path}: sha256 {self.sha256[:12]}… does not match model.yaml ({str(expected)[:12]}…)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.log_severity_level = 3
        # Spinning worker threads would steal the core that gRPC and the caller need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(files.onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelLoadError(f"{files.onnx_path}: onnxruntime cannot load it: {exc}") from None
        self.input_meta = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_inputs()
        self._features = self.schema.features
        self._numeric = [f for f in self._features if f.kind == "numeric"]
        self._categorical = [f for f in self._features if f.kind == "categorical"]
        # What a categorical feature with limits accepts: its categories, and the missing
        # marker where the model imputes it.
        accepted = {
            f.name: {*f.categories, *((MISSING_CATEGORY,) if f.allow_missing else ())}
            for f in self._categorical
            if f.categories
        }
        self._category_sets = {
            name: np.array(sorted(values), dtype=object) for name, values in accepted.items()
        }
        # Precomputed for the fast paths: they only decide "valid or not"; any doubt falls
        # back to `validate`, which stays the one place that words the errors.
        self.feature_names: tuple[str, ...] = tuple(self.schema.feature_names)
        self._name_set = frozenset(self.feature_names)
        self.numeric_names: tuple[str, ...] = tuple(f.name for f in self._numeric)
        self.category_lookup: dict[str, frozenset[str] | None] = {
            f.name: frozenset(accepted[f.name]) if f.name in accepted else None
            for f in self._categorical
        }
        self._lo = np.array(
            [-np.inf if f.min is None else f.min for f in self._numeric], dtype=np.float64
        )[:, None]
        self._hi = np.array(
            [np.inf if f.max is None else f.max for f in self._numeric], dtype=np.float64
        )[:, None]
        self._bounded = any(f.min is not None or f.max is not None for f in self._numeric)
        # Every feature numeric: OIP may then send one [N, F] tensor or one tensor per feature,
        # decoded straight into a (features, rows) block (`convert.quick_prepared_from_tensors`).
        self.all_numeric = not self._categorical
        self.feature_index: dict[str, int] = {n: j for j, n in enumerate(self.feature_names)}
        # Matrix models whose features are all numeric and in schema order take the
        # validated (features, rows) block transposed, with no per-column copies.
        self._matrix_dtype: type | None = None
        if self.schema.input_layout == "matrix" and not self._categorical:
            self._matrix_dtype = _ORT_TO_NUMPY.get(self.input_meta["input"].type, np.float32)

    @property
    def name(self) -> str:
        return self.schema.name

    @property
    def version(self) -> str:
        return self.schema.version

    def _check_inputs(self) -> None:
        source = self.files.schema_path
        if self.schema.input_layout == "matrix":
            if list(self.input_meta) != ["input"]:
                raise ModelLoadError(
                    f"{source}: input_layout matrix needs one ONNX input named 'input'"
                )
            return
        missing = [n for n in self.schema.feature_names if n not in self.input_meta]
        if missing or len(self.input_meta) != len(self.schema.features):
            raise ModelLoadError(
                f"{source}: features do not match the ONNX inputs "
                f"(schema {self.schema.feature_names}, ONNX {list(self.input_meta)})"
            )

    # -- validation ---------------------------------------------------------------------------

    def _check_numeric(self, f: FeatureSchema, column: np.ndarray) -> None:
        finite = np.isfinite(column)
        if not finite.all():
            bad = ~finite
            if np.isinf(column).any() or not f.allow_missing:
                row = int(np.argmax(bad if not f.allow_missing else np.isinf(column)))
                raise InvalidArgument(
                    f"features.{f.name}: row {row} is {_describe(column[row])}, "
                    f"which the schema does not allow"
                )
        if f.min is not None or f.max is not None:
            lo = -np.inf if f.min is None else f.min
            hi = np.inf if f.max is None else f.max
            out = ((column < lo) | (column > hi)) & finite
            if out.any():
                row = int(np.argmax(out))
                raise InvalidArgument(
                    f"features.{f.name}: row {row} is {float(column[row])!r}, outside the allowed range [{f.min}, {f.max}]"
                )

    def _check_categorical(self, f: FeatureSchema, column: np.ndarray) -> None:
        allowed = self._category_sets.get(f.name)
        if allowed is None:
            return
        unknown = ~np.isin(column, allowed)
        if unknown.any():
            row = int(np.argmax(unknown))
            raise InvalidArgument(
                f"features.{f.name}: row {row} has unknown category {column[row]!r} "
                f"(allowed: {', '.join(map(str, allowed[:10]))}{'…' if len(allowed) > 10 else ''})"
            )

    def numeric_ok(self, block: np.ndarray) -> bool:
        """True if a (numeric features, rows) float block passes every numeric check."""
        if not np.isfinite(block).all():
            return False
        return not (self._bounded and ((block < self._lo) | (block > self._hi)).any())

    def categories_ok(self, name: str, values: Iterable[object]) -> bool:
        allowed = self.category_lookup.get(name)
        return allowed is None or all(v in allowed for v in values)

    def quick_validate(
        self, columns: Mapping[str, np.ndarray]
    ) -> tuple[int, np.ndarray | None] | None:
        """Rows and the numeric block when `columns` is plainly valid; None means "ask `validate`"."""
        if len(columns) != len(self.feature_names) or columns.keys() != self._name_set:
            return None
        rows = -1
        numeric: list[np.ndarray] = []
        for f in self._features:
            column = columns[f.name]
            if column.ndim != 1 or (rows != -1 and len(column) != rows):
                return None
            rows = len(column)
            if len(column) == 0:
                continue  # an empty column has no type to check; the row count says why it fails
            if f.kind == "numeric":
                if column.dtype.kind not in "fiub":
                    return None
                numeric.append(column)
            elif column.dtype.kind not in "OUS" or not self.categories_ok(f.name, column.tolist()):
                return None
        if not 0 < rows <= self.max_batch_rows:
            return None
        block = np.array(numeric, dtype=np.float64) if numeric else None
        if block is not None and not self.numeric_ok(block):
            return None
        return rows, block

    def _no_features(self) -> str:
        """A request without any feature: most often a REST body without its wrapper."""
        example = ", ".join(
            f'"{f.name}": {{"strings": ["..."]}}'
            if f.kind == "categorical"
            else f'"{f.name}": {{"numbers": [...]}}'
            for f in self._features[:2]
        )
        more = ", ..." if len(self._features) > 2 else ""
        return (
            f"features: none given; model {self.name!r} takes "
            f"{', '.join(self.schema.feature_names)}, one column each (a REST body needs them"
            f' under "features": {{"features": {{{example}{more}}}}})'
        )

    def validate(self, columns: Mapping[str, np.ndarray]) -> int:
        """Check names, kinds, lengths and values; return the row count."""
        unknown = [name for name in columns if name not in self._names]
        if unknown:
            raise InvalidArgument(
                f"features.{unknown[0]}: unknown feature (model {self.name!r} takes "
                f"{', '.join(self.schema.feature_names)})"
            )
        if not columns:
            raise InvalidArgument(self._no_features())
        rows = -1
        for f in self._features:
            column = columns.get(f.name)
            if column is None:
                raise InvalidArgument(f"features.{f.name}: missing")
            if column.ndim != 1:
                raise InvalidArgument(f"features.{f.name}: expected one value per row")
            if rows == -1:
                rows = len(column)
            elif len(column) != rows:
                raise InvalidArgument(self._ragged(columns))
            if len(column) == 0:
                continue  # an empty column has no type to check; the row count says why it fails
            if f.kind == "numeric":
                if column.dtype.kind not in "fiub":
                    raise InvalidArgument(f"features.{f.name}: expected numbers, got text")
                self._check_numeric(f, column.astype(np.float64, copy=False))
            else:
                if column.dtype.kind not in "OUS":
                    raise InvalidArgument(f"features.{f.name}: expected strings, got numbers")
        if rows <= 0:
            raise InvalidArgument("features: the request has no rows")
        if rows > self.max_batch_rows:
            raise InvalidArgument(
                f"features: {rows} rows is more than the limit of {self.max_batch_rows}"
            )
        for f in self._categorical:
            self._check_categorical(f, columns[f.name])
        return rows

    def _ragged(self, columns: Mapping[str, np.ndarray]) -> str:
        """Columns of different lengths: name the one that differs from most (the first
        feature's may be the odd one, e.g. a JSON `[null]` the transcoder read as empty)."""
        lengths = {f.name: len(columns[f.name]) for f in self._features if f.name in columns}
        counts = list(lengths.values())
        common = max(counts, key=counts.count)
        odd = next(name for name, n in lengths.items() if n != common)
        return f"features.{odd}: has {lengths[odd]} values, but the other features have {common}"

    @property
    def _names(self) -> frozenset[str]:
        return self._name_set

    # -- inference ----------------------------------------------------------------------------

    def feed(self, columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.schema.input_layout == "matrix":
            dtype = _ORT_TO_NUMPY.get(self.input_meta["input"].type, np.float32)
            matrix = np.empty(
                (len(columns[self._features[0].name]), len(self._features)), dtype=dtype
            )
            for i, f in enumerate(self._features):
                matrix[:, i] = columns[f.name]
            return {"input": matrix}
        feed: dict[str, np.ndarray] = {}
        for f in self._features:
            dtype = _ORT_TO_NUMPY.get(self.input_meta[f.name].type, np.float32)
            column = columns[f.name]
            feed[f.name] = column.astype(dtype, copy=False).reshape(-1, 1)
        return feed

    @property
    def takes_block(self) -> bool:
        return self._matrix_dtype is not None

    def feed_block(
        self, block: np.ndarray | None, columns: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """`feed`, but straight from a validated numeric block when the model allows it."""
        if self._matrix_dtype is not None and block is not None:
            return {"input": np.ascontiguousarray(block.T, dtype=self._matrix_dtype)}
        return self.feed(columns)

    def run(self, feed: Mapping[str, np.ndarray], rows: int) -> Outputs:
        raw_list = self.session.run(
            self.output_names, feed if isinstance(feed, dict) else dict(feed)
        )
        raw = dict(zip(self.output_names, raw_list, strict=True))
        if self.schema.task == "regression":
            return Outputs(
                rows, values=np.asarray(raw_list[0], dtype=np.float64).reshape(rows), raw=raw
            )
        labels = np.asarray(raw_list[0]).reshape(rows)
        # float32 sums over trees land a few ulps outside [0, 1] (-1.2e-07, 1.0000001):
        # a probability a caller receives is one. Clipped in place, so the OIP tensor agrees.
        np.clip(raw_list[1], 0.0, 1.0, out=raw_list[1])
        probabilities = np.asarray(raw_list[1], dtype=np.float64).reshape(rows, -1)
        return Outputs(rows, labels=labels.astype(str), probabilities=probabilities, raw=raw)

    def slice(self, outputs: Outputs, start: int, stop: int) -> Outputs:
        """Rows [start, stop) of a batch's outputs, as if those rows had run alone."""
        return Outputs(
            stop - start,
            values=None if outputs.values is None else outputs.values[start:stop],
            labels=None if outputs.labels is None else outputs.labels[start:stop],
            probabilities=None
            if outputs.probabilities is None
            else outputs.probabilities[start:stop],
            raw={name: value[start:stop] for name, value in outputs.raw.items()},
        )

    def predict(self, columns: Mapping[str, np.ndarray]) -> Outputs:
        rows = self.validate(columns)
        return self.run(self.feed(columns), rows)
