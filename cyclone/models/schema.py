"""`model.yaml`: what a model consumes and produces, read and written in one place."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from cyclone.errors import ModelLoadError

Task = Literal["regression", "classification"]
FeatureKind = Literal["numeric", "categorical"]
InputLayout = Literal["columns", "matrix"]

NUMERIC_DTYPES = ("float32", "float64", "int64")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# A categorical value that is missing, in requests, logs and the ONNX model's string input
# (a string tensor has no null). Only features with `allow_missing` (the pipeline imputes
# them) accept it beyond their categories.
MISSING_CATEGORY = ""


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
    name: str
    kind: FeatureKind
    dtype: str
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()
    allow_missing: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "dtype": self.dtype}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.categories:
            out["categories"] = list(self.categories)
        if self.allow_missing:
            out["allow_missing"] = True
        return out


@dataclasses.dataclass(frozen=True)
class ModelSchema:
    """The contents of `model.yaml`."""

    name: str
    version: str
    task: Task
    features: tuple[FeatureSchema, ...]
    # "columns": one ONNX input per feature, shape [N, 1]; "matrix": one float input [N, F].
    input_layout: InputLayout = "columns"
    class_labels: tuple[str, ...] = ()
    description: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "input_layout": self.input_layout,
            "features": [f.to_dict() for f in self.features],
        }
        if self.class_labels:
            out["class_labels"] = list(self.class_labels)
        if self.description:
            out["description"] = self.description
        out.update(self.extra)
        return out

    def write(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def validate_name(field: str, value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"{field}: {value!r} is not a valid name (letters, digits, '_', '.', '-'; "
            "starting with a letter or digit; at most 128 characters)"
        )
    return value


def _feature(index: int, raw: Any, source: str) -> FeatureSchema:
    where = f"{source}: features[{index}]"
    if not isinstance(raw, dict) or "name" not in raw:
        raise ModelLoadError(f"{where}: expected a mapping with a name")
    kind = raw.get("kind", "numeric")
    if kind not in ("numeric", "categorical"):
        raise ModelLoadError(f"{where}.kind: expected numeric or categorical, got {kind!r}")
    dtype = str(raw.get("dtype", "float32" if kind == "numeric" else "string"))
    if kind == "numeric" and dtype not in NUMERIC_DTYPES:
        raise ModelLoadError(
            f"{where}.dtype: numeric features take {NUMERIC_DTYPES}, got {dtype!r}"
        )
    if kind == "categorical" and dtype != "string":
        raise ModelLoadError(f"{where}.dtype: categorical features take 'string', got {dtype!r}")
    try:
        lo = None if raw.get("min") is None else float(raw["min"])
        hi = None if raw.get("max") is None else float(raw["max"])
    except (TypeError, ValueError):
        raise ModelLoadError(f"{where}: min and max must be numbers") from None
    return FeatureSchema(
        name=str(raw["name"]),
        kind=kind,
        dtype=dtype,
        min=lo,
        max=hi,
        categories=tuple(str(c) for c in raw.get("categories") or ()),
        allow_missing=bool(raw.get("allow_missing", False)),
    )


_KNOWN_KEYS = {"name", "version", "task", "input_layout", "features", "class_labels", "description"}


def parse_schema(raw: Any, source: str) -> ModelSchema:
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{source}: expected a mapping")
    task = raw.get("task")
    if task not in ("regression", "classification"):
        raise ModelLoadError(f"{source}: task: expected regression or classification, got {task!r}")
    layout = raw.get("input_layout", "columns")
    if layout not in ("columns", "matrix"):
        raise ModelLoadError(f"{source}: input_layout: expected columns or matrix, got {layout!r}")
    features = raw.get("features")
    if not isinstance(features, list) or not features:
        raise ModelLoadError(f"{source}: features: expected a non-empty list")
    parsed = tuple(_feature(i, f, source) for i, f in enumerate(features))
    names = [f.name for f in parsed]
    if len(set(names)) != len(names):
        raise ModelLoadError(f"{source}: features: duplicate feature names")
    class_labels = tuple(str(c) for c in raw.get("class_labels") or ())
    if task == "classification" and len(class_labels) < 2:
        raise ModelLoadError(f"{source}: class_labels: a classifier needs at least two classes")
    return ModelSchema(
        name=str(raw.get("name", "")),
        version=str(raw.get("version", "")),
        task=task,
        features=parsed,
        input_layout=layout,
        class_labels=class_labels,
        description=str(raw.get("description", "")),
        extra={k: v for k, v in raw.items() if k not in _KNOWN_KEYS},
    )


_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_schema(path: Path) -> ModelSchema:
    try:
        # libyaml's loader when built in: the pool reads this on every cold load (~1.7 ms of
        # pure-Python parsing holding the GIL otherwise).
        raw = yaml.load(path.read_text(), Loader=_SAFE_LOADER)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{path}: not valid YAML: {exc}") from None
    return parse_schema(raw, str(path))
