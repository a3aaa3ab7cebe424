"""Where served predictions go after the caller has its answer.

The servicer hands every scored batch to a `PredictionSink` and never waits for
it; the store-backed sink (batching, disk spool) lives in its own module.
"""

from __future__ import annotations

from typing import Protocol

from services.inference.batching import Prepared
from services.inference.model import LoadedModel, Outputs


class PredictionSink(Protocol):
    def submit(
        self,
        model: LoadedModel,
        prediction_ids: list[str],
        job: Prepared,
        outputs: Outputs,
        latency_ms: float,
        trace_id: str,
    ) -> None:
        """Take one scored request (`job` is what was scored); return at once, never raise."""


class NullSink:
    """Logging switched off."""

    def submit(
        self,
        model: LoadedModel,
        prediction_ids: list[str],
        job: Prepared,
        outputs: Outputs,
        latency_ms: float,
        trace_id: str,
    ) -> None:
        return None
