"""What the CLI says when a call fails: one sentence for people, the raw error for the log.

Nothing answering is the common case for a new user, so it names what was tried (address and
where it came from) and the way out; any other status is its name and the first line of its
details.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cyclone.local_mesh import ADDRESS_ENV, ADDRESS_FLAG, Target, default_data_dir

log = logging.getLogger("cyclone_app.cli")
T = TypeVar("T")
NOT_REACHED = frozenset({grpc.StatusCode.UNAVAILABLE})
# What gRPC and Envoy say when no server took the call. Any other UNAVAILABLE came from a server
# that answered and says why (a standby trainer naming the leader, a store whose database is
# down): that is shown, not "nothing answered".
_TRANSPORT_DETAILS = (
    "failed to connect",
    "connection refused",
    "no healthy upstream",
    "upstream connect error",
    "socket closed",
    "connection reset",
    "dns resolution failed",
    "broken pipe",
)
# Envoy is up but none of the component's instances is healthy: a trainer failing over (a
# standby takes the leader's role within its lease, 10 s by default, then passes Envoy's
# next health check) or a restart under way.
NOT_FORWARDED = ("no healthy upstream", "connection failure")  # Envoy's reset reasons: local/remote
FAILOVER_WAIT_SECONDS = 20.0


def _code(exc: BaseException) -> grpc.StatusCode | None:
    code = getattr(exc, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else None


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    text = (details() if callable(details) else "") or ""
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def unreachable(target: Target) -> str:
    flag, env = ADDRESS_FLAG[target.component], ADDRESS_ENV[target.component]
    return (
        f"nothing answered at {target.describe()}; start it with `cyclone up` "
        f"(or point {flag} / ${env} at a running one)"
    )


def not_reached(exc: BaseException) -> bool:
    """The call reached no server (rather than a server answering UNAVAILABLE with why)."""
    if _code(exc) not in NOT_REACHED:
        return False
    details = _details(exc).lower()
    return not details or any(marker in details for marker in _TRANSPORT_DETAILS)


def waiting_out_failover(call: Callable[[], T], *, wait: float = FAILOVER_WAIT_SECONDS) -> T:
    """`call()`, tried again while Envoy has no instance to send it to (none healthy, or the
    one it chose refused the connection: nothing was forwarded, so a write is safe to repeat),
    for up to `wait` seconds."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            details = _details(exc)
            forwarded = not any(marker in details for marker in NOT_FORWARDED)
            if forwarded or time.monotonic() >= deadline:
                raise
            if not said:
                print(
                    f"no instance answers yet (failing over?); waiting up to {wait:.0f}s",
                    file=sys.stderr,
                )
                said = True
            time.sleep(0.5)


def message(exc: BaseException, target: Target | None = None) -> str:
    """The sentence a person reads for a failed call to `target`."""
    code = _code(exc)
    if not_reached(exc) and target is not None:
        return unreachable(target)
    details = _details(exc)
    if code is None:
        return details or type(exc).__name__
    return f"{code.name}: {details}" if details else code.name


def log_raw(exc: BaseException, target: Target | None = None, data_dir: Path | None = None) -> None:
    """Append the raw error to <data_dir>/logs/cli.log when that directory exists."""
    logs = (data_dir or (target.data_dir if target else None) or default_data_dir()) / "logs"
    where = target.address if target else "-"
    log.debug("call to %s failed: %r", where, exc)
    if not logs.is_dir():
        return
    try:
        with (logs / "cli.log").open("a") as out:
            out.write(f"{datetime.now(UTC).isoformat()} {where}: {exc!r}\n")
    except OSError:
        pass


def describe_failure(exc: Any, target: Target | None = None) -> str:
    log_raw(exc, target)
    return message(exc, target)
