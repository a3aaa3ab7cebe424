"""Envoy config for pooled revisions: the version headers are set by the revision's cluster
and by its failover aggregate (the one the weighted route names), requests are hashed to one
member by model, and a dedicated revision's clusters stay as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cyclone.envoy import config as cfg
from cyclone.traffic import Endpoint, Revision, TrafficSplit
from cyclone.wire import POOL_MODEL_HEADER, POOL_VERSION_HEADER

POOL = (Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002))
SETTINGS = cfg.EnvoySettings(work_dir=Path("/nonexistent"))


def _headers_set(cluster: dict[str, Any]) -> dict[str, str]:
    options = cluster["typed_extension_protocol_options"][cfg._HTTP_OPTIONS]
    found = {}
    for upstream_filter in options.get("http_filters", []):
        mutations = upstream_filter["typed_config"].get("mutations", {})
        for mutation in mutations.get("request_mutations", []):
            header = mutation["append"]["header"]
            found[header["key"]] = header["value"]
    return found


def test_pooled_clusters_name_their_version_and_hash_by_model() -> None:
    v1, v2 = Revision("credit", "1", POOL, pooled=True), Revision("credit", "2", POOL, pooled=True)
    split = TrafficSplit("credit", {v1.name: 90, v2.name: 10}, {v1.name: v1, v2.name: v2})
    clusters = {c["name"]: c for c in cfg.split_clusters(split, SETTINGS)}
    for revision in (v1, v2):
        wanted = {POOL_MODEL_HEADER: "credit", POOL_VERSION_HEADER: revision.version}
        assert _headers_set(clusters[revision.name]) == wanted
        assert _headers_set(clusters[cfg.failover_name(revision.name)]) == wanted
        assert clusters[revision.name]["lb_policy"] == "MAGLEV"
    routes = cfg.inference_routes({"credit": split}, SETTINGS)
    action = next(r["route"] for r in routes if "route" in r)
    assert action["hash_policy"][0] == {"header": {"header_name": cfg.MODEL_HEADER}}


def test_dedicated_revisions_are_unchanged() -> None:
    revision = Revision("credit", "1", (Endpoint("127.0.0.1", 9001),))
    split = TrafficSplit("credit", {revision.name: 100}, {revision.name: revision})
    for cluster in cfg.split_clusters(split, SETTINGS):
        assert _headers_set(cluster) == {}
        assert cluster["lb_policy"] != "MAGLEV"
    routes = cfg.inference_routes({"credit": split}, SETTINGS)
    assert all("hash_policy" not in r.get("route", {}) for r in routes)


def test_pooled_clusters_bound_a_members_load_only_when_asked() -> None:
    revision = Revision("credit", "1", POOL, pooled=True)
    assert "common_lb_config" not in cfg.revision_cluster(revision, SETTINGS)  # default: off
    bounded = cfg.EnvoySettings(work_dir=Path("/nonexistent"), pool_hash_balance_percent=150)
    cluster = cfg.revision_cluster(revision, bounded)
    assert cluster["lb_policy"] == "MAGLEV"
    assert cluster["common_lb_config"] == {
        "consistent_hashing_lb_config": {"hash_balance_factor": 150}
    }
    dedicated = cfg.revision_cluster(Revision("credit", "1", POOL), bounded)
    assert "common_lb_config" not in dedicated  # least-request clusters have no hash to bound


def test_a_bound_under_the_mean_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="pool_hash_balance_percent: must be 100 or more"):
        cfg.EnvoySettings(work_dir=Path("/nonexistent"), pool_hash_balance_percent=99)


def test_pooled_clusters_check_healthy_members_less_often() -> None:
    pooled = cfg.revision_cluster(Revision("credit", "1", POOL, pooled=True), SETTINGS)
    check = pooled["health_checks"][0]
    # Every pooled cluster checks the same members: a healthy one every 10 s, not every second.
    assert check["interval"] == check["no_traffic_interval"] == "10s"
    assert check["unhealthy_interval"] == "1s"  # a member that failed is watched as closely
    assert pooled["outlier_detection"]["consecutive_local_origin_failure"] == 2
    dedicated = cfg.revision_cluster(Revision("credit", "1", POOL), SETTINGS)
    assert dedicated["health_checks"][0]["interval"] == "1s"
    assert "unhealthy_interval" not in dedicated["health_checks"][0]
    # Never less often than the base interval, should that be the longer one.
    slow = cfg.EnvoySettings(work_dir=Path("/nonexistent"), health_interval_s=30)
    pooled = cfg.revision_cluster(Revision("credit", "1", POOL, pooled=True), slow)
    assert pooled["health_checks"][0]["interval"] == "30s"


def test_a_pool_health_interval_of_zero_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="pool_health_interval_s: must be more than 0"):
        cfg.EnvoySettings(work_dir=Path("/nonexistent"), pool_health_interval_s=0)
