"""Blue-green's gate: known-answer requests sent straight to a new revision's replicas.

The answers come from the version itself: `probes.json` next to the model (written at import,
`cyclone.models.convert.known_answers`): `{"rows": [...], "outputs": [{"label"|"value": ...}],
"tolerance": t}`.
Each request carries one probe row and goes to the revision's endpoints in turn (every replica
is asked), bypassing the proxy, so callers never see a smoke answer. An answer is correct when
it equals the recorded label (classification) or is within `tolerance * max(1, |expected|)` of
the recorded value (regression).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc import aio

from cyclone.channels import aio_channel
from cyclone.client import build_request
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.traffic import Revision

from .ports import SmokeResult

PROBES_FILE = "probes.json"  # cyclone.models.convert.PROBES_FILE (not imported: heavy module)
_EXAMPLES = 3  # mismatches quoted in the result's detail


class ProbesError(ValueError):
    """probes.json is missing or malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Probes:
    rows: Sequence[dict[str, Any]]
    outputs: Sequence[str | float]
    tolerance: float

    @classmethod
    def load(cls, path: Path) -> Probes:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProbesError(f"{path}: no known answers for this version") from None
        except (OSError, ValueError) as exc:
            raise ProbesError(f"{path}: not readable JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ProbesError(f"{path}: expected an object with rows and outputs")
        rows, outputs = data.get("rows"), data.get("outputs")
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise ProbesError(f"{path}: rows: expected a non-empty list of objects")
        if not isinstance(outputs, list) or len(outputs) != len(rows):
            raise ProbesError(f"{path}: outputs: expected a list as long as rows ({len(rows)})")
        # Each answer is {"label": ..., "probabilities": [...]} or {"value": ...}.
        outputs = [(o.get("label", o.get("value")) if isinstance(o, dict) else o) for o in outputs]
        if any(o is None for o in outputs):
            raise ProbesError(f"{path}: outputs: each needs a label or a value")
        tolerance = data.get("tolerance", 1e-4)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or tolerance < 0:
            raise ProbesError(f"{path}: tolerance: expected a number >= 0, got {tolerance!r}")
        return cls(rows, outputs, float(tolerance))

    def matches(self, index: int, answer: str | float) -> bool:
        expected = self.outputs[index]
        if isinstance(expected, str) or isinstance(answer, str):
            return str(answer) == str(expected)
        if math.isnan(expected) or math.isnan(answer):
            return math.isnan(expected) and math.isnan(answer)
        return abs(answer - expected) <= self.tolerance * max(1.0, abs(expected))


class ProbeSmokeTester:
    """`SmokeTester` over a model repository: `ProbeSmokeTester(repository)`."""

    def __init__(self, model_repository: Path, *, timeout: float = 5.0) -> None:
        self.model_repository = Path(model_repository)
        self.timeout = timeout

    def probes_path(self, revision: Revision) -> Path:
        return self.model_repository / revision.model / revision.version / PROBES_FILE

    async def smoke(self, revision: Revision, rows: int) -> SmokeResult:
        try:
            probes = Probes.load(self.probes_path(revision))
        except ProbesError as exc:
            return SmokeResult(0, 0, 0, str(exc))
        if not revision.endpoints:
            return SmokeResult(0, 0, 0, f"revision {revision.name} has no endpoints")
        channels = [aio_channel(e.address) for e in revision.endpoints]
        try:
            stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
            answers = await asyncio.gather(
                *(
                    self._ask(stubs[i % len(stubs)], revision, probes.rows[i % len(probes.rows)])
                    for i in range(max(rows, 1))
                )
            )
        finally:
            for channel in channels:
                await channel.close()
        failures, correct, wrong, errors = 0, 0, [], []
        for i, answer in enumerate(answers):
            probe = i % len(probes.rows)
            if isinstance(answer, aio.AioRpcError):
                failures += 1
                errors.append(f"{answer.code().name}: {answer.details()}")
            elif probes.matches(probe, answer):
                correct += 1
            else:
                wrong.append(f"row {probe}: got {answer!r}, expected {probes.outputs[probe]!r}")
        parts = [f"{correct}/{len(answers)} known answers matched"]
        if wrong:
            parts.append(f"{len(wrong)} differ ({'; '.join(wrong[:_EXAMPLES])})")
        if errors:
            parts.append(f"{failures} failed ({'; '.join(errors[:_EXAMPLES])})")
        return SmokeResult(len(answers), failures, correct, ", ".join(parts))

    async def _ask(
        self, stub: pb_grpc.InferenceServiceStub, revision: Revision, row: dict[str, Any]
    ) -> str | float | aio.AioRpcError:
        request = build_request(revision.model, [row], revision.version)
        try:
            reply: pb.PredictResponse = await stub.Predict(request, timeout=self.timeout)
        except aio.AioRpcError as exc:
            return exc
        if reply.labels:
            return str(reply.labels[0])
        return float(reply.values[0])
