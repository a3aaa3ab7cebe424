"""The trainers' leader election against a fake store: who leads, renewals, a lease that ends
unrenewed (deposed before the store can hand it to anyone), a clean stop, the fence."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from cyclone.errors import NotLeader
from cyclone.store.v1 import store_service_pb2 as pb
from services.trainer.leader import LeaderElection


class Unreachable(aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(), "down")


class FakeStore:
    """One role's lease as the store keeps it, on a clock the test moves."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.holder = ""
        self.epoch = 0
        self.expires = 0.0
        self.address = ""
        self.down = False
        self.calls = 0
        self.released: list[tuple[str, int]] = []
        self.stall = 0.0  # the caller's clock moves this much while a call is in flight

    async def AcquireRoleLease(self, request: pb.AcquireRoleLeaseRequest, **_: Any) -> Any:
        self.calls += 1
        if self.down:
            raise Unreachable()
        now = self.clock[0]
        if self.stall and isinstance(self.clock, list):
            self.clock[0] += self.stall
        live = self.expires > now
        if self.holder == request.holder and self.epoch == request.epoch:
            self.expires = now + request.lease_seconds  # nobody took it meanwhile
        elif not live or self.holder == request.holder:
            self.holder, self.epoch = request.holder, self.epoch + 1
            self.expires, self.address = now + request.lease_seconds, request.address
        held = self.holder == request.holder
        lease = pb.RoleLease(holder=self.holder, epoch=self.epoch, address=self.address)
        return pb.AcquireRoleLeaseResponse(held=held, lease=lease)

    async def ReleaseRoleLease(self, request: pb.ReleaseRoleLeaseRequest, **_: Any) -> Any:
        self.released.append((request.holder, request.epoch))
        if request.holder == self.holder and request.epoch == self.epoch:
            self.expires = float("-inf")
        return pb.ReleaseRoleLeaseResponse(released=True)


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []

    async def elected(self) -> None:
        self.events.append("elected")

    async def deposed(self) -> None:
        self.events.append("deposed")


def election(
    store: FakeStore,
    clock: list[float],
    name: str,
    lease: float = 3.0,
    step_down_when_cut_off: bool = True,
) -> Any:
    recorder = Recorder()
    chosen = LeaderElection(
        store,  # type: ignore[arg-type]
        on_elected=recorder.elected,
        on_deposed=recorder.deposed,
        holder=name,
        address=f"{name}:1",
        lease_seconds=lease,
        clock=lambda: clock[0],
        step_down_when_cut_off=step_down_when_cut_off,
    )
    return chosen, recorder


async def test_the_first_trainer_leads_at_once_and_the_second_stands_by() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    a, a_events = election(store, clock, "a")
    b, b_events = election(store, clock, "b")
    await a.start()
    assert a.leads and a_events.events == ["elected"]  # before start returned: no wait
    await b.start()
    assert not b.leads and b.leader_address == "a:1" and b_events.events == []
    assert await a.fence() == pb.RoleFence(role=a.role, holder="a", epoch=1)
    with pytest.raises(NotLeader, match="a:1"):
        await b.fence()
    await a.stop()
    await b.stop()


async def test_a_leader_stops_leading_at_its_own_deadline_never_after_the_stores() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    a, events = election(store, clock, "a", lease=3.0)
    await a.start()
    store.down = True
    clock[0] += 2.9
    await a.try_once()
    assert a.leads  # positive control: still inside its lease
    clock[0] += 0.2  # past the deadline counted from before its last successful renewal
    assert not a.leads
    # The deadline it counted was never later than the store's expiry.
    assert store.expires >= 100.0 + 3.0 > clock[0] - 0.2
    assert events.events == ["elected"]  # lapsed: writes refused, nothing torn down yet
    await a.try_once()  # the store unreachable, but maybe only slow: keep waiting
    assert a.epoch == 1 and events.events == ["elected"]
    clock[0] += 3.0  # a whole lease past the lapse without a word: cut off
    await a.try_once()
    assert a.epoch == 0 and events.events == ["elected", "deposed"]
    await a.stop()


async def test_a_leader_whose_work_nobody_can_take_over_keeps_it_through_a_store_outage() -> None:
    """A trainer running its own Envoy and revisions (not apart): stopping them because the
    store is away would fail every request, and no standby could take them over. Its writes
    are still refused while the lease is lapsed; it leads on once the store answers."""
    clock = [100.0]
    store = FakeStore(clock)
    a, events = election(store, clock, "a", lease=3.0, step_down_when_cut_off=False)
    await a.start()
    store.down = True
    clock[0] += 10.0  # lapsed more than a whole lease ago: a leader apart would step down
    await a.try_once()
    assert not a.leads and a.epoch == 1 and events.events == ["elected"]
    with pytest.raises(NotLeader):
        await a.fence()
    store.down = False
    await a.try_once()
    assert a.leads and a.epoch == 1 and events.events == ["elected"]
    await a.stop()


async def test_a_write_after_a_stall_renews_first_and_the_loop_resumes_what_was_refused() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    resumed: list[int] = []

    async def on_resumed() -> None:
        resumed.append(a.epoch)

    recorder = Recorder()
    a = LeaderElection(
        store,  # type: ignore[arg-type]
        on_elected=recorder.elected,
        on_deposed=recorder.deposed,
        on_resumed=on_resumed,
        holder="a",
        lease_seconds=3.0,
        clock=lambda: clock[0],
    )
    await a.start()
    clock[0] += 10  # stalled past its lease; nobody took the role
    assert not a.leads
    assert await a.ensure_leading() and a.epoch == 1  # renewed, same epoch
    assert resumed == []
    await a.try_once()  # the loop's next round resumes rollouts refused during the stall
    assert resumed == [1] and recorder.events == ["elected"]
    store.down = True
    clock[0] += 10
    assert not await a.ensure_leading()  # cannot renew: the write is refused
    await a.stop()


async def test_a_renewal_answered_after_its_lease_ended_does_not_resume() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    resumed: list[int] = []

    async def on_resumed() -> None:
        resumed.append(1)

    recorder = Recorder()
    a = LeaderElection(
        store,  # type: ignore[arg-type]
        on_elected=recorder.elected,
        on_deposed=recorder.deposed,
        on_resumed=on_resumed,
        holder="a",
        lease_seconds=3.0,
        clock=lambda: clock[0],
    )
    await a.start()
    clock[0] += 4  # lapsed
    store.stall = 5  # and the renewal's reply is handled after the lease it gave ended
    await a.try_once()
    assert not a.leads and resumed == []
    store.stall = 0
    await a.try_once()  # a timely renewal: it leads on and resumes
    assert a.leads and resumed == [1] and recorder.events == ["elected"]
    await a.stop()


async def test_a_standby_takes_over_after_expiry_and_the_old_leader_steps_down() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    a, a_events = election(store, clock, "a", lease=3.0)
    b, b_events = election(store, clock, "b", lease=3.0)
    await a.start()
    await b.start()
    clock[0] += 3.5  # a paused past its lease
    await b.try_once()
    await asyncio.sleep(0)  # b's leading task runs
    assert b.leads and b.epoch == 2 and b_events.events == ["elected"]
    await a.try_once()  # a comes back: the store names b
    assert not a.leads and a.leader_address == "b:1"
    assert a_events.events == ["elected", "deposed"]
    await a.stop()
    await b.stop()


async def test_a_clean_stop_steps_down_then_releases() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    a, events = election(store, clock, "a")
    b, _ = election(store, clock, "b")
    await a.start()
    await a.stop()
    assert events.events == ["elected", "deposed"] and store.released == [("a", 1)]
    await b.start()
    assert b.leads and b.epoch == 2  # at once, not after the lease time
    await b.stop()


async def test_a_failed_first_leadership_fails_the_start() -> None:
    clock = [100.0]
    store = FakeStore(clock)

    async def broken() -> None:
        raise ValueError("orchestrator: unknown 'nope'")

    async def nothing() -> None:
        return None

    a = LeaderElection(
        store,  # type: ignore[arg-type]
        on_elected=broken,
        on_deposed=nothing,
        holder="a",
        clock=lambda: clock[0],
    )
    with pytest.raises(ValueError, match="orchestrator"):
        await a.start()
    assert not a.leads


async def test_the_background_loop_renews_and_steps_down_when_cut_off() -> None:
    store = FakeStore([0.0])
    loop = asyncio.get_running_loop()
    store.clock = _LoopClock(loop)  # type: ignore[assignment]
    recorder = Recorder()
    a = LeaderElection(
        store,  # type: ignore[arg-type]
        on_elected=recorder.elected,
        on_deposed=recorder.deposed,
        holder="a",
        lease_seconds=0.3,
        clock=loop.time,
    )
    await a.start()
    calls = store.calls
    await asyncio.sleep(0.5)
    assert a.leads and store.calls >= calls + 2  # renewed past its first lease
    store.down = True
    deadline = loop.time() + 2
    while a.epoch and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert recorder.events == ["elected", "deposed"]
    store.down = False  # back: the role is free again (its lease expired), taken anew
    deadline = loop.time() + 2
    while not a.leads and loop.time() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    assert a.epoch == 2 and recorder.events == ["elected", "deposed", "elected"]
    await a.stop()


async def test_a_lapsed_leader_learning_of_a_takeover_steps_down() -> None:
    clock = [100.0]
    store = FakeStore(clock)
    a, events = election(store, clock, "a", lease=3.0)
    await a.start()
    clock[0] += 3.5  # stalled past its lease
    assert not a.leads and events.events == ["elected"]
    store.holder, store.epoch, store.expires, store.address = "b", 2, clock[0] + 3, "b:1"
    await a.try_once()
    assert a.epoch == 0 and a.leader_address == "b:1"
    assert events.events == ["elected", "deposed"]
    await a.stop()


class _LoopClock:
    """The fake store's clock as a list-like view of the event loop's time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __getitem__(self, index: int) -> float:
        return self.loop.time()


@pytest.mark.parametrize("seconds", [0.0, 0.5, 3601.0, float("nan")])
def test_a_bad_leader_lease_is_refused_naming_the_setting(seconds: float) -> None:
    from cyclone.settings import SettingsError
    from services.trainer.main import TrainerSettings

    with pytest.raises(SettingsError, match=r"^leader_lease_seconds"):
        TrainerSettings(leader_lease_seconds=seconds)
