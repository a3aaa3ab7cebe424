"""Rollouts through a real Envoy under a steady load: zero failed requests is the bar.

One mesh for the module: the store (embedded PostgreSQL), Envoy, the local orchestrator
running `credit` revisions as `cyclone serve inference` subprocesses, and the rollout
controller. Four clients (two gRPC with the `cyclone-model` header, two REST through the JSON
transcoder) send predictions through Envoy the whole time. Each scenario rolls the serving
version to a fresh copy of version 2 (imported from a differently-seeded pipeline) and checks:
no failed request while it ran, the final split in Envoy, the versions' statuses in the store,
and every recorded step with its numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from cyclone.channels import aio_channel, sync_channel
from cyclone.client import MODEL_HEADER, build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.convert import import_pipeline
from cyclone.models.repository import ModelRepository, sha256_of
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.rollout_plan import parse_rollout
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.traffic import Revision, TrafficSplit, revision_name
from cyclone_app.examples import credit_frame, credit_pipeline
from plugins.orchestrator_local import LocalOrchestrator
from services.launch import Started, start_store
from services.store.main import StoreSettings
from services.trainer.rollout import ControllerSettings, Rollout, RolloutController, RolloutState
from services.trainer.rollout.smoke import ProbeSmokeTester
from services.trainer.rollout.store_gateway import StoreGateway
from tests.conftest import CREDIT, ModelRepo

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.asyncio(loop_scope="module"),
]

CLIENTS_PER_API = 3
RATE_PER_CLIENT = 80.0  # requests per second each client aims at
TOTAL_AT_LEAST = 10_000
ROWS = [
    {"age": 41.0, "income": 52000.0, "debt_ratio": 0.31, "city": "porto"},
    {"age": 23.0, "income": 18000.0, "debt_ratio": 0.62, "city": "lisbon"},
    {"age": 67.0, "income": 91000.0, "debt_ratio": 0.05, "city": "braga"},
]
TOTALS: Counter[str] = Counter()  # scenario -> requests, for the module's 10k bar


# ---- the load ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Tally:
    requests: int = 0
    by_version: Counter[str] = dataclasses.field(default_factory=Counter)
    by_api: Counter[str] = dataclasses.field(default_factory=Counter)
    failures: list[str] = dataclasses.field(default_factory=list)

    def minus(self, earlier: Tally) -> Tally:
        return Tally(
            self.requests - earlier.requests,
            self.by_version - earlier.by_version,
            self.by_api - earlier.by_api,
            self.failures[len(earlier.failures) :],
        )


class Load:
    """Paced clients in threads (the test's event loop stays free for the controller)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.tally = Tally()
        self.threads = [
            threading.Thread(target=self._run, args=(api, i), daemon=True)
            for api in ("grpc", "rest")
            for i in range(CLIENTS_PER_API)
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(15)

    def snapshot(self) -> Tally:
        with self.lock:
            t = self.tally
            return Tally(t.requests, Counter(t.by_version), Counter(t.by_api), list(t.failures))

    def _record(self, api: str, version: str | None, failure: str | None) -> None:
        with self.lock:
            self.tally.requests += 1
            self.tally.by_api[api] += 1
            if failure is not None:
                self.tally.failures.append(f"{api}: {failure}")
            elif version is not None:
                self.tally.by_version[version] += 1

    def _run(self, api: str, index: int) -> None:
        call = self._grpc_caller() if api == "grpc" else self._rest_caller()
        period, next_at, i = 1 / RATE_PER_CLIENT, time.monotonic(), index
        while not self.stopping.is_set():
            row = ROWS[i % len(ROWS)]
            i += 1
            try:
                self._record(api, call(row), None)
            except Exception as exc:  # every failure is counted, none is fatal
                self._record(api, None, f"{type(exc).__name__}: {exc}"[:300])
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()

    def _grpc_caller(self) -> Any:
        channel = sync_channel(self.address)
        stub = inference_grpc.InferenceServiceStub(channel)
        metadata = ((MODEL_HEADER, CREDIT),)

        def call(row: dict[str, Any]) -> str:
            reply = stub.Predict(build_request(CREDIT, [row]), metadata=metadata, timeout=10)
            return str(reply.version)

        return call

    def _rest_caller(self) -> Any:
        host, port = self.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"content-type": "application/json"}

        def call(row: dict[str, Any]) -> str:
            features = {
                k: {"strings": [v]} if isinstance(v, str) else {"numbers": [v]}
                for k, v in row.items()
            }
            body = json.dumps({"features": features})
            conn.request("POST", f"/v1/models/{CREDIT}:predict", body, headers)
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
            return str(json.loads(payload)["version"])

        return call


# ---- the mesh ---------------------------------------------------------------------------------


class FreezingOrchestrator:
    """The local orchestrator, except that versions in `freeze` stop answering (SIGSTOP) right
    after they started: their processes live, but Envoy's health checks time out."""

    def __init__(self, inner: LocalOrchestrator) -> None:
        self.inner = inner
        self.freeze: set[str] = set()
        self.frozen: dict[str, list[int]] = {}

    async def start(self, model: str, version: str, replicas: int) -> Revision:
        revision = await self.inner.start(model, version, replicas)
        if version in self.freeze and revision.name not in self.frozen:
            pids = self.inner.replica_pids(revision.name)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            self.frozen[revision.name] = pids
        return revision

    async def stop(self, revision_name: str) -> None:
        for pid in self.frozen.pop(revision_name, []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        await self.inner.stop(revision_name)

    async def running(self) -> Sequence[Revision]:
        return await self.inner.running()


@dataclasses.dataclass
class Mesh:
    repo: Path
    store: Started[Any]
    store_stub: store_grpc.StoreServiceStub
    envoy: EnvoyProxy
    orchestrator: FreezingOrchestrator
    controller: RolloutController
    load: Load
    next_version: int = 3

    async def new_version(self) -> str:
        """A fresh copy of version 2 (a different model from version 1), registered staged."""
        version = str(self.next_version)
        self.next_version += 1
        shutil.copytree(self.repo / CREDIT / "2", self.repo / CREDIT / version)
        files = ModelRepository(self.repo).files(CREDIT, version)
        await self.store_stub.RegisterModelVersion(
            store_pb.RegisterModelVersionRequest(
                model_version=store_pb.ModelVersion(
                    model=CREDIT,
                    version=version,
                    task="classification",
                    sha256=sha256_of(files.onnx_path),
                    artifact_uri=str(files.directory),
                    schema_json=json.dumps(files.read_schema().to_dict()),
                )
            ),
            timeout=10,
        )
        return version

    async def set_rollout(self, **rollout: Any) -> None:
        plan = dataclasses.replace(
            default_plan(CREDIT, "classification"), rollout=parse_rollout(rollout)
        )
        await self.store_stub.SavePlan(
            store_pb.SavePlanRequest(model=CREDIT, plan_yaml=plan_to_yaml(plan)), timeout=10
        )

    async def statuses(self) -> dict[str, str]:
        reply = await self.store_stub.ListModelVersions(
            store_pb.ListModelVersionsRequest(model=CREDIT), timeout=10
        )
        names = {
            v: k.removeprefix("MODEL_STATUS_").lower() for k, v in store_pb.ModelStatus.items()
        }
        return {v.version: names[v.status] for v in reply.model_versions}

    async def serving(self) -> str:
        return next(v for v, s in (await self.statuses()).items() if s == "serving")

    async def recorded(self, rollout_id: str) -> Rollout:
        """The rollout as the store has it (not the controller's copy)."""
        found = await StoreGateway(self.store.address).get(rollout_id)
        assert found is not None
        return found

    async def answers_now(self, n: int = 30) -> Counter[str]:
        """Which versions answer through Envoy right now."""
        async with aio_channel(self.envoy.public_address) as channel:
            stub = inference_grpc.InferenceServiceStub(channel)
            seen: Counter[str] = Counter()
            for i in range(n):
                reply = await stub.Predict(
                    build_request(CREDIT, [ROWS[i % len(ROWS)]]),
                    metadata=((MODEL_HEADER, CREDIT),),
                    timeout=10,
                )
                seen[reply.version] += 1
            return seen

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[list[Tally]]:
        """The load seen while the block ran; asserts there was some and none of it failed."""
        before = self.load.snapshot()
        out: list[Tally] = []
        yield out
        seen = self.load.snapshot().minus(before)
        TOTALS[name] = seen.requests
        out.append(seen)
        assert seen.requests > 0 and seen.by_api["grpc"] > 0 and seen.by_api["rest"] > 0
        assert seen.failures == [], f"{len(seen.failures)} failed requests: {seen.failures[:5]}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(
    model_repo: ModelRepo, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    work = tmp_path_factory.mktemp("rollouts")
    repo = model_repo.copy_to(work / "models")
    frame = credit_frame(400, seed=1)
    import_pipeline(credit_pipeline(frame), CREDIT, repo, version="2", sample=frame)
    # Not under pytest's basetemp: the embedded server runs as another user (see
    # tests/integration/conftest.py).
    store_dir = Path(tempfile.mkdtemp(prefix="cyclone-e2e-store-"))
    store = await start_store(
        StoreSettings(port=0, data_dir=store_dir, embedded_fast_unsafe=True, log_level="WARNING")
    )
    inner = LocalOrchestrator(
        {
            "model_repository": repo,
            "store": store.address,
            "data_dir": work / "orchestrator",
            "grace_seconds": 5,
            "extra_args": ["--data-dir", str(work / "inference")],
        }
    )
    orchestrator = FreezingOrchestrator(inner)
    envoy = EnvoyProxy(
        EnvoySettings(
            work_dir=work / "envoy",
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            concurrency=1,
            health_interval_s=0.5,
            drain_timeout_s=5,
        )
    )
    gateway = StoreGateway(store.address)
    controller = RolloutController(
        orchestrator, envoy, gateway, ControllerSettings(), smoke=ProbeSmokeTester(repo)
    )
    channel = aio_channel(store.address)
    try:
        await envoy.start()
        first = await orchestrator.start(CREDIT, "1", 1)
        await envoy.apply(TrafficSplit(CREDIT, {first.name: 100}, {first.name: first}))
        await envoy.wait_healthy(first, 20)
        mesh = Mesh(
            repo,
            store,
            store_grpc.StoreServiceStub(channel),
            envoy,
            orchestrator,
            controller,
            Load(envoy.public_address),
        )
        for _ in range(100):  # the revision registers version 1 as serving
            if (await mesh.statuses()).get("1") == "serving":
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("version 1 was never registered as serving")
        await controller.start_up()
        with mesh.load:
            yield mesh
    finally:
        await controller.close()
        await gateway.close()
        await inner.close()
        await envoy.stop()
        await channel.close()
        await store.stop()
        shutil.rmtree(store_dir, ignore_errors=True)


FAST: dict[str, Any] = {
    "interval": "500ms",
    "step_duration": "1s",
    "min_requests": 20,
    "deadline": "3s",
    "health_timeout": "20s",
    "drain": "2s",
    # p99 over one-second windows of a process started seconds ago, on a small machine shared
    # with the load generator: 2-4x spikes against the warm champion are noise here (the
    # latency check itself is covered by the unit tests).
    "analysis": {"max_p99_latency_ratio": 10.0},
}


def decisions(rollout: Rollout) -> list[str]:
    return [s.decision for s in rollout.steps]


def step(rollout: Rollout, decision: str) -> Any:
    return next(s for s in rollout.steps if s.decision == decision)


async def finish(mesh: Mesh, rollout: Rollout, timeout: float = 60) -> Rollout:
    await mesh.controller.wait(rollout.id, timeout)
    return await mesh.recorded(rollout.id)


async def assert_promoted(mesh: Mesh, recorded: Rollout, old: str, new: str) -> None:
    """The new version serves alone: in the store, in Envoy; the old one is retired and stopped."""
    assert recorded.state is RolloutState.PROMOTED, recorded.reason
    assert recorded.weight == 100
    assert dict(mesh.envoy.splits[CREDIT].weights) == {revision_name(CREDIT, new): 100}
    statuses = await mesh.statuses()
    assert (statuses[old], statuses[new]) == ("retired", "serving")
    assert revision_name(CREDIT, old) not in {r.name for r in await mesh.orchestrator.running()}


async def test_a_canary_promotes_through_its_steps_without_a_failed_request(mesh: Mesh) -> None:
    old = await mesh.serving()
    new = await mesh.new_version()
    await mesh.set_rollout(strategy="canary", steps=[20, 50, 100], **FAST)
    with mesh.scenario("canary") as seen:
        rollout = await mesh.controller.start(CREDIT, new)
        recorded = await finish(mesh, rollout)
        answers = await mesh.answers_now()
    await assert_promoted(mesh, recorded, old, new)
    assert answers == {new: 30}
    assert seen[0].by_version[old] > 0 and seen[0].by_version[new] > 0
    assert (await mesh.statuses())[old] == "retired"
    assert (await mesh.statuses())[new] == "serving"
    weights = [s.weight for s in recorded.steps if s.decision == "set_weight"]
    assert weights == [20, 50, 100]
    advances = [s for s in recorded.steps if s.decision == "advance"]
    assert len(advances) == 2
    for s in advances:
        assert s.numbers["canary_requests"] >= 20 and s.numbers["canary_error_rate"] == 0
    assert step(recorded, "promote").numbers["canary_requests"] >= 20
    assert decisions(recorded)[-1] == "promoted"
    assert revision_name(CREDIT, old) not in {r.name for r in await mesh.orchestrator.running()}


async def test_blue_green_passes_its_smoke_test_then_moves_traffic(mesh: Mesh) -> None:
    old = await mesh.serving()
    new = await mesh.new_version()
    await mesh.set_rollout(
        strategy="blue_green",
        steps=[50, 100],
        blue_green={"smoke_requests": 20, "min_smoke_accuracy": 1.0},
        **FAST,
    )
    with mesh.scenario("blue_green"):
        rollout = await mesh.controller.start(CREDIT, new)
        recorded = await finish(mesh, rollout)
    await assert_promoted(mesh, recorded, old, new)
    smoke = step(recorded, "smoke_passed")
    assert smoke.weight == 0
    assert smoke.numbers == {"smoke_requests": 20, "smoke_failures": 0, "smoke_accuracy": 1.0}
    assert decisions(recorded).index("smoke_passed") < decisions(recorded).index("set_weight")
    assert (await mesh.statuses())[new] == "serving"


async def test_red_black_cuts_over_at_once_and_keeps_the_old_one_warm(mesh: Mesh) -> None:
    old = await mesh.serving()
    new = await mesh.new_version()
    await mesh.set_rollout(strategy="red_black", red_black={"keep_old_for": "2s"}, **FAST)
    with mesh.scenario("red_black"):
        rollout = await mesh.controller.start(CREDIT, new)
        for _ in range(200):
            current = await mesh.controller.get(rollout.id)
            if "cutover" in decisions(current):
                break
            await asyncio.sleep(0.05)
        # Cut over: all traffic on the new version, the old one still running at 0 %.
        assert dict(mesh.envoy.splits[CREDIT].weights) == {
            revision_name(CREDIT, old): 0,
            revision_name(CREDIT, new): 100,
        }
        assert revision_name(CREDIT, old) in {r.name for r in await mesh.orchestrator.running()}
        assert await mesh.answers_now() == {new: 30}
        recorded = await finish(mesh, rollout)
    await assert_promoted(mesh, recorded, old, new)
    assert decisions(recorded)[-3:] == ["cutover", "promote", "promoted"]
    kept_warm = step(recorded, "promote").numbers  # what the new version served meanwhile
    assert kept_warm["canary_requests"] > 0 and kept_warm["canary_error_rate"] == 0
    assert (await mesh.statuses())[old] == "retired"


async def test_a_canary_whose_replica_is_killed_rolls_back_and_no_request_fails(
    mesh: Mesh,
) -> None:
    old = await mesh.serving()
    new = await mesh.new_version()
    slow = {**FAST, "step_duration": "30s", "deadline": "60s"}
    await mesh.set_rollout(
        strategy="canary",
        steps=[50, 100],
        **{**slow, "analysis": {**slow["analysis"], "failure_limit": 1}},
    )
    name = revision_name(CREDIT, new)
    with mesh.scenario("canary_killed") as seen:
        rollout = await mesh.controller.start(CREDIT, new)
        for _ in range(400):
            current = await mesh.controller.get(rollout.id)
            if current.weight == 50 and mesh.load.snapshot().by_version[new] >= 50:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail(f"the canary never took traffic: {decisions(current)}")
        for pid in mesh.orchestrator.inner.replica_pids(name):
            os.kill(pid, signal.SIGKILL)
        recorded = await finish(mesh, rollout)
    assert recorded.state is RolloutState.ROLLED_BACK, recorded.reason
    assert seen[0].by_version[new] > 0
    assert dict(mesh.envoy.splits[CREDIT].weights) == {revision_name(CREDIT, old): 100}
    assert await mesh.answers_now() == {old: 30}
    assert (await mesh.statuses())[old] == "serving"
    assert (await mesh.statuses())[new] == "retired"
    rollback = step(recorded, "rollback")
    # Whichever check saw it first: the failed health checks, an ejection or the failed
    # attempts Envoy retried elsewhere.
    assert recorded.reason.startswith("failure limit 1 reached"), recorded.reason
    seen_by = ("canary_health_failures", "canary_ejections", "canary_error_rate")
    assert sum(rollback.numbers[k] for k in seen_by) > 0, rollback.numbers
    assert name not in {r.name for r in await mesh.orchestrator.running()}


async def test_a_revision_that_fails_health_is_aborted_and_never_takes_traffic(
    mesh: Mesh,
) -> None:
    old = await mesh.serving()
    new = await mesh.new_version()
    await mesh.set_rollout(strategy="canary", steps=[50, 100], **{**FAST, "health_timeout": "3s"})
    mesh.orchestrator.freeze.add(new)
    with mesh.scenario("unhealthy") as seen:
        rollout = await mesh.controller.start(CREDIT, new)
        recorded = await finish(mesh, rollout)
    assert recorded.state is RolloutState.FAILED
    assert "failed health" in recorded.reason
    assert seen[0].by_version[new] == 0 and set(seen[0].by_version) == {old}
    assert all(s.weight == 0 for s in recorded.steps)
    assert decisions(recorded) == ["start", "abort"]
    assert dict(mesh.envoy.splits[CREDIT].weights) == {revision_name(CREDIT, old): 100}
    assert (await mesh.statuses())[old] == "serving"
    assert (await mesh.statuses())[new] == "retired"
    assert revision_name(CREDIT, new) not in {r.name for r in await mesh.orchestrator.running()}


async def test_the_rollouts_ran_under_at_least_10k_requests() -> None:
    if len(TOTALS) < 5:
        pytest.skip(f"only {sorted(TOTALS)} ran; the bar is for the whole module")
    print(f"requests through Envoy per scenario: {dict(TOTALS)}, {sum(TOTALS.values())} in all")
    assert sum(TOTALS.values()) >= TOTAL_AT_LEAST, dict(TOTALS)
