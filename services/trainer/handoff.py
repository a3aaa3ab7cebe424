"""A retraining job's rollout when several trainers share one traffic plane.

Every trainer runs jobs, but only the leader (services.trainer.leader) drives Envoy. A job that
reaches its rollout on the leader starts it there; on a standby it asks the leader through the
trainer's own `Rollout` RPC, at the address the leader wrote in its role lease. While no trainer
leads (an election in progress) it asks again every renewal interval, up to `timeout`.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc import aio

from cyclone.channels import aio_channel
from cyclone.errors import NotLeader
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.leader import LeaderElection
from services.trainer.traffic import TrafficPlane

# How long a job waits for a leader to take its rollout: several lease times.
HANDOFF_TIMEOUT_SECONDS = 120.0
CALL_TIMEOUT_SECONDS = 30.0


class LeaderHandoff:
    """`RolloutStarter` of a trainer that elects the traffic plane's leader."""

    def __init__(
        self,
        election: LeaderElection,
        traffic: TrafficPlane,
        timeout: float = HANDOFF_TIMEOUT_SECONDS,
    ) -> None:
        self.election = election
        self.traffic = traffic
        self.timeout = timeout

    async def __call__(self, model: str, version: str, job_id: int) -> str:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if self.election.leads and self.traffic.controller is not None:
                    return await self.traffic.start_rollout(model, version, job_id)
                leader = self.election.leader_address
                if leader and leader != self.election.address:
                    return await self._ask(leader, model, version)
            except NotLeader:
                pass  # deposed meanwhile: the next leader takes it
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() > deadline:
                raise NotLeader(
                    f"no trainer took the rollout of {model} {version} within"
                    f" {self.timeout:g}s (leader: {self.election.describe_leader()})"
                )
            await asyncio.sleep(self.election.renew_every)

    async def _ask(self, leader: str, model: str, version: str) -> str:
        async with aio_channel(leader) as channel:
            reply = await pb_grpc.TrainerServiceStub(channel).Rollout(
                pb.RolloutRequest(model=model, version=version), timeout=CALL_TIMEOUT_SECONDS
            )
        return str(reply.rollout.id)
