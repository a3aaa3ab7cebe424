"""The rollout controller: one small state machine per rollout, advanced once per interval.

Order of change, whatever the strategy: start the new revision -> add it to the split at 0 % ->
wait until the proxy sees it healthy (else: stop it, traffic never moved) -> move weights ->
at 100 %: mark it serving, take the old revision out of the split, stop it once it has drained.
A rollback puts the champion back at 100 % first, then stops the challenger. Every step and
decision is recorded (with its numbers) before the next one is taken, so a restarted controller
resumes from the record or rolls back cleanly. What happens between "healthy at 0 %" and
the promotion is the strategy's: `strategies/<name>.py`.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from cyclone.errors import FailedPrecondition, InvalidArgument, NotFound, NotLeader
from cyclone.rollout_plan import RolloutSpec
from cyclone.rollout_strategies import STRATEGIES, StrategyName
from cyclone.traffic import Revision, RevisionStats, TrafficRouter, TrafficSplit, revision_name

from . import analysis, strategies
from .analysis import Check, Counts
from .model import Phase, Progress, Rollout, RolloutState, RolloutStep
from .ports import Calibrations, Orchestrator, RolloutStore, Rows, SmokeTester
from .strategies.base import Strategy, rows_since

log = logging.getLogger(__name__)

S = RolloutState

# How far back the champion's realized quality is looked for when a rollout starts.
CHAMPION_LOOKBACK_S = 300.0


@dataclass(frozen=True)
class ControllerSettings:
    """Knobs of the controller itself (the rollout's own come from the plan)."""

    resume: bool = True  # on start-up carry on active rollouts (False: roll them back)


class RolloutController:
    """Starts, advances, promotes and rolls back rollouts; transport-free.

    `controller = RolloutController(orchestrator, router, store)`; `await controller.start_up()`
    resumes what a previous process left; `await controller.close()` stops the background tasks
    (rollouts stay recorded as they are and resume on the next start-up).

    Its methods without a leading underscore besides that API (`apply`, `record`, `checks`,
    `finalize`, `roll_back_to_champion`, ...) are `strategies.base.Engine`: the shared steps
    each strategy module (`strategies/<name>.py`) drives its own phases with.
    """

    def __init__(
        self,
        orchestrator: Orchestrator,
        router: TrafficRouter,
        store: RolloutStore,
        settings: ControllerSettings | None = None,
        *,
        smoke: SmokeTester | None = None,
        calibrations: Calibrations | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.orchestrator = orchestrator
        self.router = router
        self.store = store
        self.settings = settings or ControllerSettings()
        self.smoke = smoke
        self.calibrations = calibrations
        # Per rollout: the champion's newest labelled rows from before it began (read once).
        self._champion_recent: dict[str, Rows] = {}
        self.clock = clock
        self._rollouts: dict[str, Rollout] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._watchers: dict[str, builtins.list[asyncio.Queue[RolloutStep | None]]] = {}
        self._starting: set[str] = set()

    # ---- public API ------------------------------------------------------------------------

    async def start(
        self, model: str, to_version: str, strategy: StrategyName | None = None
    ) -> Rollout:
        """Begin moving `model`'s traffic to `to_version` (strategy: the plan's unless given)."""
        return await self._begin(model, to_version, strategy)

    async def revert(self, model: str, reason: str = "", key: str = "") -> Rollout:
        """Send `model`'s traffic back to the previous version.

        During a rollout that is its rollback. After a promotion it is a rollout of its own back
        to the version the promotion replaced: red-black (started, healthy at 0 %, then all
        traffic at once) with a one-second keep-warm, so the version being left stops as soon
        as it has drained. `key` (an alert id) makes a repeated request return the first one's
        rollout instead of going back twice.
        """
        if not model:
            raise InvalidArgument("model: empty")
        recent = await self.list(model, limit=20)
        active = [r for r in recent if r.state.active]
        if active:
            return await self.rollback(active[0].id, reason)
        marker = f"[{key}]" if key else ""
        repeated = [r for r in recent if marker and r.steps and marker in r.steps[0].reason]
        if repeated:
            return repeated[0]
        serving = await self.store.serving_version(model)
        if serving is None:
            raise NotFound(await self._unknown(model, ""))
        promoted = next(
            (r for r in recent if r.state is S.PROMOTED and r.to_version == serving), None
        )
        if promoted is None or not promoted.from_version:
            raise FailedPrecondition(
                f"model: {model!r} has no version to go back to: {serving} was not promoted"
                " over an earlier one"
            )
        spec = (await self.store.rollout_spec(model)).with_strategy("red_black")
        # Going back to a version that served before needs no long keep-warm (1 s: the
        # shortest a stored spec can say).
        spec = replace(spec, red_black=replace(spec.red_black, keep_old_for_seconds=1.0))
        why = f"rollback of {model} from {serving} to {promoted.from_version}"
        why += f": {reason}" if reason else ""
        return await self._begin(
            model, promoted.from_version, None, spec=spec, note=f"{why} {marker}".strip()
        )

    async def _begin(
        self,
        model: str,
        to_version: str,
        strategy: StrategyName | None,
        *,
        spec: RolloutSpec | None = None,
        note: str = "",
    ) -> Rollout:
        if not model:
            raise InvalidArgument("model: empty")
        if not to_version:
            raise InvalidArgument("version: empty")
        if strategy is not None and strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")
        if model in self._starting:
            raise FailedPrecondition(f"model: {model!r} already has a rollout starting")
        self._starting.add(model)
        try:
            info = await self.store.model_version(model, to_version)
            if info is None:
                raise NotFound(await self._unknown(model, to_version))
            if info.status == "serving":
                raise FailedPrecondition(f"version: {model} {to_version} is already serving")
            active = [r for r in await self.store.list(model, active_only=True)]
            if active:
                raise FailedPrecondition(
                    f"model: {model!r} already has an active rollout ({active[0].id}, to version"
                    f" {active[0].to_version}); promote or roll it back first"
                )
            if spec is None:
                spec = (await self.store.rollout_spec(model)).with_strategy(strategy)
            champion = await self.store.serving_version(model)
            if champion and strategies.BY_NAME[spec.strategy].needs_smoke_tester and not self.smoke:
                # Its gate is the point of the strategy: refused, never skipped.
                raise FailedPrecondition(
                    f"strategy: {spec.strategy} smoke-tests the new version before it takes"
                    " traffic, and this controller has no smoke tester; use canary instead"
                )
            now = self.clock()
            rollout = Rollout(
                id="",
                model=model,
                from_version=champion,
                to_version=to_version,
                spec=spec,
                progress=Progress(started_at=now),
            )
            first = self._step(
                rollout,
                "start",
                note
                or f"{spec.strategy} rollout of {model} {to_version}"
                + (f" replacing {champion}" if champion else " (first version)"),
            )
            rollout = await self.store.create(rollout, first)
        finally:
            self._starting.discard(model)
        self._spawn(rollout)
        return rollout

    async def promote(self, rollout_id: str) -> Rollout:
        """Finish now: the new version takes all traffic (also resumes a held rollout)."""
        rollout = await self._active(rollout_id)
        async with self._lock(rollout.id):
            if rollout.state.active:
                if rollout.progress.phase is Phase.START:
                    raise FailedPrecondition(
                        f"rollout_id: {rollout.id} has not started its new revision yet"
                    )
                await self.finalize(rollout, "promoted by hand")
        self._wake_up(rollout.id)
        return rollout

    async def rollback(self, rollout_id: str, reason: str = "") -> Rollout:
        """Give the traffic back to the champion and stop the new revision."""
        rollout = await self._active(rollout_id)
        async with self._lock(rollout.id):
            if rollout.state.active:
                await self.roll_back_to_champion(rollout, reason or "rolled back by hand")
        self._wake_up(rollout.id)
        return rollout

    async def get(self, rollout_id: str) -> Rollout:
        if rollout_id in self._rollouts:
            return self._rollouts[rollout_id]
        found = await self.store.get(rollout_id)
        if found is None:
            raise NotFound(f"rollout_id: rollout {rollout_id!r} not found")
        return found

    async def list(self, model: str | None = None, limit: int = 50) -> builtins.list[Rollout]:
        rows = await self.store.list(model or None, limit=limit)
        return [self._rollouts.get(r.id, r) for r in rows]

    async def watch(self, rollout_id: str) -> AsyncIterator[RolloutStep]:
        """The steps so far, then each new one, until the rollout ends."""
        rollout = await self.get(rollout_id)
        queue: asyncio.Queue[RolloutStep | None] = asyncio.Queue()
        seen = list(rollout.steps)
        if rollout.state.active:
            self._watchers.setdefault(rollout.id, []).append(queue)
        try:
            for step in seen:
                yield step
            if not rollout.state.active:
                return
            while (event := await queue.get()) is not None:
                yield event
        finally:
            with contextlib.suppress(ValueError, KeyError):
                self._watchers[rollout.id].remove(queue)

    async def start_up(self) -> None:
        """Resume (or cleanly roll back) the rollouts a previous controller left active, and
        those this one stopped driving (a write refused while its leadership lapsed)."""
        running = {r.name: r for r in await self.orchestrator.running()}
        for rollout in await self.store.list(active_only=True, limit=1000):
            task = self._tasks.get(rollout.id)
            if task is not None and not task.done():
                continue  # still driven here
            try:
                await self._resume(rollout, running)
            except NotLeader:
                raise  # deposed while starting up: the new leader resumes it
            except Exception:
                log.exception("rollout %s: could not resume; rolling back", rollout.id)
                await self.roll_back_to_champion(rollout, "could not resume after a restart")

    async def close(self) -> None:
        """Stop advancing rollouts (they stay recorded and resume on the next start-up)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for queues in self._watchers.values():
            for q in queues:
                q.put_nowait(None)

    async def wait(self, rollout_id: str, timeout: float | None = None) -> Rollout:
        """Wait until the rollout ends (tests, CLI)."""
        task = self._tasks.get(rollout_id)
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return await self.get(rollout_id)

    # ---- the loop ----------------------------------------------------------------------------

    def _spawn(self, rollout: Rollout) -> None:
        self._rollouts[rollout.id] = rollout
        self._wake[rollout.id] = asyncio.Event()
        self._tasks[rollout.id] = asyncio.create_task(
            self._drive(rollout), name=f"rollout-{rollout.id}"
        )

    async def _drive(self, rollout: Rollout) -> None:
        while rollout.state.active:
            if rollout.state is S.PAUSED:
                await self._wake[rollout.id].wait()
                self._wake[rollout.id].clear()
                continue
            try:
                async with self._lock(rollout.id):
                    if rollout.state in (S.PENDING, S.PROGRESSING):
                        await self._tick(rollout)
            except asyncio.CancelledError:
                raise
            except NotLeader as exc:
                # A write refused (leadership lapsed or lost): stop driving, roll nothing back.
                # The store has its last recorded step; whoever leads next resumes from it.
                log.warning("rollout %s: %s; resumed by the next leader", rollout.id, exc)
                break
            except Exception as exc:
                log.exception("rollout %s: step failed", rollout.id)
                async with self._lock(rollout.id):
                    if rollout.state.active:
                        await self.roll_back_to_champion(rollout, f"internal error: {exc}")
                break
            if rollout.state.active:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wake[rollout.id].wait(), rollout.spec.interval_seconds
                    )
                self._wake[rollout.id].clear()
        self._champion_recent.pop(rollout.id, None)
        for q in self._watchers.pop(rollout.id, []):
            q.put_nowait(None)

    async def _tick(self, r: Rollout) -> None:
        """Run the current phase once: the shared ones here, the strategy's own from its
        module (`strategies/<name>.py`)."""
        phase = r.progress.phase
        strategy = strategies.BY_NAME.get(r.strategy)
        if strategy is None:
            await self.roll_back_to_champion(r, f"unknown strategy {r.strategy!r}")
        elif phase is Phase.START:
            await self._start_revision(r, strategy)
        elif phase is Phase.CONFIRM:
            await self._confirm(r)
        elif phase is Phase.FINALIZE:
            await self.finalize(r, "finishing the promotion")
        elif phase in strategy.ticks:
            await strategy.ticks[phase](self, r)
        else:  # recorded by a newer controller, or not a phase of this strategy
            await self.roll_back_to_champion(r, f"unknown phase {phase.value!r} of {strategy.name}")

    # ---- phases ------------------------------------------------------------------------------

    async def _start_revision(self, r: Rollout, strategy: Strategy) -> None:
        spec = r.spec
        champion = await self.champion_revision(r)
        try:
            new = await self.orchestrator.start(r.model, r.to_version, spec.replicas)
        except Exception as exc:
            await self._abort(r, f"new revision did not start: {exc}")
            return
        if champion is None:
            # First version of the model: there is no traffic to protect.
            await self.apply(r, {new.name: 100}, [new])
        else:
            await self.apply(r, {champion.name: 100, new.name: 0}, [champion, new])
        try:
            await self.router.wait_healthy(new, spec.health_timeout_seconds)
        except Exception as exc:
            await self._abort(r, f"new revision failed health: {exc}")
            return
        r.state = S.PROGRESSING
        r.progress.rollout_baseline = await self.snapshot(r)
        if champion is None:
            r.weight = 100
            r.progress.phase = Phase.FINALIZE
            await self.record(r, "healthy", f"{new.name} is healthy; first version, promoting")
            await self.finalize(r, "first version of the model")
            return
        await self.record(r, "healthy", f"{new.name} is healthy at 0 % of traffic")
        await strategy.begin(self, r)

    async def _abort(self, r: Rollout, reason: str) -> None:
        """Health failed: the challenger never took traffic; take it out and stop it."""
        champion = await self.champion_revision(r)
        if champion is not None:
            await self.apply(r, {champion.name: 100}, [champion])
        else:
            with contextlib.suppress(Exception):
                await self.router.remove_model(r.model)
        await self._stop(r.new_revision)
        await self.set_status(r.model, r.to_version, "retired")
        r.weight = 0
        r.state = S.FAILED
        r.reason = reason
        await self.record(r, "abort", reason + "; traffic never moved")

    async def on_deadline(self, r: Rollout, why: str, numbers: dict[str, float]) -> None:
        policy = r.spec.on_deadline
        if policy == "promote":
            await self.finalize(r, f"{why}; on_deadline=promote", numbers)
        elif policy == "rollback":
            await self.roll_back_to_champion(r, f"{why}; on_deadline=rollback", numbers)
        else:
            r.state = S.PAUSED
            await self.record(r, "hold", f"{why}; on_deadline=hold: waiting for a person", numbers)

    # ---- decisions -------------------------------------------------------------------------

    async def checks(self, r: Rollout) -> tuple[builtins.list[Check], int]:
        """Error rate of the canary since its step began against the champion over the whole
        rollout, p99 latency (over the router's recent window when it has one), the canary's
        health since it was first seen healthy, and quality on labelled rows since the rollout
        began."""
        a = r.spec.analysis
        new_name = r.new_revision
        champ_name = revision_name(r.model, r.from_version or "")
        new_stats = await self.router.stats(new_name)
        champ_stats = await self.router.stats(champ_name)
        canary = _delta(new_stats, r.progress.baseline.get(new_name))
        champion = _delta(champ_stats, r.progress.rollout_baseline.get(champ_name))
        health_failures, ejections = _unhealthy(
            new_stats, r.progress.rollout_baseline.get(new_name)
        )
        checks = [
            analysis.error_rate(champion, canary, a, r.spec.min_requests),
            analysis.latency(
                champion, canary, a, r.spec.min_requests, self._window_requests(r, new_stats)
            ),
            analysis.stability(health_failures, ejections),
        ]
        since = rows_since(r.progress.started_at)
        info = await self.store.model_version(r.model, r.to_version)
        metric = analysis.resolve_metric(a.quality_metric, info.task if info else "")
        assert r.from_version is not None
        champion_rows = await self.store.rows(r.model, r.from_version, since)
        canary_rows = await self.store.rows(r.model, r.to_version, since)
        checks.append(analysis.quality(champion_rows, canary_rows, metric, a))
        estimate = await self.estimated_check(r, champion_rows, canary_rows, metric)
        if estimate is not None:
            checks.append(estimate)
        return checks, canary.requests

    async def estimated_check(
        self, r: Rollout, champion_rows: Rows, candidate_rows: Rows, metric: str
    ) -> Check | None:
        """Quality before labels (None when the plan turns estimates off or nothing can
        calibrate): the candidate's calibrated expectation against the champion's quality --
        realized on its newest labelled rows from just before the rollout when it has them."""
        if not r.spec.analysis.estimates or self.calibrations is None or not r.from_version:
            return None
        recent = self._champion_recent.get(r.id)
        if recent is None:
            since = rows_since(r.progress.started_at - CHAMPION_LOOKBACK_S)
            before = await self.store.rows(r.model, r.from_version, since)
            recent = before.labelled().newest(analysis.CHAMPION_RECENT_ROWS)
            self._champion_recent[r.id] = recent
        enough = len(recent.labels) >= r.spec.analysis.min_labelled_rows
        return analysis.estimated_quality(
            recent if enough else champion_rows,
            candidate_rows,
            await self.calibrations.calibration(r.model, r.from_version),
            await self.calibrations.calibration(r.model, r.to_version),
            metric,
            r.spec.analysis,
        )

    async def enter_confirm(self, r: Rollout, reason: str, numbers: dict[str, float]) -> None:
        """Promoted on estimates: all traffic on the new version, now serving; the old one
        stays warm at 0 % while labels confirm the decision (or undo it)."""
        if r.spec.confirm_seconds <= 0:
            await self.finalize(r, f"{reason} (estimated)", numbers)
            return
        champion = await self.champion_revision(r)
        new = await self.running(r.new_revision)
        assert champion is not None
        r.progress.shadow = ""
        await self.apply(r, {champion.name: 0, new.name: 100}, [champion, new])
        r.weight = 100
        await self.set_status(r.model, r.to_version, "serving")
        r.progress.phase = Phase.CONFIRM
        r.progress.step_started_at = self.clock()
        r.progress.waiting = ""
        await self.record(
            r,
            "promote",
            f"{reason} (estimated, no labels yet); {champion.name} kept warm while labels"
            f" confirm for up to {r.spec.confirm_seconds:g} s",
            numbers,
        )

    async def _confirm(self, r: Rollout) -> None:
        """Realized quality of the new version since its promotion against the champion's
        recent realized quality: worse rolls back by itself; confirmed (or not contradicted
        within `confirm_seconds`) finishes the promotion."""
        assert r.from_version is not None
        info = await self.store.model_version(r.model, r.to_version)
        metric = analysis.resolve_metric(r.spec.analysis.quality_metric, info.task if info else "")
        champion = await self.store.rows(
            r.model, r.from_version, rows_since(r.progress.started_at - CHAMPION_LOOKBACK_S)
        )
        new = await self.store.rows(r.model, r.to_version, rows_since(r.progress.started_at))
        check = analysis.quality(
            champion.labelled().newest(analysis.CHAMPION_RECENT_ROWS), new, metric, r.spec.analysis
        )
        if check.passed is False:
            await self.roll_back_to_champion(
                r, f"labels contradict the estimate: {check.reason}", check.numbers
            )
            return
        waited = self.clock() - r.progress.step_started_at
        if check.passed is None and waited < r.spec.confirm_seconds:
            await self.waiting(r, "labels", f"confirming: {check.reason}", check.numbers)
            return
        why = (
            f"confirmed by labels: {check.reason}"
            if check.passed
            else f"not contradicted by labels within {r.spec.confirm_seconds:g} s: {check.reason}"
        )
        await self.record(r, "confirmed", why, check.numbers)
        r.progress.phase = Phase.FINALIZE
        await self.finalize(r, why, check.numbers)

    def _window_requests(self, r: Rollout, stats: RevisionStats) -> float | None:
        """About how many canary calls the router's recent latency window holds (its rate in
        this step times the window), or None when its p99s cover the whole step."""
        window = stats.extra.get("recent_window_s")
        if window is None:
            return None
        now = self.clock()
        if now - r.progress.latency_judged_at < window:
            return 0.0  # this window was judged at the last tick: one window, one observation
        r.progress.latency_judged_at = now
        base = r.progress.baseline.get(r.new_revision) or [0]
        elapsed = max(now - r.progress.step_started_at, window)
        return max(stats.requests - base[0], 0) / elapsed * window

    async def count_failures(self, r: Rollout, checks: builtins.list[Check]) -> bool:
        """Record failed checks; roll back at the failure limit. True when the rollout ended."""
        failed = [c for c in checks if c.passed is False]
        if not failed:
            return False
        r.progress.failed_checks += 1
        limit = r.spec.analysis.failure_limit
        numbers = analysis.numbers(checks)
        numbers["failed_checks"] = float(r.progress.failed_checks)
        why = "; ".join(c.reason for c in failed)
        if r.progress.failed_checks >= limit:
            await self.roll_back_to_champion(r, f"failure limit {limit} reached: {why}", numbers)
            return True
        await self.record(
            r, "check_failed", f"{r.progress.failed_checks}/{limit} failed checks: {why}", numbers
        )
        return False

    async def waiting(self, r: Rollout, what: str, reason: str, numbers: dict[str, float]) -> None:
        """Record that a step waits, once per kind of wait (not once per interval)."""
        if r.progress.waiting != what:
            r.progress.waiting = what
            await self.record(r, "wait", reason, numbers)

    async def finalize(
        self, r: Rollout, reason: str, numbers: dict[str, float] | None = None
    ) -> None:
        """All traffic to the new revision; old one out of the split, drained, then stopped."""
        new = await self.running(r.new_revision)
        r.progress.shadow = ""  # a promoted shadow takes the traffic instead of a copy of it
        if r.progress.phase is not Phase.FINALIZE:
            r.progress.phase = Phase.FINALIZE
            await self.apply(r, {new.name: 100}, [new])
            r.weight = 100
            await self.record(r, "promote", reason, numbers or {})
        else:
            await self.apply(r, {new.name: 100}, [new])
        await self.set_status(r.model, r.to_version, "serving")
        if r.from_version:
            await self._drain(revision_name(r.model, r.from_version), r.spec.drain_seconds)
            await self._stop(revision_name(r.model, r.from_version))
        r.state = S.PROMOTED
        r.reason = reason
        await self.record(r, "promoted", f"{r.to_version} serves all traffic")

    async def roll_back_to_champion(
        self, r: Rollout, reason: str, numbers: dict[str, float] | None = None
    ) -> None:
        """Champion back to 100 % first, then the challenger stops and is retired."""
        champion = await self.champion_revision(r)
        r.progress.shadow = ""
        if champion is not None:
            await self.apply(r, {champion.name: 100}, [champion])
        else:
            with contextlib.suppress(Exception):
                await self.router.remove_model(r.model)
        r.weight = 0
        await self._stop(r.new_revision)
        await self.set_status(r.model, r.to_version, "retired")
        if r.from_version:
            await self.set_status(r.model, r.from_version, "serving")
        r.state = S.ROLLED_BACK
        r.reason = reason
        await self.record(r, "rollback", reason, numbers or {})

    async def _resume(self, r: Rollout, running: dict[str, Revision]) -> None:
        new_ok = r.new_revision in running
        champ_ok = not r.from_version or revision_name(r.model, r.from_version) in running
        if not self.settings.resume:
            await self.roll_back_to_champion(r, "controller restarted with resume off")
        elif r.progress.phase is Phase.START and not new_ok:
            await self.roll_back_to_champion(
                r, "controller restarted before the new revision was healthy"
            )
        elif r.progress.phase is Phase.START:
            # The new revision outlived the old controller (adopted): start it over from its
            # health check; traffic has not moved yet.
            await self.record(r, "resumed", "resumed while starting the new revision")
            self._spawn(r)
            return
        elif not (new_ok and champ_ok):
            missing = [
                n
                for n, ok in ((r.new_revision, new_ok), (r.from_version or "", champ_ok))
                if not ok
            ]
            await self.roll_back_to_champion(r, f"controller restarted and {missing} no longer run")
        else:
            revisions = [running[n] for n in r.weights if n in running]
            if r.progress.shadow and r.progress.shadow in running:
                revisions.append(running[r.progress.shadow])
            if r.weights:
                await self.apply(r, dict(r.weights), revisions)
            await self.record(r, "resumed", f"resumed in phase {r.progress.phase.value}")
            self._spawn(r)
            return
        self._rollouts[r.id] = r

    # ---- helpers ---------------------------------------------------------------------------

    async def _unknown(self, model: str, version: str) -> str:
        """A NOT_FOUND message listing what exists: the models, or the model's versions."""
        known = await self.store.registered()
        mine = [v for v in known if v.model == model]
        if not mine:
            names = sorted({v.model for v in known})
            listed = ", ".join(names) if names else "none"
            return f"model: {model!r} is not registered (registered models: {listed})"
        if version:
            versions = ", ".join(f"{v.version} ({v.status})" for v in mine)
            return f"version: model {model!r} has no version {version!r} (its versions: {versions})"
        return f"model: {model!r} has no serving version"

    def _lock(self, rollout_id: str) -> asyncio.Lock:
        return self._locks.setdefault(rollout_id, asyncio.Lock())

    def _wake_up(self, rollout_id: str) -> None:
        if rollout_id in self._wake:
            self._wake[rollout_id].set()

    async def _active(self, rollout_id: str) -> Rollout:
        rollout = await self.get(rollout_id)
        if not rollout.state.active:
            raise FailedPrecondition(
                f"rollout_id: rollout {rollout_id} has ended ({rollout.state.value})"
            )
        if rollout.id not in self._rollouts:
            raise FailedPrecondition(
                f"rollout_id: rollout {rollout_id} is not driven by this controller"
            )
        return self._rollouts[rollout.id]

    async def running(self, name: str) -> Revision:
        for revision in await self.orchestrator.running():
            if revision.name == name:
                return revision
        raise FailedPrecondition(f"revision {name} is not running")

    async def champion_revision(self, r: Rollout) -> Revision | None:
        """The champion's revision, started if it is not running (the proxy must never name a
        cluster whose processes are gone)."""
        if not r.from_version:
            return None
        name = revision_name(r.model, r.from_version)
        for revision in await self.orchestrator.running():
            if revision.name == name:
                return revision
        return await self.orchestrator.start(r.model, r.from_version, r.spec.replicas)

    async def apply(
        self, r: Rollout, weights: dict[str, int], revisions: builtins.list[Revision]
    ) -> None:
        shadow = r.progress.shadow or None
        by_name = {rev.name: rev for rev in revisions}
        if shadow not in by_name:
            shadow = None
        await self.router.apply(
            TrafficSplit(
                r.model,
                weights,
                by_name,
                shadow=shadow,
                shadow_percent=r.progress.shadow_percent,
            )
        )
        r.weights = dict(weights)

    async def _stop(self, name: str) -> None:
        try:
            await self.orchestrator.stop(name)
        except Exception:
            log.exception("could not stop revision %s", name)

    async def set_status(self, model: str, version: str, status: str) -> None:
        await self.store.set_status(model, version, status)

    async def snapshot(self, r: Rollout) -> dict[str, builtins.list[int]]:
        names = [r.new_revision]
        if r.from_version:
            names.append(revision_name(r.model, r.from_version))
        out: dict[str, builtins.list[int]] = {}
        for name in names:
            s = await self.router.stats(name)
            out[name] = [s.requests, s.failures, *_health_counters(s)]
        return out

    async def _drain(self, name: str, seconds: float) -> None:
        """Wait until the old revision's request count stops moving (at most `seconds`)."""
        deadline = self.clock() + seconds
        previous: int | None = None
        while self.clock() < deadline:
            current = (await self.router.stats(name)).requests
            if current == previous:
                return
            previous = current
            await asyncio.sleep(min(0.5, max(seconds / 4, 0.01)))

    def _step(
        self, r: Rollout, decision: str, reason: str, numbers: dict[str, float] | None = None
    ) -> RolloutStep:
        return RolloutStep(
            time=datetime.now(UTC),
            state=r.state,
            weight=float(r.weight),
            decision=decision,
            reason=reason,
            numbers={k: float(v) for k, v in (numbers or {}).items()},
        )

    async def record(
        self, r: Rollout, decision: str, reason: str, numbers: dict[str, float] | None = None
    ) -> None:
        step = self._step(r, decision, reason, numbers)
        r.steps.append(step)
        r.updated_at = step.time
        log.info("rollout %s %s: %s (%s)", r.id, decision, reason, r.state.value)
        await self.store.save(r, [step])
        for q in self._watchers.get(r.id, []):
            q.put_nowait(step)
        if not r.state.active:
            for q in self._watchers.get(r.id, []):
                q.put_nowait(None)


def _delta(stats: RevisionStats, baseline: Sequence[int] | None) -> Counts:
    base = list(baseline or [0, 0])
    return Counts(max(stats.requests - base[0], 0), max(stats.failures - base[1], 0), _p99(stats))


def _p99(stats: RevisionStats) -> float | None:
    """The p99 over the router's recent window when it has one (the same period for champion
    and canary), else its cumulative p99."""
    if "recent_window_s" in stats.extra:
        return stats.extra.get("latency_ms_p99_recent")
    return stats.latency_ms_p99


def _health_counters(stats: RevisionStats) -> list[int]:
    """Failed active health checks and outlier ejections the proxy counted (cumulative)."""
    return [
        int(stats.extra.get("health_check_failures", 0)),
        int(stats.extra.get("ejections", 0)),
    ]


def _unhealthy(stats: RevisionStats, baseline: Sequence[int] | None) -> tuple[int, int]:
    """Health-check failures and ejections since `baseline` (older records lack them: 0)."""
    base = [*(baseline or [])[2:4], 0, 0]
    now = _health_counters(stats)
    return max(now[0] - base[0], 0), max(now[1] - base[1], 0)


def spec_override(spec: RolloutSpec, **changes: Any) -> RolloutSpec:
    """`dataclasses.replace` for a spec (tests and the CLI tweak one field)."""
    return replace(spec, **changes)
