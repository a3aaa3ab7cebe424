"""OpenTelemetry: with an OTLP endpoint set, every RPC gets a server span whose trace id
travels with the prediction to the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cyclone.models.convert import import_pipeline
from cyclone_app.examples import bench_regressor

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).with_name("tracing_check.py")


def test_predict_is_traced_and_the_trace_id_reaches_the_sink(tmp_path: Path) -> None:
    model, _ = bench_regressor()
    import_pipeline(model, "rf", tmp_path)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    predict_spans = [s for s in seen["spans"] if s["name"].endswith("InferenceService/Predict")]
    assert len(predict_spans) == 1, seen["spans"]
    assert seen["sink_trace_ids"] == [predict_spans[0]["trace_id"]]


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from cyclone import telemetry

    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert telemetry.server_tracing_interceptors("inference") == []
    assert telemetry.current_trace_id() == ""
