"""The public listener as the edge: tokens pass through to the services, optional TLS, and
the limits (per-client rate, body size, header count) refuse the excess and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import yaml
from support import make_pki

from cyclone.auth import Scope, scope_for
from cyclone.client import build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.monitor.v1 import monitor_service_pb2 as monitor_pb
from cyclone.oip.v2 import open_inference_pb2 as oip_pb
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.traffic import Endpoint, Revision, TrafficSplit
from cyclone.trainer.v1 import trainer_service_pb2 as trainer_pb
from services.inference.main import InferenceSettings
from services.launch import start_inference, start_store
from services.store.main import StoreSettings

if TYPE_CHECKING:
    from tests.conftest import ModelRepo

pytestmark = pytest.mark.integration

CREDIT = "credit"
PREDICT_TOKEN = "predict-token-0123456789abcdef"
LABEL_TOKEN = "label-token-0123456789abcdef"
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def _split(port: int) -> TrafficSplit:
    rev = Revision(CREDIT, "1", (Endpoint("127.0.0.1", port),))
    return TrafficSplit(CREDIT, {rev.name: 100}, {rev.name: rev})


def _rows(model_repo: ModelRepo, n: int = 2) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = model_repo.credit_rows.iloc[:n].to_dict(orient="records")
    return rows


def _rest_body(rows: list[dict[str, Any]]) -> bytes:
    features: dict[str, Any] = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        if all(isinstance(v, int | float) for v in values):
            features[name] = {"numbers": [float(v) for v in values]}
        else:
            features[name] = {"strings": [str(v) for v in values]}
    return json.dumps({"features": features}).encode()


def _post(
    address: str,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    source: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """One HTTP/1.1 POST from `source` (another loopback address is another client)."""
    host, port = address.rsplit(":", 1)
    connection: http.client.HTTPConnection
    if tls is not None:
        connection = http.client.HTTPSConnection(
            host, int(port), timeout=10, source_address=(source, 0), context=tls
        )
    else:
        connection = http.client.HTTPConnection(
            host, int(port), timeout=10, source_address=(source, 0)
        )
    try:
        connection.request(
            "POST", path, body, {"content-type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def _edge(tmp_path: Path, server_port: int, **settings: Any) -> AsyncIterator[EnvoyProxy]:
    proxy = EnvoyProxy(
        EnvoySettings(
            work_dir=tmp_path / "envoy",
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            concurrency=1,
            health_interval_s=0.25,
            **settings,
        )
    )
    async with proxy:
        await proxy.apply(_split(server_port))
        yield proxy


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    entries = [
        {"name": "predict", "token": PREDICT_TOKEN, "scopes": ["predict"]},
        {"name": "label", "token": LABEL_TOKEN, "scopes": ["label"]},
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


async def test_tokens_are_checked_behind_the_public_listener(
    tmp_path: Path, model_repo: ModelRepo, tokens_file: Path
) -> None:
    """Envoy passes `authorization` through; the service answers, gRPC and REST alike."""
    settings = InferenceSettings(
        model_repository=model_repo.root,
        port=0,
        log_level="WARNING",
        tokens_file=tokens_file,
        require_data_token=True,
    )
    rows = _rows(model_repo)
    async with (
        await start_inference(settings) as server,
        _edge(tmp_path, server.port) as envoy,
        grpc.aio.insecure_channel(envoy.public_address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        request = build_request(CREDIT, rows)
        expected = [
            (None, grpc.StatusCode.UNAUTHENTICATED, 401),
            ("not-a-token-at-all", grpc.StatusCode.UNAUTHENTICATED, 401),
            (LABEL_TOKEN, grpc.StatusCode.PERMISSION_DENIED, 403),
            (PREDICT_TOKEN, grpc.StatusCode.OK, 200),
        ]
        for token, code, http_status in expected:
            metadata = (("authorization", f"Bearer {token}"),) if token else ()
            try:
                response = await stub.Predict(request, metadata=metadata, timeout=10)
                got = grpc.StatusCode.OK
                assert len(response.labels) == len(rows)
            except grpc.aio.AioRpcError as exc:
                got = exc.code()
                assert token is None or token not in (exc.details() or "")
            assert got == code, token
            headers = {"authorization": f"Bearer {token}"} if token else {}
            status, body = await asyncio.to_thread(
                _post,
                envoy.public_address,
                f"/v1/models/{CREDIT}:predict",
                _rest_body(rows),
                headers,
            )
            assert status == http_status, (token, body)
            if token is not None:
                assert token.encode() not in body


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a certificate for 127.0.0.1/localhost (server) and one for a client (envoy)."""
    return make_pki(tmp_path_factory.mktemp("edge-pki"), client_name="envoy")


NEEDS_OPENSSL = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@NEEDS_OPENSSL
async def test_public_listener_serves_tls(
    tmp_path: Path, model_repo: ModelRepo, pki: dict[str, Path]
) -> None:
    cert, key, ca = pki["server.pem"], pki["server.key"], pki["ca.pem"]
    rows = _rows(model_repo)
    settings = InferenceSettings(model_repository=model_repo.root, port=0, log_level="WARNING")
    async with (
        await start_inference(settings) as server,
        _edge(tmp_path, server.port, tls_cert_file=cert, tls_key_file=key) as envoy,
    ):
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        async with grpc.aio.secure_channel(envoy.public_address, credentials) as channel:
            response = await pb_grpc.InferenceServiceStub(channel).Predict(
                build_request(CREDIT, rows), timeout=10
            )
            assert len(response.labels) == len(rows)
        context = ssl.create_default_context(cafile=str(ca))
        status, _ = await asyncio.to_thread(
            _post,
            envoy.public_address,
            f"/v1/models/{CREDIT}:predict",
            _rest_body(rows),
            tls=context,
        )
        assert status == 200
        # Plaintext to the TLS port gets nowhere; the control listener stays as it was.
        async with grpc.aio.insecure_channel(envoy.public_address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.InferenceServiceStub(plain).Predict(
                    build_request(CREDIT, rows), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(envoy.control_address) as control:
            await pb_grpc.InferenceServiceStub(control).Predict(build_request(CREDIT, rows))


@NEEDS_OPENSSL
async def test_envoy_reaches_services_that_require_mutual_tls(
    tmp_path: Path, model_repo: ModelRepo, pki: dict[str, Path]
) -> None:
    settings = InferenceSettings(
        model_repository=model_repo.root,
        port=0,
        log_level="WARNING",
        tls_cert_file=pki["server.pem"],
        tls_key_file=pki["server.key"],
        tls_client_ca_file=pki["ca.pem"],  # no client certificate, no connection
    )
    rows = _rows(model_repo)
    async with (
        await start_inference(settings) as server,
        _edge(
            tmp_path,
            server.port,
            upstream_tls_ca_file=pki["ca.pem"],
            upstream_tls_cert_file=pki["client.pem"],
            upstream_tls_key_file=pki["client.key"],
        ) as envoy,
        grpc.aio.insecure_channel(envoy.public_address) as channel,
    ):
        await envoy.wait_healthy(_split(server.port).revisions[f"{CREDIT}--1"], 10)
        response = await pb_grpc.InferenceServiceStub(channel).Predict(
            build_request(CREDIT, rows), timeout=10
        )
        assert len(response.labels) == len(rows)


async def test_tls_settings_need_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        EnvoySettings(work_dir=tmp_path, tls_cert_file=tmp_path / "cert.pem")
    with pytest.raises(ValueError, match="needs upstream_tls_ca_file"):
        EnvoySettings(
            work_dir=tmp_path,
            upstream_tls_cert_file=tmp_path / "c.pem",
            upstream_tls_key_file=tmp_path / "c.key",
        )
    with pytest.raises(ValueError, match="rate_limit_per_client"):
        EnvoySettings(work_dir=tmp_path, rate_limit_per_client=0)


@pytest.mark.parametrize("field", ["health_interval_s", "health_timeout_s"])
async def test_health_check_times_must_be_positive(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EnvoySettings(work_dir=tmp_path, **{field: 0})


async def test_a_flooding_client_is_limited_and_another_is_served(
    tmp_path: Path, model_repo: ModelRepo
) -> None:
    rows = _rows(model_repo, 1)
    settings = InferenceSettings(model_repository=model_repo.root, port=0, log_level="WARNING")
    async with (
        await start_inference(settings) as server,
        _edge(tmp_path, server.port, rate_limit_per_client=5, rate_limit_burst=5) as envoy,
        grpc.aio.insecure_channel(envoy.public_address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        request = build_request(CREDIT, rows)

        async def predict() -> grpc.StatusCode:
            try:
                await stub.Predict(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        flood = Counter(await asyncio.gather(*(predict() for _ in range(40))))
        assert set(flood) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, flood
        assert 1 <= flood[grpc.StatusCode.OK] <= 10, flood
        body, path = _rest_body(rows), f"/v1/models/{CREDIT}:predict"
        status, _ = await asyncio.to_thread(_post, envoy.public_address, path, body)
        assert status == 429  # the same client over REST: same address, same empty bucket
        # Another client (another loopback address) has its own bucket.
        for _ in range(3):
            status, answer = await asyncio.to_thread(
                _post, envoy.public_address, path, body, source="127.0.0.2"
            )
            assert status == 200, answer
        # The flooder is served again once its bucket refills; Envoy kept serving throughout.
        await asyncio.sleep(1.2)
        assert await predict() == grpc.StatusCode.OK
        assert envoy.running()


async def test_oversized_bodies_and_header_floods_are_refused(
    tmp_path: Path, model_repo: ModelRepo
) -> None:
    rows = _rows(model_repo, 1)
    settings = InferenceSettings(model_repository=model_repo.root, port=0, log_level="WARNING")
    async with (
        await start_inference(settings) as server,
        _edge(tmp_path, server.port, max_request_bytes=64 * 1024, max_headers_count=30) as envoy,
    ):
        path = f"/v1/models/{CREDIT}:predict"
        big = json.dumps(
            {"features": {"age": {"numbers": [1.0] * 20_000}}}
        ).encode()  # ~100 KiB of JSON
        assert len(big) > 64 * 1024
        status, answer = await asyncio.to_thread(_post, envoy.public_address, path, big)
        assert status == 413, answer
        many = {f"x-filler-{i}": "1" for i in range(40)}
        status, _ = await asyncio.to_thread(
            _post, envoy.public_address, path, _rest_body(rows), many
        )
        assert status == 431
        status, _ = await asyncio.to_thread(_post, envoy.public_address, path, _rest_body(rows))
        assert status == 200  # a normal request right after is served


# --- every RPC through the public listener ----------------------------------------------------

ALL_TOKENS = {scope: f"{scope.value}-token-0123456789abcdef" for scope in Scope}
CLOSED = "not available on the public listener"


async def _raw_call(
    channel: grpc.aio.Channel, path: str, method: Any, token: str | None
) -> tuple[grpc.StatusCode, str]:
    """Call `path` with an empty request (or stream): only the status matters here."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if method.client_streaming and method.server_streaming:
            async for _ in channel.stream_stream(path, **raw)(
                iter(()), metadata=metadata, timeout=5
            ):
                pass
        elif method.client_streaming:
            await channel.stream_unary(path, **raw)(iter(()), metadata=metadata, timeout=5)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **raw)(b"", metadata=metadata, timeout=5):
                pass
        else:
            await channel.unary_unary(path, **raw)(b"", metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_every_rpc_through_the_public_listener(
    tmp_path: Path, model_repo: ModelRepo, fresh_database_url: str
) -> None:
    """Reachable or not, and the status without a token, with a wrong one and each scope."""
    path = tmp_path / "all-tokens.yaml"
    entries = [{"name": s.value, "token": t, "scopes": [s.value]} for s, t in ALL_TOKENS.items()]
    path.write_text(yaml.safe_dump({"tokens": entries}))
    store_settings = StoreSettings(
        port=0,
        database_url=fresh_database_url,
        log_level="WARNING",
        pool_min_size=1,
        tokens_file=path,
    )
    inference_settings = InferenceSettings(
        model_repository=model_repo.root, port=0, log_level="WARNING", tokens_file=path
    )
    services = [
        store_pb.DESCRIPTOR.services_by_name["StoreService"],
        inference_pb.DESCRIPTOR.services_by_name["InferenceService"],
        oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        monitor_pb.DESCRIPTOR.services_by_name["MonitorService"],
        trainer_pb.DESCRIPTOR.services_by_name["TrainerService"],
    ]
    reachable: set[str] = set()
    async with (
        await start_store(store_settings) as store,
        await start_inference(inference_settings) as server,
        _edge(
            tmp_path,
            server.port,
            store=Endpoint("127.0.0.1", store.port),
            rate_limit_per_client=None,
        ) as envoy,
        grpc.aio.insecure_channel(envoy.public_address) as channel,
    ):
        for service in services:
            for method in service.methods:
                rpc = f"/{service.full_name}/{method.name}"
                scope = scope_for(rpc)
                assert scope is not None
                code, details = await _raw_call(channel, rpc, method, None)
                if code == grpc.StatusCode.UNIMPLEMENTED and CLOSED in details:
                    # Closed at the edge, whatever the token.
                    assert scope not in (Scope.PREDICT, Scope.LABEL), rpc
                    for token in (*ALL_TOKENS.values(), "not-a-token-at-all"):
                        assert (await _raw_call(channel, rpc, method, token))[1] == details
                    continue
                reachable.add(rpc)
                assert code not in REFUSED, rpc  # data plane: open without a token
                wrong = await _raw_call(channel, rpc, method, "not-a-token-at-all")
                assert wrong[0] == grpc.StatusCode.UNAUTHENTICATED, rpc
                for held, token in ALL_TOKENS.items():
                    status = (await _raw_call(channel, rpc, method, token))[0]
                    if held == scope:
                        assert status not in REFUSED, (rpc, held)
                    else:
                        assert status == grpc.StatusCode.PERMISSION_DENIED, (rpc, held)
    data_plane = {
        f"/{s.full_name}/{m.name}"
        for s in services
        for m in s.methods
        if scope_for(f"/{s.full_name}/{m.name}") in (Scope.PREDICT, Scope.LABEL)
    }
    assert reachable == data_plane
    assert "/cyclone.store.v1.StoreService/AddLabels" in reachable
