"""The inference server's on-disk spool: order, bound, durability across re-open."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference.spool import Spool, SpoolFull


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (data := spool.peek()) is not None:
        out.append(data)
        spool.pop()
    return out


def test_fifo_order_and_pop(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    assert len(spool) == 0 and spool.peek() is None and spool.bytes == 0
    batches = [f"batch-{i}".encode() * (i + 1) for i in range(12)]
    for b in batches:
        spool.append(b)
    assert len(spool) == 12
    assert spool.bytes == sum(map(len, batches))
    # peek does not consume.
    assert spool.peek() == batches[0]
    assert spool.peek() == batches[0]
    spool.pop()
    assert len(spool) == 11
    assert spool.bytes == sum(map(len, batches[1:]))
    # Appending after popping keeps the order.
    spool.append(b"late")
    assert drain(spool) == [*batches[1:], b"late"]
    assert spool.bytes == 0
    assert [p.name for p in (tmp_path / "spool").iterdir()] == [".lock"]


def test_bound(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100)
    spool.append(b"x" * 60)
    spool.append(b"y" * 40)  # exactly at the bound is fine
    with pytest.raises(SpoolFull, match="100 bytes"):
        spool.append(b"z")
    # A refused batch leaves nothing behind.
    assert len(spool) == 2 and spool.bytes == 100
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.name != ".lock") == [".batch", ".batch"]
    spool.pop()
    spool.append(b"z" * 60)
    assert drain(spool) == [b"y" * 40, b"z" * 60]
    # One batch bigger than the whole bound is refused even when empty.
    with pytest.raises(SpoolFull):
        spool.append(b"w" * 101)


def test_durable_across_reopen(tmp_path: Path) -> None:
    first = Spool(tmp_path, 1 << 20)
    for i in range(15):  # more than 9: zero-padded names keep the numeric order
        first.append(f"{i}".encode())
    first.pop()
    first.pop()
    first.close()  # the process ends (a re-open in the same process must release first)
    # A crash mid-write leaves a .tmp file behind: it is not a batch and is removed.
    (tmp_path / "0000000000000099.tmp").write_bytes(b"half a batch")

    second = Spool(tmp_path, 1 << 20)
    assert not list(tmp_path.glob("*.tmp"))
    assert len(second) == 13
    assert second.bytes == sum(len(f"{i}".encode()) for i in range(2, 15))
    assert second.peek() == b"2"
    # New batches go after the old ones, also after another re-open.
    second.append(b"new")
    second.close()
    third = Spool(tmp_path, 1 << 20)
    assert drain(third) == [f"{i}".encode() for i in range(2, 15)] + [b"new"]
    # Sequence numbers keep growing after the spool emptied and was re-opened.
    third.append(b"a")
    third.close()
    fourth = Spool(tmp_path, 1 << 20)
    fourth.append(b"b")
    fourth.close()
    assert drain(Spool(tmp_path, 1 << 20)) == [b"a", b"b"]


def test_reopen_counts_bytes_against_the_bound(tmp_path: Path) -> None:
    first = Spool(tmp_path, 100)
    first.append(b"x" * 80)
    first.close()
    again = Spool(tmp_path, 100)
    assert again.bytes == 80
    with pytest.raises(SpoolFull):
        again.append(b"y" * 21)
    again.append(b"y" * 20)


def test_one_process_per_spool_directory(tmp_path: Path) -> None:
    import subprocess
    import sys

    first = Spool(tmp_path / "spool", 1 << 20)
    # flock is per open file description, so the second owner must be another process.
    probe = (
        "import sys; from pathlib import Path; from services.inference.spool import Spool, SpoolInUse\n"
        "try:\n    Spool(Path(sys.argv[1]), 1 << 20)\nexcept SpoolInUse as exc:\n    print(exc); sys.exit(3)\n"
    )
    held = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "spool")], capture_output=True, text=True
    )
    assert held.returncode == 3 and "in use by another process" in held.stdout
    first.close()
    free = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "spool")], capture_output=True, text=True
    )
    assert free.returncode == 0, free.stdout + free.stderr


def test_a_batch_the_disk_refuses_is_spool_full_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 1 << 20)
    spool.append(b"kept")
    # The next batch's temporary file is /dev/full: its write fails with ENOSPC.
    (tmp_path / f"{1:016d}.tmp").symlink_to("/dev/full")
    with pytest.raises(SpoolFull, match="No space left"):
        spool.append(b"refused")
    assert len(spool) == 1 and spool.bytes == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", f"{0:016d}.batch"]
    spool.append(b"later")  # the disk has room again
    assert drain(spool) == [b"kept", b"later"]
