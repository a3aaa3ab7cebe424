"""Canary: the new revision takes the plan's weight steps, each analysed before the next."""

from __future__ import annotations

from .. import analysis
from ..analysis import Check
from ..model import Phase, Rollout
from .base import Engine, Strategy


async def begin(engine: Engine, r: Rollout) -> None:
    await enter_step(engine, r, 0)


async def enter_step(engine: Engine, r: Rollout, index: int) -> None:
    """Move the split to step `index`'s weight and start judging it from now."""
    weight = r.spec.steps[index]
    champion = await engine.champion_revision(r)
    new = await engine.running(r.new_revision)
    assert champion is not None
    if r.weight == 0 and weight > 0:
        await engine.set_status(r.model, r.to_version, "canary")
    await engine.apply(r, {champion.name: 100 - weight, new.name: weight}, [champion, new])
    r.weight = weight
    r.progress.phase = Phase.STEPS
    r.progress.step_index = index
    r.progress.step_started_at = engine.clock()
    r.progress.baseline = await engine.snapshot(r)
    r.progress.waiting = ""
    await engine.record(r, "set_weight", f"step {index + 1}/{len(r.spec.steps)}: {weight} %")


async def analyse_step(engine: Engine, r: Rollout) -> None:
    """Judge the current step: fail, wait (requests, labels), advance, promote or confirm."""
    spec, p = r.spec, r.progress
    elapsed = engine.clock() - p.step_started_at
    checks, canary_requests = await engine.checks(r)
    if await engine.count_failures(r, checks):
        return
    last = p.step_index >= len(spec.steps) - 1
    promotion_gate = p.step_index >= len(spec.steps) - 2
    enough = canary_requests >= spec.min_requests and elapsed >= spec.step_seconds
    quality = next(c for c in checks if c.name == "quality")
    estimated = _estimate_passed(checks)
    numbers = analysis.numbers(checks)
    if enough and promotion_gate and quality.passed is None and not estimated:
        if elapsed < spec.deadline_seconds:
            await engine.waiting(r, "labels", f"waiting for labels: {quality.reason}", numbers)
            return
        numbers["quality_judged"] = 0.0
        await engine.record(
            r,
            "quality_not_judged",
            f"{quality.reason} by the deadline; deciding on error rate and latency",
            numbers,
        )
    if enough:
        if last and quality.passed is None and estimated:
            await engine.enter_confirm(r, _summary(checks), numbers)
        elif last:
            await engine.finalize(r, _summary(checks) or "all steps passed", numbers)
        else:
            await engine.record(r, "advance", _summary(checks), numbers)
            await enter_step(engine, r, p.step_index + 1)
        return
    if elapsed >= spec.deadline_seconds:
        why = (
            f"deadline: {canary_requests} requests < {spec.min_requests} after"
            f" {elapsed:.0f} s at {r.weight:g} %"
        )
        await engine.on_deadline(r, why, numbers)
        return
    await engine.waiting(r, "requests", f"{canary_requests}/{spec.min_requests} requests", numbers)


def _estimate_passed(checks: list[Check]) -> bool:
    return any(c.name == "estimated_quality" and c.passed for c in checks)


def _summary(checks: list[Check]) -> str:
    return "; ".join(c.reason for c in checks if c.passed is not None or c.name == "quality")


STRATEGY = Strategy(
    name="canary",
    phases=(Phase.START, Phase.STEPS, Phase.CONFIRM, Phase.FINALIZE),
    begin=begin,
    ticks={Phase.STEPS: analyse_step},
)
