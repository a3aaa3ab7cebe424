"""`cyclone status`'s collection: each service adds what it knows, one that does not answer is a
problem line, not a failure. Fake store and trainer servers (real gRPC on free ports)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from cyclone.store.v1 import store_service_pb2 as spb
from cyclone.store.v1 import store_service_pb2_grpc as spb_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as tpb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as tpb_grpc
from cyclone_app.cli_mesh import collect_status


class FakeStore(spb_grpc.StoreServiceServicer):
    def GetStats(self, request: spb.GetStatsRequest, context: Any) -> spb.GetStatsResponse:
        return spb.GetStatsResponse(
            storage_mode="plain",
            models=[spb.ModelStats(model="credit", predictions=10, labels=4, label_coverage=0.4)],
        )

    def ListModelVersions(
        self, request: spb.ListModelVersionsRequest, context: Any
    ) -> spb.ListModelVersionsResponse:
        return spb.ListModelVersionsResponse(
            model_versions=[
                spb.ModelVersion(model="credit", version="1", status=spb.MODEL_STATUS_SERVING),
                spb.ModelVersion(
                    model="credit", version="2", status=spb.MODEL_STATUS_CANARY, parent_version="1"
                ),
                spb.ModelVersion(model="bike", version="3", status=spb.MODEL_STATUS_SERVING),
            ]
        )


class FakeTrainer(tpb_grpc.TrainerServiceServicer):
    def ListJobs(self, request: tpb.ListJobsRequest, context: Any) -> tpb.ListJobsResponse:
        job = tpb.Job(id=7, model="credit", state=tpb.JOB_STATE_SUCCEEDED, new_version="2")
        return tpb.ListJobsResponse(jobs=[job])

    def ListRollouts(
        self, request: tpb.ListRolloutsRequest, context: Any
    ) -> tpb.ListRolloutsResponse:
        return tpb.ListRolloutsResponse(
            rollouts=[
                tpb.Rollout(
                    id="r-credit",
                    model="credit",
                    from_version="1",
                    to_version="2",
                    strategy=tpb.ROLLOUT_STRATEGY_CANARY,
                    state=tpb.ROLLOUT_STATE_PROGRESSING,
                    current_weight=25.0,
                ),
                # Finished: the split stays the serving version's.
                tpb.Rollout(
                    id="r-bike",
                    model="bike",
                    from_version="2",
                    to_version="3",
                    state=tpb.ROLLOUT_STATE_PROMOTED,
                    current_weight=100.0,
                ),
            ]
        )


@contextmanager
def _serving(add: Any, servicer: Any) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _nothing_listening() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_status_joins_what_answers_and_names_the_service_that_does_not(tmp_path: Path) -> None:
    with (
        _serving(spb_grpc.add_StoreServiceServicer_to_server, FakeStore()) as store,
        _serving(tpb_grpc.add_TrainerServiceServicer_to_server, FakeTrainer()) as trainer,
    ):
        got = collect_status(tmp_path, store=store, monitor=_nothing_listening(), trainer=trainer)

    assert got["mesh"] is None  # no `cyclone up` in this data dir
    assert got["storage_mode"] == "plain"
    credit, bike = got["models"]["credit"], got["models"]["bike"]
    assert credit["serving"] == "1" and credit["traffic"]["predictions"] == 10
    assert (
        credit["versions"]["2"]["status"] == "canary" and credit["versions"]["2"]["parent"] == "1"
    )
    assert credit["split"] == {"2": 25.0, "1": 75.0}  # the rollout in flight
    assert bike["split"] == {"3": 100.0}
    assert [(r["id"], r["strategy"], r["state"]) for r in got["rollouts"]] == [
        ("r-credit", "canary", "progressing"),
        ("r-bike", "unspecified", "promoted"),
    ]
    assert [(j["id"], j["state"], j["new_version"]) for j in got["jobs"]] == [(7, "succeeded", "2")]
    # The monitor did not answer: no levels, one problem naming it, the rest still there.
    assert credit["level"] is None and got["alerts"] == []
    assert len(got["problems"]) == 1 and got["problems"][0].startswith("monitor: ")
