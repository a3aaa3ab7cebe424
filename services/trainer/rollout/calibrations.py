"""`Calibrations` over a model repository: each version's calibration from its reference profile
(`<repository>/<model>/<version>/reference.json`), read once per version."""

from __future__ import annotations

import logging
from pathlib import Path

from cyclone.models.repository import REFERENCE_FILE
from cyclone.reference import ReferenceProfile

from .ports import Calibrated

log = logging.getLogger(__name__)


class RepositoryCalibrations:
    def __init__(self, model_repository: Path) -> None:
        self.model_repository = Path(model_repository)
        self._cache: dict[tuple[str, str], Calibrated | None] = {}

    async def calibration(self, model: str, version: str) -> Calibrated | None:
        key = (model, version)
        if key not in self._cache:
            self._cache[key] = self._load(model, version)
        return self._cache[key]

    def _load(self, model: str, version: str) -> Calibrated | None:
        path = self.model_repository / model / version / REFERENCE_FILE
        try:
            profile = ReferenceProfile.load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError) as exc:
            log.warning("no calibration for %s %s: %s is unreadable: %s", model, version, path, exc)
            return None
        if profile.calibration is None or not profile.class_labels:
            return None
        return Calibrated(tuple(str(c) for c in profile.class_labels), profile.calibration)
