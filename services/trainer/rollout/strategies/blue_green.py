"""Blue-green: the new revision answers smoke requests at 0 % of the traffic, then takes the
plan's weight steps as a canary does.

The smoke test is the point of the strategy, so it is never skipped: a controller without a
smoke tester refuses a blue-green rollout at start (FailedPrecondition), and one resumed by
such a controller rolls back saying why.
"""

from __future__ import annotations

from ..model import Phase, Rollout
from . import canary
from .base import Engine, Strategy

NO_SMOKE_TESTER = "blue_green needs a smoke tester and this controller has none"


async def begin(engine: Engine, r: Rollout) -> None:
    r.progress.phase = Phase.SMOKE  # smoke-tested at the next interval


async def smoke(engine: Engine, r: Rollout) -> None:
    """Send the smoke requests straight to the new revision; any failure (or accuracy below
    the plan's minimum) rolls back before it took a single live request."""
    new = await engine.running(r.new_revision)
    if engine.smoke is None:
        await engine.roll_back_to_champion(r, NO_SMOKE_TESTER)
        return
    result = await engine.smoke.smoke(new, r.spec.blue_green.smoke_requests)
    accuracy = result.correct / result.requests if result.requests else 0.0
    numbers = {
        "smoke_requests": float(result.requests),
        "smoke_failures": float(result.failures),
        "smoke_accuracy": accuracy,
    }
    minimum = r.spec.blue_green.min_smoke_accuracy
    if result.requests == 0 or result.failures or accuracy < minimum:
        why = (
            f"smoke test failed: {result.failures}/{result.requests} requests failed,"
            f" accuracy {accuracy:.2%} (minimum {minimum:.2%}) {result.detail}"
        ).strip()
        await engine.roll_back_to_champion(r, why, numbers)
        return
    await engine.record(r, "smoke_passed", f"{result.requests} smoke requests answered", numbers)
    await canary.enter_step(engine, r, 0)


STRATEGY = Strategy(
    name="blue_green",
    phases=(Phase.START, Phase.SMOKE, Phase.STEPS, Phase.CONFIRM, Phase.FINALIZE),
    begin=begin,
    ticks={Phase.SMOKE: smoke, Phase.STEPS: canary.analyse_step},
    needs_smoke_tester=True,
)
