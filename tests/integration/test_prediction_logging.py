"""Predictions served by the inference server land in the store: directly, via the disk spool
while the store is down, and exactly once when the store is killed and restarted under load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import psycopg
import pytest
from grpc import aio
from prometheus_client import REGISTRY
from support import eventually, free_port

from cyclone.client import build_request, predictions_from_response
from cyclone.inference.v1 import inference_service_pb2 as inf_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inf_grpc
from cyclone.server import CycloneServer
from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.inference.main import InferenceSettings
from services.launch import start_inference, start_store
from services.store.main import STORE_SERVICE, StoreSettings, open_store
from services.store.servicer import StoreServicer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODEL = "credit"
FEATURES = ["age", "income", "debt_ratio", "city"]


@dataclass(frozen=True)
class Repo:
    root: Path
    frame: pd.DataFrame

    def rows(self, start: int, count: int) -> list[dict[str, Any]]:
        n = len(self.frame)
        return [self.frame.iloc[(start + k) % n][FEATURES].to_dict() for k in range(count)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import credit_frame, credit_pipeline

    root = tmp_path_factory.mktemp("logging-repo")
    frame = credit_frame(200, seed=1)
    import_pipeline(credit_pipeline(frame), MODEL, root, sample=frame)
    return Repo(root, frame)


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(f"cyclone_store_sink_{name}_rows_total") or 0.0


@contextlib.asynccontextmanager
async def store_server(database_url: str, port: int = 0) -> AsyncIterator[CycloneServer]:
    server = (
        await start_store(
            StoreSettings(
                port=port, database_url=database_url, log_level="WARNING", pool_min_size=1
            )
        )
    ).server
    try:
        yield server
    finally:
        await server.stop(0)


@dataclass
class Inference:
    server: CycloneServer
    stub: inf_grpc.InferenceServiceStub
    spool_dir: Path


@contextlib.asynccontextmanager
async def inference_server(
    repo: Repo, store_address: str, spool_dir: Path, **overrides: Any
) -> AsyncIterator[Inference]:
    settings = InferenceSettings(
        model_repository=repo.root,
        port=0,
        store=store_address,
        spool_dir=spool_dir,
        log_flush_interval=0.05,
        log_level="WARNING",
        **overrides,
    )
    started = await start_inference(settings)
    server, port = started.server, started.port
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Inference(server, inf_grpc.InferenceServiceStub(channel), spool_dir)
    finally:
        await server.stop(0)


async def predict(
    inference: Inference, repo: Repo, start: int, count: int
) -> inf_pb.PredictResponse:
    response: inf_pb.PredictResponse = await inference.stub.Predict(
        build_request(MODEL, repo.rows(start, count)), timeout=10
    )
    assert len(response.prediction_ids) == count
    return response


def stored_ids(database_url: str) -> list[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT prediction_id::text FROM predictions WHERE model = %s", (MODEL,)
        ).fetchall()
    return [r[0] for r in rows]


async def count_stored(database_url: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM predictions WHERE model = %s", (MODEL,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


# --- store up ------------------------------------------------------------------------------


async def test_served_predictions_reach_the_store(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    sent_before = counter("sent")
    async with (
        store_server(fresh_database_url) as store,
        inference_server(repo, f"127.0.0.1:{store.port}", tmp_path / "spool") as inference,
        aio.insecure_channel(f"127.0.0.1:{store.port}") as channel,
    ):
        stub = pb_grpc.StoreServiceStub(channel)
        responses = [await predict(inference, repo, start=5 * k, count=5) for k in range(4)]
        expected = {
            p.prediction_id: (row, p)
            for k, response in enumerate(responses)
            for row, p in zip(repo.rows(5 * k, 5), predictions_from_response(response), strict=True)
        }

        async def all_stored() -> bool:
            s = await stub.GetStats(pb.GetStatsRequest(model=MODEL))
            return bool(s.models) and s.models[0].predictions == 20

        await eventually(all_stored, 10, "20 predictions in the store")
        page = await stub.QueryPredictions(pb.QueryPredictionsRequest(model=MODEL, page_size=1000))
        assert sorted(p.prediction_id for p in page.predictions) == sorted(expected)
        for stored in page.predictions:
            row, served = expected[stored.prediction_id]
            assert (stored.model, stored.version) == (MODEL, "1")
            assert json.loads(stored.input_json) == row
            output = json.loads(stored.output_json)
            assert output["label"] == served.label
            assert served.probabilities is not None
            assert output["probabilities"] == pytest.approx(served.probabilities, abs=1e-6)
            assert stored.latency_ms > 0
            assert stored.label_json == ""

        # The served model is in the registry, as the serving version, with its sha256.
        info = await inference.stub.GetModel(inf_pb.GetModelRequest(model=MODEL))

        async def registered() -> bool:
            try:
                got = await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL))
            except aio.AioRpcError:
                return False
            return got.model_version.status == pb.MODEL_STATUS_SERVING

        await eventually(registered, 10, "the model registered as serving")
        mv = (await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL))).model_version
        assert (mv.version, mv.task, mv.sha256) == ("1", "classification", info.model.sha256)
        assert json.loads(mv.schema_json)["class_labels"] == ["0", "1"]

        # The model is registered, so labels for what was served are accepted and join.
        first = next(iter(expected))
        added = await stub.AddLabels(
            pb.AddLabelsRequest(model=MODEL, labels=[pb.Label(prediction_id=first, text="1")])
        )
        assert (added.stored, list(added.unmatched_prediction_ids)) == (1, [])
    assert counter("sent") - sent_before >= 20
    assert not list((tmp_path / "spool").glob("*.batch"))


class SlowStore(StoreServicer):
    """Takes its time before every LogPredictions, so a send is in flight when we stop."""

    def __init__(self, store: Any) -> None:
        super().__init__(store)
        self.receiving = asyncio.Event()

    async def LogPredictions(
        self, request_iterator: Any, context: Any
    ) -> pb.LogPredictionsResponse:
        self.receiving.set()
        await asyncio.sleep(0.6)
        return await super().LogPredictions(request_iterator, context)


async def test_stopping_the_inference_server_finishes_an_inflight_send(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    db, _ = await open_store(settings)
    store = CycloneServer("store", settings)
    slow = SlowStore(db)
    store.add_service(STORE_SERVICE, lambda s: pb_grpc.add_StoreServiceServicer_to_server(slow, s))
    store.on_shutdown(db.close)
    await store.start()
    try:
        async with inference_server(
            repo, f"127.0.0.1:{store.port}", tmp_path / "spool"
        ) as inference:
            served = (await predict(inference, repo, start=0, count=10)).prediction_ids
            # Stop once the batch is in flight: the store is still sleeping on it.
            await asyncio.wait_for(slow.receiving.wait(), 10)
        # Stopped: what was answered is in the store (or, failing that, in the spool).
        stored = await count_stored(fresh_database_url)
        spooled = [
            r.prediction_id
            for f in sorted((tmp_path / "spool").glob("*.batch"))
            for r in pb.LogPredictionsRequest.FromString(f.read_bytes()).records
        ]
        assert stored + len(spooled) == len(served) == 10
        assert stored == 10
    finally:
        await store.stop(0)


# --- store down: spool, replay, bound --------------------------------------------------------


async def test_spooled_while_store_down_then_replayed_in_order(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    spool_dir = tmp_path / "spool"
    spooled_before, replayed_before = counter("spooled"), counter("replayed")
    async with inference_server(repo, f"127.0.0.1:{port}", spool_dir) as inference:
        served: list[str] = []
        for k in range(6):
            response = await predict(inference, repo, start=3 * k, count=3)
            served.extend(response.prediction_ids)
            await asyncio.sleep(0.08)  # separate flushes: several batches in the spool

        async def all_spooled() -> bool:
            return counter("spooled") - spooled_before == 18

        await eventually(all_spooled, 10, "18 spooled predictions")
        files = sorted(spool_dir.glob("*.batch"))
        assert len(files) >= 2
        spooled = [
            r.prediction_id
            for f in files
            for r in pb.LogPredictionsRequest.FromString(f.read_bytes()).records
        ]
        assert spooled == served  # in serving order, nothing twice
        assert counter("replayed") == replayed_before

        async with store_server(fresh_database_url, port=port):

            async def all_stored() -> bool:
                return await count_stored(fresh_database_url) == 18

            await eventually(all_stored, 15, "the spool replayed into the store")
            # Served after the store came back: goes straight through behind the replay.
            late = await predict(inference, repo, start=50, count=2)

            async def late_stored() -> bool:
                return await count_stored(fresh_database_url) == 20

            await eventually(late_stored, 10, "the late predictions stored")

    ids = stored_ids(fresh_database_url)
    assert sorted(ids) == sorted([*served, *late.prediction_ids])
    assert len(ids) == len(set(ids)) == 20
    assert counter("replayed") - replayed_before == 18
    assert not list(spool_dir.glob("*.batch"))
    # Replayed in order: each batch is one transaction, so transaction ids follow the replay order.
    with psycopg.connect(fresh_database_url) as conn:
        rows = conn.execute(
            "SELECT prediction_id::text, xmin::text::bigint FROM predictions WHERE model = %s",
            (MODEL,),
        ).fetchall()
    xmin = dict(rows)
    order = [xmin[i] for i in served]
    assert order == sorted(order)
    assert len(set(order)) >= 2


async def test_full_spool_drops_but_serving_goes_on(repo: Repo, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    dropped_before, spooled_before = counter("dropped"), counter("spooled")
    async with inference_server(
        repo, f"127.0.0.1:{free_port()}", spool_dir, spool_max_bytes=64
    ) as inference:
        for k in range(3):
            response = await predict(inference, repo, start=4 * k, count=4)
            assert all(label in ("0", "1") for label in response.labels)
            await asyncio.sleep(0.08)

        async def all_dropped() -> bool:
            return counter("dropped") - dropped_before == 12

        await eventually(all_dropped, 10, "12 dropped predictions")
        assert counter("spooled") == spooled_before
        assert not list(spool_dir.glob("*.batch"))
        # Still serving.
        await predict(inference, repo, start=0, count=1)


# --- a batch the store refuses for good: quarantined, not retried, not lost -----------------------


class RejectingStore(StoreServicer):
    """Refuses the first `reject` LogPredictions calls as INVALID_ARGUMENT (a poison batch)."""

    def __init__(self, store: Any, reject: int) -> None:
        super().__init__(store)
        self.reject = reject

    async def LogPredictions(
        self, request_iterator: Any, context: Any
    ) -> pb.LogPredictionsResponse:
        if self.reject > 0:
            self.reject -= 1
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "records[0].input_json: not a JSON object"
            )
        return await super().LogPredictions(request_iterator, context)


@contextlib.asynccontextmanager
async def rejecting_store(
    database_url: str, reject: int, port: int = 0
) -> AsyncIterator[CycloneServer]:
    settings = StoreSettings(
        port=port, database_url=database_url, log_level="WARNING", pool_min_size=1
    )
    db, _ = await open_store(settings)
    store = CycloneServer("store", settings)
    store.add_service(
        STORE_SERVICE,
        lambda s: pb_grpc.add_StoreServiceServicer_to_server(RejectingStore(db, reject), s),
    )
    store.on_shutdown(db.close)
    await store.start()
    try:
        yield store
    finally:
        await store.stop(0)


def batch_ids(directory: Path) -> list[str]:
    return [
        r.prediction_id
        for f in sorted(directory.glob("*.batch"))
        for r in pb.LogPredictionsRequest.FromString(f.read_bytes()).records
    ]


async def test_a_rejected_batch_is_quarantined_and_the_next_one_goes_through(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    before = {name: counter(name) for name in ("rejected", "dropped", "sent", "spooled")}
    async with (
        rejecting_store(fresh_database_url, reject=1) as store,
        inference_server(repo, f"127.0.0.1:{store.port}", spool_dir) as inference,
    ):
        poisoned = list((await predict(inference, repo, start=0, count=4)).prediction_ids)

        async def rejected() -> bool:
            return counter("rejected") - before["rejected"] == 4

        await eventually(rejected, 10, "4 rejected predictions")
        # Kept for an operator, under its own reason: not "spool full", not sent, not retried.
        assert batch_ids(spool_dir / "rejected") == poisoned
        assert counter("dropped") == before["dropped"]
        assert counter("sent") == before["sent"]
        assert counter("spooled") == before["spooled"]
        assert not list(spool_dir.glob("*.batch"))

        # The poison batch blocks nothing behind it.
        later = list((await predict(inference, repo, start=10, count=3)).prediction_ids)

        async def later_stored() -> bool:
            return await count_stored(fresh_database_url) == 3

        await eventually(later_stored, 10, "the next batch stored")
    assert sorted(stored_ids(fresh_database_url)) == sorted(later)
    assert counter("sent") - before["sent"] == 3
    assert batch_ids(spool_dir / "rejected") == poisoned


async def test_a_spooled_batch_rejected_on_replay_is_quarantined(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    spool_dir = tmp_path / "spool"
    spooled_before, replayed_before = counter("spooled"), counter("replayed")
    rejected_before = counter("rejected")
    async with inference_server(repo, f"127.0.0.1:{port}", spool_dir) as inference:
        first = list((await predict(inference, repo, start=0, count=2)).prediction_ids)

        async def first_spooled() -> bool:
            return counter("spooled") - spooled_before == 2

        await eventually(first_spooled, 10, "the first batch spooled")
        second = list((await predict(inference, repo, start=5, count=3)).prediction_ids)

        async def both_spooled() -> bool:
            return counter("spooled") - spooled_before == 5

        await eventually(both_spooled, 10, "the second batch spooled")
        assert batch_ids(spool_dir) == first + second

        # The store comes back and refuses the oldest batch: it leaves the spool for the
        # quarantine and the replay carries on with the next one.
        async with rejecting_store(fresh_database_url, reject=1, port=port):

            async def replayed() -> bool:
                return await count_stored(fresh_database_url) == 3

            await eventually(replayed, 15, "the second batch replayed")
    assert sorted(stored_ids(fresh_database_url)) == sorted(second)
    assert batch_ids(spool_dir / "rejected") == first
    assert not list(spool_dir.glob("*.batch"))
    assert counter("rejected") - rejected_before == 2
    assert counter("replayed") - replayed_before == 3


async def test_a_full_quarantine_drops_the_rejected_batch(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    rejected_before, dropped_before = counter("rejected"), counter("dropped")
    async with (
        rejecting_store(fresh_database_url, reject=1) as store,
        inference_server(
            repo, f"127.0.0.1:{store.port}", spool_dir, spool_max_bytes=64
        ) as inference,
    ):
        await predict(inference, repo, start=0, count=4)

        async def dropped() -> bool:
            return counter("dropped") - dropped_before == 4

        await eventually(dropped, 10, "the rejected batch dropped")
        assert counter("rejected") - rejected_before == 4
        assert not list((spool_dir / "rejected").glob("*.batch"))
        await predict(inference, repo, start=0, count=1)  # still serving


# --- the store killed and restarted under load -------------------------------------------------


class StoreProcess:
    """`python -m cyclone_app serve store` on a fixed port, as an operator would run it."""

    def __init__(self, port: int, database_url: str, log_dir: Path) -> None:
        self.port = port
        self.database_url = database_url
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"store-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cyclone",
                "serve",
                "store",
                "--port",
                str(self.port),
                "--database-url",
                self.database_url,
                "--metrics-port",
                "-1",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        self.procs.append(proc)
        return proc

    async def ready(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        async with aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.StoreServiceStub(channel)
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"store exited:\n{self.log()}")
                try:
                    await stub.GetStats(pb.GetStatsRequest(), timeout=1)
                    return
                except aio.AioRpcError as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"store not ready ({exc.code()}):\n{self.log()}"
                        ) from None
                await asyncio.sleep(0.05)

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.log_dir.glob("store-*.log"))
        )

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def store_process(fresh_database_url: str, tmp_path: Path) -> Any:
    store = StoreProcess(free_port(), fresh_database_url, tmp_path)
    try:
        yield store
    finally:
        store.stop_all()


async def test_store_killed_and_restarted_under_load_loses_nothing(
    repo: Repo, store_process: StoreProcess, fresh_database_url: str, tmp_path: Path
) -> None:
    first = store_process.start()
    await store_process.ready(first)
    spooled_before = counter("spooled")
    answered: list[str] = []
    during_outage = 0
    outage = asyncio.Event()
    stop = asyncio.Event()

    async with inference_server(
        repo, f"127.0.0.1:{store_process.port}", tmp_path / "spool"
    ) as inference:

        async def worker(w: int) -> None:
            nonlocal during_outage
            k = 0
            while not stop.is_set():
                response = await predict(inference, repo, start=w * 37 + k, count=1 + k % 3)
                answered.extend(response.prediction_ids)
                if outage.is_set():
                    during_outage += len(response.prediction_ids)
                k += 1

        workers = [asyncio.create_task(worker(w)) for w in range(4)]
        try:
            await asyncio.sleep(1.5)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait)
            outage.set()
            await asyncio.sleep(1.0)
            second = store_process.start()
            await store_process.ready(second)
            outage.clear()
            await asyncio.sleep(1.5)  # keep serving with the store back (replay + live traffic)
        finally:
            stop.set()
            await asyncio.gather(*workers)

        assert first.returncode == -signal.SIGKILL
        assert during_outage > 0
        assert counter("spooled") - spooled_before > 0

        async def all_stored() -> bool:
            return await count_stored(fresh_database_url) >= len(answered)

        await eventually(all_stored, 20, f"{len(answered)} predictions in the store")
        # The positive control: one more call, logged behind everything the sink still held
        # (the spool replays first, batches go in serving order); once it is stored, a
        # duplicate or a stray from before would be stored too.
        answered.extend((await predict(inference, repo, start=0, count=1)).prediction_ids)

        async def last_stored() -> bool:
            return answered[-1] in stored_ids(fresh_database_url)

        await eventually(last_stored, 20, "the last prediction in the store")

    ids = stored_ids(fresh_database_url)
    assert len(answered) > 100
    assert len(set(answered)) == len(answered)
    assert len(ids) == len(answered), "duplicates or strays in the store"
    assert set(ids) == set(answered)
    assert not list((tmp_path / "spool").glob("*.batch"))
    assert second.poll() is None


async def test_an_inference_process_killed_before_its_flush_loses_nothing(
    repo: Repo, fresh_database_url: str, tmp_path: Path
) -> None:
    """Answered, then SIGKILLed before the batch left (a flush every minute): the process that
    restarts on the same spool logs every answered prediction, once."""
    port = free_port()
    command = [
        sys.executable, "-m", "cyclone_app", "serve", "inference",
        "--model-repository", str(repo.root), "--port", str(port), "--metrics-port", "-1",
        "--spool-dir", str(tmp_path / "spool"),
    ]  # fmt: skip
    env = {**os.environ, "CYCLONE_LOG_FLUSH_INTERVAL": "60", "CYCLONE_LOG_LEVEL": "WARNING"}
    async with store_server(fresh_database_url) as store:
        command += ["--store", f"127.0.0.1:{store.port}"]
        log = (tmp_path / "inference.log").open("ab")
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        second: subprocess.Popen[bytes] | None = None
        try:
            answered: list[str] = []
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = inf_grpc.InferenceServiceStub(channel)

                async def serving() -> bool:
                    try:
                        await stub.Predict(build_request(MODEL, repo.rows(0, 1)), timeout=2)
                    except aio.AioRpcError:
                        return False
                    return True

                await eventually(serving, 60, "the inference server")
                warm = await count_stored(fresh_database_url)
                for k in range(40):
                    rows = repo.rows(k * 3, 1 + k % 4)
                    rows[0]["city"] = None  # a missing category travels through the journal too
                    request = build_request(MODEL, rows, "", {"city"})
                    response = await stub.Predict(request, timeout=10)
                    answered.extend(response.prediction_ids)
            assert await count_stored(fresh_database_url) == warm  # nothing flushed yet
            first.send_signal(signal.SIGKILL)
            first.wait(10)

            second = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

            async def all_stored() -> bool:
                return set(answered) <= set(stored_ids(fresh_database_url))

            await eventually(all_stored, 60, f"{len(answered)} answered predictions stored")
        finally:
            for process in (first, second):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait(10)
            log.close()
    ids = stored_ids(fresh_database_url)
    assert len(ids) == len(set(ids)), "a replayed journal stored a prediction twice"
    with psycopg.connect(fresh_database_url) as conn:
        row = conn.execute(
            "SELECT input, output FROM predictions WHERE prediction_id = %s", (answered[0],)
        ).fetchone()
    assert row is not None and row[0]["city"] in ("", None) and "label" in row[1]
