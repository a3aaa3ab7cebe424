"""The local orchestrator with real inference subprocesses serving the `credit` model."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from cyclone.plugins import orchestrators
from cyclone.traffic import revision_name
from plugins.orchestrator_local import LocalOrchestrator, _serving
from tests.conftest import CREDIT, ModelRepo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_replicas_serve_restart_after_a_kill_and_stop_cleanly(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    assert "local" in orchestrators()
    orch = LocalOrchestrator(
        {"model_repository": model_repo.root, "data_dir": tmp_path, "grace_seconds": 5}
    )
    name = revision_name(CREDIT, "1")
    try:
        revision = await orch.start(CREDIT, "1", 2)
        assert revision.name == name and len(revision.endpoints) == 2
        assert [await _serving(e.address) for e in revision.endpoints] == [True, True]
        assert [r.name for r in await orch.running()] == [name]
        assert orch.log_path(name).exists()
        pids = orch.replica_pids(name)
        assert len(pids) == 2

        os.kill(pids[0], signal.SIGKILL)  # a replica dies: it comes back on the same port
        for _ in range(300):
            now = orch.replica_pids(name)
            if (
                len(now) == 2
                and pids[0] not in now
                and await _serving(revision.endpoints[0].address)
            ):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"replica not restarted: {orch.log_path(name).read_text()[-2000:]}")
        live = orch.replica_pids(name)
    finally:
        await orch.close()
    assert await orch.running() == []
    for pid in live:
        assert not _alive(pid)
    assert not await _serving(revision.endpoints[1].address, timeout=0.5)


async def test_a_revision_that_cannot_start_leaves_nothing_behind(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    orch = LocalOrchestrator(
        {"model_repository": tmp_path / "missing", "data_dir": tmp_path, "start_timeout": 60}
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited 3 times before serving"):
        await orch.start(CREDIT, "1", 1)  # exits at once (no repository), restarted, never healthy
    assert time.monotonic() - started < 30  # gave up on the crash loop, not at start_timeout
    assert await orch.running() == []
    assert "--model-repository" in orch.log_path(revision_name(CREDIT, "1")).read_text()
