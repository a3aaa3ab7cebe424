"""A model version on disk as the store's registry wants it, and registering it.

The inference server registers what it serves, the trainer what it finds in the repository at
start-up, and `cyclone model import` what it just wrote: one entry format for all three.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cyclone.models.repository import EVALUATION_FILE, REFERENCE_FILE, ModelFiles, sha256_of
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc

# Known-answer probes of a version (written at import, see `convert.known_answers`).
PROBES_FILE = "probes.json"


def _read_optional(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def with_probes(schema: dict[str, Any], directory: Path | str) -> dict[str, Any]:
    """`schema` (a `ModelSchema.to_dict()`) with the version's known-answer probes under
    "probes", when the version has them: the registry keeps them inside the schema JSON (no
    new column or field), and the monitor's probe loop reads them back from there."""
    probes = _read_optional(Path(directory) / PROBES_FILE)
    return {**schema, "probes": json.loads(probes)} if probes else schema


def registry_entry(files: ModelFiles) -> store_pb.ModelVersion:
    """The registry entry of one version directory (schema, reference, baseline, checksum)."""
    schema = files.read_schema()
    described = with_probes(schema.to_dict(), files.directory)
    return store_pb.ModelVersion(
        model=files.name,
        version=files.version,
        task=schema.task,
        sha256=str(schema.extra.get("sha256") or sha256_of(files.onnx_path)),
        artifact_uri=str(files.directory.resolve()),
        schema_json=json.dumps(described),
        reference_profile_json=_read_optional(files.directory / REFERENCE_FILE),
        evaluation_json=_read_optional(files.directory / EVALUATION_FILE),
    )


async def register(
    stub: store_grpc.StoreServiceStub, files: ModelFiles, *, serve_if_first: bool = True
) -> bool:
    """Register `files` (no-op when already registered); returns True if it is now serving.

    With `serve_if_first`, a model that has no serving version gets this one.
    """
    await stub.RegisterModelVersion(
        store_pb.RegisterModelVersionRequest(
            model_version=registry_entry(files), if_not_exists=True
        ),
        timeout=10,
    )
    listed = await stub.ListModelVersions(
        store_pb.ListModelVersionsRequest(model=files.name), timeout=10
    )
    serving = [
        v.version for v in listed.model_versions if v.status == store_pb.MODEL_STATUS_SERVING
    ]
    if serving:
        return bool(serving[0] == files.version)
    if not serve_if_first:
        return False
    await stub.SetModelStatus(
        store_pb.SetModelStatusRequest(
            model=files.name, version=files.version, status=store_pb.MODEL_STATUS_SERVING
        ),
        timeout=10,
    )
    return True
