"""A bounded, durable, ordered on-disk queue of prediction batches.

Used only while the store is slow or down. Each batch is one file, written to a
temporary name, fsynced and renamed, so a crash never leaves half a batch; file
names carry a sequence number so replay keeps the order batches were served in.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_SUFFIX = ".batch"


class SpoolFull(Exception):
    """Adding the batch would pass the spool's byte bound, or the disk refused it."""


class SpoolDiskFull(SpoolFull):
    """The disk refused the batch (full, or failing)."""


class SpoolInUse(RuntimeError):
    """Another process already spools into this directory."""


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        # Two writers would reuse each other's sequence numbers: one process per spool.
        self._lock = (directory / ".lock").open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SpoolInUse(
                f"spool {directory} is in use by another process; give each inference "
                "process its own --spool-dir"
            ) from None
        for stale in directory.glob("*.tmp"):
            stale.unlink(missing_ok=True)
        self._files = sorted(directory.glob(f"*{_SUFFIX}"))
        self.bytes = sum(f.stat().st_size for f in self._files)
        self._next = int(self._files[-1].stem) + 1 if self._files else 0
        if self._files:
            log.info(
                "spool %s holds %d batches (%d bytes) to replay",
                directory,
                len(self._files),
                self.bytes,
            )

    def __len__(self) -> int:
        return len(self._files)

    def append(self, data: bytes) -> None:
        if self.bytes + len(data) > self.max_bytes:
            raise SpoolFull(f"spool {self.directory} would exceed {self.max_bytes} bytes")
        path = self.directory / f"{self._next:016d}{_SUFFIX}"
        tmp = path.with_suffix(".tmp")
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.rename(path)
        except OSError as exc:  # a full disk is a full spool: the caller counts the loss
            tmp.unlink(missing_ok=True)
            raise SpoolDiskFull(f"spool {self.directory}: {exc.strerror or exc}") from None
        self._next += 1
        self._files.append(path)
        self.bytes += len(data)

    def peek(self) -> bytes | None:
        """The oldest batch, or None when empty."""
        return self._files[0].read_bytes() if self._files else None

    def close(self) -> None:
        """Release the directory for another process."""
        self._lock.close()

    def pop(self) -> None:
        """Forget the oldest batch (after the store acknowledged it)."""
        path = self._files.pop(0)
        self.bytes -= path.stat().st_size
        path.unlink()
