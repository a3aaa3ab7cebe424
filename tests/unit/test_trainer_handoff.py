"""A job's rollout on a trainer that does not lead the traffic plane: handed to the leader by
its Rollout RPC (a fake leader on a real gRPC port), waiting out an election, and started in
place on the leader."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc import aio

from cyclone.errors import NotLeader
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.handoff import LeaderHandoff


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
        self.controller: Any = None
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
    handoff = LeaderHandoff(FakeElection(address), traffic, timeout=5)  # type: ignore[arg-type]
    assert await handoff("credit", "2", 11) == "7"
    assert servicer.asked == [("credit", "2")] and traffic.started == []


async def test_the_leader_starts_the_rollout_itself() -> None:
    traffic = FakeTraffic()
    traffic.controller = object()
    election = FakeElection("", leads=True)
    handoff = LeaderHandoff(election, traffic, timeout=5)  # type: ignore[arg-type]
    assert await handoff("credit", "2", 11) == "3"
    assert traffic.started == ["2"]


async def test_no_leader_within_the_timeout_fails_the_hand_off_naming_why() -> None:
    handoff = LeaderHandoff(FakeElection(""), FakeTraffic(), timeout=0.2)  # type: ignore[arg-type]
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
        handoff = LeaderHandoff(FakeElection(address), FakeTraffic(), timeout=5)  # type: ignore[arg-type]
        with pytest.raises(aio.AioRpcError) as info:
            await handoff("credit", "2", 11)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert len(servicer.asked) == 1
