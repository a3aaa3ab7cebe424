"""What `cyclone up` asks of its trainer: the serving pool's memory budget per process."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mesh import (
    POOL_MEMORY_FLOOR_MB,
    POOL_MEMORY_MB,
    Mesh,
    MeshSettings,
    pool_memory_mb,
)

GIB = 1024**3


def trainer_args(tmp_path: Path, **settings: object) -> list[str]:
    plans = Mesh(MeshSettings(data_dir=tmp_path, **settings)).plan()  # type: ignore[arg-type]
    return next(p for p in plans if p.name == "trainer").args


def test_a_roomy_machine_gets_the_measured_budget() -> None:
    assert pool_memory_mb(2, available_bytes=20 * GIB) == POOL_MEMORY_MB


@pytest.mark.parametrize("processes", [1, 2, 4, 16])
def test_the_budget_never_takes_more_than_its_share_of_a_small_machine(processes: int) -> None:
    available = 3 * GIB
    budget = pool_memory_mb(processes, available_bytes=available)
    assert budget * processes * 1024**2 <= 0.3 * available or budget == POOL_MEMORY_FLOOR_MB
    assert POOL_MEMORY_FLOOR_MB <= budget <= POOL_MEMORY_MB


def test_the_trainer_is_given_the_budget_only_with_the_pool_on(tmp_path: Path) -> None:
    pooled = trainer_args(tmp_path, pool_processes=2)
    assert pooled[pooled.index("--pool-processes") + 1] == "2"
    assert float(pooled[pooled.index("--pool-memory-mb") + 1]) >= POOL_MEMORY_FLOOR_MB
    unpooled = trainer_args(tmp_path, pool_processes=0)
    assert unpooled[unpooled.index("--pool-processes") + 1] == "0"
    assert "--pool-memory-mb" not in unpooled
