"""The store's rollout RPCs against a real in-process server on an embedded PostgreSQL."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio
from support import expect_error

from cyclone.errors import FailedPrecondition
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.launch import start_store
from services.store.db import StoreDB
from services.store.db.rollouts import RolloutEventRow, RolloutRow
from services.store.main import StoreSettings
from services.trainer.rollout import RolloutController, RolloutState
from services.trainer.rollout.store_gateway import StoreGateway
from tests.unit.test_rollout_controller import FakeOrchestrator, FakeRouter

pytestmark = pytest.mark.integration

M = "credit"


@pytest.fixture
async def store_address(fresh_database_url: str) -> AsyncIterator[str]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    server = (await start_store(settings)).server
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def stub(store_address: str) -> AsyncIterator[pb_grpc.StoreServiceStub]:
    async with aio.insecure_channel(store_address) as channel:
        s = pb_grpc.StoreServiceStub(channel)
        for v in ("1", "2", "3"):
            await s.RegisterModelVersion(
                pb.RegisterModelVersionRequest(
                    model_version=pb.ModelVersion(model=M, version=v, task="classification")
                )
            )
        yield s


def create(version: str = "2", **overrides: Any) -> pb.CreateRolloutRequest:
    fields: dict[str, Any] = {
        "model": M,
        "from_version": "1",
        "to_version": version,
        "strategy": "canary",
        "state": "pending",
        "spec_json": json.dumps({"strategy": "canary", "steps": [50, 100]}),
        **overrides,
    }
    return pb.CreateRolloutRequest(
        rollout=pb.RolloutRecord(**fields),
        event=pb.RolloutEvent(state="pending", weight=0, decision="start", reason="by hand"),
    )


async def test_rollout_lifecycle_is_recorded_with_its_events(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    created = (await stub.CreateRollout(create())).rollout
    assert created.id > 0 and created.state == "pending" and len(created.events) == 1
    assert json.loads(created.spec_json)["steps"] == [50, 100]
    updated = (
        await stub.UpdateRollout(
            pb.UpdateRolloutRequest(
                rollout_id=created.id,
                state="progressing",
                current_weight=50,
                weights_json=json.dumps({"credit--1": 50, "credit--2": 50}),
                progress_json=json.dumps({"phase": "steps", "step_index": 0}),
                events=[
                    pb.RolloutEvent(
                        state="progressing",
                        weight=50,
                        decision="set_weight",
                        numbers={"canary_error_rate": 0.01, "error_rate_p_value": 0.4},
                    )
                ],
            )
        )
    ).rollout
    assert updated.current_weight == 50
    assert [e.seq for e in updated.events] == [1, 2]
    assert updated.events[1].numbers["canary_error_rate"] == pytest.approx(0.01)
    assert json.loads(updated.progress_json)["phase"] == "steps"
    active = (await stub.ListRollouts(pb.ListRolloutsRequest(active_only=True))).rollouts
    assert [r.id for r in active] == [created.id]
    await stub.UpdateRollout(
        pb.UpdateRolloutRequest(
            rollout_id=created.id,
            state="promoted",
            current_weight=100,
            reason="all steps passed",
            events=[pb.RolloutEvent(state="promoted", weight=100, decision="promoted")],
        )
    )
    got = (await stub.GetRollout(pb.GetRolloutRequest(rollout_id=created.id))).rollout
    assert got.state == "promoted" and got.reason == "all steps passed"
    assert json.loads(got.weights_json) == {"credit--1": 50, "credit--2": 50}  # kept
    assert not (await stub.ListRollouts(pb.ListRolloutsRequest(active_only=True))).rollouts
    # Ended: the next rollout of the model may start; the ended one cannot change.
    second = (await stub.CreateRollout(create("3"))).rollout
    listed = (await stub.ListRollouts(pb.ListRolloutsRequest(model=M))).rollouts
    assert [r.id for r in listed] == [second.id, created.id]
    await expect_error(
        stub.UpdateRollout(pb.UpdateRolloutRequest(rollout_id=created.id, state="paused")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "has ended",
    )


async def test_second_active_rollout_of_a_model_is_refused(stub: pb_grpc.StoreServiceStub) -> None:
    await stub.CreateRollout(create("2"))
    await expect_error(
        stub.CreateRollout(create("3")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "already has an active rollout",
    )


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (create(model=""), grpc.StatusCode.INVALID_ARGUMENT, "rollout.model: empty"),
        (create(to_version=""), grpc.StatusCode.INVALID_ARGUMENT, "rollout.to_version: empty"),
        (create(strategy="yolo"), grpc.StatusCode.INVALID_ARGUMENT, "rollout.strategy"),
        (create(state="done"), grpc.StatusCode.INVALID_ARGUMENT, "rollout.state"),
        (create(current_weight=101), grpc.StatusCode.INVALID_ARGUMENT, "rollout.current_weight"),
        (create(spec_json="[1]"), grpc.StatusCode.INVALID_ARGUMENT, "rollout.spec_json"),
        (create(progress_json="{"), grpc.StatusCode.INVALID_ARGUMENT, "rollout.progress_json"),
        (
            create(spec_json='{"steps": [1e999]}'),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rollout.spec_json: not valid JSON (1e999 is out of range for a double)",
        ),
        (
            create(weights_json="null"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rollout.weights_json: expected a JSON object, got null",
        ),
        (create("9"), grpc.StatusCode.NOT_FOUND, "rollout.to_version"),
        (
            pb.CreateRolloutRequest(rollout=create().rollout),
            grpc.StatusCode.INVALID_ARGUMENT,
            "event: missing",
        ),
    ],
)
async def test_create_bad_input(
    stub: pb_grpc.StoreServiceStub, request_: pb.CreateRolloutRequest, code: Any, fragment: str
) -> None:
    await expect_error(stub.CreateRollout(request_), code, fragment)


async def test_update_get_list_bad_input(stub: pb_grpc.StoreServiceStub) -> None:
    rid = (await stub.CreateRollout(create())).rollout.id
    bad_updates = [
        (pb.UpdateRolloutRequest(rollout_id=0, state="paused"), "rollout_id: must be positive"),
        (pb.UpdateRolloutRequest(rollout_id=rid, state="sideways"), "state: expected one of"),
        (
            pb.UpdateRolloutRequest(rollout_id=rid, state="paused", current_weight=math.nan),
            "current_weight: must be between",
        ),
        (
            pb.UpdateRolloutRequest(rollout_id=rid, state="paused", weights_json="nope"),
            "weights_json: not valid JSON",
        ),
        (
            pb.UpdateRolloutRequest(
                rollout_id=rid, state="paused", progress_json='{"phase": "\\u0000"}'
            ),
            "progress_json: \\u0000 is not allowed",
        ),
        (
            pb.UpdateRolloutRequest(
                rollout_id=rid,
                state="paused",
                events=[pb.RolloutEvent(state="paused", weight=0, decision="")],
            ),
            "events[0].decision: empty",
        ),
        (
            pb.UpdateRolloutRequest(
                rollout_id=rid,
                state="paused",
                events=[
                    pb.RolloutEvent(
                        state="paused", weight=0, decision="hold", numbers={"p": math.inf}
                    )
                ],
            ),
            "events[0].numbers[p]: must be finite",
        ),
    ]
    for request, fragment in bad_updates:
        await expect_error(stub.UpdateRollout(request), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    await expect_error(
        stub.UpdateRollout(pb.UpdateRolloutRequest(rollout_id=rid + 100, state="paused")),
        grpc.StatusCode.NOT_FOUND,
        "rollout_id",
    )
    await expect_error(
        stub.GetRollout(pb.GetRolloutRequest(rollout_id=rid + 100)),
        grpc.StatusCode.NOT_FOUND,
        "rollout_id",
    )
    await expect_error(
        stub.GetRollout(pb.GetRolloutRequest(rollout_id=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "rollout_id",
    )
    await expect_error(
        stub.ListRollouts(pb.ListRolloutsRequest(limit=5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    )
    # Nothing of the refused updates was written.
    got = (await stub.GetRollout(pb.GetRolloutRequest(rollout_id=rid))).rollout
    assert got.state == "pending" and len(got.events) == 1


async def test_the_strategy_list_lives_in_one_place_not_in_the_schema(
    fresh_database_url: str, stub: pb_grpc.StoreServiceStub
) -> None:
    """The RPC refuses a name outside cyclone.rollout_strategies; the table takes any (a
    strategy added to the trainer proto needs no migration)."""
    await expect_error(
        stub.CreateRollout(create(strategy="ramp")), grpc.StatusCode.INVALID_ARGUMENT, "ramp"
    )
    db = StoreDB()
    await db.open(fresh_database_url)
    try:
        row = RolloutRow(model=M, to_version="2", strategy="ramp", state="pending")
        stored = await db.insert_rollout(row, RolloutEventRow("pending", 0.0, "start"))
        assert stored.strategy == "ramp"
    finally:
        await db.close()


async def test_controller_records_a_canary_in_the_store(
    store_address: str, stub: pb_grpc.StoreServiceStub
) -> None:
    """The controller over the real store: statuses, plan section, steps and numbers persist."""
    await stub.SetModelStatus(
        pb.SetModelStatusRequest(model=M, version="1", status=pb.MODEL_STATUS_SERVING)
    )
    await stub.SavePlan(
        pb.SavePlanRequest(
            model=M,
            plan_yaml="model: credit\nrollout:\n  steps: [50, 100]\n  interval: 10ms\n"
            "  step_duration: 30ms\n  min_requests: 20\n  deadline: 300ms\n  drain: 50ms\n",
        )
    )
    orchestrator = FakeOrchestrator()
    await orchestrator.start(M, "1", 1)
    router = FakeRouter(orchestrator)
    gateway = StoreGateway(store_address)
    controller = RolloutController(orchestrator, router, gateway)
    try:
        started = await controller.start(M, "2")
        with pytest.raises(FailedPrecondition, match="active rollout"):
            await controller.start(M, "3")
        done = await controller.wait(started.id, 10)
    finally:
        await controller.close()
    stored = await gateway.get(started.id)
    await gateway.close()
    assert done.state is RolloutState.PROMOTED, done.steps
    assert stored is not None and stored.state is RolloutState.PROMOTED
    assert stored.spec.steps == (50, 100) and stored.spec.interval_seconds == 0.01
    assert [s.decision for s in stored.steps] == [s.decision for s in done.steps]
    assert any("canary_error_rate" in s.numbers for s in stored.steps)
    versions = (await stub.ListModelVersions(pb.ListModelVersionsRequest(model=M))).model_versions
    status = {v.version: v.status for v in versions}
    assert status == {
        "1": pb.MODEL_STATUS_RETIRED,
        "2": pb.MODEL_STATUS_SERVING,
        "3": pb.MODEL_STATUS_STAGED,
    }
