"""Async data access for the store (psycopg 3 + psycopg_pool); no gRPC here.

db = StoreDB()
await db.open(url)          # migrations, partitions/policies; db.mode says which
await db.copy_predictions(records)
...
await db.refresh_rollup()   # periodically: per-minute rollup (rollup.py)
await db.apply_retention()  # periodically: drop what is past retention (retention.py)
await db.close()
"""

from __future__ import annotations

from ._base import Conn
from .health import EvaluationOutcome, Health, HealthMixin
from .ingest import IngestMixin
from .leases import LeaseOutcome, LeasesMixin, ModelLease
from .outbox import OutboxMixin
from .reads import ReadsMixin, decode_page_token, encode_page_token
from .registry import RegistryMixin
from .retention import RetentionMixin, RetentionResult
from .role_leases import RoleFence, RoleLease, RoleLeasesMixin
from .rollouts import RolloutsMixin
from .rollup import RefreshResult, RollupMixin
from .training import JobEndedError, TrainingJob, TrainingMixin
from .types import (
    EPOCH,
    Alert,
    AlertTarget,
    AlreadyExistsError,
    ColumnChunk,
    FeatureFilter,
    LabelResult,
    MetricPoint,
    MinuteStats,
    Mode,
    ModelStats,
    ModelStatus,
    ModelVersion,
    NotFoundError,
    Plan,
    PredictionRecord,
    PredictionRow,
    StoreError,
    TrainingChunk,
    uuid7,
    uuid7_time,
)


class StoreDB(
    TrainingMixin,
    IngestMixin,
    ReadsMixin,
    RegistryMixin,
    OutboxMixin,
    HealthMixin,
    RolloutsMixin,
    RollupMixin,
    RetentionMixin,
    LeasesMixin,
    RoleLeasesMixin,
):
    """The store's database: see the mixins for the methods."""

    async def __aenter__(self) -> StoreDB:
        return self


__all__ = [
    "EPOCH",
    "Alert",
    "AlertTarget",
    "AlreadyExistsError",
    "ColumnChunk",
    "Conn",
    "EvaluationOutcome",
    "FeatureFilter",
    "Health",
    "JobEndedError",
    "LabelResult",
    "LeaseOutcome",
    "MetricPoint",
    "MinuteStats",
    "Mode",
    "ModelLease",
    "ModelStats",
    "ModelStatus",
    "ModelVersion",
    "NotFoundError",
    "Plan",
    "PredictionRecord",
    "PredictionRow",
    "RefreshResult",
    "RetentionResult",
    "RoleFence",
    "RoleLease",
    "StoreDB",
    "StoreError",
    "TrainingChunk",
    "TrainingJob",
    "decode_page_token",
    "encode_page_token",
    "uuid7",
    "uuid7_time",
]
