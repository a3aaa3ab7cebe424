"""The serving pool at scale: 10, 100 and 500 small models behind Envoy, traffic spread Zipf-like.

Real parts: Envoy (`cyclone.envoy.EnvoyProxy`, one cluster per model version as under
`cyclone up`), the local orchestrator's serving pool (one inference process per core, each with
a `--pool-memory-mb` budget) and a gRPC client sending Predict through Envoy's public listener.
For each model count:

- RSS of the whole serving side (Envoy + the pool's processes) after the traffic, against what
  dedicated revisions would take (the one-model mesh's RSS per version times the count);
- p99 latency of the hottest model under Zipf traffic (s = 1.1) against a one-model mesh (one
  dedicated revision, two replicas, as `cyclone up` runs it today) under the same client
  concurrency: the ratio (target <= 1.5);
- the cold-load latency of an evicted version: it is unloaded from every member, then one
  request through Envoy (median and worst of a few);
- setup: how long starting the N pooled revisions and installing their routes took;
- the standing CPU of the serving side with no traffic (Envoy + the pool, in % of one core),
  against the one-model mesh's: mostly Envoy's active health checks, one per pooled cluster
  per member per `--pool-health-interval-s`, which the same cores pay while serving.

Models: a few random-forest pipelines (a few MB of ONNX each) fitted and converted once with
`cyclone.models.convert.import_pipeline`, hard-linked under N model names (a version's
directory is its name): each name is its own onnxruntime session in the pool, as N distinct
models would be. Traffic is measured after one warm-up pass of the same traffic.

Usage: python -m bench.pool_scale [--models 10,100,500] [--requests 2000] [--rounds 3]
       [--concurrency 8] [--pool-memory-mb MB (default: what `cyclone up` gives, services.mesh)]
       [--pool-health-interval-s S (the pooled clusters' health checks; default EnvoySettings')]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from bench._common import Figures, median, percentile
from cyclone.channels import aio_channel
from cyclone.client import MODEL_HEADER, build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.models.convert import import_pipeline
from cyclone.oip.v2 import open_inference_pb2 as oip_pb
from cyclone.oip.v2 import open_inference_pb2_grpc as oip_grpc
from cyclone.traffic import Revision, TrafficSplit
from cyclone_app.examples import CREDIT_FEATURES, credit_frame
from plugins.orchestrator_local import LocalOrchestrator
from services.mesh import pool_memory_mb

ZIPF_S = 1.1
TEMPLATES = 4
MEMORY_TARGET_BYTES = 4 * 1024**3
P99_TARGET_RATIO = 1.5
COLD_SAMPLES = 5
MIB = 1 << 20


def _forest(seed: int) -> Any:
    """A small tabular pipeline of a few MB once converted: one-hot city + a random forest."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    frame = credit_frame(4000, seed=seed)
    pre = ColumnTransformer(
        [
            ("num", "passthrough", ["age", "income", "debt_ratio"]),
            ("cat", OneHotEncoder(handle_unknown="ignore"), ["city"]),
        ]
    )
    forest = RandomForestClassifier(n_estimators=40, max_depth=12, random_state=seed)
    pipeline = Pipeline([("pre", pre), ("clf", forest)])
    pipeline.fit(frame[CREDIT_FEATURES], frame["defaulted"])
    return pipeline, frame


def _templates(root: Path) -> list[Path]:
    """Version directories of a few distinct models, converted once."""
    dirs = []
    for k in range(TEMPLATES):
        pipeline, frame = _forest(seed=k)
        directory, _, _ = import_pipeline(pipeline, f"template{k}", root, sample=frame)
        dirs.append(directory)
    return dirs


def _repository(root: Path, templates: Sequence[Path], count: int) -> list[str]:
    """`count` models (version 1 each), hard links to the templates' files."""
    names = [f"model{i:04d}" for i in range(count)]
    for i, name in enumerate(names):
        target = root / name / "1"
        if not target.exists():
            shutil.copytree(templates[i % len(templates)], target, copy_function=os.link)
    return names


def _zipf(count: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1) ** ZIPF_S
    return rng.choice(count, size=draws, p=weights / weights.sum())


def _cpu_seconds(pids: Sequence[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


async def _idle_cpu_percent(pids: Sequence[int], seconds: float = 3.0) -> float:
    """CPU the processes take with no traffic, in % of one core."""
    before, started = _cpu_seconds(pids), time.perf_counter()
    await asyncio.sleep(seconds)
    return 100 * (_cpu_seconds(pids) - before) / (time.perf_counter() - started)


def _rss(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


async def _traffic(
    address: str, models: Sequence[str], picks: np.ndarray, concurrency: int
) -> dict[str, list[float]]:
    """Send one Predict per pick through Envoy; latency (ms) per model. Any failure raises."""
    rows = credit_frame(8, seed=99)[CREDIT_FEATURES].head(1).to_dict(orient="records")
    latencies: dict[str, list[float]] = {m: [] for m in models}
    queue = list(picks[::-1])
    async with aio_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def worker() -> None:
            while queue:
                model = models[queue.pop()]
                started = time.perf_counter()
                await stub.Predict(
                    build_request(model, rows), metadata=[(MODEL_HEADER, model)], timeout=30
                )
                latencies[model].append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def _envoy(work_dir: Path, pool_health_interval_s: float | None = None) -> EnvoyProxy:
    settings = EnvoySettings(
        work_dir=work_dir,
        public_host="127.0.0.1",
        public_port=0,
        control_port=0,
        rate_limit_per_client=None,  # one client sends all the traffic here
    )
    if pool_health_interval_s is not None:
        settings = dataclasses.replace(settings, pool_health_interval_s=pool_health_interval_s)
    proxy = EnvoyProxy(settings)
    await proxy.start()
    return proxy


class OneModelMesh:
    """One model on one dedicated two-replica revision behind its own Envoy (today's layout)."""

    def __init__(self, root: Path, model: str, work: Path) -> None:
        self.model = model
        self.orchestrator = LocalOrchestrator({"model_repository": root, "data_dir": work / "one"})
        self.work = work
        self.proxy: EnvoyProxy | None = None
        self.revision: Revision | None = None

    async def start(self) -> None:
        self.proxy = await _envoy(self.work / "one-envoy")
        self.revision = revision = await self.orchestrator.start(self.model, "1", 2)
        await self.proxy.apply(
            TrafficSplit(self.model, {revision.name: 100}, {revision.name: revision})
        )
        await self.proxy.wait_healthy(revision, 60)

    async def latencies(self, requests: int, concurrency: int) -> list[float]:
        assert self.proxy is not None
        picks = np.zeros(requests, dtype=int)
        took = await _traffic(self.proxy.public_address, [self.model], picks, concurrency)
        return took[self.model]

    def pids(self) -> list[int]:
        assert self.proxy is not None and self.revision is not None
        pids = self.orchestrator.replica_pids(self.revision.name)
        return [*pids, *([self.proxy.pid] if self.proxy.pid else [])]

    def rss(self) -> int:
        return _rss(self.pids())

    async def stop(self) -> None:
        await self.orchestrator.close()
        if self.proxy is not None:
            await self.proxy.stop()


async def _unload(revision: Revision) -> None:
    request = oip_pb.RepositoryModelUnloadRequest(model_name=revision.model)
    for endpoint in revision.endpoints:
        async with aio_channel(endpoint.address) as channel:
            # NOT_FOUND when that member does not hold it: already evicted.
            with contextlib.suppress(grpc.RpcError):
                await oip_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                    request, timeout=10
                )


async def pooled_mesh(
    root: Path,
    names: Sequence[str],
    args: argparse.Namespace,
    work: Path,
    figures: Figures,
    one_model: OneModelMesh,
) -> None:
    count = len(names)
    orchestrator = LocalOrchestrator(
        {
            "model_repository": root,
            "data_dir": work / f"pool-{count}",
            "pool_processes": args.processes,
            "pool_memory_mb": args.pool_memory_mb,
        }
    )
    proxy = await _envoy(work / f"pool-{count}-envoy", args.pool_health_interval_s)
    try:
        started = time.perf_counter()
        semaphore = asyncio.Semaphore(8)

        async def start(name: str) -> Revision:
            async with semaphore:
                return await orchestrator.start(name, "1", 1)

        revisions = await asyncio.gather(*(start(n) for n in names))
        assert all(r.pooled for r in revisions)
        await proxy.apply_all(
            [TrafficSplit(r.model, {r.name: 100}, {r.name: r}) for r in revisions]
        )
        await proxy.wait_healthy(revisions[-1], 60)
        setup_s = time.perf_counter() - started
        pool_pids = orchestrator.replica_pids(revisions[0].name)
        pool_idle_cpu = await _idle_cpu_percent(pool_pids)
        idle_cpu = pool_idle_cpu + await _idle_cpu_percent([proxy.pid] if proxy.pid else [])
        one_idle_cpu = await _idle_cpu_percent(one_model.pids())

        rng = np.random.default_rng(count)
        await _traffic(proxy.public_address, names, _zipf(count, args.requests, rng), 8)
        # Rounds alternate with the one-model mesh, so both see the same machine (shared here).
        hot: list[float] = []
        every: list[float] = []
        baseline: list[float] = []
        for _ in range(args.rounds):
            baseline += await one_model.latencies(args.requests // 4, args.concurrency)
            picks = _zipf(count, args.requests, rng)
            latencies = await _traffic(proxy.public_address, names, picks, args.concurrency)
            hot += latencies[names[0]]
            every += [v for values in latencies.values() for v in values]
        hot_p99, all_p99 = percentile(hot, 0.99), percentile(every, 0.99)
        one_p99 = percentile(baseline, 0.99)
        envoy_rss = _rss([proxy.pid] if proxy.pid else [])
        rss = _rss(pool_pids) + envoy_rss

        cold = []
        for revision in revisions[count // 2 : count // 2 + COLD_SAMPLES]:
            await _unload(revision)  # as the LRU would have

            took = await _traffic(proxy.public_address, [revision.model], np.zeros(1, int), 1)
            cold.append(took[revision.model][0])

        dedicated = one_model.rss() * count  # a two-replica revision (and an Envoy) per version
        print(
            f"  {count} models: setup {setup_s:.1f} s, {len(hot)} hot requests (one-model p99"
            f" {one_p99:.1f} ms over {len(baseline)}),"
            f" Envoy {envoy_rss / MIB:.0f} MiB, pool {_rss(pool_pids) / MIB:.0f} MiB"
            f" ({len(pool_pids)} processes), p99 all models {all_p99:.1f} ms; idle CPU"
            f" {idle_cpu:.1f} % of a core, the pool's {pool_idle_cpu:.1f} % (one-model mesh"
            f" {one_idle_cpu:.1f} %)",
            flush=True,
        )
        figures.add(f"pool_{count}_rss_mib", rss / MIB, "MiB", dedicated / MIB, False)
        figures.add(f"pool_{count}_hot_p99_ms", hot_p99, "ms", one_p99, False)
        figures.add(f"pool_{count}_cold_load_median_ms", median(cold), "ms", hot_p99, False)
        figures.add(f"pool_{count}_cold_load_max_ms", max(cold), "ms", hot_p99, False)
        figures.add(f"pool_{count}_setup_s", setup_s, "s", setup_s, False)
        figures.add(f"pool_{count}_idle_cpu_percent", idle_cpu, "%", one_idle_cpu, False)
        print(
            f"  targets: RSS {'within' if rss <= MEMORY_TARGET_BYTES else 'OVER'} 4 GiB;"
            f" hot p99 {hot_p99 / one_p99:.2f}x the one-model mesh"
            f" ({'within' if hot_p99 <= P99_TARGET_RATIO * one_p99 else 'OVER'} 1.5x)",
            flush=True,
        )
    finally:
        await orchestrator.close()
        await proxy.stop()


async def run(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.models.split(",")]
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="cyclone-pool-scale-") as tmp:
        work = Path(tmp)
        root = work / "models"
        templates = _templates(work / "templates")
        sizes = [(t / "model.onnx").stat().st_size / MIB for t in templates]
        print(f"model files: {', '.join(f'{s:.1f}' for s in sizes)} MiB", flush=True)
        names = _repository(root, templates, max(counts))
        one = OneModelMesh(root, names[0], work)
        try:
            await one.start()
            await one.latencies(args.requests // 4, args.concurrency)  # warm-up
            print(f"one-model mesh: RSS {one.rss() / MIB:.0f} MiB", flush=True)
            for count in counts:
                await pooled_mesh(root, names[:count], args, work, figures, one)
        finally:
            await one.stop()
    figures.emit()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="10,100,500", help="model counts, comma-separated")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternations with one model")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--pool-memory-mb", type=float, default=None, help="default: cyclone up's budget"
    )
    parser.add_argument(
        "--pool-health-interval-s",
        type=float,
        default=None,
        help="how often pooled clusters check a healthy member (default: EnvoySettings')",
    )
    args = parser.parse_args(argv)
    if args.pool_memory_mb is None:
        args.pool_memory_mb = pool_memory_mb(args.processes)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
