"""Known-answer probes: the rows a version was imported with, sent to the serving model.

Each version keeps up to 20 rows with its own ONNX answers (`probes.json`, carried in the
registry's schema JSON under "probes"). A probe round sends them in one Predict call marked
with the `cyclone-probe: 1` metadata header (the inference server answers but does not log
them) and the `cyclone-model` header (Envoy routes by it once two models are served), and
compares the answers with the recorded ones. A different answer means a software
fault (the wrong model serving, a changed runtime, a corrupted artifact), not drift.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.wire import MODEL_HEADER, PROBE_HEADER

PROBE_METADATA = ((PROBE_HEADER, "1"),)
# Statuses a starting mesh answers with (Envoy up before its route, a revision not yet
# healthy, nothing listening yet): worth a second try before a round counts as unanswered.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND})


def probe_metadata(model: str) -> tuple[tuple[str, str], ...]:
    """The probe marker plus the model header, so Envoy routes the call with 2+ models."""
    return (*PROBE_METADATA, (MODEL_HEADER, model))


# At most this many differing rows are named in a reason; the count says how many there were.
NAMED_ROWS = 3


@dataclass(frozen=True)
class KnownAnswers:
    """One version's probe rows (feature -> value, None for missing) and recorded answers."""

    version: str
    rows: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]


def known_answers_from_schema(version: str, schema_json: str) -> KnownAnswers | None:
    """The probes kept in a registry entry's schema JSON; None when the version has none."""
    probes = json.loads(schema_json).get("probes") if schema_json else None
    if not isinstance(probes, Mapping) or not probes.get("rows"):
        return None
    return KnownAnswers(version, tuple(probes["rows"]), tuple(probes["outputs"]))


@dataclass(frozen=True)
class Answer:
    """What the served model said: the version that answered and one output per row."""

    version: str
    outputs: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class ProbeRound:
    """One round: `wrong` names the rows answered differently, `error` why none came."""

    address: str
    version: str = ""
    wrong: tuple[str, ...] = ()
    error: str = ""

    @property
    def answered(self) -> bool:
        return not self.error


def predict_request(model: str, answers: KnownAnswers) -> inference_pb.PredictRequest:
    """The probe rows as one Predict call to whatever version the endpoint serves."""
    request = inference_pb.PredictRequest(model=model, request_id="cyclone-probe")
    names = list(answers.rows[0])
    for name in names:
        column = request.features[name]
        values = [row.get(name) for row in answers.rows]
        if any(isinstance(v, str) for v in values):
            column.strings.extend(str(v) for v in values)
        else:
            column.numbers.extend(math.nan if v is None else float(v) for v in values)
    return request


def answer_from_response(response: inference_pb.PredictResponse) -> Answer:
    outputs: tuple[Mapping[str, Any], ...]
    if response.labels:
        width = len(response.class_labels)
        probabilities = list(response.probabilities)
        outputs = tuple(
            {"label": label, "probabilities": probabilities[i * width : (i + 1) * width]}
            for i, label in enumerate(response.labels)
        )
    else:
        outputs = tuple({"value": value} for value in response.values)
    return Answer(response.version, outputs)


def differences(
    recorded: Sequence[Mapping[str, Any]], got: Sequence[Mapping[str, Any]], tolerance: float
) -> list[str]:
    """One "row i: ..." per row whose answer is not the recorded one (within `tolerance`)."""
    if len(got) != len(recorded):
        return [f"{len(got)} answers for {len(recorded)} rows"]
    out = []
    for i, (want, have) in enumerate(zip(recorded, got, strict=True)):
        if "value" in want:
            expected, value = float(want["value"]), float(have.get("value", math.nan))
            if not abs(value - expected) <= tolerance:
                out.append(f"row {i}: value {value:.6g}, recorded {expected:.6g}")
            continue
        if str(have.get("label")) != str(want["label"]):
            out.append(f"row {i}: label {have.get('label')!r}, recorded {want['label']!r}")
            continue
        p_want = [float(p) for p in want.get("probabilities", ())]
        p_have = [float(p) for p in have.get("probabilities", ())]
        gap = (
            max(abs(a - b) for a, b in zip(p_want, p_have, strict=True))
            if len(p_want) == len(p_have) and p_want
            else math.inf
        )
        if not gap <= tolerance:
            out.append(f"row {i}: probabilities differ by {gap:.3g} (tolerance {tolerance:g})")
    return out


def wrong_answers(answers: KnownAnswers, answer: Answer, tolerance: float) -> tuple[str, ...]:
    """Reasons naming the differing rows (the first few) and how many there were."""
    found = differences(answers.outputs, answer.outputs, tolerance)
    if not found:
        return ()
    more = f" (and {len(found) - NAMED_ROWS} more)" if len(found) > NAMED_ROWS else ""
    return (
        f"probes: version {answer.version or '?'} answered {len(found)} of "
        f"{len(answers.outputs)} known rows differently: {'; '.join(found[:NAMED_ROWS])}{more}",
    )


def failure_text(exc: BaseException) -> str:
    """One short sentence for a failed call: the status name and its details (the first line),
    never the multi-line repr of an AioRpcError."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    if callable(code) and callable(details):
        status = code()
        text = (details() or "").strip().splitlines()
        name = status.name if isinstance(status, grpc.StatusCode) else "error"
        return f"{name}: {text[0]}" if text else name
    return type(exc).__name__


@dataclass(frozen=True)
class NoAnswer:
    """Why a round got no answer, and whether a starting mesh could explain it."""

    reason: str
    transient: bool = False


async def ask(
    channel: aio.Channel, model: str, answers: KnownAnswers, timeout: float
) -> Answer | NoAnswer:
    """Send the probe rows; the answer, or why none came (one short sentence)."""
    stub = inference_grpc.InferenceServiceStub(channel)
    try:
        response = await stub.Predict(
            predict_request(model, answers), metadata=probe_metadata(model), timeout=timeout
        )
    except grpc.RpcError as exc:
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        return NoAnswer(failure_text(exc), code in TRANSIENT)
    return answer_from_response(response)


@dataclass
class ProbeRecord:
    """Probe rounds of one model since the monitor started (kept in memory only)."""

    rounds: int = 0
    answered: int = 0
    last: ProbeRound | None = None

    def add(self, outcome: ProbeRound) -> bool:
        """Count `outcome`; True when its verdict differs from the previous round's."""
        previous = self.last
        self.rounds += 1
        self.answered += outcome.answered
        self.last = outcome
        return previous is None or (previous.wrong, previous.error == "") != (
            outcome.wrong,
            outcome.error == "",
        )

    @property
    def uptime(self) -> float:
        return self.answered / self.rounds if self.rounds else math.nan
