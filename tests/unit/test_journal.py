"""The store sink's write-ahead journal: records read back as they were written, a torn tail
is skipped, sealed segments are released, and what a dead process left is found."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.inference.batching import Prepared
from services.inference.journal import Journal, decode, encode
from services.inference.model import Outputs
from services.inference.store_sink import Submitted


def _classified(ids: list[str]) -> Submitted:
    block = np.array([[41.0, 35.0], [52000.0, 61000.0]])
    outputs = Outputs(
        2, labels=np.array(["0", "1"]), probabilities=np.array([[0.9, 0.1], [0.3, 0.7]])
    )
    return Submitted(
        "credit",
        "2",
        ids,
        Prepared(None, 2, block, ("age", "income")),
        outputs,
        ("0", "1"),
        1.5,
        "t1",
    )


def _with_categories() -> Submitted:
    columns = {
        "age": np.array([41.0, np.nan]),
        "city": np.array(["porto", ""], dtype=object),
    }
    outputs = Outputs(2, values=np.array([3.5, -1.25], dtype=np.float32))
    return Submitted("bikes", "1", ["a", "b"], Prepared(columns, 2), outputs, (), 0.25, "")


@pytest.mark.parametrize("make", [lambda: _classified(["x", "y"]), _with_categories])
def test_a_record_reads_back_as_it_was_written(make: object) -> None:
    item = make()  # type: ignore[operator]
    back = Submitted(*decode(encode(item)))
    assert back[:3] == item[:3] and back[5:] == item[5:]
    assert back.job.rows == item.job.rows and back.job.whole_block == item.job.whole_block
    for name in item.job.columns:
        np.testing.assert_array_equal(back.job.columns[name], item.job.columns[name])
    for field in ("values", "labels", "probabilities"):
        expected, got = getattr(item.outputs, field), getattr(back.outputs, field)
        if expected is None:
            assert got is None
        else:
            np.testing.assert_array_equal(got, expected)
            assert got.dtype == expected.dtype


def test_segments_left_behind_are_recovered_and_a_torn_tail_skipped(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    first.append(_classified(["a", "b"]))
    sealed = first.seal()
    assert sealed is not None and first.seal() is None  # nothing written since
    first.append(_classified(["c", "d"]))
    first.append(_classified(["e", "f"]))
    # The process dies mid-write: the last record is cut short.
    segment = sorted(tmp_path.glob("*.journal"))[-1]
    segment.write_bytes(segment.read_bytes()[:-10])

    second = Journal(tmp_path)
    recovered = second.recover()
    assert [r[2] for r in recovered] == [["a", "b"], ["c", "d"]]
    Journal.release(second.left_behind)
    assert not second.left_behind[0].exists()
    second.close()  # nothing written: its empty segment goes too
    assert list(tmp_path.glob("*.journal")) == []


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}]
from tests.unit.test_journal import _classified
from services.inference.journal import Journal
journal = Journal(Path({directory!r}))
for i in range(3):
    journal.append(_classified([f"k{{i}}", f"k{{i}}b"]))
print("appended", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no seal, no close, no flush of anything
"""


def test_what_a_sigkilled_process_appended_is_recovered(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[2])
    code = _KILLED_WRITER.format(root=root, directory=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "appended", done.stderr  # positive control: it did append
    assert done.returncode == -signal.SIGKILL
    recovered = Journal(tmp_path).recover()
    assert [r[2] for r in recovered] == [[f"k{i}", f"k{i}b"] for i in range(3)]


def _disk_full(journal: Journal) -> int:
    """Point the journal's open segment at /dev/full (every write: ENOSPC); the saved fd
    puts the real segment back."""
    saved = os.dup(journal._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, journal._fd)
    os.close(full)
    return saved


def _disk_back(journal: Journal, saved: int) -> None:
    os.dup2(saved, journal._fd)
    os.close(saved)


def test_a_full_disk_never_fails_an_append_and_later_records_recover(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.append(_classified(["a", "b"]))
    saved = _disk_full(journal)
    assert not journal.append(_classified(["lost", "lost"]))  # refused, not raised
    _disk_back(journal, saved)
    assert journal.append(_classified(["c", "d"]))
    journal.close()
    assert [r[2] for r in Journal(tmp_path).recover()] == [["a", "b"], ["c", "d"]]


def test_a_short_write_is_cut_off_so_the_records_after_it_recover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    assert journal.append(_classified(["a", "b"]))
    real_write = os.write
    # The disk fills half-way through a record.
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    assert not journal.append(_classified(["torn", "torn"]))
    monkeypatch.setattr(os, "write", real_write)
    assert journal.append(_classified(["c", "d"]))
    journal.close()
    assert [r[2] for r in Journal(tmp_path).recover()] == [["a", "b"], ["c", "d"]]


def test_the_sink_answers_while_its_journal_disk_is_full(tmp_path: Path) -> None:
    """`submit` runs on every answered request: a full disk must not fail the request; the
    rows stay queued for the store and are counted as not journaled."""
    from types import SimpleNamespace

    from services.inference.store_sink import UNJOURNALED, StoreSink

    sink = StoreSink("127.0.0.1:1", tmp_path / "spool")
    assert sink.journal is not None
    item = _classified(["p1", "p2"])
    model = SimpleNamespace(
        name="credit", version="2", schema=SimpleNamespace(class_labels=("0", "1"))
    )
    before = UNJOURNALED._value.get()
    saved = _disk_full(sink.journal)
    try:
        sink.submit(model, item.prediction_ids, item.job, item.outputs, 1.5, "t1")  # type: ignore[arg-type]
    finally:
        _disk_back(sink.journal, saved)
    assert sink._pending_rows == 2
    assert UNJOURNALED._value.get() - before == 2
    sink.journal.close()
    sink.spool.close()
    sink.rejected.close()


async def test_a_batch_the_spool_disk_refuses_is_left_in_the_journal(tmp_path: Path) -> None:
    """The store is down and the disk refuses the spool's write: the batch is counted as
    dropped, but its journal segment stays for the next start to log."""
    from types import SimpleNamespace

    from services.inference.store_sink import DROPPED, StoreSink
    from services.launch import free_port

    spool = tmp_path / "spool"
    sink = StoreSink(f"127.0.0.1:{free_port()}", spool, flush_interval=3600, send_timeout=0.5)
    await sink.start()
    item = _classified(["p1", "p2"])
    model = SimpleNamespace(
        name="credit", version="2", schema=SimpleNamespace(class_labels=("0", "1"))
    )
    sink.submit(model, item.prediction_ids, item.job, item.outputs, 1.5, "t1")  # type: ignore[arg-type]
    (spool / f"{0:016d}.tmp").symlink_to("/dev/full")
    before = DROPPED._value.get()
    await sink.flush()
    assert DROPPED._value.get() - before == 2  # positive control: the spool refused it
    (spool / f"{0:016d}.tmp").unlink(missing_ok=True)
    await sink.stop()
    assert [r[2] for r in Journal(spool / "journal").recover()] == [["p1", "p2"]]
