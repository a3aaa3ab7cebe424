"""The store sink's write-ahead journal: what was answered survives a SIGKILL before its flush.

`StoreSink.submit` keeps scored requests in memory until the next flush (0.2 s). A process killed
in between would lose them, though their callers got answers and prediction ids. So each one is
also appended to a journal segment (one `write` to the page cache: the kernel keeps it whatever
happens to the process) before the answer leaves. A flush seals the segment it drained; once the
batch is in the store or the spool the segment is deleted. At start, segments left by a killed
process are read back and logged first -- the store is idempotent on prediction id, so a
segment whose batch did reach the store before the kill costs nothing but the resend.

Records are length-prefixed pickles of plain values (arrays as bytes, dtype and shape): about
3 us a request, against ~15 us for pickling the arrays themselves.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.inference.batching import Prepared
from services.inference.model import Outputs

if TYPE_CHECKING:
    from services.inference.store_sink import Submitted

# A journal record read back: the fields of a `Submitted`, in order.
Fields = tuple[str, str, list[str], Prepared, Outputs, tuple[str, ...], float, str]

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<I")
_SUFFIX = ".journal"


def _array(a: np.ndarray | None) -> Any:
    if a is None:
        return None
    if a.dtype.kind in "OUS":  # text (categories, class labels): a list pickles fast enough
        return ("list", a.tolist(), a.dtype.str)
    return ("raw", np.ascontiguousarray(a).tobytes(), a.dtype.str, a.shape)


def _unarray(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    if v[0] == "list":
        return np.asarray(v[1], dtype=v[2])
    _, data, dtype, shape = v
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _required(v: Any) -> np.ndarray:
    array = _unarray(v)
    if array is None:
        raise ValueError("journal record: a column without values")
    return array


def encode(item: Submitted) -> bytes:
    job, out = item.job, item.outputs
    if job.whole_block:
        inputs: Any = ("block", _array(job.block), job.names)
    else:
        inputs = ("columns", {name: _array(col) for name, col in job.columns.items()})
    return pickle.dumps(
        (
            item.model,
            item.version,
            item.prediction_ids,
            job.rows,
            inputs,
            out.rows,
            _array(out.values),
            _array(out.labels),
            _array(out.probabilities),
            item.class_labels,
            item.latency_ms,
            item.trace_id,
        ),
        protocol=5,
    )


def decode(data: bytes) -> Fields:
    (
        model,
        version,
        ids,
        rows,
        inputs,
        out_rows,
        values,
        labels,
        probs,
        classes,
        latency,
        trace,
    ) = pickle.loads(data)  # our own file: written by this process's predecessor
    if inputs[0] == "block":
        block = _unarray(inputs[1])
        job = Prepared(None, rows, block, tuple(inputs[2]))
    else:
        columns: Mapping[str, Any] = inputs[1]
        job = Prepared({n: _required(c) for n, c in columns.items()}, rows)
    outputs = Outputs(out_rows, _unarray(values), _unarray(labels), _unarray(probs))
    return (model, version, list(ids), job, outputs, tuple(classes), float(latency), str(trace))


class Journal:
    """Append-only segments in `directory`; one writer (the spool's lock guards the parent)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.left_behind = sorted(directory.glob(f"*{_SUFFIX}"))
        last = int(self.left_behind[-1].stem) if self.left_behind else -1
        self._index = last + 1
        self._fd = self._open(self._index)
        self._written = 0
        self._size = 0  # bytes of whole records in the open segment
        self._failing = False  # the last append found the disk full (logged once per streak)

    def _path(self, index: int) -> Path:
        return self.directory / f"{index:016d}{_SUFFIX}"

    def _open(self, index: int) -> int:
        return os.open(self._path(index), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def recover(self) -> list[Fields]:
        """The requests in segments a previous process left (oldest first); a torn last
        record (killed mid-write) is skipped."""
        items: list[Fields] = []
        for path in self.left_behind:
            data = path.read_bytes()
            at = 0
            while at + _LENGTH.size <= len(data):
                (size,) = _LENGTH.unpack_from(data, at)
                record = data[at + _LENGTH.size : at + _LENGTH.size + size]
                if len(record) < size:
                    log.warning("journal %s: a torn record at byte %d is skipped", path, at)
                    break
                try:
                    items.append(decode(record))
                except Exception:  # a record this version cannot read must not stop serving
                    log.exception(
                        "journal %s: an unreadable record at byte %d is skipped", path, at
                    )
                at += _LENGTH.size + size
        if items:
            log.info("journal: %d answered requests from before a restart to log", len(items))
        return items

    def append(self, item: Submitted) -> bool:
        """Journal one answered request. False when the disk refused it (full): the request is
        still logged from memory, it only would not survive this process dying -- serving
        never fails because of the journal."""
        data = encode(item)
        record = _LENGTH.pack(len(data)) + data
        try:
            written = os.write(self._fd, record)
        except OSError as exc:
            written, error = 0, exc.strerror
        else:
            error = f"short write ({written} of {len(record)} bytes)"
        if written == len(record):
            self._size += written
            self._written += 1
            if self._failing:
                self._failing = False
                log.warning("journal %s: writing again", self.directory)
            return True
        # A torn record would hide every record after it from recovery: cut it off.
        if written:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.exception("journal %s: could not cut off a torn record", self.directory)
        if not self._failing:
            self._failing = True
            log.error(
                "journal %s: %s; answered requests are logged from memory only until it"
                " writes again",
                self.directory,
                error,
            )
        return False

    def seal(self) -> Path | None:
        """Close the segment being written (the flush took its requests) and start the next;
        the sealed segment's path, to `release` once its batch is safe. None when empty."""
        if not self._written:
            return None
        os.close(self._fd)
        sealed = self._path(self._index)
        self._index += 1
        self._fd = self._open(self._index)
        self._written = 0
        self._size = 0
        return sealed

    @staticmethod
    def release(paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self._fd)
        if not self._written:
            self._path(self._index).unlink(missing_ok=True)
