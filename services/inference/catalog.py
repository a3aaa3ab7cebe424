"""Which models this process serves, which failed to load (and why), and the repository policy
(what may be loaded or unloaded) every front end applies. Transport-free: no grpc, no protobuf.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import NamedTuple

from cyclone import heap
from cyclone.errors import (
    CycloneError,
    FailedPrecondition,
    InvalidArgument,
    ModelLoadError,
    NotFound,
)
from cyclone.models.repository import ModelRepository
from services.inference.model import LoadedModel
from services.inference.pool import MIB, ModelPool, PoolTarget

log = logging.getLogger(__name__)


class RequestFields(NamedTuple):
    """What the API that was called names a request's model and version: an error names the
    caller's field (`model` on the Cyclone API, `model_name` on an OIP inference)."""

    model: str
    version: str


CYCLONE_FIELDS = RequestFields("model", "version")
OIP_INFER_FIELDS = RequestFields("model_name", "model_version")
OIP_MODEL_FIELDS = RequestFields("name", "version")  # ModelReady, ModelMetadata


@dataclasses.dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """One model of the repository as an index lists it."""

    name: str
    version: str
    state: str  # "READY" or "UNAVAILABLE"
    reason: str = ""


class ModelCatalog:
    """Loaded models by name; one version each (a process serves one revision per model) --
    or, as a serving pool member (`pool_memory_mb`), many versions loaded on demand."""

    def __init__(
        self,
        repository: Path,
        *,
        model: str | None = None,
        version: str | None = None,
        intra_op_threads: int = 1,
        inter_op_threads: int = 1,
        max_batch_rows: int = 10_000,
        pool_memory_mb: float | None = None,
    ) -> None:
        self.repository = ModelRepository(repository)
        self.pinned_model = model
        self.pinned_version = version
        self._threads = (intra_op_threads, inter_op_threads)
        self.max_batch_rows = max_batch_rows
        self.models: dict[str, LoadedModel] = {}
        self.failures: dict[str, str] = {}
        self.pool: ModelPool | None = None
        if pool_memory_mb is not None:
            if model is not None:
                raise ValueError("pool_memory_mb: a pool member serves many models; drop --model")
            self.pool = ModelPool(self.repository, int(pool_memory_mb * MIB), self._open)

    @property
    def single_revision(self) -> bool:
        return self.pinned_model is not None

    @property
    def pooled(self) -> bool:
        return self.pool is not None

    def lookup(
        self,
        name: str,
        version: str,
        target: PoolTarget | None = None,
        fields: RequestFields = CYCLONE_FIELDS,
    ) -> LoadedModel | None:
        """The model a request names, when it is loaded; None when a pool member must load it
        first (await `acquire`). The hot path: no await."""
        if self.pool is None:
            return self.get(name, version, fields)
        return self.pool.loaded(*self._pool_key(name, version, target, fields))

    async def acquire(
        self,
        name: str,
        version: str,
        target: PoolTarget | None = None,
        fields: RequestFields = CYCLONE_FIELDS,
    ) -> LoadedModel:
        """The model a request names, loading it into the pool when it is not (waits for it)."""
        if self.pool is None:
            return self.get(name, version, fields)
        return await self.pool.get(*self._pool_key(name, version, target, fields))

    def _pool_key(
        self, name: str, version: str, target: PoolTarget | None, fields: RequestFields
    ) -> tuple[str, str]:
        """Which version answers: the one the request's Envoy cluster names, else the one the
        request names, else the repository's latest."""
        if target is not None:
            if name and name != target.model:
                raise FailedPrecondition(
                    f"{fields.model}: this route serves {target.model!r}, not {name!r}"
                )
            if version and version != target.version:
                raise NotFound(
                    f"{fields.version}: {target.model!r} version {version!r} is not served by"
                    " this route"
                    f" (serving {target.version!r})"
                )
            return target.model, target.version
        if not name:
            raise NotFound(f"{fields.model}: empty model name")
        if version:
            return name, version
        versions = self.repository.versions(name)
        if not versions:
            raise NotFound(f"{fields.model}: {name!r} is not in the repository")
        return name, versions[-1]

    def _open(self, repository: ModelRepository, name: str, version: str) -> LoadedModel:
        return LoadedModel(
            repository.files(name, version),
            intra_op_threads=self._threads[0],
            inter_op_threads=self._threads[1],
            max_batch_rows=self.max_batch_rows,
        )

    def served(self) -> list[LoadedModel]:
        """Every model version loaded in this process."""
        return self.pool.models() if self.pool is not None else list(self.models.values())

    def load_initial(self) -> None:
        """Load the pinned revision, or every model of the repository; failures are recorded.
        A pool member starts empty: it loads versions as requests ask for them."""
        if self.pool is not None:
            return
        names = [self.pinned_model] if self.pinned_model else self.repository.models()
        for name in names:
            try:
                self.load(name)
            except (ModelLoadError, NotFound) as exc:
                log.error("cannot load model %s: %s", name, exc.message)

    def load(self, name: str, version: str | None = None) -> LoadedModel:
        """Load (or reload) `name` at `version` (None: the latest) and serve it."""
        if not name:
            raise InvalidArgument("model_name: empty")
        if self.single_revision:
            if name != self.pinned_model:
                raise FailedPrecondition(
                    f"model_name: this server serves only {self.pinned_model!r}; "
                    "start it with --all-models to load others"
                )
            # Envoy routes to this process by revision: it never serves another version.
            version = self.pinned_version
        try:
            files = self.repository.files(name, version)
            loaded = LoadedModel(
                files,
                intra_op_threads=self._threads[0],
                inter_op_threads=self._threads[1],
                max_batch_rows=self.max_batch_rows,
            )
        except ModelLoadError as exc:
            self.failures[name] = exc.message
            raise
        self.models[name] = loaded
        self.failures.pop(name, None)
        heap.resettle()
        log.info("loaded model %s version %s (%s)", name, loaded.version, loaded.schema.task)
        return loaded

    def unload(self, name: str) -> None:
        if self.pool is not None:
            self.pool.unload(name)
            return
        if self.single_revision:
            raise FailedPrecondition("model_name: a single-revision server cannot unload its model")
        if name not in self.models:
            raise NotFound(f"model_name: {name!r} is not loaded")
        del self.models[name]
        heap.resettle()

    def get(
        self, name: str, version: str = "", fields: RequestFields = CYCLONE_FIELDS
    ) -> LoadedModel:
        loaded = self.models.get(name)
        if loaded is None:
            if not name:
                raise NotFound(f"{fields.model}: empty model name")
            if name in self.failures:
                raise FailedPrecondition(
                    f"{fields.model}: {name!r} failed to load: {self.failures[name]}"
                )
            raise NotFound(
                f"{fields.model}: {name!r} is not served here"
                f" (serving: {', '.join(self.models) or 'none'})"
            )
        if version and version != loaded.version:
            raise NotFound(
                f"{fields.version}: {name!r} version {version!r} is not served here (serving {loaded.version!r})"
            )
        return loaded

    def is_ready(self, name: str, version: str = "") -> bool:
        try:
            self.get(name, version)
        except CycloneError:
            return False
        return True

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        """Every model this server may serve: loaded ones READY, the others UNAVAILABLE with why."""
        entries: list[RepositoryEntry] = []
        names = [self.pinned_model] if self.pinned_model else self.repository.models()
        loaded_now = {m.name: m for m in self.served()}
        for name in names:
            loaded = loaded_now.get(name)
            if loaded is not None:
                entries.append(RepositoryEntry(name, loaded.version, "READY"))
            elif not ready_only:
                versions = self.repository.versions(name)
                entries.append(
                    RepositoryEntry(
                        name,
                        versions[-1] if versions else "",
                        "UNAVAILABLE",
                        self.failures.get(
                            name,
                            "not loaded (loads on its first request)"
                            if self.pool
                            else "not loaded",
                        ),
                    )
                )
        return entries
