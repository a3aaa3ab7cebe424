"""The production path at full speed: Envoy and the serving pool on every core against MLServer.

What `cyclone up` serves a small model with by default (docs/serving-pool.md): Envoy's public
listener, the model's cluster pointing at the serving pool (one `cyclone serve inference
--pool-memory-mb` process per core, started by the local orchestrator, the version named by
the cluster's headers). The client sends OIP `ModelInfer` (one [1, 12] FP32 tensor) with the
`cyclone-model` header, as the SDK does. Envoy's per-client rate limit (1,000 req/s by default
under `cyclone up`) is off: one client process sends all the load here. Nothing is logged to
a store (no peer logs either): what logging costs is bench/inference.py's figure.
`--hash-balance PERCENT` adds a second mesh whose pooled clusters use Envoy's consistent
hashing with bounded loads (`EnvoySettings.pool_hash_balance_percent`).

Peers, in the same run, interleaved (the order rotates every repetition):
- MLServer 1.7 on the same ONNX file, direct (no proxy in front of it), in each worker
  configuration that could be its best on this machine: `parallel_workers` 0 (in the server's
  event loop), 1 (its default) and one per core; the best of them at each concurrency is the
  floor of the headline figure;
- one `cyclone serve inference` process, direct (what Envoy and the pool add or win).

Figures are medians over `--reps`; server CPU per request is the whole serving side's (Envoy
and the pool, or the peer's process tree). The machine is shared: compare ratios from one run.

Usage: python -m bench.production_path [--seconds 3] [--reps 3] [--hash-balance PERCENT]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from grpc import aio

from bench._common import Figures, percentile, stop_process
from bench.inference import INFER, infer_payload, tree_cpu_seconds
from bench.mlserver_peer import mlserver_executable, start_mlserver
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.models.convert import import_pipeline
from cyclone.traffic import Revision, TrafficSplit
from cyclone.wire import MODEL_HEADER
from cyclone_app.examples import bench_regressor
from plugins.orchestrator_local import LocalOrchestrator
from services.launch import spawn

MODEL = "rf"
CORES = os.cpu_count() or 1


def _cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds of these processes and their descendants (MLServer's workers)."""
    return sum(tree_cpu_seconds(pid) for pid in roots)


@dataclass
class Sample:
    throughput: float  # req/s
    p50: float  # ms
    p99: float  # ms
    cpu_us: float  # serving side's CPU per request
    client_cpu_us: float  # the load generator's (this process) CPU per request


@dataclass
class Case:
    name: str
    address: str
    pids: Callable[[], list[int]]


async def load(
    address: str, payload: bytes, concurrency: int, seconds: float
) -> tuple[float, float, float, int]:
    """Throughput, p50 and p99 (ms) of closed-loop callers, and the calls made (warm-up too)."""
    metadata = ((MODEL_HEADER, MODEL),)
    async with aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)
        for _ in range(50):
            await call(payload, metadata=metadata)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await call(payload, metadata=metadata)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return (
        len(latencies) / elapsed,
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
        50 + len(latencies),
    )


def measure(case: Case, payload: bytes, concurrency: int, seconds: float) -> Sample:
    pids = case.pids()
    before, client_before = _cpu_seconds(pids), time.process_time()
    throughput, p50, p99, calls = asyncio.run(load(case.address, payload, concurrency, seconds))
    cpu, client = _cpu_seconds(pids) - before, time.process_time() - client_before
    return Sample(throughput, p50, p99, cpu / calls * 1e6, client / calls * 1e6)


class PooledMesh:
    """Envoy + the local orchestrator's serving pool (one process per core), one model."""

    def __init__(self, repository: Path, work: Path, hash_balance: int | None) -> None:
        self.orchestrator = LocalOrchestrator(
            {"model_repository": repository, "data_dir": work / "pool", "pool_processes": CORES}
        )
        self.settings = EnvoySettings(
            work_dir=work / "envoy",
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            rate_limit_per_client=None,  # one client sends everything (see the docstring)
            pool_hash_balance_percent=hash_balance,
        )
        self.proxy = EnvoyProxy(self.settings)
        self.revision: Revision | None = None

    async def start(self) -> str:
        await self.proxy.start()
        self.revision = revision = await self.orchestrator.start(MODEL, "1", 1)
        assert revision.pooled, "the benchmark's model should be pooled"
        await self.proxy.apply(TrafficSplit(MODEL, {revision.name: 100}, {revision.name: revision}))
        await self.proxy.wait_healthy(revision, 60)
        return self.proxy.public_address

    def pids(self) -> list[int]:
        assert self.revision is not None
        envoy = [self.proxy.pid] if self.proxy.pid else []
        return [*self.orchestrator.replica_pids(self.revision.name), *envoy]

    async def stop(self) -> None:
        await self.orchestrator.close()
        await self.proxy.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settle", type=float, default=1.0, help="quiet before each figure")
    parser.add_argument(
        "--hash-balance",
        type=int,
        default=None,
        help="also a mesh whose pool clusters bound each member's load at PERCENT of the mean",
    )
    parser.add_argument("--no-mlserver", action="store_true")
    args = parser.parse_args(argv)
    model, x = bench_regressor()
    payload = infer_payload(x[0].astype(np.float32))
    figures = Figures()
    loop = asyncio.new_event_loop()
    stopping: list[Callable[[], object]] = []
    with tempfile.TemporaryDirectory(prefix="cyclone-production-path-") as tmp:
        work = Path(tmp)
        model_dir, _, _ = import_pipeline(model, MODEL, work / "models")
        try:
            meshes = {"mesh": PooledMesh(work / "models", work / "mesh", None)}
            if args.hash_balance:
                meshes["mesh_balanced"] = PooledMesh(
                    work / "models", work / "mesh-balanced", args.hash_balance
                )
            cases: list[Case] = []
            for name, mesh in meshes.items():
                stopping.append(lambda mesh=mesh: loop.run_until_complete(mesh.stop()))  # type: ignore[misc]
                cases.append(Case(name, loop.run_until_complete(mesh.start()), mesh.pids))
            serve = ["--model-repository", str(work / "models"), "--model", MODEL]
            one = spawn("inference", [*serve, "--metrics-port", "-1"], work / "one.log")
            stopping.append(one.stop)
            cases.append(Case("one_process", one.address, lambda: [one.process.pid]))
            if not args.no_mlserver:
                executable = mlserver_executable()
                for workers in sorted({0, 1, CORES}):
                    label = f"mlserver_pw{workers}"
                    peer, port = start_mlserver(
                        executable, model_dir / "model.onnx", work / label, workers
                    )
                    stopping.append(lambda peer=peer: stop_process(peer))  # type: ignore[misc]
                    cases.append(
                        Case(label, f"127.0.0.1:{port}", lambda pid=peer.pid: [pid])  # type: ignore[misc]
                    )
            samples = _run(cases, payload, args)
        finally:
            for stop in reversed(stopping):
                stop()
            loop.close()
    _figures(figures, samples, [c.name for c in cases])
    figures.emit()


def _run(
    cases: list[Case], payload: bytes, args: argparse.Namespace
) -> dict[tuple[str, int], list[Sample]]:
    print(f"{CORES} cores; {args.seconds:.0f} s per figure, {args.reps} reps", flush=True)
    samples: dict[tuple[str, int], list[Sample]] = {}
    for rep in range(args.reps):
        for conc in (1, 32):
            shift = (rep * 2 + (conc == 32)) % len(cases)
            for case in cases[shift:] + cases[:shift]:
                time.sleep(args.settle)
                sample = measure(case, payload, conc, args.seconds)
                samples.setdefault((case.name, conc), []).append(sample)
                print(
                    f"  rep {rep} c{conc:<2} {case.name:<16} {sample.throughput:8.0f} req/s"
                    f"  p50 {sample.p50:6.2f} ms  p99 {sample.p99:6.2f} ms"
                    f"  cpu {sample.cpu_us:6.0f} us/req (client {sample.client_cpu_us:4.0f})",
                    flush=True,
                )
    return samples


def _figures(
    figures: Figures, samples: dict[tuple[str, int], list[Sample]], names: list[str]
) -> None:
    med = statistics.median
    peers = [n for n in names if n.startswith("mlserver")]
    for conc in (1, 32):
        for name in names:
            runs = samples[(name, conc)]
            print(
                f"  c{conc} {name:<16} {med(s.throughput for s in runs):8.0f} req/s"
                f" (range {min(s.throughput for s in runs):.0f}..{max(s.throughput for s in runs):.0f})"
                f"  p99 {med(s.p99 for s in runs):6.2f} ms  cpu {med(s.cpu_us for s in runs):5.0f}"
                f" us/req, client {med(s.client_cpu_us for s in runs):4.0f} us/req"
            )
        if not peers:
            continue
        best = max(peers, key=lambda p: med(s.throughput for s in samples[(p, conc)]))
        theirs = samples[(best, conc)]
        for name in [n for n in names if not n.startswith("mlserver")]:
            ours = samples[(name, conc)]
            figures.add(
                f"{name}_c{conc}_throughput_vs_{best}",
                med(s.throughput for s in ours),
                "req/s",
                med(s.throughput for s in theirs),
                True,
            )
            figures.add(
                f"{name}_c{conc}_p99_vs_{best}",
                med(s.p99 for s in ours),
                "ms",
                med(s.p99 for s in theirs),
                False,
            )


if __name__ == "__main__":
    main()
