"""Time-ordered prediction ids (UUIDv7, RFC 9562).

Ids are made at the edge, so the store can derive `created_at` from the id and
attach late labels without a lookup table. Within one process ids are strictly
increasing: a 12-bit counter fills `rand_a` when several ids share a millisecond.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from datetime import UTC, datetime

_lock = threading.Lock()
# Seeded from the OS once per process, so processes do not share a sequence.
_random = random.Random()
# A forked child must not repeat its parent's sequence.
os.register_at_fork(after_in_child=_random.seed)
_last_ms = 0
_counter = 0


def _next_ms_and_counter(n: int) -> tuple[int, int]:
    """Reserve `n` consecutive counter values in the current millisecond."""
    global _last_ms, _counter
    with _lock:
        now = time.time_ns() // 1_000_000
        if now > _last_ms:
            _last_ms, _counter = now, 0
        elif _counter + n > 0xFFF:
            # Counter space used up: borrow the next millisecond (monotonic, never repeats).
            _last_ms, _counter = _last_ms + 1, 0
        start = _counter
        _counter += n
        return _last_ms, start


def _format(high: int, low: int) -> str:
    """The canonical 8-4-4-4-12 text of a UUID from its two 64-bit halves.

    Written out rather than `str(uuid.UUID(int=...))`: that validates and builds an object
    per id, several times the cost of the id on the one-row serving path."""
    h = f"{high:016x}"
    lo = f"{low:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:]}-{lo[:4]}-{lo[4:]}"


def uuid7_batch(n: int) -> list[str]:
    """Return `n` new, strictly increasing UUIDv7 strings."""
    out: list[str] = []
    getrandbits = _random.getrandbits
    while n > 0:
        take = min(n, 0x1000)
        ms, start = _next_ms_and_counter(take)
        high = (ms << 16) | 0x7000
        for i in range(take):
            # Uniqueness, not secrecy, is what these bits are for; os.urandom would be a
            # system call per request on the serving path.
            out.append(_format(high | (start + i), getrandbits(62) | 0x8000000000000000))
        n -= take
    return out


def uuid7() -> str:
    """Return one new UUIDv7 string."""
    return uuid7_batch(1)[0]


def uuid7_time(prediction_id: str | uuid.UUID) -> datetime:
    """The creation time embedded in a UUIDv7 (millisecond precision, UTC)."""
    value = prediction_id if isinstance(prediction_id, uuid.UUID) else uuid.UUID(prediction_id)
    if value.version != 7:
        raise ValueError(f"{prediction_id} is not a UUIDv7")
    ms = value.int >> 80
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
