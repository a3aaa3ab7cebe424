"""The rollout state machine against in-memory router, orchestrator and store (fast unit tests).

The fakes check the invariants the real parts rely on: the router is never given a split naming a
revision that is not running, and the store keeps one active rollout per model.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pytest

from cyclone.errors import FailedPrecondition, NotFound
from cyclone.rollout_plan import AnalysisSpec, RedBlackSpec, RolloutSpec, ShadowSpec
from cyclone.traffic import Endpoint, Revision, RevisionStats, TrafficSplit, revision_name
from services.trainer.rollout import (
    Phase,
    Progress,
    Rollout,
    RolloutController,
    RolloutState,
    RolloutStep,
    Rows,
    SmokeResult,
    VersionInfo,
)
from services.trainer.rollout.strategies import BY_NAME

M = "credit"
OLD, NEW = revision_name(M, "1"), revision_name(M, "2")

FAST = RolloutSpec(
    steps=(50, 100),
    interval_seconds=0.01,
    step_seconds=0.03,
    min_requests=20,
    deadline_seconds=0.4,
    health_timeout_seconds=1,
    drain_seconds=0.05,
    analysis=AnalysisSpec(min_labelled_rows=30, failure_limit=2),
    red_black=RedBlackSpec(keep_old_for_seconds=0.15),
    shadow=ShadowSpec(min_paired_rows=40),
)


class FakeOrchestrator:
    def __init__(self) -> None:
        self.revisions: dict[str, Revision] = {}
        self.fail_start: set[str] = set()
        self.started: list[str] = []
        self.stopped: list[str] = []
        self._port = 9000

    async def start(self, model: str, version: str, replicas: int) -> Revision:
        name = revision_name(model, version)
        if name in self.fail_start:
            raise RuntimeError(f"{name} exited with status 1")
        if name not in self.revisions:
            self._port += 1
            self.revisions[name] = Revision(model, version, (Endpoint("127.0.0.1", self._port),))
            self.started.append(name)
        return self.revisions[name]

    async def stop(self, revision_name: str) -> None:
        if self.revisions.pop(revision_name, None) is not None:
            self.stopped.append(revision_name)

    async def running(self) -> Sequence[Revision]:
        return list(self.revisions.values())


class FakeRouter:
    """Each stats() call serves `weight` requests to that revision at its failure rate."""

    def __init__(self, orchestrator: FakeOrchestrator) -> None:
        self.orchestrator = orchestrator
        self.splits: list[TrafficSplit] = []
        self.unhealthy: set[str] = set()
        self.failure_rate: dict[str, float] = {}
        self.p99: dict[str, float] = {OLD: 10.0, NEW: 10.0}
        self.counts: dict[str, list[float]] = {}
        self.flapping: set[str] = set()  # health checks fail while it takes traffic
        self.health_failures: dict[str, int] = {}

    async def apply(self, split: TrafficSplit) -> None:
        running = {r.name for r in await self.orchestrator.running()}
        named = set(split.weights) | ({split.shadow} if split.shadow else set())
        assert named <= running, f"split names revisions that are not running: {named - running}"
        self.splits.append(split)

    async def wait_healthy(self, revision: Revision, timeout: float) -> None:
        assert any(revision.name in s.revisions for s in self.splits), "health before cluster"
        if revision.name in self.unhealthy:
            raise TimeoutError(f"{revision.name} not healthy within {timeout} s")

    async def stats(self, revision_name: str) -> RevisionStats:
        weight = self.splits[-1].weights.get(revision_name, 0) if self.splits else 0
        c = self.counts.setdefault(revision_name, [0, 0])
        c[0] += weight
        c[1] += weight * self.failure_rate.get(revision_name, 0.0)
        if weight and revision_name in self.flapping:
            self.health_failures[revision_name] = self.health_failures.get(revision_name, 0) + 1
        extra = {"health_check_failures": float(self.health_failures.get(revision_name, 0))}
        return RevisionStats(int(c[0]), int(c[1]), 1.0, self.p99.get(revision_name), extra)

    async def remove_model(self, model: str) -> None:
        self.removed = model

    def max_weight(self, name: str) -> int:
        return max((s.weights.get(name, 0) for s in self.splits), default=0)


@dataclass
class FakeStore:
    versions: dict[str, VersionInfo] = field(default_factory=dict)
    spec: RolloutSpec = FAST
    version_rows: dict[str, Rows] = field(default_factory=dict)
    records: dict[str, Rollout] = field(default_factory=dict)
    statuses: list[tuple[str, str]] = field(default_factory=list)

    async def model_version(self, model: str, version: str) -> VersionInfo | None:
        return self.versions.get(version) if model == M else None

    async def serving_version(self, model: str) -> str | None:
        if model != M:
            return None
        return next((v.version for v in self.versions.values() if v.status == "serving"), None)

    async def registered(self, model: str | None = None) -> list[VersionInfo]:
        return [v for v in self.versions.values() if model in (None, v.model)]

    async def set_status(self, model: str, version: str, status: str) -> None:
        if status == "serving":
            for v, info in self.versions.items():
                if info.status == "serving" and v != version:
                    self.versions[v] = replace(info, status="retired")
        self.versions[version] = replace(self.versions[version], status=status)
        self.statuses.append((version, status))

    async def rollout_spec(self, model: str) -> RolloutSpec:
        return self.spec

    async def rows(self, model: str, version: str, since: datetime) -> Rows:
        return self.version_rows.get(version, Rows([], [], []))

    async def create(self, rollout: Rollout, first: RolloutStep) -> Rollout:
        if any(r.model == rollout.model and r.state.active for r in self.records.values()):
            raise FailedPrecondition(f"model {rollout.model!r} already has an active rollout")
        rollout.id = str(len(self.records) + 1)
        rollout.steps.append(first)
        self.records[rollout.id] = copy.deepcopy(rollout)
        return rollout

    async def save(self, rollout: Rollout, steps: Sequence[RolloutStep]) -> None:
        assert self.records[rollout.id].state.active, "an ended rollout changed"
        self.records[rollout.id] = copy.deepcopy(rollout)

    async def get(self, rollout_id: str) -> Rollout | None:
        found = self.records.get(rollout_id)
        return copy.deepcopy(found) if found else None

    async def list(
        self, model: str | None = None, active_only: bool = False, limit: int = 50
    ) -> list[Rollout]:
        return [
            copy.deepcopy(r)
            for r in reversed(self.records.values())
            if (model is None or r.model == model) and (not active_only or r.state.active)
        ][:limit]


class FakeSmoke:
    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[str] = []

    async def smoke(self, revision: Revision, rows: int) -> SmokeResult:
        self.calls.append(revision.name)
        return SmokeResult(rows, self.failures, rows - self.failures)


@dataclass
class Mesh:
    orchestrator: FakeOrchestrator
    router: FakeRouter
    store: FakeStore
    controller: RolloutController

    def decisions(self, rollout_id: str) -> list[str]:
        return [s.decision for s in self.store.records[rollout_id].steps]


def rows(n: int, right: int, prefix: str = "k", label: str = "yes") -> Rows:
    """n labelled classification rows, the first `right` answered correctly."""
    preds = [label if i < right else "no" for i in range(n)]
    return Rows([f"{prefix}{i}" for i in range(n)], preds, [label] * n)


@pytest.fixture
async def mesh() -> Any:
    orchestrator = FakeOrchestrator()
    await orchestrator.start(M, "1", 1)  # the champion runs before any rollout
    router = FakeRouter(orchestrator)
    store = FakeStore(
        versions={
            "1": VersionInfo(M, "1", "serving", "classification"),
            "2": VersionInfo(M, "2", "staged", "classification"),
        },
        version_rows={"1": rows(60, 50), "2": rows(60, 50)},
    )
    controller = RolloutController(orchestrator, router, store, smoke=FakeSmoke())
    yield Mesh(orchestrator, router, store, controller)
    await controller.close()


async def finish(mesh: Mesh, rollout_id: str, timeout: float = 5) -> Rollout:
    return await mesh.controller.wait(rollout_id, timeout)


async def test_canary_promotes_step_by_step_and_stops_the_old_revision(mesh: Mesh) -> None:
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.PROMOTED, done.steps
    weights = [s.weights.get(NEW, 0) for s in mesh.router.splits]
    assert weights[:3] == [0, 50, 100]  # added at 0 %, then the steps in order
    assert mesh.router.splits[-1].weights == {NEW: 100}
    assert OLD in mesh.orchestrator.stopped and NEW in mesh.orchestrator.revisions
    assert mesh.store.versions["2"].status == "serving"
    assert mesh.store.versions["1"].status == "retired"
    assert ("2", "canary") in mesh.store.statuses
    decisions = mesh.decisions(r.id)
    assert decisions[:3] == ["start", "healthy", "set_weight"]
    assert decisions[-2:] == ["promote", "promoted"]
    advance = next(s for s in done.steps if s.decision == "advance")
    assert "canary_error_rate" in advance.numbers and "canary_accuracy" in advance.numbers


async def test_canary_rolls_back_when_errors_reach_the_failure_limit(mesh: Mesh) -> None:
    mesh.router.failure_rate[NEW] = 0.5
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.ROLLED_BACK
    assert "failure limit 2" in done.reason and "error rate" in done.reason
    assert mesh.decisions(r.id).count("check_failed") == 1
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert NEW in mesh.orchestrator.stopped and OLD in mesh.orchestrator.revisions
    assert mesh.store.versions["2"].status == "retired"
    assert mesh.store.versions["1"].status == "serving"
    last = done.steps[-1]
    assert last.numbers["canary_error_rate"] == pytest.approx(0.5, abs=0.05)


async def test_the_last_step_records_its_numbers_with_the_promotion(mesh: Mesh) -> None:
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    promote = next(s for s in done.steps if s.decision == "promote")
    assert promote.numbers["canary_requests"] >= FAST.min_requests
    assert promote.numbers["canary_health_failures"] == 0


async def test_a_canary_that_goes_unhealthy_rolls_back_though_no_request_failed(
    mesh: Mesh,
) -> None:
    mesh.router.flapping.add(NEW)  # a replica died: retries hid it, health checks did not
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.ROLLED_BACK
    assert "failure limit 2" in done.reason and "went unhealthy" in done.reason
    last = done.steps[-1]
    assert last.numbers["canary_health_failures"] >= 2
    assert last.numbers["canary_error_rate"] == 0
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert mesh.store.versions["2"].status == "retired"


async def test_health_failures_before_the_canary_was_healthy_do_not_count(mesh: Mesh) -> None:
    mesh.router.health_failures[NEW] = 5  # counted while it started, before it was healthy
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.PROMOTED, done.reason


async def test_canary_rolls_back_when_its_p99_is_beyond_the_ratio(mesh: Mesh) -> None:
    mesh.router.p99[NEW] = 40.0  # 4x the champion's 10 ms (limit 2x) and 30 ms slower (>25)
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.ROLLED_BACK
    assert "p99 40.0 ms is 4.00x" in done.reason
    assert done.steps[-1].numbers["p99_ratio"] == 4.0


def test_latency_is_not_judged_on_a_handful_of_calls() -> None:
    from services.trainer.rollout.analysis import LATENCY_MIN_REQUESTS, Counts, latency

    champion = Counts(10_000, 0, 10.0)
    few = latency(champion, Counts(LATENCY_MIN_REQUESTS - 1, 0, 90.0), AnalysisSpec(), 20)
    assert few.passed is None and "not judged" in few.reason
    enough = latency(champion, Counts(LATENCY_MIN_REQUESTS, 0, 90.0), AnalysisSpec(), 20)
    assert enough.passed is False
    # Recent-window p99s: judged by the calls the window holds, not the step's total.
    thin = latency(champion, Counts(10_000, 0, 90.0), AnalysisSpec(), 20, window_requests=60)
    assert thin.passed is None and "~60 canary calls per latency window" in thin.reason
    full = latency(champion, Counts(10_000, 0, 90.0), AnalysisSpec(), 20, window_requests=150)
    assert full.passed is False


async def test_a_recent_latency_window_is_judged_once_however_often_the_rollout_ticks(
    mesh: Mesh,
) -> None:
    from services.trainer.rollout.model import Progress

    now = [1000.0]
    controller = RolloutController(mesh.orchestrator, mesh.router, mesh.store, clock=lambda: now[0])
    rollout = Rollout("1", M, "1", "2", FAST, progress=Progress(step_started_at=990.0))
    stats = RevisionStats(2000, 0, 1.0, 50.0, {"recent_window_s": 1.0})
    assert controller._window_requests(rollout, stats) == 200  # 2000 calls in 10 s, 1 s window
    now[0] += 0.5
    assert controller._window_requests(rollout, stats) == 0  # same window: not judged again
    now[0] += 0.6
    assert controller._window_requests(rollout, stats) == pytest.approx(2000 / 11.1)
    assert controller._window_requests(rollout, RevisionStats(10)) is None  # cumulative p99s


def test_latency_compares_the_routers_recent_window_when_it_has_one() -> None:
    from services.trainer.rollout.controller import _delta

    recent = RevisionStats(
        500, 0, 1.0, 80.0, {"recent_window_s": 1.0, "latency_ms_p99_recent": 9.0}
    )
    assert _delta(recent, [100, 0]).p99_ms == 9.0  # not the cumulative 80 (its cold start)
    quiet = RevisionStats(500, 0, 1.0, 80.0, {"recent_window_s": 1.0})
    assert _delta(quiet, None).p99_ms is None  # no calls lately: nothing to judge
    assert _delta(RevisionStats(500, 0, 1.0, 80.0), None).p99_ms == 80.0


async def test_canary_rolls_back_on_worse_quality(mesh: Mesh) -> None:
    mesh.store.version_rows["2"] = rows(60, 20)  # 33 % right vs the champion's 83 %
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.ROLLED_BACK
    assert "accuracy" in done.reason
    assert done.steps[-1].numbers["quality_p_value"] < 0.05


async def test_health_failure_aborts_with_traffic_never_moved(mesh: Mesh) -> None:
    mesh.router.unhealthy.add(NEW)
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.FAILED
    assert "health" in done.reason
    assert mesh.router.max_weight(NEW) == 0
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert NEW in mesh.orchestrator.stopped
    assert mesh.store.versions["2"].status == "retired"


async def test_a_revision_that_does_not_start_fails_the_rollout(mesh: Mesh) -> None:
    mesh.orchestrator.fail_start.add(NEW)
    done = await finish(mesh, (await mesh.controller.start(M, "2")).id)
    assert done.state is RolloutState.FAILED and "did not start" in done.reason
    assert mesh.router.max_weight(NEW) == 0


@pytest.mark.parametrize(
    ("policy", "state"),
    [
        ("promote", RolloutState.PROMOTED),
        ("rollback", RolloutState.ROLLED_BACK),
        ("hold", RolloutState.PAUSED),
    ],
)
async def test_deadline_without_enough_traffic_follows_on_deadline(
    mesh: Mesh, policy: str, state: RolloutState
) -> None:
    mesh.store.spec = replace(FAST, min_requests=10_000, on_deadline=policy)  # type: ignore[arg-type]
    r = await mesh.controller.start(M, "2")
    if state is RolloutState.PAUSED:
        for _ in range(200):
            if mesh.store.records[r.id].state is RolloutState.PAUSED:
                break
            await asyncio.sleep(0.01)
        held = mesh.store.records[r.id]
        assert held.state is RolloutState.PAUSED and held.weight == 50
        assert "on_deadline=hold" in held.steps[-1].reason
        done = await mesh.controller.rollback(r.id, "a person decided")
        assert done.state is RolloutState.ROLLED_BACK and done.reason == "a person decided"
        return
    done = await finish(mesh, r.id)
    assert done.state is state
    assert f"on_deadline={policy}" in done.reason and "requests <" in done.reason


async def test_no_labels_by_the_deadline_decides_on_errors_and_records_it(mesh: Mesh) -> None:
    mesh.store.version_rows = {}
    done = await finish(mesh, (await mesh.controller.start(M, "2")).id)
    assert done.state is RolloutState.PROMOTED
    judged = next(s for s in done.steps if s.decision == "quality_not_judged")
    assert judged.numbers["quality_judged"] == 0
    assert "deciding on error rate and latency" in judged.reason


async def test_blue_green_smoke_failure_rolls_back_before_any_traffic(mesh: Mesh) -> None:
    mesh.controller.smoke = FakeSmoke(failures=3)
    r = await mesh.controller.start(M, "2", "blue_green")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.ROLLED_BACK and "smoke test failed" in done.reason
    assert mesh.router.max_weight(NEW) == 0
    assert done.steps[-1].numbers["smoke_failures"] == 3


async def test_blue_green_passes_smoke_then_moves_in_steps(mesh: Mesh) -> None:
    smoke = FakeSmoke()
    mesh.controller.smoke = smoke
    done = await finish(mesh, (await mesh.controller.start(M, "2", "blue_green")).id)
    assert done.state is RolloutState.PROMOTED and smoke.calls == [NEW]
    assert [s.weights.get(NEW, 0) for s in mesh.router.splits][:3] == [0, 50, 100]


async def test_red_black_cuts_over_at_once_and_keeps_the_old_revision_warm(mesh: Mesh) -> None:
    r = await mesh.controller.start(M, "2", "red_black")
    for _ in range(200):
        if mesh.store.records[r.id].progress.phase == "keep_warm":
            break
        await asyncio.sleep(0.005)
    assert mesh.router.splits[-1].weights == {OLD: 0, NEW: 100}
    assert OLD in mesh.orchestrator.revisions  # warm
    done = await mesh.controller.rollback(r.id, "bad answers")
    assert done.state is RolloutState.ROLLED_BACK
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert mesh.orchestrator.stopped == [NEW]


async def test_red_black_promotes_after_keep_warm(mesh: Mesh) -> None:
    done = await finish(mesh, (await mesh.controller.start(M, "2", "red_black")).id)
    assert done.state is RolloutState.PROMOTED
    assert mesh.router.splits[-1].weights == {NEW: 100} and OLD in mesh.orchestrator.stopped


async def test_shadow_promotes_a_challenger_not_worse_on_paired_rows(mesh: Mesh) -> None:
    mesh.store.version_rows = {"1": rows(60, 40), "2": rows(60, 55)}
    done = await finish(mesh, (await mesh.controller.start(M, "2", "shadow")).id)
    shadowed = [s for s in mesh.router.splits if s.shadow == NEW]
    assert shadowed and all(s.weights == {OLD: 100} for s in shadowed)
    assert done.state is RolloutState.PROMOTED
    promote = next(s for s in done.steps if s.decision == "promote")
    assert promote.numbers["pairs"] == 60 and promote.numbers["challenger_only_right"] == 15


async def test_shadow_discards_a_worse_challenger(mesh: Mesh) -> None:
    mesh.store.version_rows = {"1": rows(60, 55), "2": rows(60, 30)}
    done = await finish(mesh, (await mesh.controller.start(M, "2", "shadow")).id)
    assert done.state is RolloutState.ROLLED_BACK and "worse" in done.reason
    assert mesh.router.max_weight(NEW) == 0 and NEW in mesh.orchestrator.stopped


async def test_resume_after_restart_carries_on_from_the_record(mesh: Mesh) -> None:
    mesh.store.spec = replace(FAST, step_seconds=0.2, deadline_seconds=1.0)
    r = await mesh.controller.start(M, "2")
    for _ in range(200):
        if mesh.store.records[r.id].progress.phase == "steps":
            break
        await asyncio.sleep(0.005)
    await mesh.controller.close()  # the trainer dies mid-canary
    assert mesh.store.records[r.id].state.active
    again = RolloutController(mesh.orchestrator, mesh.router, mesh.store)
    await again.start_up()
    done = await again.wait(r.id, 5)
    await again.close()
    assert done.state is RolloutState.PROMOTED
    assert "resumed" in [s.decision for s in done.steps]


async def test_restart_with_the_new_revision_gone_rolls_back_cleanly(mesh: Mesh) -> None:
    mesh.store.spec = replace(FAST, step_seconds=5, deadline_seconds=10)
    r = await mesh.controller.start(M, "2")
    for _ in range(200):
        if mesh.store.records[r.id].progress.phase == "steps":
            break
        await asyncio.sleep(0.005)
    await mesh.controller.close()
    mesh.orchestrator.revisions.clear()  # every process died with the trainer
    again = RolloutController(mesh.orchestrator, mesh.router, mesh.store)
    await again.start_up()
    done = await again.get(r.id)
    assert done.state is RolloutState.ROLLED_BACK and "no longer run" in done.reason
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert OLD in mesh.orchestrator.revisions  # the champion was started again first


async def test_second_rollout_of_a_model_is_refused(mesh: Mesh) -> None:
    mesh.store.versions["3"] = VersionInfo(M, "3", "staged", "classification")
    mesh.store.spec = replace(FAST, step_seconds=5, deadline_seconds=10)
    first = await mesh.controller.start(M, "2")
    with pytest.raises(FailedPrecondition, match="already has an active rollout"):
        await mesh.controller.start(M, "3")
    await mesh.controller.rollback(first.id)


async def test_unknown_and_serving_versions_are_refused(mesh: Mesh) -> None:
    with pytest.raises(NotFound, match=r"no version '9' \(its versions: 1 \(serving\), 2"):
        await mesh.controller.start(M, "9")
    with pytest.raises(NotFound, match=r"'credt' is not registered \(registered models: credit\)"):
        await mesh.controller.start("credt", "2")
    with pytest.raises(FailedPrecondition, match="already serving"):
        await mesh.controller.start(M, "1")
    with pytest.raises(NotFound, match="rollout_id"):
        await mesh.controller.get("42")
    assert mesh.router.splits == [] and mesh.store.records == {}


async def test_watch_streams_every_step_until_the_end(mesh: Mesh) -> None:
    r = await mesh.controller.start(M, "2")
    seen = [s.decision async for s in mesh.controller.watch(r.id)]
    assert seen[0] == "start" and seen[-1] == "promoted"
    assert seen == mesh.decisions(r.id)


async def test_rollback_after_a_promotion_is_a_rollout_back_to_the_previous_version(
    mesh: Mesh,
) -> None:
    promoted = await finish(mesh, (await mesh.controller.start(M, "2")).id)
    assert promoted.state is RolloutState.PROMOTED and OLD in mesh.orchestrator.stopped
    splits_before = len(mesh.router.splits)
    back = await mesh.controller.revert(M, "v2 went RED")
    assert back.id != promoted.id and (back.from_version, back.to_version) == ("2", "1")
    assert back.strategy == "red_black"
    assert back.steps[0].reason == "rollback of credit from 2 to 1: v2 went RED"
    done = await finish(mesh, back.id)
    assert done.state is RolloutState.PROMOTED, done.steps
    # Zero downtime: v1 added at 0 % beside v2, then all at once, then v2 out and stopped.
    splits = mesh.router.splits[splits_before:]
    assert [s.weights for s in splits] == [{NEW: 100, OLD: 0}, {NEW: 0, OLD: 100}, {OLD: 100}]
    assert mesh.orchestrator.stopped[-1] == NEW and OLD in mesh.orchestrator.revisions
    assert mesh.store.versions["1"].status == "serving"
    assert mesh.store.versions["2"].status == "retired"


async def test_a_repeated_rollback_alert_goes_back_once(mesh: Mesh) -> None:
    await finish(mesh, (await mesh.controller.start(M, "2")).id)
    first = await mesh.controller.revert(M, "RED", key="alert 7")
    await finish(mesh, first.id)
    again = await mesh.controller.revert(M, "RED", key="alert 7")
    assert again.id == first.id
    assert mesh.store.versions["1"].status == "serving"


async def test_rollback_with_no_earlier_version_is_refused(mesh: Mesh) -> None:
    with pytest.raises(FailedPrecondition, match="no version to go back to"):
        await mesh.controller.revert(M)
    with pytest.raises(NotFound, match=r"'forest' is not registered \(registered models: credit\)"):
        await mesh.controller.revert("forest")


async def test_rollback_during_a_rollout_rolls_that_rollout_back(mesh: Mesh) -> None:
    mesh.store.spec = replace(FAST, deadline_seconds=60, step_seconds=60)
    r = await mesh.controller.start(M, "2")
    back = await mesh.controller.revert(M, "by hand")
    assert back.id == r.id and back.state is RolloutState.ROLLED_BACK
    assert mesh.store.versions["1"].status == "serving"


# ---- failure paths: each injected -------------------------------------------------------------


async def wait_for_phase(mesh: Mesh, rollout_id: str, phase: Phase) -> None:
    for _ in range(400):
        if mesh.store.records[rollout_id].progress.phase is phase:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"rollout {rollout_id} never reached {phase}")


async def test_an_exception_inside_a_tick_rolls_back_as_an_internal_error(mesh: Mesh) -> None:
    async def store_down(model: str, version: str, since: datetime) -> Rows:
        raise ConnectionError("store unreachable")

    mesh.store.rows = store_down  # type: ignore[method-assign]  # read first when judging a step
    r = await mesh.controller.start(M, "2")
    done = await finish(mesh, r.id)
    assert done.state is RolloutState.ROLLED_BACK
    assert done.reason == "internal error: store unreachable"
    assert mesh.decisions(r.id)[-2:] == ["set_weight", "rollback"]  # the step moved, then back
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert mesh.orchestrator.stopped == [NEW] and OLD in mesh.orchestrator.revisions
    assert mesh.store.versions["2"].status == "retired"
    assert mesh.store.versions["1"].status == "serving"


async def test_a_resume_that_fails_rolls_back_cleanly(mesh: Mesh) -> None:
    mesh.store.spec = replace(FAST, step_seconds=5, deadline_seconds=10)
    r = await mesh.controller.start(M, "2")
    await wait_for_phase(mesh, r.id, Phase.STEPS)
    await mesh.controller.close()  # the trainer dies mid-canary; both revisions live on
    real_apply = mesh.router.apply
    refused: list[TrafficSplit] = []

    async def proxy_refuses_once(split: TrafficSplit) -> None:
        if not refused:
            refused.append(split)
            raise RuntimeError("envoy rejected the config")
        await real_apply(split)

    mesh.router.apply = proxy_refuses_once  # type: ignore[method-assign]
    again = RolloutController(mesh.orchestrator, mesh.router, mesh.store)
    await again.start_up()
    done = await again.get(r.id)
    await again.close()
    assert refused and refused[0].weights == {OLD: 50, NEW: 50}  # resume re-applied the split
    assert done.state is RolloutState.ROLLED_BACK
    assert done.reason == "could not resume after a restart"
    assert "resumed" not in mesh.decisions(r.id)
    assert mesh.router.splits[-1].weights == {OLD: 100}
    assert NEW in mesh.orchestrator.stopped and OLD in mesh.orchestrator.revisions
    assert mesh.store.versions["2"].status == "retired"
    assert mesh.store.versions["1"].status == "serving"


async def test_blue_green_without_a_smoke_tester_is_refused_at_start(mesh: Mesh) -> None:
    mesh.controller.smoke = None
    with pytest.raises(FailedPrecondition, match=r"blue_green smoke-tests .* no smoke tester"):
        await mesh.controller.start(M, "2", "blue_green")
    assert mesh.store.records == {} and NEW not in mesh.orchestrator.started
    mesh.store.spec = replace(FAST, strategy="blue_green")  # the plan's strategy: refused too
    with pytest.raises(FailedPrecondition, match="no smoke tester"):
        await mesh.controller.start(M, "2")
    done = await finish(mesh, (await mesh.controller.start(M, "2", "canary")).id)
    assert done.state is RolloutState.PROMOTED  # what the refusal suggests works


async def test_a_blue_green_rollout_resumed_without_a_smoke_tester_rolls_back(
    mesh: Mesh,
) -> None:
    smoking = asyncio.Event()

    class HangingSmoke:
        async def smoke(self, revision: Revision, rows: int) -> SmokeResult:
            smoking.set()
            await asyncio.Event().wait()  # the trainer dies while smoke requests are in flight
            raise AssertionError("unreachable")

    mesh.controller.smoke = HangingSmoke()
    r = await mesh.controller.start(M, "2", "blue_green")
    await asyncio.wait_for(smoking.wait(), 5)
    await mesh.controller.close()
    assert mesh.orchestrator.revisions.keys() == {OLD, NEW}  # both outlive the trainer
    again = RolloutController(mesh.orchestrator, mesh.router, mesh.store)  # no smoke tester
    await again.start_up()
    done = await again.wait(r.id, 5)
    await again.close()
    assert done.state is RolloutState.ROLLED_BACK
    assert "needs a smoke tester" in done.reason
    assert mesh.router.max_weight(NEW) == 0 and NEW in mesh.orchestrator.stopped


async def test_a_phase_this_controller_does_not_know_rolls_back_on_resume(mesh: Mesh) -> None:
    mesh.store.spec = replace(FAST, step_seconds=5, deadline_seconds=10)
    r = await mesh.controller.start(M, "2")
    await wait_for_phase(mesh, r.id, Phase.STEPS)
    await mesh.controller.close()
    record = mesh.store.records[r.id]
    record.progress = Progress.from_dict({**record.progress.to_dict(), "phase": "ramp"})
    again = RolloutController(mesh.orchestrator, mesh.router, mesh.store)
    await again.start_up()
    done = await again.wait(r.id, 5)
    await again.close()
    assert done.state is RolloutState.ROLLED_BACK
    assert done.reason == "unknown phase 'unknown' of canary"
    assert mesh.router.splits[-1].weights == {OLD: 100}


@pytest.mark.parametrize("name", sorted(BY_NAME))
async def test_each_strategy_goes_only_through_the_phases_its_module_lists(
    mesh: Mesh, name: str
) -> None:
    mesh.store.version_rows = {"1": rows(60, 40), "2": rows(60, 55)}  # shadow: promote
    seen: list[Phase] = []
    real_save = mesh.store.save

    async def save(rollout: Rollout, steps: Sequence[RolloutStep]) -> None:
        if not seen or seen[-1] is not rollout.progress.phase:
            seen.append(rollout.progress.phase)
        await real_save(rollout, steps)

    mesh.store.save = save  # type: ignore[method-assign]
    done = await finish(mesh, (await mesh.controller.start(M, "2", name)).id)
    assert done.state is RolloutState.PROMOTED, done.reason
    phases = BY_NAME[name].phases
    assert set(seen) <= set(phases), f"{name} went through {seen}, lists {phases}"
    assert sorted(seen, key=phases.index) == seen  # in the order the module lists them
    assert seen[-1] is Phase.FINALIZE


async def test_a_strategy_this_controller_does_not_know_rolls_back_on_resume(mesh: Mesh) -> None:
    mesh.store.spec = replace(FAST, step_seconds=5, deadline_seconds=10)
    r = await mesh.controller.start(M, "2")
    await wait_for_phase(mesh, r.id, Phase.STEPS)
    await mesh.controller.close()
    record = mesh.store.records[r.id]
    record.spec = replace(record.spec, strategy="ramp")  # a newer controller's strategy
    again = RolloutController(mesh.orchestrator, mesh.router, mesh.store)
    await again.start_up()
    done = await again.wait(r.id, 5)
    await again.close()
    assert done.state is RolloutState.ROLLED_BACK and done.reason == "unknown strategy 'ramp'"
    assert mesh.router.splits[-1].weights == {OLD: 100} and NEW in mesh.orchestrator.stopped
