"""Envoy in front of real inference servers: routing by header and path, REST transcoding, the
public vs control surfaces, weighted splits, failover, health and config validation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1.health import aio as health_aio
from support import free_port
from typer.testing import CliRunner

from cyclone.client import build_request
from cyclone.envoy import EnvoyConfigError, EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.monitor.v1 import monitor_service_pb2 as mon_pb
from cyclone.monitor.v1 import monitor_service_pb2_grpc as mon_grpc
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.traffic import Endpoint, Revision, TrafficSplit
from cyclone_app.cli import app

if TYPE_CHECKING:
    from tests.conftest import ModelRepo, RunningServer

pytestmark = pytest.mark.integration

CREDIT = "credit"
BENCH = "bench"
StartServer = Callable[..., contextlib.AbstractAsyncContextManager["RunningServer"]]


def revision(model: str, version: str, *ports: int) -> Revision:
    return Revision(model, version, tuple(Endpoint("127.0.0.1", p) for p in ports))


def only(rev: Revision) -> TrafficSplit:
    return TrafficSplit(rev.model, {rev.name: 100}, {rev.name: rev})


class StoreStandIn(store_grpc.StoreServiceServicer):
    """Answers the two store RPCs these tests route (Envoy is under test, not the store)."""

    async def ListAlerts(self, request: Any, context: Any) -> store_pb.ListAlertsResponse:
        return store_pb.ListAlertsResponse()

    async def AddLabels(self, request: Any, context: Any) -> store_pb.AddLabelsResponse:
        return store_pb.AddLabelsResponse(stored=len(request.labels))


class MonitorStandIn(mon_grpc.MonitorServiceServicer):
    async def GetStatus(self, request: Any, context: Any) -> mon_pb.GetStatusResponse:
        return mon_pb.GetStatusResponse()


@contextlib.asynccontextmanager
async def stand_in_server(add: Callable[[Any], None]) -> AsyncIterator[int]:
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@pytest.fixture
async def components() -> AsyncIterator[tuple[int, int]]:
    """(store port, monitor port): stand-ins behind the control listener."""
    async with (
        stand_in_server(
            lambda s: store_grpc.add_StoreServiceServicer_to_server(StoreStandIn(), s)
        ) as store,
        stand_in_server(
            lambda s: mon_grpc.add_MonitorServiceServicer_to_server(MonitorStandIn(), s)
        ) as monitor,
    ):
        yield store, monitor


@pytest.fixture
async def envoy(tmp_path: Path, components: tuple[int, int]) -> AsyncIterator[EnvoyProxy]:
    store, monitor = components
    settings = EnvoySettings(
        work_dir=tmp_path / "envoy",
        public_host="127.0.0.1",
        public_port=0,
        control_port=0,
        store=Endpoint("127.0.0.1", store),
        monitor=Endpoint("127.0.0.1", monitor),
        concurrency=1,
        health_interval_s=0.25,
    )
    proxy = EnvoyProxy(settings)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def slow_health_checks(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Servers started after this answer health checks `seconds` late once `.slow` is set on
    their health servicer (grpc registers the bound method, so the class is patched)."""
    check = health_aio.HealthServicer.Check

    async def late_check(self: Any, request: Any, context: Any) -> Any:
        if getattr(self, "slow", False):
            await asyncio.sleep(seconds)
        return await check(self, request, context)

    monkeypatch.setattr(health_aio.HealthServicer, "Check", late_check)


@pytest.fixture
def two_versions(model_repo: ModelRepo, tmp_path: Path) -> Path:
    """A repository where `credit` has versions 1 and 2 (the same model, told apart by version)."""
    root = model_repo.copy_to(tmp_path / "repo")
    shutil.copytree(root / CREDIT / "1", root / CREDIT / "2")
    return root


def credit_rows(model_repo: ModelRepo, n: int = 3) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = model_repo.credit_rows.iloc[:n].to_dict(orient="records")
    return rows


def rest_body(rows: list[dict[str, Any]]) -> bytes:
    features: dict[str, Any] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if all(isinstance(v, int | float) for v in values):
            features[name] = {"numbers": [float(v) for v in values]}
        else:
            features[name] = {"strings": [str(v) for v in values]}
    return json.dumps({"features": features}).encode()


async def http(
    address: str, path: str, body: bytes | None = None, method: str | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON body); runs in a thread so in-process servers keep serving."""
    request = urllib.request.Request(
        f"http://{address}{path}",
        data=body,
        method=method or ("POST" if body is not None else "GET"),
        headers={"content-type": "application/json"},
    )

    def call() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(call)


@contextlib.asynccontextmanager
async def inference_stub(address: str) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


# --- configuration ----------------------------------------------------------------------------


async def test_every_written_config_is_what_envoy_validated(
    envoy: EnvoyProxy, start_inference_server: StartServer
) -> None:
    """The files on disk parse, and Envoy accepted them (routes installed at our version)."""
    import yaml

    async with start_inference_server() as server:
        await envoy.apply(only(revision(CREDIT, "1", server.port)))
        layout = envoy.layout
        for path in (layout.bootstrap, layout.cds, layout.lds, layout.rds("public")):
            assert yaml.safe_load(path.read_text())
        cds = yaml.safe_load(layout.cds.read_text())
        names = {c["name"] for c in cds["resources"]}
        assert {"credit--1", "credit--1~failover", "cyclone-store", "cyclone-monitor"} <= names
        assert not list(layout.xds_dir.glob(".*.tmp")), "no temp files left behind"


async def test_invalid_config_is_rejected_and_not_installed(
    envoy: EnvoyProxy, start_inference_server: StartServer, model_repo: ModelRepo
) -> None:
    async with start_inference_server() as server:
        good = revision(CREDIT, "1", server.port)
        await envoy.apply(only(good))
        before = {p.name: p.read_text() for p in envoy.layout.xds_dir.glob("*.yaml")}
        bad = Revision(CREDIT, "2", (Endpoint("127.0.0.1", 70000),))  # port out of range
        with pytest.raises(EnvoyConfigError, match="port_value"):
            await envoy.apply(
                TrafficSplit(
                    CREDIT, {good.name: 50, bad.name: 50}, {good.name: good, bad.name: bad}
                )
            )
        after = {p.name: p.read_text() for p in envoy.layout.xds_dir.glob("*.yaml")}
        assert after == before
        assert envoy.splits[CREDIT].weights == {good.name: 100}
        async with inference_stub(envoy.public_address) as stub:
            response = await stub.Predict(build_request(CREDIT, credit_rows(model_repo)))
        assert response.version == "1"


# --- routing ----------------------------------------------------------------------------------


async def test_grpc_predict_with_and_without_header(
    envoy: EnvoyProxy, start_inference_server: StartServer, model_repo: ModelRepo
) -> None:
    rows = credit_rows(model_repo)
    async with start_inference_server() as server, inference_stub(envoy.public_address) as stub:
        await envoy.apply(only(revision(CREDIT, "1", server.port)))
        # One model: no header needed.
        response = await stub.Predict(build_request(CREDIT, rows))
        assert (response.model, len(response.labels)) == (CREDIT, 3)
        # Two models: the header picks one, its absence is a clear error naming it.
        await envoy.apply(only(revision(BENCH, "1", server.port)))
        response = await stub.Predict(
            build_request(CREDIT, rows), metadata=[("cyclone-model", CREDIT)]
        )
        assert response.model == CREDIT
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.Predict(build_request(CREDIT, rows))
        assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cyclone-model" in (missing.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Predict(build_request("nope", rows), metadata=[("cyclone-model", "nope")])
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in (unknown.value.details() or "")
        assert (unknown.value.details() or "").endswith(f"served: {BENCH}, {CREDIT}")
        # REST names the model in the path; with two models the listing names them both.
        status, body = await http(envoy.public_address, "/v1/models")
        assert status == 200 and [m["name"] for m in body["models"]] == [BENCH, CREDIT], body
        # Removing a model: back to one, so no header needed again.
        await envoy.remove_model(BENCH)
        assert (await stub.Predict(build_request(CREDIT, rows))).model == CREDIT


async def test_rest_predict_returns_json_and_bad_input_is_400(
    envoy: EnvoyProxy, start_inference_server: StartServer, model_repo: ModelRepo
) -> None:
    rows = credit_rows(model_repo)
    async with start_inference_server() as server, inference_stub(envoy.public_address) as stub:
        await envoy.apply(only(revision(CREDIT, "1", server.port)))
        status, body = await http(
            envoy.public_address, "/v1/models/credit:predict", rest_body(rows)
        )
        assert status == 200, body
        assert (
            body["model"] == CREDIT and len(body["labels"]) == 3 and len(body["predictionIds"]) == 3
        )
        status, body = await http(envoy.public_address, "/v1/models/credit")
        assert status == 200 and body["model"]["name"] == CREDIT
        status, body = await http(envoy.public_address, "/v1/models")
        assert status == 200 and CREDIT in [m["name"] for m in body["models"]]

        bad = rest_body([{k: v for k, v in r.items() if k != "income"} for r in rows])
        status, body = await http(envoy.public_address, "/v1/models/credit:predict", bad)
        assert status == 400 and "income" in body["message"]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Predict(build_request(CREDIT, [{"age": 1.0}]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "income" in (error.value.details() or "")
        status, body = await http(envoy.public_address, "/v1/models/nope:predict", rest_body(rows))
        assert status == 404 and body["message"].endswith("; served: credit"), body
        # A served model's predict path without POST is not "not served".
        status, body = await http(envoy.public_address, "/v1/models/credit:predict")
        assert status == 405 and "POST" in body["message"], body
        # The Open Inference Protocol's REST paths say where it is served instead.
        status, body = await http(envoy.public_address, "/v2/models/credit/infer", b"{}")
        assert status == 404 and "over gRPC" in body["message"], body
        # The features straight in the body, without their wrapper: the message shows it.
        unwrapped = json.loads(rest_body(rows))["features"]
        status, body = await http(
            envoy.public_address, "/v1/models/credit:predict", json.dumps(unwrapped).encode()
        )
        assert status == 400 and 'needs them under "features"' in body["message"], body


async def test_control_plane_only_on_the_control_listener(
    envoy: EnvoyProxy, start_inference_server: StartServer, model_repo: ModelRepo
) -> None:
    async with start_inference_server() as server:
        await envoy.apply(only(revision(CREDIT, "1", server.port)))
        async with grpc.aio.insecure_channel(envoy.public_address) as public:
            store = store_grpc.StoreServiceStub(public)
            for call in (
                store.ListAlerts(store_pb.ListAlertsRequest()),
                store.SavePlan(store_pb.SavePlanRequest(model=CREDIT)),
                mon_grpc.MonitorServiceStub(public).GetStatus(mon_pb.GetStatusRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as closed:
                    await call
                assert closed.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert "public listener" in (closed.value.details() or "")
            # Label ingestion is data plane: open on the public listener.
            label = store_pb.AddLabelsRequest(model=CREDIT)
            label.labels.add(prediction_id="x")
            assert (await store.AddLabels(label)).stored == 1
        for path, method in [
            ("/v1/alerts", "GET"),
            ("/v1/status", "GET"),
            ("/v1/models/credit/plan", "GET"),
            ("/v1/model-versions", "GET"),
            ("/v1/alerts:claim", "POST"),
        ]:
            status, _ = await http(envoy.public_address, path, b"{}" if method == "POST" else None)
            assert status == 404, path
        status, body = await http(
            envoy.public_address,
            "/v1/models/credit/labels",
            json.dumps({"labels": [{"predictionId": "x"}]}).encode(),
        )
        assert status == 200 and int(body["stored"]) == 1

        async with grpc.aio.insecure_channel(envoy.control_address) as control:
            await store_grpc.StoreServiceStub(control).ListAlerts(store_pb.ListAlertsRequest())
            await mon_grpc.MonitorServiceStub(control).GetStatus(mon_pb.GetStatusRequest())
            predicted = await pb_grpc.InferenceServiceStub(control).Predict(
                build_request(CREDIT, credit_rows(model_repo))
            )
            assert predicted.model == CREDIT
        status, _ = await http(envoy.control_address, "/v1/status")
        assert status == 200


async def test_cli_predict_through_envoy(
    envoy: EnvoyProxy, start_inference_server: StartServer, model_repo: ModelRepo
) -> None:
    async with start_inference_server() as server:
        await envoy.apply(only(revision(CREDIT, "1", server.port)))
        await envoy.apply(only(revision(BENCH, "1", server.port)))  # two models: header needed
        row = json.dumps(credit_rows(model_repo, 1)[0])
        args = [
            "predict",
            "--model",
            CREDIT,
            "--address",
            envoy.public_address,
            "--json",
            "--row",
            row,
        ]
        result = await asyncio.to_thread(CliRunner().invoke, app, args)
        assert result.exit_code == 0, result.output
        assert "prediction_id" in json.loads(result.output.splitlines()[0])


# --- traffic ----------------------------------------------------------------------------------


async def test_observed_split_matches_weights(
    envoy: EnvoyProxy,
    start_inference_server: StartServer,
    two_versions: Path,
    model_repo: ModelRepo,
) -> None:
    async with (
        start_inference_server(model_repository=two_versions, model=CREDIT, version="1") as one,
        start_inference_server(model_repository=two_versions, model=CREDIT, version="2") as two,
        inference_stub(envoy.public_address) as stub,
    ):
        v1, v2 = revision(CREDIT, "1", one.port), revision(CREDIT, "2", two.port)
        await envoy.apply(
            TrafficSplit(CREDIT, {v1.name: 80, v2.name: 20}, {v1.name: v1, v2.name: v2})
        )
        await envoy.wait_healthy(v1, 10)
        await envoy.wait_healthy(v2, 10)
        request = build_request(CREDIT, credit_rows(model_repo, 1))
        seen: Counter[str] = Counter()
        for _ in range(50):
            responses = await asyncio.gather(*(stub.Predict(request) for _ in range(20)))
            seen.update(r.version for r in responses)
        assert sum(seen.values()) == 1000
        assert abs(seen["2"] / 1000 - 0.20) < 0.06, seen

        stats = await envoy.stats(v2.name)
        assert stats.requests >= seen["2"] and stats.failures == 0
        assert (await envoy.stats("nope--1")).requests == 0

        # Cut over; the old revision's clusters go once the new routes are in.
        await envoy.apply(only(v2))
        responses = await asyncio.gather(*(stub.Predict(request) for _ in range(50)))
        assert {r.version for r in responses} == {"2"}
        assert v1.name not in await envoy.admin.clusters()


@pytest.mark.parametrize(
    "survivor_checks_slow", [False, True], ids=["survivor-ok", "survivor-slow"]
)
async def test_stopped_revision_is_retried_elsewhere(
    envoy: EnvoyProxy,
    start_inference_server: StartServer,
    two_versions: Path,
    model_repo: ModelRepo,
    monkeypatch: pytest.MonkeyPatch,
    survivor_checks_slow: bool,
) -> None:
    """With `survivor_checks_slow` the surviving revision answers its health checks later than
    the check interval (a loaded machine): a timed-out check must not leave the killed
    revision as the only place retries can go."""
    if survivor_checks_slow:
        slow_health_checks(monkeypatch, seconds=0.6)
    async with (
        start_inference_server(model_repository=two_versions, model=CREDIT, version="1") as one,
        start_inference_server(model_repository=two_versions, model=CREDIT, version="2") as two,
        inference_stub(envoy.public_address) as stub,
    ):
        one.server.health.slow = survivor_checks_slow
        v1, v2 = revision(CREDIT, "1", one.port), revision(CREDIT, "2", two.port)
        await envoy.apply(
            TrafficSplit(CREDIT, {v1.name: 50, v2.name: 50}, {v1.name: v1, v2.name: v2})
        )
        await envoy.wait_healthy(v2, 10)
        request = build_request(CREDIT, credit_rows(model_repo, 1))
        await asyncio.gather(*(stub.Predict(request) for _ in range(20)))
        await two.server.stop(0)  # killed: no drain, no goodbye
        versions: Counter[str] = Counter()
        for _ in range(20):
            responses = await asyncio.gather(*(stub.Predict(request) for _ in range(10)))
            versions.update(r.version for r in responses)
        assert versions == Counter({"1": 200})
        with pytest.raises(TimeoutError, match="credit--2"):
            await envoy.wait_healthy(v2, 1)


async def test_wait_healthy_times_out_for_a_dead_endpoint(
    envoy: EnvoyProxy, start_inference_server: StartServer
) -> None:
    async with start_inference_server() as server:
        live, dead = revision(CREDIT, "1", server.port), revision(CREDIT, "2", free_port())
        await envoy.apply(
            TrafficSplit(CREDIT, {live.name: 100, dead.name: 0}, {live.name: live, dead.name: dead})
        )
        await envoy.wait_healthy(live, 10)
        with pytest.raises(
            TimeoutError, match=r"credit--2.*not healthy after 1s.*failed_active_health_check"
        ):
            await envoy.wait_healthy(dead, 1)


async def test_shadow_gets_a_copy_and_callers_get_the_champion(
    envoy: EnvoyProxy,
    start_inference_server: StartServer,
    two_versions: Path,
    model_repo: ModelRepo,
) -> None:
    async with (
        start_inference_server(model_repository=two_versions, model=CREDIT, version="1") as one,
        start_inference_server(model_repository=two_versions, model=CREDIT, version="2") as two,
        inference_stub(envoy.public_address) as stub,
    ):
        v1, v2 = revision(CREDIT, "1", one.port), revision(CREDIT, "2", two.port)
        await envoy.apply(
            TrafficSplit(CREDIT, {v1.name: 100}, {v1.name: v1, v2.name: v2}, shadow=v2.name)
        )
        await envoy.wait_healthy(v2, 10)
        request = build_request(CREDIT, credit_rows(model_repo, 1))
        responses = await asyncio.gather(*(stub.Predict(request) for _ in range(40)))
        assert {r.version for r in responses} == {"1"}
        for _ in range(50):
            if (await envoy.stats(v2.name)).requests >= 40:
                break
            await asyncio.sleep(0.1)
        assert (await envoy.stats(v2.name)).requests >= 40


async def test_stop_leaves_no_envoy_process(tmp_path: Path) -> None:
    proxy = EnvoyProxy(
        EnvoySettings(work_dir=tmp_path / "envoy", public_port=0, control_port=0, concurrency=1)
    )
    await proxy.start()
    pid = proxy.pid
    assert pid and proxy.running()
    await proxy.stop()
    assert not proxy.running()
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


async def test_deploy_example_is_current_and_valid(tmp_path: Path) -> None:
    """deploy/envoy/ is what the code generates today, and Envoy accepts its bootstrap."""
    from cyclone.envoy.config import DESCRIPTOR
    from cyclone.envoy.example import example_files
    from cyclone.envoy.files import envoy_binary

    deploy = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
    for relative, text in example_files().items():
        assert (deploy / relative).read_text() == text, (
            f"stale: python -m cyclone.envoy.example ({relative})"
        )
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    shutil.copy(DESCRIPTOR, tmp_path / "cyclone.binpb")
    proc = await asyncio.create_subprocess_exec(
        str(envoy_binary()),
        "--mode",
        "validate",
        "--disable-hot-restart",
        "-c",
        "bootstrap.yaml",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
