"""The model repository on disk: `<repo>/<model>/<version>/{model.onnx, model.yaml, ...}`.

A version directory may also hold `pipeline.joblib` (the fitted scikit-learn pipeline the ONNX
model was converted from), `reference.json` and `evaluation.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from cyclone.errors import ModelLoadError, NotFound
from cyclone.models.schema import ModelSchema, read_schema

MODEL_FILE = "model.onnx"
SCHEMA_FILE = "model.yaml"
REFERENCE_FILE = "reference.json"
EVALUATION_FILE = "evaluation.json"
# The fitted scikit-learn pipeline (joblib), kept so the trainer can refit it.
PIPELINE_FILE = "pipeline.joblib"


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    name: str
    version: str
    directory: Path

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def schema_path(self) -> Path:
        return self.directory / SCHEMA_FILE

    @property
    def pipeline_path(self) -> Path:
        return self.directory / PIPELINE_FILE

    def read_schema(self) -> ModelSchema:
        schema = read_schema(self.schema_path)
        # The directory layout is the source of truth for name and version.
        return dataclasses.replace(schema, name=self.name, version=self.version)


def load_pipeline(files: ModelFiles) -> Any:
    """The fitted scikit-learn pipeline saved next to the ONNX model, e.g. to clone and refit.

    joblib files are pickles: loading one runs code, so only load from a repository you trust.
    The checksum recorded in `model.yaml` at import guards against a swapped or damaged file.
    """
    import joblib

    path = files.pipeline_path
    if not path.is_file():
        raise NotFound(f"pipeline: {files.name!r} version {files.version!r} has no {PIPELINE_FILE}")
    expected = files.read_schema().extra.get("pipeline_sha256")
    if expected is not None and sha256_of(path) != expected:
        raise ModelLoadError(f"{path}: checksum differs from pipeline_sha256 in {SCHEMA_FILE}")
    try:
        return joblib.load(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load: {exc}") from None


def version_sort_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically and after non-numeric ones."""
    return (1, int(version)) if version.isdigit() else (0, version)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def versions(self, model: str) -> list[str]:
        directory = self.root / model
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if p.is_dir() and (p / SCHEMA_FILE).exists()]
        return sorted(found, key=version_sort_key)

    def latest_version(self, model: str) -> str:
        versions = self.versions(model)
        if not versions:
            raise NotFound(f"model: no versions of {model!r} in {self.root}")
        return versions[-1]

    def next_version(self, model: str) -> str:
        numeric = [int(v) for v in self.versions(model) if v.isdigit()]
        return str(max(numeric, default=0) + 1)

    def files(self, model: str, version: str | None = None) -> ModelFiles:
        version = version or self.latest_version(model)
        directory = self.root / model / version
        if not directory.is_dir():
            raise NotFound(f"version: {model!r} has no version {version!r} in {self.root}")
        if not (directory / MODEL_FILE).exists():
            raise ModelLoadError(f"{directory}: {MODEL_FILE} is missing")
        return ModelFiles(model, version, directory)
