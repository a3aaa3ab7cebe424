"""The canary's latency check: a ratio over a fast champion is not enough to fail it."""

from __future__ import annotations

import pytest

from cyclone.rollout_plan import AnalysisSpec
from services.trainer.rollout.analysis import Counts, latency

SPEC = AnalysisSpec()  # 2x and +25 ms


@pytest.mark.parametrize(
    ("champion_ms", "canary_ms", "passes"),
    [
        (4.0, 10.5, True),  # a cold start on a fast model: 2.6x, but 6.5 ms
        (4.0, 28.0, True),  # 7x, still only 24 ms slower
        (4.0, 80.0, False),  # 20x and 76 ms: users feel it
        (100.0, 180.0, True),  # 76 ms slower but under 2x
        (100.0, 260.0, False),
    ],
)
def test_latency_needs_both_the_ratio_and_the_milliseconds(
    champion_ms: float, canary_ms: float, passes: bool
) -> None:
    check = latency(Counts(500, 0, champion_ms), Counts(500, 0, canary_ms), SPEC, 50)
    assert check.passed is passes, check.reason
    assert check.numbers["p99_ratio"] == pytest.approx(canary_ms / champion_ms)


def test_too_few_canary_requests_is_inconclusive() -> None:
    check = latency(Counts(500, 0, 4.0), Counts(10, 0, 400.0), SPEC, 50)
    assert check.passed is None
