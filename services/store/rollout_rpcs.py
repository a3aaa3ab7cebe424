"""Store RPCs the trainer's rollout controller uses: create, update, get and list rollouts.

Mixed into `StoreServicer`; like it, each method only translates protobuf around one `Store` call.
"""

from __future__ import annotations

from cyclone.rpc_errors import rpc_errors
from cyclone.store.v1 import store_service_pb2 as pb
from services.store import convert
from services.store.errors import database_errors
from services.store.rpc_area import Context, RpcArea


class RolloutRpcs(RpcArea):
    @rpc_errors(translate=database_errors)
    async def CreateRollout(
        self, request: pb.CreateRolloutRequest, context: Context
    ) -> pb.CreateRolloutResponse:
        created = await self.store.create_rollout(
            convert.rollout_from_pb(request.rollout),
            convert.first_event_from_pb(request),
            convert.fence_from_pb(request),
        )
        return pb.CreateRolloutResponse(rollout=convert.rollout_to_pb(created))

    @rpc_errors(translate=database_errors)
    async def UpdateRollout(
        self, request: pb.UpdateRolloutRequest, context: Context
    ) -> pb.UpdateRolloutResponse:
        updated = await self.store.update_rollout(convert.rollout_update_from_pb(request))
        return pb.UpdateRolloutResponse(rollout=convert.rollout_to_pb(updated))

    @rpc_errors(translate=database_errors)
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: Context
    ) -> pb.GetRolloutResponse:
        found = await self.store.get_rollout(request.rollout_id)
        return pb.GetRolloutResponse(rollout=convert.rollout_to_pb(found))

    @rpc_errors(translate=database_errors)
    async def ListRollouts(
        self, request: pb.ListRolloutsRequest, context: Context
    ) -> pb.ListRolloutsResponse:
        rows = await self.store.list_rollouts(request.model, request.active_only, request.limit)
        return pb.ListRolloutsResponse(rollouts=[convert.rollout_to_pb(r) for r in rows])
