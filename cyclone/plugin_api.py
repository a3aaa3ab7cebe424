"""Everything a plugin author imports, in one place: `from cyclone.plugin_api import ...`.

The definitions live in `cyclone.specs` (what plugins register and return), `cyclone.columns`
(the window and binned columns they compute on) and `cyclone.reference` (reference profiles).
"""

from __future__ import annotations

from cyclone.columns import CurrentColumn, Window
from cyclone.reference import (
    CategoricalProfile,
    ColumnProfile,
    FeatureSchema,
    NumericProfile,
    ReferenceProfile,
    build_profile,
    to_float,
)
from cyclone.specs import (
    Alert,
    AlertSinkSpec,
    DriftResult,
    DriftTestSpec,
    FamilyContext,
    Level,
    MetricContext,
    MetricResult,
    MetricSpec,
    ModelFamilySpec,
    OrchestratorSpec,
)

__all__ = [
    "Alert",
    "AlertSinkSpec",
    "CategoricalProfile",
    "ColumnProfile",
    "CurrentColumn",
    "DriftResult",
    "DriftTestSpec",
    "FamilyContext",
    "FeatureSchema",
    "Level",
    "MetricContext",
    "MetricResult",
    "MetricSpec",
    "ModelFamilySpec",
    "NumericProfile",
    "OrchestratorSpec",
    "ReferenceProfile",
    "Window",
    "build_profile",
    "to_float",
]
