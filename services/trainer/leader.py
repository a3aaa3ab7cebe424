"""Which trainer leads the traffic plane: a role lease in the store (docs/scaling-out.md).

Every trainer runs jobs; only the holder of the `trainer-traffic` role lease runs the traffic
plane (attaches to Envoy, adopts the revisions, drives the rollouts). The holder renews the
lease three times per lease; a standby tries as often and takes the role when the lease is free
or expired.

A trainer counts its lease from *before* the call that renewed it, so its own deadline is never
later than the store's. When the deadline passes unrenewed (paused, cut off from the store) it
stops driving at once, before any standby can have taken over: `leads` turns False, so Envoy's
xDS writes (`may_write`) are refused, and its rollout writes carry the lease's epoch, which the
store refuses while the lease is expired or held by another. A write first tries one renewal:
after a mere stall (nobody took the role) it goes on under the same epoch. A rollout whose write
was refused stops where the store last recorded it and is resumed from there at the next
renewal. When the store names another holder, or still cannot be reached a whole lease after
the lapse (cut off, not merely slow), this trainer stops its traffic plane (a partitioned
leader stops supervising revisions too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from grpc import aio

from cyclone.errors import NotLeader
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc

log = logging.getLogger(__name__)

TRAFFIC_ROLE = "trainer-traffic"
# As the monitors' model leases: on a busy 2-core machine a trainer went over 5 s unrenewed.
DEFAULT_LEASE_SECONDS = 10.0
# Renewals per lease: a lease survives two lost renewals in a row.
RENEWALS_PER_LEASE = 3

Transition = Callable[[], Awaitable[None]]


def default_holder() -> str:
    """This process's holder id: host and pid for people, a random part so a restarted process
    (same pid in a container) is never taken for the one before."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def _nothing() -> None:
    return None


class LeaderElection:
    """Holds or waits for one role lease; runs `on_elected` when this instance starts leading,
    `on_deposed` when it stops (another took the role, or a clean stop) and `on_resumed` when
    its lease, lapsed but taken by nobody, is renewed. While lapsed, `leads` is False."""

    def __init__(
        self,
        store: store_grpc.StoreServiceStub,
        *,
        on_elected: Transition,
        on_deposed: Transition,
        on_resumed: Transition | None = None,
        holder: str = "",
        address: str = "",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        role: str = TRAFFIC_ROLE,
        clock: Callable[[], float] = time.monotonic,
        step_down_when_cut_off: bool = True,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds: must be positive, got {lease_seconds:g}")
        self.store = store
        self.on_elected = on_elected
        self.on_deposed = on_deposed
        self.on_resumed = on_resumed or _nothing
        self.holder = holder or default_holder()
        self.address = address
        self.lease_seconds = lease_seconds
        self.role = role
        self.clock = clock
        # False when the led work must outlive a store outage (a traffic plane that runs its own
        # Envoy and revisions: no other trainer can take those over, and stopping them would
        # fail every request); its writes are still fenced while the lease is lapsed.
        self.step_down_when_cut_off = step_down_when_cut_off
        self.epoch = 0  # the lease's epoch while this instance holds it, else 0
        self.leader_address = ""  # where the leader serves, as last seen
        self._deadline = 0.0
        self._task: asyncio.Task[None] | None = None
        self._leading: asyncio.Task[None] | None = None
        self._transition = asyncio.Lock()
        self._renewing = asyncio.Lock()
        self._lapsed = False

    @property
    def renew_every(self) -> float:
        return self.lease_seconds / RENEWALS_PER_LEASE

    @property
    def leads(self) -> bool:
        """True while this instance holds an unexpired lease (by its own, earlier, deadline)."""
        return self.epoch > 0 and self.clock() < self._deadline

    async def ensure_leading(self) -> bool:
        """Asked before every write: True while this trainer leads. A lease that lapsed (the
        process stalled past its deadline) is renewed first when nobody took it meanwhile,
        so a stall costs a renewal, not a refused write."""
        if self.leads:
            return True
        if self.epoch <= 0:
            return False
        self._lapsed = True  # the loop resumes what was refused before this renewal
        async with self._renewing:
            if not self.leads and self.epoch > 0:
                await self._renew_same_epoch()
        return self.leads

    async def fence(self) -> store_pb.RoleFence:
        """What rollout writes carry: the store refuses them once this epoch no longer leads.
        Raises NotLeader when this instance does not lead (nothing to write under)."""
        if not await self.ensure_leading():
            raise NotLeader(
                f"role {self.role}: this trainer does not lead (leader:"
                f" {self.describe_leader()}); not writing"
            )
        return store_pb.RoleFence(role=self.role, holder=self.holder, epoch=self.epoch)

    async def _renew_same_epoch(self) -> None:
        """Renew under the current epoch only; any other outcome is the loop's to act on."""
        sent = self.clock()
        epoch = self.epoch
        try:
            reply = await self._acquire()
        except aio.AioRpcError:
            return
        if reply.held and reply.lease.epoch == epoch == self.epoch:
            self._deadline = sent + self.lease_seconds

    async def _acquire(self) -> store_pb.AcquireRoleLeaseResponse:
        reply: store_pb.AcquireRoleLeaseResponse = await self.store.AcquireRoleLease(
            store_pb.AcquireRoleLeaseRequest(
                role=self.role,
                holder=self.holder,
                lease_seconds=self.lease_seconds,
                epoch=self.epoch,
                address=self.address,
            ),
            # A slow answer still renews (the deadline counts from the call); one slower
            # than the lease renews nothing.
            timeout=self.lease_seconds,
        )
        return reply

    def describe_leader(self) -> str:
        if self.leads:
            return f"this trainer ({self.address or self.holder})"
        return self.leader_address or "none elected yet"

    async def start(self) -> None:
        """Try once, then keep renewing or trying. A lone trainer leads at once: its first
        `on_elected` runs here, and what it raises fails the start (as a trainer without
        election would fail)."""
        await self.try_once()
        leading = self._leading
        if leading is not None:
            await asyncio.shield(leading)
            if leading.exception() is not None:
                await self.stop()
                raise leading.exception()  # type: ignore[misc]
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.role}")

    async def stop(self) -> None:
        """Stop trying; a leader stops leading first, then releases the lease so a standby
        takes over at its next try instead of at expiry."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        epoch = self.epoch
        await self._depose("stopping")
        if epoch > 0:
            try:
                await self.store.ReleaseRoleLease(
                    store_pb.ReleaseRoleLeaseRequest(
                        role=self.role, holder=self.holder, epoch=epoch
                    ),
                    timeout=5,
                )
            except aio.AioRpcError as exc:  # it expires by itself
                log.warning("could not release role %s: %s", self.role, exc.details())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                await self.try_once()
            except Exception:  # keep electing whatever one attempt did
                log.exception("role %s: lease attempt failed", self.role)

    async def try_once(self) -> None:
        """One AcquireRoleLease: renew, take, or learn who leads."""
        sent = self.clock()
        try:
            reply = await self._acquire()
        except aio.AioRpcError as exc:
            log.warning("role %s: store unreachable (%s)", self.role, exc.code().name)
            cut_off = self.epoch > 0 and self.clock() > self._deadline + self.lease_seconds
            if cut_off and self.step_down_when_cut_off:
                # Lapsed a whole lease ago and still no word from the store (cut off, not
                # merely slow): another trainer may lead by now. Stop the traffic plane
                # (revision supervision too), not only its writes, which stopped at the lapse.
                await self._depose("lease lapsed and the store is unreachable")
            return
        if not reply.held:
            self.leader_address = reply.lease.address or reply.lease.holder
            if self.epoch > 0:
                await self._depose(f"taken by {self.leader_address}")
            return
        if reply.lease.epoch != self.epoch and self.epoch > 0:
            # A new epoch for this holder: writes under the old one are fenced, so restart
            # the traffic plane under the new one.
            await self._depose("lease renewed under a new epoch")
        lapsed = self.epoch > 0 and (self._lapsed or not self.leads)
        self._deadline = sent + self.lease_seconds
        if self.epoch > 0 and not self.leads:
            # The reply came after the lease it renewed had ended (this process stalled
            # meanwhile): another trainer may hold the role by now; the next try tells.
            self._lapsed = True
            return
        self._lapsed = False
        self.leader_address = self.address
        if self.epoch == 0:
            self.epoch = reply.lease.epoch
            log.info("role %s: leading (epoch %d)", self.role, self.epoch)
            self._leading = asyncio.create_task(self._lead(), name=f"lead-{self.role}")
            # Its failure is logged in `_lead`; retrieve it so asyncio does not warn again.
            self._leading.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif lapsed:
            # Nobody took the role while this trainer was paused or cut off: it leads on
            # under the same epoch; what was refused meanwhile resumes from the store.
            log.warning("role %s: lease renewed after it lapsed (epoch %d)", self.role, self.epoch)
            async with self._transition:
                try:
                    await self.on_resumed()
                except Exception:
                    log.exception("role %s: resuming after a lapse failed", self.role)

    async def _lead(self) -> None:
        async with self._transition:
            try:
                await self.on_elected()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("role %s: could not start leading; giving the role up", self.role)
                self.epoch = 0
                with contextlib.suppress(Exception):
                    await self.on_deposed()
                raise

    async def _depose(self, why: str) -> None:
        leading, self._leading = self._leading, None
        was = self.epoch
        self.epoch = 0
        self._lapsed = False
        if leading is not None and not leading.done():
            leading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await leading
        if was > 0:
            log.warning("role %s: no longer leading (epoch %d): %s", self.role, was, why)
            async with self._transition:
                try:
                    await self.on_deposed()
                except Exception:
                    log.exception("role %s: stopping the leader's work failed", self.role)
