"""Red-black: all traffic moves at once; the old revision stays warm at 0 % (and in the split,
so going back is one weight change) for `red_black.keep_old_for`, judged meanwhile."""

from __future__ import annotations

from .. import analysis
from ..model import Phase, Rollout
from .base import Engine, Strategy


async def cutover(engine: Engine, r: Rollout) -> None:
    champion = await engine.champion_revision(r)
    new = await engine.running(r.new_revision)
    assert champion is not None
    await engine.set_status(r.model, r.to_version, "canary")
    await engine.apply(r, {champion.name: 0, new.name: 100}, [champion, new])
    r.weight = 100
    r.progress.phase = Phase.KEEP_WARM
    r.progress.step_started_at = engine.clock()
    r.progress.baseline = await engine.snapshot(r)
    await engine.record(
        r,
        "cutover",
        f"all traffic on {new.name}; {champion.name} kept warm for"
        f" {r.spec.red_black.keep_old_for_seconds:g} s",
    )


async def keep_warm(engine: Engine, r: Rollout) -> None:
    """Failed checks count toward the limit (a rollback); the period over promotes."""
    checks, _ = await engine.checks(r)
    if await engine.count_failures(r, checks):
        return
    if engine.clock() - r.progress.step_started_at >= r.spec.red_black.keep_old_for_seconds:
        await engine.finalize(r, "keep-warm period over", analysis.numbers(checks))


STRATEGY = Strategy(
    name="red_black",
    phases=(Phase.START, Phase.KEEP_WARM, Phase.FINALIZE),
    begin=cutover,
    ticks={Phase.KEEP_WARM: keep_warm},
)
