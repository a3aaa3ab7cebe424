"""A job's rollout on a trainer that does not lead the traffic plane: handed to the leader by
its Rollout RPC (a fake leader on a real gRPC port), waiting out an election, and started in
place on the leader; a leader that started the rollout but died or stalled before it answered
is not asked twice (the store has the rollout)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from cyclone.errors import NotLeader
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.handoff import LeaderHandoff


class RolloutRecords:
    """The store's rollouts as `ListRollouts` returns them (newest first)."""

    def __init__(self) -> None:
        self.rollouts: list[store_pb.RolloutRecord] = []
        self.lookups = 0

    async def ListRollouts(self, request: store_pb.ListRolloutsRequest, **_: Any) -> Any:
        self.lookups += 1
        mine = [r for r in self.rollouts if r.model == request.model]
        return store_pb.ListRolloutsResponse(rollouts=mine[::-1][: request.limit])


class FakeLeader(pb_grpc.TrainerServiceServicer):
    def __init__(self, unavailable_first: int = 0) -> None:
        self.unavailable = unavailable_first
        self.asked: list[tuple[str, str]] = []

    async def Rollout(self, request: pb.RolloutRequest, context: Any) -> pb.RolloutResponse:
        if self.unavailable > 0:
            self.unavailable -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Rollout: this trainer is a standby")
        self.asked.append((request.model, request.version))
        return pb.RolloutResponse(rollout=pb.Rollout(id="7", model=request.model))


class FakeElection:
    def __init__(self, leader_address: str, leads: bool = False) -> None:
        self.leads = leads
        self.leader_address = leader_address
        self.address = "127.0.0.1:1"
        self.renew_every = 0.05

    def describe_leader(self) -> str:
        return self.leader_address or "none elected yet"


class FakeTraffic:
    def __init__(self) -> None:
        self.ready = False
        self.started: list[str] = []

    async def start_rollout(self, model: str, version: str, job_id: int) -> str:
        self.started.append(version)
        return "3"


async def _leader(servicer: FakeLeader) -> AsyncIterator[str]:
    server = aio.server()
    pb_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def leader() -> AsyncIterator[tuple[str, FakeLeader]]:
    servicer = FakeLeader(unavailable_first=2)
    async for address in _leader(servicer):
        yield address, servicer


async def test_a_standby_hands_the_rollout_to_the_leader_retrying_while_unavailable(
    leader: tuple[str, FakeLeader],
) -> None:
    address, servicer = leader
    traffic = FakeTraffic()
    handoff = LeaderHandoff(FakeElection(address), traffic, timeout=5, store=RolloutRecords())  # type: ignore[arg-type]
    assert await handoff("credit", "2", 11) == "7"
    assert servicer.asked == [("credit", "2")] and traffic.started == []


async def test_the_leader_starts_the_rollout_itself() -> None:
    traffic = FakeTraffic()
    traffic.ready = True
    election = FakeElection("", leads=True)
    handoff = LeaderHandoff(election, traffic, timeout=5, store=RolloutRecords())  # type: ignore[arg-type]
    assert await handoff("credit", "2", 11) == "3"
    assert traffic.started == ["2"]


async def test_no_leader_within_the_timeout_fails_the_hand_off_naming_why() -> None:
    handoff = LeaderHandoff(FakeElection(""), FakeTraffic(), timeout=0.2, store=RolloutRecords())  # type: ignore[arg-type]
    with pytest.raises(NotLeader, match="none elected yet"):
        await handoff("credit", "2", 11)


async def test_a_refusal_other_than_unavailable_is_not_retried() -> None:
    class Refusing(FakeLeader):
        async def Rollout(self, request: pb.RolloutRequest, context: Any) -> pb.RolloutResponse:
            self.asked.append((request.model, request.version))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model has an active rollout")
            raise AssertionError  # abort raises

    servicer = Refusing()
    async for address in _leader(servicer):
        handoff = LeaderHandoff(
            FakeElection(address), FakeTraffic(), timeout=5, store=RolloutRecords()
        )  # type: ignore[arg-type]
        with pytest.raises(aio.AioRpcError) as info:
            await handoff("credit", "2", 11)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert len(servicer.asked) == 1


async def test_a_leader_that_started_the_rollout_and_died_before_answering_is_not_asked_again() -> (
    None
):
    records = RolloutRecords()

    class DiesAfterStarting(FakeLeader):
        async def Rollout(self, request: pb.RolloutRequest, context: Any) -> pb.RolloutResponse:
            self.asked.append((request.model, request.version))
            records.rollouts.append(
                store_pb.RolloutRecord(id=9, model=request.model, to_version=request.version)
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            raise AssertionError  # abort raises

    servicer = DiesAfterStarting()
    async for address in _leader(servicer):
        handoff = LeaderHandoff(FakeElection(address), FakeTraffic(), timeout=5, store=records)  # type: ignore[arg-type]
        assert await handoff("credit", "2", 11) == "9"
    assert servicer.asked == [("credit", "2")] and records.lookups == 1


async def test_a_leader_that_does_not_answer_in_time_is_asked_again() -> None:
    class StallsOnce(FakeLeader):
        async def Rollout(self, request: pb.RolloutRequest, context: Any) -> pb.RolloutResponse:
            self.asked.append((request.model, request.version))
            if len(self.asked) == 1:
                await asyncio.sleep(1.0)  # past the caller's deadline; it started nothing
            return pb.RolloutResponse(rollout=pb.Rollout(id="7", model=request.model))

    servicer, records = StallsOnce(), RolloutRecords()
    async for address in _leader(servicer):
        handoff = LeaderHandoff(
            FakeElection(address),  # type: ignore[arg-type]
            FakeTraffic(),  # type: ignore[arg-type]
            timeout=5,
            store=records,  # type: ignore[arg-type]
            call_timeout=0.2,
        )
        assert await handoff("credit", "2", 11) == "7"
    assert len(servicer.asked) == 2 and records.lookups == 1


async def test_a_new_leader_starts_the_rollout_only_once_its_traffic_plane_is_up() -> None:
    traffic = FakeTraffic()  # elected, but still resuming the store's rollouts
    handoff = LeaderHandoff(
        FakeElection("", leads=True),  # type: ignore[arg-type]
        traffic,  # type: ignore[arg-type]
        timeout=5,
        store=RolloutRecords(),  # type: ignore[arg-type]
    )
    asked = asyncio.create_task(handoff("credit", "2", 11))
    await asyncio.sleep(0.2)
    assert traffic.started == [] and not asked.done()
    traffic.ready = True
    assert await asyncio.wait_for(asked, 5) == "3"
    assert traffic.started == ["2"]


async def test_a_traffic_plane_that_is_starting_refuses_rollouts_as_retryable() -> None:
    from services.trainer.traffic import TrafficPlane

    plane = TrafficPlane(settings=None, store=None)  # type: ignore[arg-type]
    plane.controller = object()  # type: ignore[assignment]
    with pytest.raises(NotLeader, match="starting"):
        await plane.rollout("credit", "2")
