"""Scale to zero on one machine: stop a revision nobody calls, start it again on the next call.

A model served by one revision at 100 % (no rollout, no shadow) whose Envoy counters have not
moved for `timeout_s` is stopped, but its cluster stays in Envoy with the same endpoints. The
next request then fails to connect; Envoy holds it, retrying with back-off (the route's retry
policy, `EnvoySettings.cold_start_hold_s`), while this watcher sees the attempts in Envoy's
counters and starts the revision again on the same ports. The caller gets a slow answer, not an
error. Only requests count as traffic: Envoy's health checks do not move these counters.
A pooled revision is left alone: the pool's processes stay up, and a version nobody calls is
evicted by their least-recently-used budget and loaded again on its next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from cyclone.envoy import EnvoyProxy
from cyclone.traffic import Revision, TrafficSplit
from services.trainer.rollout import Orchestrator

log = logging.getLogger(__name__)

# Counters of a revision's own cluster that move when a request is sent to it, including one
# that cannot connect (it waits as pending, then fails): the wake-up signal.
_TRAFFIC_COUNTERS = ("upstream_rq_total", "upstream_rq_pending_total")
# Gauges of requests in flight: a long stream keeps its revision busy though no counter moves.
_IN_FLIGHT_GAUGES = ("upstream_rq_active", "upstream_rq_pending_active")
# How long a woken revision may take to pass Envoy's health check.
_HEALTHY_TIMEOUT_S = 30.0


@dataclasses.dataclass
class _Watched:
    revision: Revision
    traffic: float
    changed_at: float
    asleep: bool = False


@dataclasses.dataclass(frozen=True)
class ColdStart:
    """One wake-up: which revision and how long from seeing a request to serving."""

    revision: str
    seconds: float


class IdleWatcher:
    """Polls Envoy's counters; stops idle revisions and wakes them on the next request."""

    def __init__(
        self,
        orchestrator: Orchestrator,
        proxy: EnvoyProxy,
        rollout_active: Callable[[str], Awaitable[bool]],
        timeout_s: float,
        poll_s: float = 0.5,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"idle_timeout_seconds: must be more than 0, got {timeout_s:g}")
        self.orchestrator = orchestrator
        self.proxy = proxy
        self.rollout_active = rollout_active
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.cold_starts: list[ColdStart] = []
        self._watched: dict[str, _Watched] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="idle-watcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def asleep(self) -> list[str]:
        """Names of the revisions stopped for idleness now."""
        return sorted(w.revision.name for w in self._watched.values() if w.asleep)

    async def wake_model(self, model: str) -> None:
        """Start the model's stopped revision (before a rollout takes the model over)."""
        async with self._lock:
            watched = self._watched.get(model)
            if watched is not None and watched.asleep:
                await self._wake(model, watched)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                # A missed poll must not end scale to zero; the next one tries again.
                log.exception("idle watcher: poll failed")
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> None:
        async with self._lock:
            splits = self.proxy.splits
            for model in [m for m in self._watched if _sole_revision(splits.get(m)) is None]:
                # A rollout (or removal) changed the model's split: no longer ours to stop,
                # and its split is the rollout's now, so the revision only starts again.
                watched = self._watched.pop(model)
                if watched.asleep and model in splits:
                    await self._start_again(watched.revision)
            for model, split in splits.items():
                revision = _sole_revision(split)
                if revision is not None:
                    await self._check(model, revision)

    async def _check(self, model: str, revision: Revision) -> None:
        if revision.pooled:
            return  # its pool processes stay; an idle version is evicted by their LRU
        now = time.monotonic()
        traffic, in_flight = await self._traffic(revision.name)
        watched = self._watched.get(model)
        if watched is None or watched.revision != revision:
            self._watched[model] = _Watched(revision, traffic, now)
            return
        if traffic != watched.traffic or in_flight:
            watched.traffic, watched.changed_at = traffic, now
            if watched.asleep:
                await self._wake(model, watched)
            return
        if watched.asleep or now - watched.changed_at < self.timeout_s:
            return
        if await self.rollout_active(model):
            watched.changed_at = now  # a rollout owns the model; look again a timeout later
            return
        log.info(
            "revision %s idle for %.0f s: stopping it (the next request starts it again)",
            revision.name,
            now - watched.changed_at,
        )
        await self.orchestrator.stop(revision.name)
        watched.asleep = True

    async def _wake(self, model: str, watched: _Watched) -> None:
        revision = watched.revision
        started = time.monotonic()
        woken = await self._start_again(revision)
        if woken.endpoints != revision.endpoints:
            # The old ports were taken meanwhile: point Envoy at the new ones.
            await self.proxy.apply(TrafficSplit(model, {woken.name: 100}, {woken.name: woken}))
            watched.revision = woken
        watched.asleep = False
        await self.proxy.wait_healthy(woken, _HEALTHY_TIMEOUT_S)
        watched.traffic, _ = await self._traffic(woken.name)
        watched.changed_at = time.monotonic()
        cold = ColdStart(woken.name, watched.changed_at - started)
        self.cold_starts.append(cold)
        log.info("revision %s woken in %.2f s", cold.revision, cold.seconds)

    async def _start_again(self, revision: Revision) -> Revision:
        ports = [e.port for e in revision.endpoints]
        start: Callable[..., Awaitable[Revision]] = self.orchestrator.start
        try:
            return await start(revision.model, revision.version, len(ports), ports=ports)
        except TypeError:
            pass  # an orchestrator that cannot choose ports: new endpoints, new split
        except Exception:
            log.warning("revision %s: cannot start on %s again; new ports", revision.name, ports)
        return await self.orchestrator.start(revision.model, revision.version, len(ports))

    async def _traffic(self, name: str) -> tuple[float, bool]:
        """(requests sent so far, whether any is in flight) for one revision's cluster."""
        values, _ = await self.proxy.admin.stats(f"cluster.{name}.upstream_rq_")

        def total(stats: Sequence[str]) -> float:
            return float(sum(values.get(f"cluster.{name}.{s}", 0) for s in stats))

        return total(_TRAFFIC_COUNTERS), total(_IN_FLIGHT_GAUGES) > 0


def _sole_revision(split: TrafficSplit | None) -> Revision | None:
    """The revision taking all of the model's traffic, when it is the only one."""
    if split is None or split.shadow or len(split.revisions) != 1:
        return None
    (revision,) = split.revisions.values()
    return revision


__all__: Sequence[str] = ["ColdStart", "IdleWatcher"]
