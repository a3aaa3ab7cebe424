"""Blue-green's smoke tester against a real in-process inference server and the probes.json
that import wrote next to each model."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cyclone.models.convert import PROBE_ROWS, PROBES_FILE
from cyclone.traffic import Endpoint, Revision
from services.trainer.rollout.smoke import ProbeSmokeTester
from tests.conftest import BENCH, CREDIT, ModelRepo, RunningServer

StartServer = Callable[..., contextlib.AbstractAsyncContextManager[RunningServer]]


def at(model: str, *ports: int) -> Revision:
    return Revision(model, "1", tuple(Endpoint("127.0.0.1", p) for p in ports))


def probes(repo: Path, model: str = CREDIT) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo / model / "1" / PROBES_FILE).read_text())
    return data


def test_import_writes_probes_with_the_models_own_answers(model_repo: ModelRepo) -> None:
    data = probes(model_repo.root)
    assert len(data["rows"]) == len(data["outputs"]) == PROBE_ROWS
    assert set(data["rows"][0]) == {"age", "income", "debt_ratio", "city"}
    assert {o["label"] for o in data["outputs"]} <= {"0", "1"}
    regression = probes(model_repo.root, BENCH)
    assert all(isinstance(o["value"], float) for o in regression["outputs"])


async def test_every_known_answer_matches_on_every_replica(
    model_repo: ModelRepo, inference_server: RunningServer
) -> None:
    tester = ProbeSmokeTester(model_repo.root)
    port = inference_server.port
    for model in (CREDIT, BENCH):
        result = await tester.smoke(at(model, port, port), 25)  # more rows than probes: cycles
        assert (result.requests, result.failures, result.correct) == (25, 0, 25), result.detail


async def test_a_wrong_answer_is_counted_and_quoted(
    model_repo: ModelRepo, inference_server: RunningServer, tmp_path: Path
) -> None:
    repo = model_repo.copy_to(tmp_path / "repo")
    data = probes(repo)
    wrong = "1" if data["outputs"][3]["label"] == "0" else "0"
    data["outputs"][3]["label"] = wrong
    (repo / CREDIT / "1" / PROBES_FILE).write_text(json.dumps(data))
    result = await ProbeSmokeTester(repo).smoke(at(CREDIT, inference_server.port), PROBE_ROWS)
    assert (result.requests, result.failures, result.correct) == (PROBE_ROWS, 0, PROBE_ROWS - 1)
    assert "row 3: got" in result.detail and f"expected '{wrong}'" in result.detail


async def test_a_regression_answer_outside_the_tolerance_is_wrong(
    model_repo: ModelRepo, inference_server: RunningServer, tmp_path: Path
) -> None:
    repo = model_repo.copy_to(tmp_path / "repo")
    data = probes(repo, BENCH)
    data["outputs"][0]["value"] += 1.0
    (repo / BENCH / "1" / PROBES_FILE).write_text(json.dumps(data))
    result = await ProbeSmokeTester(repo).smoke(at(BENCH, inference_server.port), PROBE_ROWS)
    assert result.correct == PROBE_ROWS - 1 and "row 0: got" in result.detail


async def test_an_unreachable_replica_fails_its_requests(model_repo: ModelRepo) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    tester = ProbeSmokeTester(model_repo.root, timeout=2)
    result = await tester.smoke(at(CREDIT, port), 4)
    assert (result.requests, result.failures, result.correct) == (4, 4, 0)
    assert "UNAVAILABLE" in result.detail


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (None, "no known answers"),
        ("{not json", "not readable JSON"),
        ('{"rows": [], "outputs": []}', "rows: expected a non-empty list"),
        ('{"rows": [{"age": 1}], "outputs": []}', "outputs: expected a list as long as rows"),
        ('{"rows": [{"age": 1}], "outputs": ["0"], "tolerance": -1}', "tolerance: expected"),
    ],
)
async def test_missing_or_malformed_probes_fail_the_smoke_test_naming_the_field(
    model_repo: ModelRepo, tmp_path: Path, content: str | None, field: str
) -> None:
    repo = model_repo.copy_to(tmp_path / "repo")
    path = repo / CREDIT / "1" / PROBES_FILE
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    result = await ProbeSmokeTester(repo).smoke(at(CREDIT, 1), 5)
    assert (result.requests, result.failures, result.correct) == (0, 0, 0)
    assert str(path) in result.detail and field in result.detail
