"""Rollouts judged before any label, on real parts (store, Envoy, revision subprocesses, real
calibrated models): a candidate fitted on corrupted labels is rolled back with no label sent, a
better one is promoted well inside a minute with no label sent, and labels that arrive after a
promotion and contradict it bring the old version back by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from grpc import aio
from support import eventually, store_and_trainer

from cyclone.client import MODEL_HEADER, build_request, predictions_from_response
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.convert import import_pipeline
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.rollout_plan import parse_rollout
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from cyclone_app.examples import CREDIT_FEATURES, credit_frame, credit_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "credit"
# Estimates decide long before this deadline; reaching it would promote on errors alone.
ROLLOUT = {
    "strategy": "canary",
    "steps": [50, 100],
    "step_duration": "3s",
    "min_requests": 40,
    "deadline": "90s",
    "interval": "1s",
}


def _fit(frame: pd.DataFrame, holdout: pd.DataFrame, repository: Path) -> None:
    """Fit on `frame`, import with a calibration from the clean `holdout` (true labels)."""
    import_pipeline(
        credit_pipeline(frame), MODEL, repository, sample=holdout, label_column="defaulted"
    )


def _corrupted(frame: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Labels flipped at random (`share` of rows): noise a model partly sees through."""
    rng = np.random.default_rng(seed)
    flip = rng.random(len(frame)) < share
    out = frame.copy()
    out.loc[flip, "defaulted"] = 1 - out.loc[flip, "defaulted"]
    return out


def _mislabelled(frame: pd.DataFrame) -> pd.DataFrame:
    """A labelling bug: the applications of two cities (most of them) have their labels
    flipped, so the model learns the wrong rule there (random noise would mostly average out,
    and in this world most answers are the base rate: true accuracy falls from ~0.73 to ~0.43)."""
    flip = frame["city"].isin(["lisbon", "porto"])
    out = frame.copy()
    out.loc[flip, "defaulted"] = 1 - out.loc[flip, "defaulted"]
    return out


@dataclasses.dataclass
class Mesh:
    store: store_grpc.StoreServiceStub
    trainer: pb_grpc.TrainerServiceStub
    public: str
    repository: Path
    plane: Any


@contextlib.asynccontextmanager
async def mesh(database_url: str, tmp_path: Path, champion: pd.DataFrame) -> AsyncIterator[Mesh]:
    repository = tmp_path / "models"
    repository.mkdir()
    _fit(champion, credit_frame(600, seed=99), repository)
    async with (
        store_and_trainer(database_url, repository, tmp_path / "data") as (store, trainer),
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
        )


async def _candidate(m: Mesh, frame: pd.DataFrame, confirm: str) -> None:
    _fit(frame, credit_frame(600, seed=98), m.repository)
    plan = dataclasses.replace(
        default_plan(MODEL, "classification"),
        rollout=parse_rollout({**ROLLOUT, "confirm": confirm}),
    )
    await m.store.SavePlan(store_pb.SavePlanRequest(model=MODEL, plan_yaml=plan_to_yaml(plan)))
    await m.plane.keeper.register_repository()


async def answers_grow(
    answered: dict[str, list[tuple[str, str]]], version: str, by: int = 20
) -> None:
    """Wait until `version` has answered `by` more requests of the running traffic."""
    target = len(answered.get(version, [])) + by

    async def grown() -> bool:
        return len(answered.get(version, [])) >= target

    await eventually(grown, 20, f"{by} more answers from version {version}")


@contextlib.asynccontextmanager
async def traffic(public: str) -> AsyncIterator[dict[str, list[tuple[str, str]]]]:
    """Unlabelled requests through Envoy (rows of the same world); by the version that
    answered, each prediction's id and answer."""
    rows = credit_frame(2000, seed=7)[CREDIT_FEATURES].to_dict("records")
    answered: dict[str, list[tuple[str, str]]] = {}
    stop = asyncio.Event()

    async def send() -> None:
        async with aio.insecure_channel(public) as channel:
            stub = inference_grpc.InferenceServiceStub(channel)
            k = 0
            while not stop.is_set():
                request = build_request(MODEL, [rows[k % len(rows)]], "", {"city"})
                reply = await stub.Predict(request, metadata=((MODEL_HEADER, MODEL),), timeout=10)
                answers = [
                    (p.prediction_id, p.label or "") for p in predictions_from_response(reply)
                ]
                answered.setdefault(reply.version, []).extend(answers)
                k += 1

    task = asyncio.create_task(send())
    try:
        yield answered
    finally:
        stop.set()
        await task  # a failed request fails the test here


async def _rollout(m: Mesh) -> str:
    started = await m.trainer.Rollout(pb.RolloutRequest(model=MODEL, version="2"), timeout=30)
    return str(started.rollout.id)


async def _until(m: Mesh, rollout_id: str, done: Any, timeout: float) -> pb.GetRolloutResponse:
    deadline = time.monotonic() + timeout
    while True:
        reply: pb.GetRolloutResponse = await m.trainer.GetRollout(
            pb.GetRolloutRequest(rollout_id=rollout_id)
        )
        if done(reply.rollout):
            return reply
        assert time.monotonic() < deadline, [e.reason for e in reply.rollout.steps]
        await asyncio.sleep(0.5)


def _ended(r: Any) -> bool:
    return r.state not in (pb.ROLLOUT_STATE_PENDING, pb.ROLLOUT_STATE_PROGRESSING)


async def test_a_candidate_fitted_on_corrupted_labels_is_rolled_back_with_no_label(
    fresh_database_url: str, tmp_path: Path
) -> None:
    world = credit_frame(3000, seed=0)
    async with mesh(fresh_database_url, tmp_path, world) as m:
        await _candidate(m, _mislabelled(credit_frame(3000, seed=1)), "2m")
        async with traffic(m.public):
            rollout_id = await _rollout(m)
            reply = await _until(m, rollout_id, _ended, 90)
    r = reply.rollout
    assert r.state == pb.ROLLOUT_STATE_ROLLED_BACK, [e.reason for e in r.steps]
    assert "estimated accuracy" in r.reason
    labels = await _labels(fresh_database_url)
    assert labels == 0


async def test_a_better_candidate_is_promoted_within_a_minute_with_no_label(
    fresh_database_url: str, tmp_path: Path
) -> None:
    weak = _corrupted(credit_frame(60, seed=0), 0.3, seed=3)
    async with mesh(fresh_database_url, tmp_path, weak) as m:
        await _candidate(m, credit_frame(3000, seed=1), "2m")
        async with traffic(m.public) as answered:
            started = time.monotonic()
            rollout_id = await _rollout(m)

            def promoted(r: Any) -> bool:
                return any(e.decision == "promote" for e in r.steps) or _ended(r)

            reply = await _until(m, rollout_id, promoted, 60)
            took = time.monotonic() - started
            await answers_grow(answered, "2")  # the new version takes the traffic
        r = reply.rollout
        assert r.state in (pb.ROLLOUT_STATE_PROGRESSING, pb.ROLLOUT_STATE_PROMOTED), r.reason
        promote = next(e for e in r.steps if e.decision == "promote")
        assert "estimated" in promote.reason and took < 60
        versions = await m.store.ListModelVersions(store_pb.ListModelVersionsRequest(model=MODEL))
        status = {v.version: v.status for v in versions.model_versions}
        assert status["2"] == store_pb.MODEL_STATUS_SERVING
    assert await _labels(fresh_database_url) == 0


async def test_labels_that_contradict_a_promotion_bring_the_old_version_back(
    fresh_database_url: str, tmp_path: Path
) -> None:
    weak = _corrupted(credit_frame(60, seed=0), 0.3, seed=3)
    async with mesh(fresh_database_url, tmp_path, weak) as m:
        await _candidate(m, credit_frame(3000, seed=1), "60s")
        async with traffic(m.public) as answered:
            rollout_id = await _rollout(m)
            await _until(m, rollout_id, lambda r: any(e.decision == "promote" for e in r.steps), 60)
            # The labels come: every answer of v2 was wrong, every answer of v1 right.
            await _label(m, answered, wrong="2", right="1")
            reply = await _until(m, rollout_id, _ended, 60)
            await answers_grow(answered, "1")  # v1 serves again
    r = reply.rollout
    assert r.state == pb.ROLLOUT_STATE_ROLLED_BACK, [e.reason for e in r.steps]
    assert "labels contradict the estimate" in r.reason


async def _label(
    m: Mesh, answered: dict[str, list[tuple[str, str]]], *, wrong: str, right: str
) -> None:
    """Label v2's predictions with the class it did not answer, v1's with the one it did."""
    labels = [
        store_pb.Label(prediction_id=pid, text=("0" if answer == "1" else "1"))
        for pid, answer in answered.get(wrong, [])
    ] + [store_pb.Label(prediction_id=pid, text=answer) for pid, answer in answered.get(right, [])]
    await m.store.AddLabels(store_pb.AddLabelsRequest(model=MODEL, labels=labels), timeout=30)


async def _labels(database_url: str) -> int:
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM labels")
        row = await cur.fetchone()
    return int(row[0]) if row else 0
