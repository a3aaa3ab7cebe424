"""The model registry: registering versions, finding them, moving their status."""

from __future__ import annotations

from cyclone.errors import InvalidArgument, NotFound
from services.store.db import AlreadyExistsError, ModelStats, ModelStatus, ModelVersion, StoreDB

from .checks import found, name, not_negative, one_of, require

TASKS = ("regression", "classification")


def check_new_version(mv: ModelVersion) -> None:
    """What every version to register needs, by hand or by a retraining job."""
    require("model_version.model", mv.model)
    require("model_version.version", mv.version)
    if mv.task:
        one_of("model_version.task", mv.task, TASKS)
    if mv.status == "serving":
        raise InvalidArgument(
            "model_version.status: register as staged or canary, then SetModelStatus"
        )
    name("model_version.model", mv.model)
    name("model_version.version", mv.version)
    not_negative("model_version.training_rows", mv.training_rows or 0)
    not_negative("model_version.triggering_alert_id", mv.triggering_alert_id or 0)


def already_registered(mv: ModelVersion, existing: ModelVersion | None) -> InvalidArgument:
    differs = existing is not None and existing.sha256 != mv.sha256
    return InvalidArgument(
        f"model_version: {mv.model!r} version {mv.version!r} is already registered"
        + (" with a different sha256" if differs else "")
    )


async def require_known_model(db: StoreDB, model: str) -> None:
    """NOT_FOUND when a list's `model` filter names no registered model: an empty answer would
    read as "nothing happened yet" when the name is a typo. Called only when a filtered list
    came back empty, so a known model costs nothing."""
    if not model or await db.latest_version(model) is not None:
        return
    names = sorted({v.model for v in await db.list_model_versions(None, summary=True)})
    known = f"registered models: {', '.join(names)}" if names else "no model is registered"
    raise NotFound(f"model: {model!r} is not registered; {known}")


class RegistryArea:
    db: StoreDB

    async def _find_version(self, model: str, version: str) -> ModelVersion | None:
        """`version` of `model`, or without one the serving version, else the latest."""
        require("model", model)
        if version:
            return await self.db.get_model_version(model, version)
        return await self.db.serving_version(model) or await self.db.latest_version(model)

    async def resolve_version(self, model: str) -> ModelVersion:
        """The version a model's labels and windows follow: serving, else the latest."""
        return found(await self._find_version(model, ""), f"model: {model!r} is not registered")

    async def register_model_version(
        self, mv: ModelVersion, *, if_not_exists: bool
    ) -> tuple[ModelVersion, bool]:
        """The stored version and whether this call created it."""
        check_new_version(mv)
        try:
            return await self.db.register_model_version(mv), True
        except AlreadyExistsError:
            existing = await self.db.get_model_version(mv.model, mv.version)
            if if_not_exists and existing is not None and existing.sha256 == mv.sha256:
                return existing, False
            raise already_registered(mv, existing) from None

    async def get_model_version(self, model: str, version: str) -> ModelVersion:
        return found(
            await self._find_version(model, version),
            f"version: {model!r} {version or '(any)'} is not registered",
        )

    async def list_model_versions(
        self, model: str, *, status: ModelStatus | None = None, summary: bool = False
    ) -> list[ModelVersion]:
        """`status` None: every status; `summary`: identities only (no JSON blobs)."""
        return await self.db.list_model_versions(model or None, status=status, summary=summary)

    async def set_model_status(
        self, model: str, version: str, status: ModelStatus | None
    ) -> ModelVersion:
        if status is None:
            raise InvalidArgument("status: set one of STAGED, CANARY, SERVING, RETIRED")
        require("version", version)
        await self.get_model_version(model, version)
        return await self.db.set_model_status(model, version, status)

    async def stats(self, model: str) -> tuple[list[ModelStats], str]:
        """Per-model stats and the storage mode."""
        return await self.db.stats(model or None), self.db.mode
