"""Estimated, then confirmed: a rollout judged before labels come, on each version's calibrated
expectation of itself, then confirmed (or undone) by the labels that arrive after promotion.

The worlds are generated: per row a served probability q for class "yes", a calibrated model is
right with probability max(q, 1 - q). Several seeds each; the fakes are the controller tests'.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from cyclone.reference import Calibration
from cyclone.rollout_plan import AnalysisSpec, RolloutSpec
from services.trainer.rollout import RolloutController, RolloutState, Rows, VersionInfo
from services.trainer.rollout.analysis import estimated_quality, expected_correct
from services.trainer.rollout.ports import Calibrated
from tests.unit.test_rollout_controller import (
    FAST,
    NEW,
    OLD,
    FakeOrchestrator,
    FakeRouter,
    FakeStore,
    M,
)

CLASSES = ("no", "yes")
IDENTITY = Calibrated(CLASSES, Calibration((((0.0, 1.0), (0.0, 1.0)),), 200, "test"))
SPEC = AnalysisSpec(min_labelled_rows=50)


def served(
    n: int, confidence: float, seed: int, *, labels: bool = False, prefix: str = "k"
) -> Rows:
    """`n` rows a calibrated model answered with about `confidence` in its answer; with
    `labels`, each answer is right with that probability (realized = expected)."""
    rng = np.random.default_rng(seed)
    conf = np.clip(rng.normal(confidence, 0.05, n), 0.5, 0.999)
    says_yes = rng.random(n) < 0.5
    q = np.where(says_yes, conf, 1 - conf)
    predictions = ["yes" if y else "no" for y in says_yes]
    right = rng.random(n) < conf
    truth = [
        (p if ok else ("no" if p == "yes" else "yes")) if labels else None
        for p, ok in zip(predictions, right, strict=True)
    ]
    return Rows(
        [f"{prefix}{i}" for i in range(n)],
        predictions,
        truth,
        [[1 - float(x), float(x)] for x in q],
        CLASSES,
    )


def test_expected_correctness_is_the_calibrated_probability_of_the_answer() -> None:
    rows = Rows(["a", "b"], ["yes", "no"], [None, None], [[0.2, 0.8], [0.7, 0.3]], CLASSES)
    assert expected_correct(rows, IDENTITY) == pytest.approx([0.8, 0.7])
    # A calibration that knows the model is overconfident brings the expectation down.
    humble = Calibrated(CLASSES, Calibration((((0.0, 1.0), (0.2, 0.7)),), 200, "test"))
    assert expected_correct(rows, humble) == pytest.approx([0.6, 1 - 0.35])
    # Columns served in another order are matched by class, not position.
    swapped = Rows(["a"], ["yes"], [None], [[0.8, 0.2]], ("yes", "no"))
    assert expected_correct(swapped, IDENTITY) == pytest.approx([0.8])
    assert expected_correct(replace(rows, probabilities=None), IDENTITY) is None
    assert expected_correct(replace(rows, classes=("a", "b")), IDENTITY) is None


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_worse_candidate_fails_a_better_one_passes_a_close_call_waits(seed: int) -> None:
    champion = served(300, 0.85, seed)
    worse = estimated_quality(
        champion, served(300, 0.68, seed + 10), IDENTITY, IDENTITY, "accuracy", SPEC
    )
    assert worse.passed is False and "worse beyond" in worse.reason
    assert (
        worse.numbers["candidate_estimated_accuracy"] < worse.numbers["champion_estimated_accuracy"]
    )
    better = estimated_quality(
        champion, served(300, 0.93, seed + 20), IDENTITY, IDENTITY, "accuracy", SPEC
    )
    assert better.passed is True and "not worse" in better.reason
    # 50 labels of the champion against an equal candidate: neither worse nor shown not worse.
    close = estimated_quality(
        served(50, 0.85, seed, labels=True),
        served(50, 0.85, seed + 30),
        IDENTITY,
        IDENTITY,
        "accuracy",
        SPEC,
    )
    assert close.passed is None, close.reason


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_champion_is_judged_on_its_labels_when_it_has_them(seed: int) -> None:
    """Concept shift: the champion still believes it is right 90 % of the time, its labels say
    55 %; a candidate expecting 75 % is not held back by the stale calibration."""
    stale = served(300, 0.9, seed, labels=False)
    truth = served(300, 0.55, seed + 1, labels=True)
    stale_with_labels = replace(stale, labels=truth.labels, predictions=truth.predictions)
    candidate = served(300, 0.75, seed + 2)
    check = estimated_quality(stale_with_labels, candidate, IDENTITY, IDENTITY, "accuracy", SPEC)
    assert check.passed is True, check.reason
    assert "champion_realized_accuracy" in check.numbers
    on_estimates_alone = estimated_quality(stale, candidate, IDENTITY, IDENTITY, "accuracy", SPEC)
    assert on_estimates_alone.passed is False  # what a stale calibration alone would say


def test_nothing_is_estimated_without_what_it_needs() -> None:
    rows = served(100, 0.8, 0)
    assert estimated_quality(rows, rows, IDENTITY, IDENTITY, "mae", SPEC).passed is None
    no_calibration = estimated_quality(rows, rows, IDENTITY, None, "accuracy", SPEC)
    assert no_calibration.passed is None and "no calibration" in no_calibration.reason
    few = estimated_quality(rows, served(10, 0.8, 1), IDENTITY, IDENTITY, "accuracy", SPEC)
    assert few.passed is None
    blind = estimated_quality(rows, rows, None, IDENTITY, "accuracy", SPEC)
    assert blind.passed is None and "neither labels nor a calibration" in blind.reason


class FakeCalibrations:
    async def calibration(self, model: str, version: str) -> Calibrated | None:
        return IDENTITY


def _controller(
    champion: Rows, candidate: Rows, spec: RolloutSpec
) -> tuple[RolloutController, FakeStore, FakeRouter]:
    orchestrator = FakeOrchestrator()
    router = FakeRouter(orchestrator)
    store = FakeStore(
        versions={
            "1": VersionInfo(M, "1", "serving", "classification"),
            "2": VersionInfo(M, "2", "staged", "classification"),
        },
        spec=spec,
        version_rows={"1": champion, "2": candidate},
    )
    controller = RolloutController(orchestrator, router, store, calibrations=FakeCalibrations())
    return controller, store, router


LABEL_FREE = replace(
    FAST,
    deadline_seconds=30,  # a deadline far away: only the estimate can decide in time
    confirm_seconds=0.3,
    analysis=replace(FAST.analysis, min_labelled_rows=50),
)


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_a_better_candidate_is_promoted_without_a_label_then_confirmed(seed: int) -> None:
    controller, store, router = _controller(
        served(300, 0.8, seed), served(300, 0.93, seed + 1), LABEL_FREE
    )
    try:
        await controller.orchestrator.start(M, "1", 1)  # the champion runs before the rollout
        r = await controller.start(M, "2")
        done = await controller.wait(r.id, 10)
    finally:
        await controller.close()
    assert done.state is RolloutState.PROMOTED, [s.reason for s in done.steps]
    decisions = [s.decision for s in done.steps]
    assert "promote" in decisions and decisions[-2:] == ["confirmed", "promoted"]
    promote = next(s for s in done.steps if s.decision == "promote")
    assert "estimated" in promote.reason and "candidate_estimated_accuracy" in promote.numbers
    # During the confirmation the old version stayed warm at 0 %; then it was stopped.
    assert any(s.weights == {OLD: 0, NEW: 100} for s in router.splits)
    assert router.splits[-1].weights == {NEW: 100}
    assert "not contradicted by labels" in done.reason
    assert store.versions["2"].status == "serving"


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_a_worse_candidate_is_rolled_back_with_no_label_sent(seed: int) -> None:
    controller, store, router = _controller(
        served(300, 0.85, seed), served(300, 0.65, seed + 1), LABEL_FREE
    )
    try:
        await controller.orchestrator.start(M, "1", 1)
        r = await controller.start(M, "2")
        done = await controller.wait(r.id, 10)
    finally:
        await controller.close()
    assert done.state is RolloutState.ROLLED_BACK, [s.reason for s in done.steps]
    assert "estimated accuracy" in done.reason
    assert router.splits[-1].weights == {OLD: 100}
    assert store.versions["1"].status == "serving" and store.versions["2"].status == "retired"


async def test_labels_that_contradict_the_estimate_roll_the_promotion_back() -> None:
    spec = replace(LABEL_FREE, confirm_seconds=30)
    champion = served(300, 0.8, 0)
    controller, store, router = _controller(champion, served(300, 0.93, 1), spec)
    try:
        await controller.orchestrator.start(M, "1", 1)
        r = await controller.start(M, "2")
        while r.progress.phase != "confirm":
            assert r.state.active, [s.reason for s in r.steps]
            await _tick()
        assert store.versions["2"].status == "serving"
        # The labels come: the champion was right 80 % of the time, the new version 50 %.
        store.version_rows["1"] = replace(champion, labels=served(300, 0.8, 0, labels=True).labels)
        wrong = served(300, 0.5, 1, labels=True)
        store.version_rows["2"] = replace(
            served(300, 0.93, 1), predictions=wrong.predictions, labels=wrong.labels
        )
        done = await controller.wait(r.id, 10)
    finally:
        await controller.close()
    assert done.state is RolloutState.ROLLED_BACK
    assert "labels contradict the estimate" in done.reason
    assert router.splits[-1].weights == {OLD: 100}
    assert store.versions["1"].status == "serving" and store.versions["2"].status == "retired"


async def _tick() -> None:
    await asyncio.sleep(0.01)


async def test_a_restart_while_the_new_revision_starts_carries_on_when_it_still_runs() -> None:
    """The data plane outlives the trainer: a rollout caught in its start phase finds its new
    revision adopted and goes on; without it, it rolls back as before."""
    for adopted in (True, False):
        controller, store, router = _controller(
            served(300, 0.8, 0), served(300, 0.8, 1), replace(LABEL_FREE, confirm_seconds=0)
        )
        orchestrator = controller.orchestrator
        await orchestrator.start(M, "1", 1)
        r = await controller.start(M, "2")
        await controller.close()  # the trainer dies before the first tick
        record = store.records[r.id]
        assert record.progress.phase == "start" and record.state.active
        if adopted:
            await orchestrator.start(M, "2", 1)  # it kept running (adopted by the new trainer)
        again = RolloutController(orchestrator, router, store, calibrations=FakeCalibrations())
        await again.start_up()
        done = await again.wait(r.id, 10) if adopted else await again.get(r.id)
        await again.close()
        if adopted:
            assert done.state is RolloutState.PROMOTED, [s.reason for s in done.steps]
            assert "resumed while starting" in " ".join(s.reason for s in done.steps)
        else:
            assert done.state is RolloutState.ROLLED_BACK
            assert "before the new revision was healthy" in done.reason
