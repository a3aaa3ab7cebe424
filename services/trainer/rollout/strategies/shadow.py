"""Shadow: the champion keeps answering every request while a share of them is mirrored to the
new revision (its answers logged, never returned); the two are compared on paired rows."""

from __future__ import annotations

from .. import analysis
from ..model import Phase, Rollout
from .base import Engine, Strategy, rows_since


async def start_mirror(engine: Engine, r: Rollout) -> None:
    champion = await engine.champion_revision(r)
    new = await engine.running(r.new_revision)
    assert champion is not None
    percent = r.spec.shadow.mirror_percent
    r.progress.shadow, r.progress.shadow_percent = new.name, percent
    await engine.set_status(r.model, r.to_version, "canary")
    await engine.apply(r, {champion.name: 100}, [champion, new])
    r.progress.phase = Phase.SHADOW
    r.progress.step_started_at = engine.clock()
    await engine.record(r, "shadow", f"mirroring {percent:g} % of requests to {new.name}")


async def compare(engine: Engine, r: Rollout) -> None:
    """Labelled pairs decide (promote or roll back); before them the calibrated estimate may
    fail a check or promote through the confirm phase; else wait, up to the deadline."""
    spec = r.spec
    since = rows_since(r.progress.started_at)
    assert r.from_version is not None
    info = await engine.store.model_version(r.model, r.to_version)
    metric = analysis.resolve_metric(spec.analysis.quality_metric, info.task if info else "")
    champ_rows = await engine.store.rows(r.model, r.from_version, since)
    chall_rows = await engine.store.rows(r.model, r.to_version, since)
    labels, champ, chall = analysis.pair(champ_rows, chall_rows)
    check = analysis.paired(
        labels,
        champ,
        chall,
        metric,
        spec.analysis,
        spec.shadow.promote_if,
        spec.shadow.min_paired_rows,
    )
    estimate = await engine.estimated_check(r, champ_rows, chall_rows, metric)
    if check.passed is True:
        await engine.finalize(r, check.reason, check.numbers)
    elif check.passed is False:
        await engine.roll_back_to_champion(r, f"shadow comparison: {check.reason}", check.numbers)
    elif estimate is not None and estimate.passed is False:
        await engine.count_failures(r, [estimate])
    elif estimate is not None and estimate.passed:
        await engine.enter_confirm(r, estimate.reason, estimate.numbers)
    elif engine.clock() - r.progress.step_started_at >= spec.deadline_seconds:
        await engine.on_deadline(r, f"deadline: {check.reason}", check.numbers)
    else:
        await engine.waiting(r, "pairs", check.reason, check.numbers)


STRATEGY = Strategy(
    name="shadow",
    phases=(Phase.START, Phase.SHADOW, Phase.CONFIRM, Phase.FINALIZE),
    begin=start_mirror,
    ticks={Phase.SHADOW: compare},
)
