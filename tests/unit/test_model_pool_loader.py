"""The serving pool's loader thread: loads and releases of evicted versions run there, off
the event loop, and the memory count stays the sum of what is held. A fake model stands in
for onnxruntime."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from services.inference import pool as pool_module
from services.inference.pool import ModelPool


class _FakeModel:
    """Records which thread loaded it and which thread let it go."""

    released_on: dict[str, str] = {}

    def __init__(self, key: str, onnx_path: Path) -> None:
        self.key = key
        self.files = SimpleNamespace(onnx_path=onnx_path)
        self.loaded_on = threading.current_thread().name

    def __del__(self) -> None:
        _FakeModel.released_on[self.key] = threading.current_thread().name


@pytest.fixture
def onnx_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # A steady RSS: each version then costs exactly its file size.
    monkeypatch.setattr(pool_module, "_rss", lambda: 100 << 20)
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 1024)
    return path


def _pool(onnx_file: Path, budget_bytes: int, **kwargs: Any) -> ModelPool:
    def load(_repository: Any, model: str, version: str) -> Any:
        return _FakeModel(f"{model}:{version}", onnx_file)

    return ModelPool(Path("/nonexistent"), budget_bytes, load, **kwargs)  # type: ignore[arg-type]


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def test_loads_run_on_the_loader_thread(onnx_file: Path) -> None:
    pool = _pool(onnx_file, 1 << 30)
    model: Any = await pool.get("m", "1")
    assert model.loaded_on.startswith("pool-loader")


async def test_evicted_versions_are_released_on_the_loader_thread(onnx_file: Path) -> None:
    _FakeModel.released_on.clear()
    # Each fake costs its file size (1 KiB): two fit, the third evicts the first.
    pool = _pool(onnx_file, 2048)
    for model in ("a", "b", "c"):
        await pool.get(model, "1")
    assert pool.recently_evicted[-1] == ("a", "1")
    _wait_for(lambda: "a:1" in _FakeModel.released_on)
    assert _FakeModel.released_on["a:1"].startswith("pool-loader")
    pool.unload("b")
    _wait_for(lambda: "b:1" in _FakeModel.released_on)
    assert _FakeModel.released_on["b:1"].startswith("pool-loader")


async def test_memory_count_follows_loads_evictions_and_unloads(onnx_file: Path) -> None:
    pool = _pool(onnx_file, 3 * 1024)
    for model in ("a", "b", "c", "d", "e"):
        await pool.get(model, "1")
        assert pool.used_bytes == 1024 * len(pool.models())
    assert pool.used_bytes <= pool.budget_bytes
    pool.unload("e")
    assert pool.used_bytes == 1024 * len(pool.models()) == 2048
