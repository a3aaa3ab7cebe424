"""The store's domain: what each RPC means, on domain records, without protobuf or gRPC.

Every StoreService RPC is one `Store` method; the servicer modules translate protobuf with
`services.store.convert` and call it, and it checks the request and calls `StoreDB`. One module
per area -- `registry`, `predictions`, `monitoring`, `training`, `rollouts`, `leases`, `role_leases` -- and
one set of checks with the one JSON policy (`checks`). A failed check names the request field at fault,
and every error is a `cyclone.errors` type (the database layer raises those too), so
`rpc_errors` maps it.
"""

from __future__ import annotations

from services.store.db import StoreDB

from .leases import LeasesArea
from .monitoring import EvaluationRecord, MonitoringArea
from .predictions import (
    LabelValue,
    PredictionQuery,
    PredictionsArea,
    TrainingRequest,
    TrainingStream,
)
from .role_leases import RoleLeasesArea
from .rollouts import RolloutsArea, RolloutUpdate
from .training import JobUpdate, TrainingArea


class Store(
    PredictionsArea, MonitoringArea, TrainingArea, RolloutsArea, LeasesArea, RoleLeasesArea
):
    """One method per StoreService RPC (registry and predictions, monitoring, training jobs,
    rollouts, model leases, role leases)."""

    def __init__(self, db: StoreDB) -> None:
        self.db = db


__all__ = [
    "EvaluationRecord",
    "JobUpdate",
    "LabelValue",
    "PredictionQuery",
    "RolloutUpdate",
    "Store",
    "TrainingRequest",
    "TrainingStream",
]
