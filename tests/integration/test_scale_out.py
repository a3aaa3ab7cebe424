"""Two stores and two monitors over one database, one of each killed under load.

Real processes through the launcher (stores and monitors), a real Envoy in front of the stores
(its control listener, as `cyclone up --stores 2` runs it), a real inference server logging
through it, and a client labelling through it. Store 1 and monitor 1 are killed (SIGKILL) while
predictions, labels and evaluations go on. Then:

- nothing lost: every answered prediction and every acknowledged label is stored, once;
- nothing doubled: no model evaluated twice within its schedule, no alert delivered twice;
- the surviving monitor holds every model within the lease time of the kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc import aio
from psycopg.types.json import Jsonb
from support import eventually

from bench.monitor_scale import register_models
from cyclone.client import build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as inf_grpc
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.traffic import Endpoint
from services.inference.main import InferenceSettings
from services.launch import Spawned, free_port, spawn, start_inference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "credit"
FEATURES = ["age", "income", "debt_ratio", "city"]
# Models only the monitors see (registered, no traffic): enough to split between two.
WATCHED = [f"watched-{i}" for i in range(6)]
EVERY_SECONDS = 2
LEASE_SECONDS = 3
TICK_SECONDS = 0.25
ENTRY = store_pb.ModelVersion(
    task="classification",
    schema_json='{"task": "classification", "features": [{"name": "x", "kind": "numeric"}],'
    ' "class_labels": ["0", "1"]}',
)


@pytest.fixture(scope="module")
def credit_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import credit_frame, credit_pipeline

    root = tmp_path_factory.mktemp("scale-out-repo")
    frame = credit_frame(200, seed=3)
    import_pipeline(credit_pipeline(frame), MODEL, root, sample=frame)
    rows: list[dict[str, Any]] = frame[FEATURES].to_dict(orient="records")
    return root, rows


@contextlib.contextmanager
def _processes() -> Iterator[list[Spawned]]:
    running: list[Spawned] = []
    try:
        yield running
    finally:
        for process in running:
            process.stop(10)


def _spawn_all(jobs: list[tuple[str, list[str], Path, int, dict[str, str]]]) -> list[Spawned]:
    """Start processes side by side (each waits for its own health): start-up in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [
            pool.submit(spawn, component, args, log, port=port, env=env, timeout=90)
            for component, args, log, port, env in jobs
        ]
        return [f.result() for f in futures]


@contextlib.asynccontextmanager
async def _envoy(tmp_path: Path, stores: list[int]) -> AsyncIterator[EnvoyProxy]:
    proxy = EnvoyProxy(
        EnvoySettings(
            work_dir=tmp_path / "envoy",
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            concurrency=1,
            health_interval_s=0.25,
            store=Endpoint("127.0.0.1", stores[0]),
            extra_stores=tuple(Endpoint("127.0.0.1", p) for p in stores[1:]),
        )
    )
    async with proxy:
        yield proxy


async def _query(url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return list(await cur.fetchall())


async def _insert_alerts(url: str, n: int, record_path: Path) -> None:
    target = {"action": "notify", "sink": "record", "config": {"path": str(record_path)}}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for _ in range(n):
            await conn.execute(
                "INSERT INTO alerts (model, version, level, previous_level, reasons, actions)"
                " VALUES (%s, '1', 'RED', 'GREEN', %s, %s)",
                (WATCHED[0], Jsonb(["test"]), Jsonb([target])),
            )


def _delivered(record_path: Path) -> list[str]:
    if not record_path.exists():
        return []
    lines = record_path.read_text().splitlines()
    return [str(json.loads(line)["id"]) for line in lines if line.strip()]


async def test_two_stores_and_two_monitors_survive_losing_one_of_each(
    credit_repo: tuple[Path, list[dict[str, Any]]], fresh_database_url: str, tmp_path: Path
) -> None:
    repo, rows = credit_repo
    url = fresh_database_url
    record_path = tmp_path / "alerts.jsonl"
    store_ports = [free_port(), free_port()]
    store_args = ["--database-url", url, "--metrics-port", "-1", "--data-dir", str(tmp_path)]
    with _processes() as running:
        stores = _spawn_all(
            [
                ("store", store_args, tmp_path / f"store-{i}.log", port, {})
                for i, port in enumerate(store_ports, 1)
            ]
        )
        running.extend(stores)
        async with _envoy(tmp_path, store_ports) as envoy:
            control = envoy.control_address
            async with aio.insecure_channel(control) as channel:
                store = store_grpc.StoreServiceStub(channel)
                await register_models(store, ENTRY, WATCHED, every_seconds=EVERY_SECONDS)

                def monitor_env(name: str) -> dict[str, str]:
                    return {
                        "CYCLONE_INSTANCE_ID": name,
                        "CYCLONE_LEASE_SECONDS": str(LEASE_SECONDS),
                        "CYCLONE_TICK_SECONDS": str(TICK_SECONDS),
                        "CYCLONE_ALERT_INTERVAL": "0.1",
                        "CYCLONE_ALERT_LEASE_SECONDS": "4",
                    }

                monitor_args = ["--store", control, "--metrics-port", "-1"]
                monitors = _spawn_all(
                    [
                        (
                            "monitor",
                            [*monitor_args, "--data-dir", str(tmp_path / name)],
                            tmp_path / f"{name}.log",
                            free_port(),
                            monitor_env(name),
                        )
                        for name in ("m1", "m2")
                    ]
                )
                running.extend(monitors)

                async def shared() -> bool:
                    holders = await _query(
                        url, "SELECT DISTINCT holder FROM model_leases WHERE model LIKE 'w%'"
                    )
                    return {h for (h,) in holders} == {"m1", "m2"}

                await eventually(shared, 20, "both monitors hold some of the models")

                settings = InferenceSettings(
                    model_repository=repo,
                    port=0,
                    store=control,
                    spool_dir=tmp_path / "spool",
                    log_flush_interval=0.05,
                    log_level="WARNING",
                )
                inference = await start_inference(settings)
                answered: list[str] = []
                labelled: set[str] = set()
                stop = asyncio.Event()
                try:
                    async with aio.insecure_channel(f"127.0.0.1:{inference.port}") as inf:
                        predictor = inf_grpc.InferenceServiceStub(inf)

                        async def predict_and_label(w: int) -> None:
                            k = 0
                            while not stop.is_set():
                                batch = [rows[(w * 31 + k + j) % len(rows)] for j in range(2)]
                                response = await predictor.Predict(
                                    build_request(MODEL, batch), timeout=10
                                )
                                answered.extend(response.prediction_ids)
                                await _label(store, list(response.prediction_ids), stop)
                                labelled.update(response.prediction_ids)
                                k += 1

                        await _insert_alerts(url, 10, record_path)
                        workers = [asyncio.create_task(predict_and_label(w)) for w in range(3)]
                        try:

                            async def first_alerts_out() -> bool:
                                return len(_delivered(record_path)) >= 10

                            await eventually(first_alerts_out, 15, "the first alerts delivered")
                            await asyncio.sleep(1.0)
                            # Kill one of each under load.
                            stores[0].process.send_signal(signal.SIGKILL)
                            monitors[0].process.send_signal(signal.SIGKILL)
                            killed_at = time.monotonic()
                            await _insert_alerts(url, 10, record_path)

                            async def survivor_holds_all() -> bool:
                                held = await _query(
                                    url,
                                    "SELECT count(*) FROM model_leases"
                                    " WHERE holder = 'm2' AND expires_at > now()",
                                )
                                return held[0][0] == len(WATCHED) + 1  # + credit

                            await eventually(
                                survivor_holds_all, 20, "the survivor holds every model"
                            )
                            takeover = time.monotonic() - killed_at
                            await asyncio.sleep(2 * EVERY_SECONDS)  # evaluations go on
                        finally:
                            stop.set()
                            await asyncio.gather(*workers)
                finally:
                    await inference.server.stop(5)

                assert takeover <= LEASE_SECONDS + 2, takeover
                assert stores[0].process.wait(5) == -signal.SIGKILL
                assert monitors[0].process.wait(5) == -signal.SIGKILL
                assert len(answered) > 50

                # Nothing lost, nothing doubled: predictions and labels.
                async def all_stored() -> bool:
                    found = await _query(
                        url, "SELECT count(*) FROM predictions WHERE model = %s", (MODEL,)
                    )
                    return int(found[0][0]) >= len(answered)

                await eventually(all_stored, 20, f"{len(answered)} predictions stored")
                stored = await _query(
                    url,
                    "SELECT prediction_id::text, count(*) FROM predictions WHERE model = %s"
                    " GROUP BY 1",
                    (MODEL,),
                )
                assert {pid for pid, _ in stored} == set(answered)
                assert all(count == 1 for _, count in stored)
                labels = await _query(
                    url, "SELECT prediction_id::text FROM labels WHERE model = %s", (MODEL,)
                )
                assert {pid for (pid,) in labels} == labelled

                # Alerts: every one delivered, none twice, although both monitors dispatched.
                async def all_delivered() -> bool:
                    return len(_delivered(record_path)) >= 20

                await eventually(all_delivered, 15, "every alert delivered")
                delivered = _delivered(record_path)
                assert len(delivered) == len(set(delivered)) == 20

                # Evaluations: every watched model evaluated on its schedule, never twice in
                # one schedule window (a second monitor evaluating it would be ~0 s apart).
                points = await _query(
                    url,
                    "SELECT model, created_at FROM metric_points WHERE metric = 'level'"
                    " AND model LIKE 'watched-%' ORDER BY model, created_at",
                )
                by_model: dict[str, list[float]] = {}
                for model, at in points:
                    by_model.setdefault(model, []).append(at.timestamp())
                assert sorted(by_model) == WATCHED
                for model, times in by_model.items():
                    gaps = [b - a for a, b in itertools.pairwise(times)]
                    assert len(times) >= 3, (model, times)
                    assert min(gaps) >= EVERY_SECONDS / 2, (model, gaps)


async def _label(store: store_grpc.StoreServiceStub, ids: list[str], stop: asyncio.Event) -> None:
    """Label `ids` through Envoy, retrying as a client does when a call fails."""
    request = store_pb.AddLabelsRequest(
        model=MODEL,
        labels=[store_pb.Label(prediction_id=i, text="1") for i in ids],
    )
    for _ in range(50):
        try:
            await store.AddLabels(request, timeout=5)
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"labels of {ids} never stored")
