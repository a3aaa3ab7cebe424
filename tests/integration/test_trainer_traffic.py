"""The trainer with its traffic plane, on real parts: store, Envoy, revision subprocesses.

At start-up it registers what the repository holds and serves it through Envoy; a rollout RPC
then moves the traffic to a new version, with every step recorded."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from support import store_and_trainer

from cyclone.client import MODEL_HEADER
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.convert import import_pipeline
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.rollout_plan import RedBlackSpec
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.examples import credit_frame, credit_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


@dataclasses.dataclass
class Mesh:
    store: store_grpc.StoreServiceStub
    trainer: pb_grpc.TrainerServiceStub
    public: str
    repository: Path
    plane: Any
    trainer_address: str


@pytest.fixture
async def mesh(fresh_database_url: str, tmp_path: Path, model_repo: Any) -> AsyncIterator[Mesh]:
    repository = tmp_path / "models"
    repository.mkdir()
    frame = credit_frame(400, seed=0)
    import_pipeline(
        credit_pipeline(frame), "credit", repository, sample=frame, label_column="defaulted"
    )
    async with (
        store_and_trainer(fresh_database_url, repository, tmp_path / "data") as (store, trainer),
        aio.insecure_channel(store.address) as store_channel,
        aio.insecure_channel(trainer.address) as trainer_channel,
    ):
        plane = trainer.domain.traffic
        yield Mesh(
            store_grpc.StoreServiceStub(store_channel),
            pb_grpc.TrainerServiceStub(trainer_channel),
            plane.proxy.public_address,
            repository,
            plane,
            trainer.address,
        )


async def _predict(public: str) -> inference_pb.PredictResponse:
    request = inference_pb.PredictRequest(model="credit")
    for name, value in {"age": 41.0, "income": 52000.0, "debt_ratio": 0.31}.items():
        request.features[name].numbers.append(value)
    request.features["city"].strings.append("porto")
    async with aio.insecure_channel(public) as channel:
        return await inference_grpc.InferenceServiceStub(channel).Predict(
            request, metadata=((MODEL_HEADER, "credit"),), timeout=10
        )


async def test_start_up_serves_the_repository_and_a_rollout_moves_traffic(mesh: Mesh) -> None:
    # Registered and served through Envoy without anyone asking.
    first = await _predict(mesh.public)
    assert first.version == "1" and len(first.prediction_ids) == 1
    versions = await mesh.store.ListModelVersions(store_pb.ListModelVersionsRequest(model="credit"))
    assert [(v.version, v.status) for v in versions.model_versions] == [
        ("1", store_pb.MODEL_STATUS_SERVING)
    ]

    # A second version, rolled out red-black with a short keep-warm period.
    frame = credit_frame(400, seed=3)
    import_pipeline(
        credit_pipeline(frame), "credit", mesh.repository, sample=frame, label_column="defaulted"
    )
    plan = default_plan("credit", "classification")
    plan = dataclasses.replace(
        plan,
        rollout=dataclasses.replace(plan.rollout, red_black=RedBlackSpec(keep_old_for_seconds=1.0)),
    )
    await mesh.store.SavePlan(
        store_pb.SavePlanRequest(model="credit", plan_yaml=plan_to_yaml(plan))
    )
    await mesh.plane.keeper.register_repository()
    started = await mesh.trainer.Rollout(
        pb.RolloutRequest(model="credit", version="2", strategy=pb.ROLLOUT_STRATEGY_RED_BLACK)
    )
    assert started.rollout.to_version == "2" and started.rollout.from_version == "1"

    # Requests keep succeeding while the traffic moves.
    answered: list[str] = []
    for _ in range(600):
        answered.append((await _predict(mesh.public)).version)
        state = (
            await mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id=started.rollout.id))
        ).rollout.state
        if state != pb.ROLLOUT_STATE_PROGRESSING and state != pb.ROLLOUT_STATE_PENDING:
            break
        await asyncio.sleep(0.05)
    final = (
        await mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id=started.rollout.id))
    ).rollout
    assert final.state == pb.ROLLOUT_STATE_PROMOTED, final
    assert "2" in answered and (await _predict(mesh.public)).version == "2"
    assert [s.decision for s in final.steps][:2] == ["start", "healthy"]
    statuses = {
        v.version: v.status
        for v in (
            await mesh.store.ListModelVersions(store_pb.ListModelVersionsRequest(model="credit"))
        ).model_versions
    }
    assert statuses == {"1": store_pb.MODEL_STATUS_RETIRED, "2": store_pb.MODEL_STATUS_SERVING}

    listed = await mesh.trainer.ListRollouts(pb.ListRolloutsRequest(model="credit"))
    assert [r.id for r in listed.rollouts] == [started.rollout.id]


async def test_rollout_bad_input(mesh: Mesh) -> None:
    cases = [
        (pb.RolloutRequest(model="", version="1"), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (pb.RolloutRequest(model="credit", version="9"), grpc.StatusCode.NOT_FOUND, "version"),
        (
            pb.RolloutRequest(model="credit", version="1"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "already serving",
        ),
        (
            pb.RolloutRequest(model="credit", version="1", strategy=99),
            grpc.StatusCode.INVALID_ARGUMENT,
            "strategy",
        ),
    ]
    for request, code, words in cases:
        with pytest.raises(aio.AioRpcError) as err:
            await mesh.trainer.Rollout(request)
        assert err.value.code() == code, request
        assert words in (err.value.details() or ""), err.value.details()
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.trainer.Rollback(pb.RollbackRequest(model="credit"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(aio.AioRpcError) as err:
        await mesh.trainer.Rollback(pb.RollbackRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    by_id = [
        (
            mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id="")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id="abc")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id="999")),
            grpc.StatusCode.NOT_FOUND,
        ),
        (mesh.trainer.Promote(pb.PromoteRequest(rollout_id="999")), grpc.StatusCode.NOT_FOUND),
        (
            mesh.trainer.ListRollouts(pb.ListRolloutsRequest(limit=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            mesh.trainer.ListRollouts(pb.ListRolloutsRequest(state=42)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for call, code in by_id:
        with pytest.raises(aio.AioRpcError) as err:
            await call
        assert err.value.code() == code, (code, err.value.details())
        assert (
            "rollout" in (err.value.details() or "")
            or "limit" in (err.value.details() or "")
            or "state" in (err.value.details() or "")
        )
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in mesh.trainer.WatchRollout(pb.WatchRolloutRequest(rollout_id="999")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()


async def test_rollback_alert_sends_traffic_back_through_the_trainer_sink(mesh: Mesh) -> None:
    from datetime import UTC, datetime

    from cyclone.plugin_api import Alert
    from plugins.alert_sinks import deliver_trainer

    alert = Alert("91", "credit", "2", "RED", "GREEN", ["errors"], ["rollback"], datetime.now(UTC))
    address = {"address": mesh.trainer_address}
    # Nothing to roll back yet: delivered, not retried forever.
    await asyncio.to_thread(deliver_trainer, alert, address)

    frame = credit_frame(400, seed=5)
    import_pipeline(
        credit_pipeline(frame), "credit", mesh.repository, sample=frame, label_column="defaulted"
    )
    plan = default_plan("credit", "classification")
    plan = dataclasses.replace(
        plan,
        rollout=dataclasses.replace(
            plan.rollout, red_black=RedBlackSpec(keep_old_for_seconds=120.0)
        ),
    )
    await mesh.store.SavePlan(
        store_pb.SavePlanRequest(model="credit", plan_yaml=plan_to_yaml(plan))
    )
    await mesh.plane.keeper.register_repository()
    started = await mesh.trainer.Rollout(
        pb.RolloutRequest(model="credit", version="2", strategy=pb.ROLLOUT_STRATEGY_RED_BLACK)
    )
    for _ in range(200):  # until the cutover, while the old version is kept warm
        current = (
            await mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id=started.rollout.id))
        ).rollout
        if current.current_weight == 100:
            break
        await asyncio.sleep(0.1)
    assert (await _predict(mesh.public)).version == "2"

    await asyncio.to_thread(deliver_trainer, alert, address)
    final = (
        await mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id=started.rollout.id))
    ).rollout
    assert final.state == pb.ROLLOUT_STATE_ROLLED_BACK
    assert "alert 91" in final.reason or "errors" in final.reason, final.reason
    assert (await _predict(mesh.public)).version == "1"


async def test_rollback_after_a_promotion_goes_back_to_the_previous_version(mesh: Mesh) -> None:
    """The plan's `rollback` action once the new version serves alone: a rollout of its own back
    to v1, every request answered meanwhile; the same alert delivered again changes nothing."""
    from datetime import UTC, datetime

    from cyclone.plugin_api import Alert
    from plugins.alert_sinks import deliver_trainer

    frame = credit_frame(400, seed=5)
    import_pipeline(
        credit_pipeline(frame), "credit", mesh.repository, sample=frame, label_column="defaulted"
    )
    plan = default_plan("credit", "classification")
    fast = dataclasses.replace(plan.rollout, red_black=RedBlackSpec(keep_old_for_seconds=1.0))
    plan = dataclasses.replace(plan, rollout=fast)
    await mesh.store.SavePlan(
        store_pb.SavePlanRequest(model="credit", plan_yaml=plan_to_yaml(plan))
    )
    await mesh.plane.keeper.register_repository()
    started = await mesh.trainer.Rollout(
        pb.RolloutRequest(model="credit", version="2", strategy=pb.ROLLOUT_STRATEGY_RED_BLACK)
    )

    async def ended(rollout_id: str) -> pb.Rollout:
        for _ in range(300):
            got = await mesh.trainer.GetRollout(pb.GetRolloutRequest(rollout_id=rollout_id))
            if got.rollout.state not in (
                pb.ROLLOUT_STATE_PENDING,
                pb.ROLLOUT_STATE_PROGRESSING,
            ):
                return got.rollout
            await asyncio.sleep(0.1)
        raise AssertionError(f"rollout {rollout_id} did not end")

    assert (await ended(started.rollout.id)).state == pb.ROLLOUT_STATE_PROMOTED
    assert (await _predict(mesh.public)).version == "2"

    failed: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> int:
        n = 0
        while not stop.is_set():
            try:
                await _predict(mesh.public)
            except aio.AioRpcError as exc:
                failed.append(exc.code().name)
            n += 1
        return n

    caller = asyncio.create_task(traffic())
    alert = Alert("92", "credit", "2", "RED", "GREEN", ["errors"], ["rollback"], datetime.now(UTC))
    await asyncio.to_thread(deliver_trainer, alert, {"address": mesh.trainer_address})
    listed = (await mesh.trainer.ListRollouts(pb.ListRolloutsRequest(model="credit"))).rollouts
    back = listed[0]
    assert back.id != started.rollout.id
    assert (back.from_version, back.to_version) == ("2", "1")
    done = await ended(back.id)
    stop.set()
    calls = await caller
    assert done.state == pb.ROLLOUT_STATE_PROMOTED, done.reason
    assert calls > 0 and failed == []
    assert (await _predict(mesh.public)).version == "1"
    await asyncio.to_thread(deliver_trainer, alert, {"address": mesh.trainer_address})
    again = (await mesh.trainer.ListRollouts(pb.ListRolloutsRequest(model="credit"))).rollouts
    assert len(again) == len(listed)
