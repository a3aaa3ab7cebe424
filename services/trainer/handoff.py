"""A retraining job's rollout when several trainers share one traffic plane.

Every trainer runs jobs, but only the leader (services.trainer.leader) drives Envoy. A job that
reaches its rollout on the leader starts it there; on a standby it asks the leader through the
trainer's own `Rollout` RPC, at the address the leader wrote in its role lease. While no trainer
leads (an election in progress), or the leader stalls or dies before it answers, it asks again
every renewal interval, up to `timeout`. A leader may have started the rollout and died (or
stalled) before its answer: before asking again, the hand-off looks in the store, the rollout's
record, for a rollout to this version, so a version is never handed over twice.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc import aio

from cyclone.channels import aio_channel
from cyclone.errors import NotLeader
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.trainer.v1 import trainer_service_pb2 as pb
from cyclone.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from services.trainer.leader import LeaderElection
from services.trainer.traffic import TrafficPlane

# How long a job waits for a leader to take its rollout: several lease times.
HANDOFF_TIMEOUT_SECONDS = 120.0
CALL_TIMEOUT_SECONDS = 30.0
# No leader to ask (it died), or one that did not answer in time (stalled, perhaps deposed).
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Rollouts looked through for one to the version being handed over (newest first).
RECENT_ROLLOUTS = 20


class LeaderHandoff:
    """`RolloutStarter` of a trainer that elects the traffic plane's leader."""

    def __init__(
        self,
        election: LeaderElection,
        traffic: TrafficPlane,
        timeout: float = HANDOFF_TIMEOUT_SECONDS,
        *,
        store: store_grpc.StoreServiceStub,
        call_timeout: float = CALL_TIMEOUT_SECONDS,
    ) -> None:
        self.election = election
        self.traffic = traffic
        self.timeout = timeout
        self.store = store
        self.call_timeout = call_timeout

    async def __call__(self, model: str, version: str, job_id: int) -> str:
        deadline = time.monotonic() + self.timeout
        asked = False
        while True:
            try:
                if asked:
                    started = await self._started(model, version)
                    if started:
                        return started
                if self.election.leads and self.traffic.ready:
                    asked = True
                    return await self.traffic.start_rollout(model, version, job_id)
                leader = self.election.leader_address
                if leader and leader != self.election.address:
                    asked = True
                    return await self._ask(leader, model, version)
            except NotLeader:
                pass  # deposed meanwhile: the next leader takes it
            except aio.AioRpcError as exc:
                if exc.code() not in RETRIED:
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
                pb.RolloutRequest(model=model, version=version), timeout=self.call_timeout
            )
        return str(reply.rollout.id)

    async def _started(self, model: str, version: str) -> str:
        """The id of a rollout to `version` an earlier try started (a retrained version is
        new: any rollout to it is this job's); "" when there is none."""
        reply = await self.store.ListRollouts(
            store_pb.ListRolloutsRequest(model=model, limit=RECENT_ROLLOUTS),
            timeout=self.call_timeout,
        )
        for rollout in reply.rollouts:
            if rollout.to_version == version:
                return str(rollout.id)
        return ""
