"""The local orchestrator with real inference subprocesses serving the `credit` model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from cyclone.plugins import orchestrators
from cyclone.traffic import revision_name
from plugins.orchestrator_local import LocalOrchestrator, _serving
from services.launch import free_port
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


async def test_a_replica_spools_in_the_orchestrators_data_dir(
    model_repo: ModelRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not in $CYCLONE_DATA_DIR or ~/.cyclone: there, another mesh's replica that got the same
    port would find this one's journal and log its predictions into the wrong store."""
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("CYCLONE_DATA_DIR", str(elsewhere))
    data_dir = tmp_path / "data"
    store = f"127.0.0.1:{free_port()}"  # nothing listens: the sink just waits
    orch = LocalOrchestrator(
        {"model_repository": model_repo.root, "data_dir": data_dir, "store": store}
    )
    try:
        revision = await orch.start(CREDIT, "1", 1)
        [endpoint] = revision.endpoints
        assert await _serving(endpoint.address)  # positive control: the replica is up
        spools = [p.name for p in (data_dir / "spool").iterdir()]
        assert spools == [f"inference-{CREDIT}-{endpoint.port}"]
        assert not elsewhere.exists()
    finally:
        await orch.close()


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


async def _eventually(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_detached_revisions_outlive_the_orchestrator_and_are_adopted(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    config = {"model_repository": model_repo.root, "data_dir": tmp_path, "detached": True}
    name = revision_name(CREDIT, "1")
    first = LocalOrchestrator({**config, "grace_seconds": 5})
    revision = await first.start(CREDIT, "1", 2)
    pids = first.replica_pids(name)
    await first.close()  # the trainer stops (or dies): the replicas keep serving
    assert all(_alive(pid) for pid in pids)
    assert [await _serving(e.address) for e in revision.endpoints] == [True, True]

    os.kill(pids[1], signal.SIGKILL)  # one dies while nobody supervises it
    second = LocalOrchestrator({**config, "grace_seconds": 5})
    try:
        adopted = await second.adopt()
        assert adopted == [revision]  # same ports: Envoy's endpoints stay valid
        assert await second.running() == [revision]
        assert second.replica_pids(name)[0] == pids[0]  # the live one is adopted, not restarted

        async def dead_one_restarted() -> bool:
            now = second.replica_pids(name)
            return (
                len(now) == 2
                and pids[1] not in now
                and await _serving(revision.endpoints[1].address)
            )

        await _eventually(dead_one_restarted)
        os.kill(pids[0], signal.SIGKILL)  # an adopted replica that dies is restarted too

        async def adopted_one_restarted() -> bool:
            now = second.replica_pids(name)
            return (
                pids[0] not in now
                and len(now) == 2
                and await _serving(revision.endpoints[0].address)
            )

        await _eventually(adopted_one_restarted)
        live = second.replica_pids(name)
        await second.stop(name)  # stopping works on adopted revisions as on its own
        assert not any(_alive(pid) for pid in live)
        assert await LocalOrchestrator(config).adopt() == []  # nothing left to adopt
    finally:
        await second.close()
        for pid in second.replica_pids(name):
            os.kill(pid, signal.SIGKILL)


async def test_adopt_ignores_a_reused_pid_and_an_unreadable_state(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    config = {"model_repository": model_repo.root, "data_dir": tmp_path, "detached": True}
    orch = LocalOrchestrator(config)
    orch.state_path.parent.mkdir(parents=True)
    orch.state_path.write_text("{not json")
    assert await orch.adopt() == []
    # This test process's pid is alive but is not the replica: the replica is started anew.
    entry = {"model": CREDIT, "version": "1", "ports": [free_port()], "pids": [os.getpid()]}
    orch.state_path.write_text(json.dumps({revision_name(CREDIT, "1"): entry}))
    try:
        [revision] = await orch.adopt()

        async def started() -> bool:
            pids = orch.replica_pids(revision.name)
            return (
                bool(pids)
                and os.getpid() not in pids
                and await _serving(revision.endpoints[0].address)
            )

        await _eventually(started, 60)
    finally:
        await orch.stop(revision_name(CREDIT, "1"))
