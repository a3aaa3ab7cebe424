"""What the CLI says when a call fails: one sentence for people, the raw error for the log.

Nothing answering is the common case for a new user, so it names what was tried (address and
where it came from) and the way out; any other status is its name and the first line of its
details.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from cyclone.local_mesh import ADDRESS_ENV, ADDRESS_FLAG, Target, default_data_dir

log = logging.getLogger("cyclone_app.cli")
NOT_REACHED = frozenset({grpc.StatusCode.UNAVAILABLE})


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


def message(exc: BaseException, target: Target | None = None) -> str:
    """The sentence a person reads for a failed call to `target`."""
    code = _code(exc)
    if code in NOT_REACHED and target is not None:
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
