"""Envoy config for several stores: one store cluster with every endpoint, health-checked and
with outlier ejection; idempotent store calls retried on a sibling after a reset, the others
only when they never reached a store; one store stays exactly as before."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from cyclone.envoy import config as cfg
from cyclone.envoy.proxy import EnvoyProxy
from cyclone.traffic import Endpoint

STORE, STORE_2 = Endpoint("127.0.0.1", 9002), Endpoint("127.0.0.1", 9012)
ONE = cfg.EnvoySettings(work_dir=Path("/nonexistent"), store=STORE)
TWO = cfg.EnvoySettings(work_dir=Path("/nonexistent"), store=STORE, extra_stores=(STORE_2,))


def _store_cluster(settings: cfg.EnvoySettings) -> dict[str, Any]:
    return next(c for c in cfg.component_clusters(settings) if c["name"] == cfg.STORE_CLUSTER)


def _ports(cluster: dict[str, Any]) -> list[int]:
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]


def _store_route(settings: cfg.EnvoySettings, method: str) -> dict[str, Any]:
    """The route the control listener takes for a store method (first match wins)."""
    path = f"/{cfg.STORE_SERVICE}/{method}"
    for route in cfg.control_routes({}, settings)["virtual_hosts"][0]["routes"]:
        match = route["match"]
        regex = match.get("safe_regex", {}).get("regex")
        if (
            match.get("path") == path
            or path.startswith(match.get("prefix", "\0"))
            or (regex is not None and re.fullmatch(regex, path))
        ):
            return dict(route["route"])
    raise AssertionError(f"no route for {path}")


def test_two_stores_share_one_health_checked_cluster() -> None:
    cluster = _store_cluster(TWO)
    assert _ports(cluster) == [9002, 9012]
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    assert cluster["outlier_detection"]["consecutive_local_origin_failure"] == 2


def test_idempotent_store_calls_are_retried_on_a_sibling_and_others_only_before_sending() -> None:
    for method in ("LogPredictions", "AddLabels", "GetTrainingData", "LeaseModels"):
        policy = _store_route(TWO, method)["retry_policy"]
        assert "reset" in policy["retry_on"] and "unavailable" in policy["retry_on"], method
        assert policy["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    for method in ("RecordEvaluation", "ClaimAlerts", "CreateTrainingJob"):
        retry_on = _store_route(TWO, method)["retry_policy"]["retry_on"]
        assert retry_on == "connect-failure,refused-stream", method
    # Labels on the public listener too.
    labels = [r for r in cfg.label_routes(TWO) if r["match"].get("path", "").endswith("AddLabels")]
    assert "reset" in labels[0]["route"]["retry_policy"]["retry_on"]


def test_one_store_is_configured_as_before() -> None:
    cluster = _store_cluster(ONE)
    assert _ports(cluster) == [9002]
    assert "health_checks" not in cluster
    route = _store_route(ONE, "LogPredictions")
    assert "retry_policy" not in route
    assert all("retry_policy" not in r["route"] for r in cfg.label_routes(ONE))


def test_envoy_accepts_the_two_store_config(tmp_path: Path) -> None:
    settings = cfg.EnvoySettings(
        work_dir=tmp_path / "envoy",
        store=STORE,
        extra_stores=(STORE_2,),
        public_port=0,
        control_port=0,
    )
    asyncio.run(EnvoyProxy(settings).write_config())  # runs `envoy --mode validate`
