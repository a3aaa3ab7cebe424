"""Role leases (one trainer leads the traffic plane) against a real store on a fresh database:
take, renew, expiry, release, fencing of rollout writes, bad input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio
from support import expect_error

from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.launch import start_store
from services.store.main import StoreSettings
from tests.integration.test_store_rollouts import create

pytestmark = pytest.mark.integration

ROLE = "trainer-traffic"


@pytest.fixture
async def stub(fresh_database_url: str) -> AsyncIterator[pb_grpc.StoreServiceStub]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    server = (await start_store(settings)).server
    try:
        async with aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            s = pb_grpc.StoreServiceStub(channel)
            for v in ("1", "2", "3"):
                await s.RegisterModelVersion(
                    pb.RegisterModelVersionRequest(
                        model_version=pb.ModelVersion(model="credit", version=v, task="regression")
                    )
                )
            yield s
    finally:
        await server.stop(0)


async def acquire(
    stub: pb_grpc.StoreServiceStub, holder: str, epoch: int = 0, seconds: float = 30.0
) -> pb.AcquireRoleLeaseResponse:
    return await stub.AcquireRoleLease(
        pb.AcquireRoleLeaseRequest(
            role=ROLE, holder=holder, lease_seconds=seconds, epoch=epoch, address=f"{holder}:1"
        ),
        timeout=10,
    )


async def test_one_holder_at_a_time_renewing_with_its_epoch(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    a = await acquire(stub, "a")
    assert a.held and a.lease.holder == "a" and a.lease.epoch == 1
    b = await acquire(stub, "b")
    assert not b.held and b.lease.holder == "a" and b.lease.address == "a:1"
    renewed = await acquire(stub, "a", epoch=1)
    assert renewed.held and renewed.lease.epoch == 1
    assert renewed.lease.expires_at.ToDatetime() >= a.lease.expires_at.ToDatetime()
    # The same holder asking without its epoch (a restart, a lost reply) takes a new one, so
    # writes under the old epoch are fenced.
    again = await acquire(stub, "a", epoch=0)
    assert again.held and again.lease.epoch == 2


async def test_an_expired_lease_goes_to_the_next_caller_with_a_new_epoch(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    assert (await acquire(stub, "a", seconds=0.5)).held
    assert not (await acquire(stub, "b")).held  # positive control: still a's
    await asyncio.sleep(0.7)
    b = await acquire(stub, "b")
    assert b.held and b.lease.epoch == 2
    # The old holder's renewal with its old epoch does not take the role back.
    a = await acquire(stub, "a", epoch=1)
    assert not a.held and a.lease.holder == "b"


async def test_a_lapsed_lease_nobody_took_is_renewed_under_the_same_epoch(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    assert (await acquire(stub, "a", seconds=0.5)).held
    await asyncio.sleep(0.7)
    fence = pb.RoleFence(role=ROLE, holder="a", epoch=1)
    request = create()
    request.fence.CopyFrom(fence)
    # Lapsed: its writes are refused until it renews.
    await expect_error(stub.CreateRollout(request), grpc.StatusCode.FAILED_PRECONDITION, "fence:")
    renewed = await acquire(stub, "a", epoch=1)
    assert renewed.held and renewed.lease.epoch == 1
    assert (await stub.CreateRollout(request)).rollout.id > 0


async def test_release_hands_the_role_over_at_once_and_keeps_epochs_growing(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    await acquire(stub, "a")
    wrong = await stub.ReleaseRoleLease(pb.ReleaseRoleLeaseRequest(role=ROLE, holder="b", epoch=1))
    assert not wrong.released
    released = await stub.ReleaseRoleLease(
        pb.ReleaseRoleLeaseRequest(role=ROLE, holder="a", epoch=1)
    )
    assert released.released
    b = await acquire(stub, "b")
    assert b.held and b.lease.epoch == 2


async def test_rollout_writes_under_a_lost_lease_are_refused(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    await acquire(stub, "a")
    fence_a = pb.RoleFence(role=ROLE, holder="a", epoch=1)
    request = create()
    request.fence.CopyFrom(fence_a)
    rollout = (await stub.CreateRollout(request)).rollout
    step = pb.UpdateRolloutRequest(
        rollout_id=rollout.id, state="progressing", current_weight=10, fence=fence_a
    )
    assert (await stub.UpdateRollout(step)).rollout.current_weight == 10
    await stub.ReleaseRoleLease(pb.ReleaseRoleLeaseRequest(role=ROLE, holder="a", epoch=1))
    assert (await acquire(stub, "b")).held
    stale = pb.UpdateRolloutRequest(
        rollout_id=rollout.id, state="progressing", current_weight=50, fence=fence_a
    )
    await expect_error(
        stub.UpdateRollout(stale), grpc.StatusCode.FAILED_PRECONDITION, "fence:", "'a'"
    )
    stale_create = create("3")
    stale_create.fence.CopyFrom(fence_a)
    await expect_error(stub.CreateRollout(stale_create), grpc.StatusCode.FAILED_PRECONDITION)
    current = (await stub.GetRollout(pb.GetRolloutRequest(rollout_id=rollout.id))).rollout
    assert current.current_weight == 10  # nothing of the stale write was stored
    fresh = pb.UpdateRolloutRequest(
        rollout_id=rollout.id,
        state="progressing",
        current_weight=50,
        fence=pb.RoleFence(role=ROLE, holder="b", epoch=2),
    )
    assert (await stub.UpdateRollout(fresh)).rollout.current_weight == 50


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (pb.AcquireRoleLeaseRequest(holder="a", lease_seconds=5), "role"),
        (pb.AcquireRoleLeaseRequest(role=ROLE, lease_seconds=5), "holder"),
        (pb.AcquireRoleLeaseRequest(role=ROLE, holder="a", lease_seconds=0.1), "lease_seconds"),
        (pb.AcquireRoleLeaseRequest(role=ROLE, holder="a", lease_seconds=1e9), "lease_seconds"),
        (
            pb.AcquireRoleLeaseRequest(role=ROLE, holder="a", lease_seconds=float("nan")),
            "lease_seconds",
        ),
        (pb.AcquireRoleLeaseRequest(role=ROLE, holder="a", lease_seconds=5, epoch=-1), "epoch"),
        (pb.AcquireRoleLeaseRequest(role="a b", holder="a", lease_seconds=5), "role"),
    ],
)
async def test_bad_acquire_requests_name_the_field(
    stub: pb_grpc.StoreServiceStub, request_: pb.AcquireRoleLeaseRequest, fragment: str
) -> None:
    await expect_error(stub.AcquireRoleLease(request_), grpc.StatusCode.INVALID_ARGUMENT, fragment)


async def test_bad_release_and_fence_name_the_field(stub: pb_grpc.StoreServiceStub) -> None:
    await expect_error(
        stub.ReleaseRoleLease(pb.ReleaseRoleLeaseRequest(role=ROLE, holder="a")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "epoch",
    )
    request = create()
    request.fence.CopyFrom(pb.RoleFence(role=ROLE, holder="a", epoch=0))
    await expect_error(stub.CreateRollout(request), grpc.StatusCode.INVALID_ARGUMENT, "fence.epoch")
    request.fence.CopyFrom(pb.RoleFence(role=ROLE, holder="", epoch=1))
    await expect_error(
        stub.CreateRollout(request), grpc.StatusCode.INVALID_ARGUMENT, "fence.holder"
    )
