"""Shared fixtures: one model repository per session and real inference servers on free ports."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
CREDIT = "credit"
BENCH = "bench"


def _module_cost(items: list[pytest.Item]) -> int:
    """0 for the whole-mesh files, 1 for files with slow tests, 2 for the rest."""
    if any(item.get_closest_marker("e2e") for item in items):
        return 0
    return 1 if any(item.get_closest_marker("slow") for item in items) else 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest files first, each file's tests kept together and in order.

    `make test` hands whole files to its workers in this order (`--dist loadfile
    --no-loadscope-reorder`): a two-minute e2e file started last would leave one worker
    running it alone at the end; started first, the short files fill in around it."""
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    ordered = sorted(by_module.values(), key=_module_cost)  # stable: collection order within
    items[:] = [item for module in ordered for item in module]


@dataclasses.dataclass(frozen=True)
class ModelRepo:
    """The session's model repository (read-only: copy it before changing anything)."""

    root: Path
    credit_pipeline: Any
    credit_frame: pd.DataFrame
    bench_model: Any
    bench_x: np.ndarray

    @property
    def credit_rows(self) -> pd.DataFrame:
        """Feature columns of the classifier's training frame."""
        from cyclone_app.examples import CREDIT_FEATURES

        return self.credit_frame[CREDIT_FEATURES]

    def copy_to(self, target: Path) -> Path:
        import shutil

        shutil.copytree(self.root, target)
        return target


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepo:
    """`credit` (columns layout classifier) and `bench` (matrix layout regressor), version 1."""
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import bench_regressor, credit_frame, credit_pipeline

    root = tmp_path_factory.mktemp("model-repo")
    frame = credit_frame(400, seed=0)
    pipeline = credit_pipeline(frame)
    import_pipeline(pipeline, CREDIT, root, sample=frame)
    model, x = bench_regressor()
    import_pipeline(model, BENCH, root)
    return ModelRepo(root, pipeline, frame, model, x)


@dataclasses.dataclass
class RunningServer:
    server: Any
    scorer: Any
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_inference_server(
    model_repo: ModelRepo,
) -> Callable[..., contextlib.AbstractAsyncContextManager[RunningServer]]:
    """Factory: `async with start_inference_server(**settings) as running:` (port 0, stopped after)."""
    from services.inference.main import InferenceSettings
    from services.launch import start_inference

    @contextlib.asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[RunningServer]:
        settings = InferenceSettings(
            **{"model_repository": model_repo.root, "port": 0, "log_level": "WARNING", **overrides}
        )
        started = await start_inference(settings)
        try:
            yield RunningServer(started.server, started.domain, started.port)
        finally:
            await started.stop(0)

    return start


@pytest.fixture
async def inference_server(
    start_inference_server: Callable[..., contextlib.AbstractAsyncContextManager[RunningServer]],
) -> AsyncIterator[RunningServer]:
    """A real in-process inference server serving every model of the session repository."""
    async with start_inference_server() as running:
        yield running


_LISTENING = re.compile(r"inference listening on [\d.]+:(\d+)")


@dataclasses.dataclass
class CliServer:
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextlib.contextmanager
def cli_server_process(repository: Path, log_path: Path, *extra: str) -> Iterator[CliServer]:
    """`python -m cyclone_app serve inference` on a free port (--port 0, read from its log); terminated after."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cyclone",
                "serve",
                "inference",
                "--model-repository",
                str(repository),
                "--port",
                "0",
                *extra,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            found = _LISTENING.search(log_path.read_text(errors="replace"))
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"inference server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield CliServer(f"127.0.0.1:{found.group(1)}", proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def cli_server_process_factory() -> Callable[..., contextlib.AbstractContextManager[CliServer]]:
    """`with factory(repository, log_path, *extra_flags) as server:` a CLI-started server."""
    return cli_server_process


@pytest.fixture(scope="session")
def cli_server(model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One CLI-started inference server subprocess for the session; yields its address."""
    log_path = tmp_path_factory.mktemp("cli-server") / "server.log"
    with cli_server_process(model_repo.root, log_path) as running:
        yield running.address
