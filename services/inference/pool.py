"""A serving pool member's models: many model versions in one process, each loaded on its first
request and evicted, least recently used first, once their memory passes a budget.

Envoy keeps one cluster per model version; a pooled version's cluster points at the pool's
processes and names the version in request headers (`cyclone.wire.POOL_MODEL_HEADER` and `POOL_VERSION_HEADER`,
set by the cluster, so retries, failover and the shadow mirror carry the right one). A request
for a version that is not loaded waits for its load (one load per version, however many callers
wait); a version that cannot be loaded is NOT_FOUND naming it. Transport-free.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psutil

from cyclone.errors import CycloneError, ModelLoadError, NotFound
from cyclone.models.repository import ModelRepository
from services.inference.model import LoadedModel

log = logging.getLogger(__name__)


MIB = 1 << 20
# The memory a model takes per byte of its file is learnt from files at least this big, and
# capped (a load that overlapped other allocations must not inflate every later estimate).
_LEARN_FROM_BYTES = 64 * 1024
_MAX_MEMORY_PER_FILE_BYTE = 20.0
_RATIOS_KEPT = 64


@dataclasses.dataclass(frozen=True, slots=True)
class PoolTarget:
    """The model version a request's cluster asks for."""

    model: str
    version: str


@dataclasses.dataclass(slots=True)
class _Resident:
    model: LoadedModel
    cost_bytes: int
    loaded_at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    loaded: int
    loads: int
    evictions: int
    used_bytes: int
    budget_bytes: int


class ModelPool:
    """Loaded model versions by (model, version), in least-recently-used order."""

    def __init__(
        self,
        repository: ModelRepository,
        budget_bytes: int,
        load: Callable[[ModelRepository, str, str], LoadedModel],
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"pool_memory_mb: must be more than 0, got {budget_bytes / MIB:g}")
        self.repository = repository
        self.budget_bytes = budget_bytes
        self._load = load
        self._resident: collections.OrderedDict[tuple[str, str], _Resident] = (
            collections.OrderedDict()
        )
        self._loading: dict[tuple[str, str], asyncio.Future[LoadedModel]] = {}
        # Loads one at a time: the memory a load took is measured as the process's RSS growth.
        self._load_lock = asyncio.Lock()
        # One thread loads versions and drops evicted ones: freeing an onnxruntime session
        # holds the GIL ~1 ms, which would otherwise stall the event loop at every eviction.
        # (Not at a lower priority: a niced loader holding the GIL is a priority inversion,
        # measured worse for the hot models; docs/serving-pool.md.)
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pool-loader")
        self._used_bytes = 0
        self.loads = 0
        self.evictions = 0
        # Memory per byte of model file, the mean of what loads that grew the process took:
        # once evictions free memory the heap reuses it, a load no longer grows the process,
        # and the file size alone would undercount.
        self._ratios: list[float] = []
        self.recently_evicted: collections.deque[tuple[str, str]] = collections.deque(maxlen=64)

    def loaded(self, model: str, version: str) -> LoadedModel | None:
        """The version when it is loaded (marked most recently used), else None. Hot path."""
        resident = self._resident.get((model, version))
        if resident is None:
            return None
        self._resident.move_to_end((model, version))
        return resident.model

    async def get(self, model: str, version: str) -> LoadedModel:
        """The version, loaded first when it is not (callers of one version share a load)."""
        found = self.loaded(model, version)
        if found is not None:
            return found
        key = (model, version)
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load_once(model, version))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(pending)

    async def _load_once(self, model: str, version: str) -> LoadedModel:
        async with self._load_lock:
            found = self.loaded(model, version)
            if found is not None:
                return found
            started = time.perf_counter()
            rss_before = _rss()
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(
                    self._loader, self._load, self.repository, model, version
                )
            except ModelLoadError as exc:
                raise NotFound(
                    f"version: {model!r} version {version!r} cannot be loaded: {exc.message}"
                ) from exc
            except CycloneError as exc:
                raise NotFound(
                    f"version: {model!r} version {version!r} is not in the repository"
                    f" ({exc.message})"
                ) from exc
            # What the version costs: the process's growth, or what its file size says when
            # the load reused memory an eviction freed.
            file_size = max(loaded.files.onnx_path.stat().st_size, 1)
            grown = _rss() - rss_before
            if self.loads == 0:
                grown = 0  # the first load also pays onnxruntime's one-time set-up
            elif file_size >= _LEARN_FROM_BYTES and grown > file_size:  # a load that grew
                self._ratios.append(min(grown / file_size, _MAX_MEMORY_PER_FILE_BYTE))
                del self._ratios[:-_RATIOS_KEPT]
            per_byte = sum(self._ratios) / len(self._ratios) if self._ratios else 1.0
            cost = max(grown, int(file_size * per_byte))
            self._resident[(model, version)] = _Resident(loaded, cost, time.monotonic())
            self._used_bytes += cost
            self.loads += 1
            self._evict_past_budget(keep=(model, version))
            log.info(
                "pool loaded %s version %s in %.0f ms (%.1f MiB; %d loaded, %.0f of %.0f MiB)",
                model,
                version,
                (time.perf_counter() - started) * 1000,
                cost / MIB,
                len(self._resident),
                self.used_bytes / MIB,
                self.budget_bytes / MIB,
            )
            return loaded

    def _evict_past_budget(self, keep: tuple[str, str]) -> None:
        # No `heap.resettle()` here (a dedicated revision's load/unload does one): a full
        # collection per eviction would stall the event loop as often as models churn, and
        # versions loaded after start-up are never frozen, so the collector reaches them.
        while self._used_bytes > self.budget_bytes and len(self._resident) > 1:
            key = next(iter(self._resident))
            if key == keep:
                break
            cost = self._drop(key)
            self.evictions += 1
            self.recently_evicted.append(key)
            log.info(
                "pool evicted %s version %s (%.1f MiB, least recently used)",
                key[0],
                key[1],
                cost / MIB,
            )

    def _drop(self, key: tuple[str, str]) -> int:
        """Forget a resident version; the loader thread releases it (its session's memory).
        A request still scoring with it keeps it alive until that request ends."""
        doomed = [self._resident.pop(key)]
        cost = doomed[0].cost_bytes
        self._used_bytes -= cost
        self._loader.submit(doomed.clear)  # the last reference goes on the loader thread
        return cost

    def unload(self, model: str, version: str | None = None) -> None:
        """Drop `model` at `version` (None: every version of it) ahead of the LRU."""
        keys = [k for k in self._resident if k[0] == model and version in (None, k[1])]
        if not keys:
            what = f"{model!r}" + (f" version {version!r}" if version else "")
            raise NotFound(f"model_name: {what} is not loaded here")
        for key in keys:
            self._drop(key)
        self.evictions += len(keys)

    def models(self) -> list[LoadedModel]:
        return [r.model for r in self._resident.values()]

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def stats(self) -> PoolStats:
        return PoolStats(
            len(self._resident), self.loads, self.evictions, self.used_bytes, self.budget_bytes
        )


def _rss() -> int:
    return int(psutil.Process().memory_info().rss)
