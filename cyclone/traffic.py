"""How a model's traffic is split between its revisions: the contract between the rollout
controller (which decides the weights) and the proxy that applies them (Envoy).

A revision is one model version served by one or more replica processes (its endpoints). The
router applies a whole split at once and in a safe order: new clusters first, weights next,
clusters that left the split last, so a route never names a cluster the proxy does not know.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def revision_name(model: str, version: str) -> str:
    """The cluster name of a model version: stable, readable, safe in Envoy names and stats."""
    return f"{_UNSAFE.sub('_', model)}--{_UNSAFE.sub('_', version)}"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Revision:
    """One model version and the replica processes serving it.

    A `pooled` revision's endpoints are the serving pool's processes, shared with other model
    versions: the proxy tells them which version to answer (request headers set per cluster).
    """

    model: str
    version: str
    endpoints: tuple[Endpoint, ...]
    pooled: bool = False

    @property
    def name(self) -> str:
        return revision_name(self.model, self.version)


@dataclass(frozen=True)
class TrafficSplit:
    """Weights (percent, summing to 100) over a model's revisions, plus an optional shadow.

    The shadow revision receives a copy of `shadow_percent` of the requests (Envoy request
    mirroring); its answers are never returned to callers.
    """

    model: str
    weights: Mapping[str, int]  # revision name -> percent
    revisions: Mapping[str, Revision]  # revision name -> revision (every weighted one + shadow)
    shadow: str | None = None
    shadow_percent: float = 100.0

    def __post_init__(self) -> None:
        if sum(self.weights.values()) != 100:
            raise ValueError(f"weights: must sum to 100, got {dict(self.weights)}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights: must not be negative, got {dict(self.weights)}")
        missing = [
            n for n in (*self.weights, *(s for s in [self.shadow] if s)) if n not in self.revisions
        ]
        if missing:
            raise ValueError(f"revisions: no revision for {missing}")


@dataclass(frozen=True)
class RevisionStats:
    """What the proxy saw of one revision since it was added (cumulative counters)."""

    requests: int = 0
    failures: int = 0  # 5xx and gRPC statuses other than OK/INVALID_ARGUMENT/NOT_FOUND
    latency_ms_p50: float | None = None
    latency_ms_p99: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)


class TrafficRouter(Protocol):
    """Applies traffic splits; implemented by the Envoy control plane (`cyclone.envoy`)."""

    async def apply(self, split: TrafficSplit) -> None:
        """Install `split` for its model; returns once the proxy has accepted the config."""

    async def wait_healthy(self, revision: Revision, timeout: float) -> None:
        """Return when the proxy's health checks see every endpoint of `revision` healthy.

        Raises TimeoutError naming the revision when they do not within `timeout` seconds.
        """

    async def stats(self, revision_name: str) -> RevisionStats:
        """Counters for one revision's cluster (zeros when the proxy has not seen it)."""

    async def remove_model(self, model: str) -> None:
        """Stop routing `model` at all (its clusters go once drained)."""
