"""Store RPCs for leases: monitors share the models, trainers elect the traffic plane's leader.

Mixed into `StoreServicer`; like it, each method only translates protobuf around one `Store` call.
"""

from __future__ import annotations

from cyclone import wire
from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from services.store.db import ModelLease, RoleLease
from services.store.errors import database_errors
from services.store.rpc_area import Context, RpcArea


def lease_to_pb(lease: ModelLease) -> pb.ModelLease:
    message = pb.ModelLease(
        model=lease.model, expires_at=wire.ts(lease.expires_at), acquired=lease.acquired
    )
    if lease.last_evaluated_at is not None:
        message.last_evaluated_at.CopyFrom(wire.ts(lease.last_evaluated_at))
    return message


def role_lease_to_pb(lease: RoleLease) -> pb.RoleLease:
    return pb.RoleLease(
        role=lease.role,
        holder=lease.holder,
        epoch=lease.epoch,
        expires_at=wire.ts(lease.expires_at),
        address=lease.address,
    )


class LeaseRpcs(RpcArea):
    @rpc_errors(translate=database_errors)
    async def LeaseModels(
        self, request: pb.LeaseModelsRequest, context: Context
    ) -> pb.LeaseModelsResponse:
        outcome = await self.store.lease_models(
            request.holder, list(request.models), request.lease_seconds
        )
        return pb.LeaseModelsResponse(
            leases=[lease_to_pb(lease) for lease in outcome.leases],
            holders=outcome.holders,
            fair_share=outcome.fair_share,
        )

    @rpc_errors(translate=database_errors)
    async def ReleaseModelLeases(
        self, request: pb.ReleaseModelLeasesRequest, context: Context
    ) -> pb.ReleaseModelLeasesResponse:
        released = await self.store.release_model_leases(request.holder)
        return pb.ReleaseModelLeasesResponse(released=released)

    @rpc_errors(translate=database_errors)
    async def AcquireRoleLease(
        self, request: pb.AcquireRoleLeaseRequest, context: Context
    ) -> pb.AcquireRoleLeaseResponse:
        held, lease = await self.store.acquire_role_lease(
            request.role, request.holder, request.lease_seconds, request.epoch, request.address
        )
        return pb.AcquireRoleLeaseResponse(held=held, lease=role_lease_to_pb(lease))

    @rpc_errors(translate=database_errors)
    async def ReleaseRoleLease(
        self, request: pb.ReleaseRoleLeaseRequest, context: Context
    ) -> pb.ReleaseRoleLeaseResponse:
        released = await self.store.release_role_lease(request.role, request.holder, request.epoch)
        return pb.ReleaseRoleLeaseResponse(released=released)
