"""Envoy config for several trainers: one trainer cluster with every trainer, health-checked on
the trainer service (only the traffic plane's leader reports it SERVING), no panic routing to
standbys when no trainer leads; one trainer stays exactly as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cyclone.envoy import config as cfg
from cyclone.traffic import Endpoint

TRAINER, TRAINER_2 = Endpoint("127.0.0.1", 9004), Endpoint("127.0.0.1", 9014)
ONE = cfg.EnvoySettings(work_dir=Path("/nonexistent"), trainer=TRAINER)
TWO = cfg.EnvoySettings(work_dir=Path("/nonexistent"), trainer=TRAINER, extra_trainers=(TRAINER_2,))


def _trainer_cluster(settings: cfg.EnvoySettings) -> dict[str, Any]:
    return next(c for c in cfg.component_clusters(settings) if c["name"] == cfg.TRAINER_CLUSTER)


def _ports(cluster: dict[str, Any]) -> list[int]:
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]


def test_two_trainers_are_health_checked_on_the_trainer_service() -> None:
    cluster = _trainer_cluster(TWO)
    assert _ports(cluster) == [9004, 9014]
    check = cluster["health_checks"][0]["grpc_health_check"]
    assert check == {"service_name": cfg.TRAINER_SERVICE}
    # No leader: Envoy answers UNAVAILABLE rather than spreading calls over standbys.
    assert cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}


def test_one_trainer_is_as_before() -> None:
    cluster = _trainer_cluster(ONE)
    assert _ports(cluster) == [9004]
    assert "health_checks" not in cluster and "common_lb_config" not in cluster
