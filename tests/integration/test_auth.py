"""Who may call what, on real servers: every RPC of the store and inference services, called
with no token, a wrong one, and a token of each scope."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc import aio

from cyclone.auth import ALL_SCOPES, Scope, TokenFileError, TokenSet, scope_for, write_local_tokens
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.oip.v2 import open_inference_pb2 as oip_pb
from cyclone.store.v1 import store_service_pb2 as store_pb
from services.inference.main import InferenceSettings
from services.launch import start_inference, start_store
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

TOKENS = {scope: f"{scope.value}-token-0123456789abcdef" for scope in Scope}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.yaml"
    entries = [{"name": s.value, "token": t, "scopes": [s.value]} for s, t in TOKENS.items()]
    path.write_text(yaml.safe_dump({"tokens": entries}))
    return path


def _methods(descriptor: Any) -> list[tuple[str, Any]]:
    return [(f"/{descriptor.full_name}/{m.name}", m) for m in descriptor.methods]


async def _call(channel: aio.Channel, path: str, method: Any, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    identity: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    try:
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **identity)(iter(()), metadata=metadata, timeout=5)
            async for _ in call:
                pass
        elif method.client_streaming:
            await channel.stream_unary(path, **identity)(iter(()), metadata=metadata, timeout=5)
        elif method.server_streaming:
            async for _ in channel.unary_stream(path, **identity)(
                b"", metadata=metadata, timeout=5
            ):
                pass
        else:
            await channel.unary_unary(path, **identity)(b"", metadata=metadata, timeout=5)
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


async def _check_every_method(address: str, descriptor: Any, require_data: bool) -> int:
    checked = 0
    async with aio.insecure_channel(address) as channel:
        for path, method in _methods(descriptor):
            scope = scope_for(path)
            assert scope is not None
            data_plane = scope in (Scope.PREDICT, Scope.LABEL)
            no_token = await _call(channel, path, method, None)
            if data_plane and not require_data:
                assert no_token not in REFUSED, path
            else:
                assert no_token == grpc.StatusCode.UNAUTHENTICATED, path
            assert await _call(channel, path, method, "not-a-token") == (
                grpc.StatusCode.UNAUTHENTICATED
            ), path
            for held, token in TOKENS.items():
                status = await _call(channel, path, method, token)
                if held == scope:
                    assert status not in REFUSED, (path, held)
                else:
                    assert status == grpc.StatusCode.PERMISSION_DENIED, (path, held)
            checked += 1
    return checked


@pytest.fixture
async def store(fresh_database_url: str, tokens_file: Path) -> AsyncIterator[str]:
    settings = StoreSettings(
        port=0,
        database_url=fresh_database_url,
        log_level="WARNING",
        pool_min_size=1,
        tokens_file=tokens_file,
    )
    async with await start_store(settings) as started:
        yield started.address


async def test_every_store_rpc_needs_its_scope(store: str) -> None:
    descriptor = store_pb.DESCRIPTOR.services_by_name["StoreService"]
    assert await _check_every_method(store, descriptor, require_data=False) == len(
        descriptor.methods
    )


@pytest.mark.parametrize("require_data", [False, True])
async def test_every_inference_rpc_needs_its_scope(
    model_repo: Any, tokens_file: Path, require_data: bool
) -> None:
    settings = InferenceSettings(
        model_repository=model_repo.root,
        port=0,
        log_level="WARNING",
        tokens_file=tokens_file,
        require_data_token=require_data,
    )
    async with await start_inference(settings) as started:
        for descriptor in (
            inference_pb.DESCRIPTOR.services_by_name["InferenceService"],
            oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        ):
            assert await _check_every_method(started.address, descriptor, require_data) > 0


async def test_health_stays_open_and_errors_never_echo_the_token(
    model_repo: Any, tokens_file: Path
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = InferenceSettings(
        model_repository=model_repo.root,
        port=0,
        log_level="WARNING",
        tokens_file=tokens_file,
        require_data_token=True,
    )
    async with (
        await start_inference(settings) as started,
        aio.insecure_channel(started.address) as channel,
    ):
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        secret = "label-token-0123456789abcdef"
        with pytest.raises(aio.AioRpcError) as err:
            await channel.unary_unary(
                "/cyclone.inference.v1.InferenceService/Predict",
                request_serializer=None,
                response_deserializer=None,
            )(b"", metadata=(("authorization", f"Bearer {secret}"),))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert secret not in (err.value.details() or "")
        assert "predict" in (err.value.details() or "")


def test_scope_table_for_the_rpcs_that_matter() -> None:
    assert scope_for("/cyclone.inference.v1.InferenceService/Predict") == Scope.PREDICT
    assert scope_for("/inference.GRPCInferenceService/ModelInfer") == Scope.PREDICT
    assert scope_for("/cyclone.store.v1.StoreService/AddLabels") == Scope.LABEL
    assert scope_for("/cyclone.store.v1.StoreService/LogPredictions") == Scope.INTERNAL
    assert scope_for("/cyclone.store.v1.StoreService/ClaimAlerts") == Scope.INTERNAL
    assert scope_for("/cyclone.store.v1.StoreService/UpdateRollout") == Scope.INTERNAL
    assert scope_for("/cyclone.store.v1.StoreService/RegisterTrainedVersion") == Scope.INTERNAL
    assert scope_for("/cyclone.store.v1.StoreService/GetRollout") == Scope.ADMIN
    assert scope_for("/cyclone.store.v1.StoreService/SetPlan") == Scope.ADMIN
    assert scope_for("/cyclone.store.v1.StoreService/RegisterModelVersion") == Scope.ADMIN
    assert scope_for("/cyclone.trainer.v1.TrainerService/Rollout") == Scope.ADMIN
    assert scope_for("/grpc.health.v1.Health/Check") is None


def _has_rest_mapping(method: Any) -> bool:
    from google.api import annotations_pb2

    return method.GetOptions().HasExtension(annotations_pb2.http)


@pytest.mark.parametrize(
    "descriptor",
    [
        store_pb.DESCRIPTOR.services_by_name["StoreService"],
        inference_pb.DESCRIPTOR.services_by_name["InferenceService"],
    ],
    ids=lambda d: d.name,
)
def test_internal_rpcs_have_no_rest_mapping_and_the_rest_do(descriptor: Any) -> None:
    """The transcoder publishes exactly the annotated RPCs: an internal one must not be."""
    internal = {m.name for path, m in _methods(descriptor) if scope_for(path) == Scope.INTERNAL}
    annotated = {m.name for m in descriptor.methods if _has_rest_mapping(m)}
    assert not internal & annotated
    if descriptor.name == "StoreService":
        assert internal == {
            "LogPredictions",
            "ClaimAlerts",
            "CompleteAlert",
            "RecordEvaluation",
            "LeaseModels",
            "ReleaseModelLeases",
            "AcquireRoleLease",
            "ReleaseRoleLease",
            "CreateTrainingJob",
            "UpdateTrainingJob",
            "FailOrphanedTrainingJobs",
            "HeartbeatTrainingJobs",
            "ClaimTrainingJobs",
            "RegisterTrainedVersion",
            "CreateRollout",
            "UpdateRollout",
        }
        assert {"AddLabels", "SavePlan", "ListAlerts", "GetRollout"} <= annotated


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ("tokens: []", "tokens: must be a non-empty list"),
        ("tokens: [{token: short, scopes: [admin]}]", "tokens[0].token"),
        ("tokens: [{token: 0123456789abcdefXX, scopes: [root]}]", "tokens[0].scopes: unknown"),
        ("tokens: [{token: 0123456789abcdefXX}]", "tokens[0].scopes"),
        ("tokens: [{sha256: zz, scopes: [admin]}]", "tokens[0].sha256"),
        ("[1, 2", "tokens file"),
    ],
)
def test_bad_tokens_files_name_the_field(tmp_path: Path, content: str, field: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(TokenFileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        TokenSet.from_file(path)


def test_local_tokens_are_private_and_stable(tmp_path: Path) -> None:
    token = write_local_tokens(tmp_path)
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tokens.yaml").stat().st_mode & 0o777 == 0o600
    assert write_local_tokens(tmp_path) == token
    assert TokenSet.from_file(tmp_path / "tokens.yaml").scopes_of(token) == ALL_SCOPES
    assert TokenSet.from_file(tmp_path / "tokens.yaml").scopes_of(token + "x") is None


async def test_channels_send_the_callers_token(
    store: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from cyclone.channels import aio_channel, sync_channel
    from cyclone.store.v1 import store_service_pb2_grpc as store_grpc

    monkeypatch.setenv("HOME", str(tmp_path))  # no stray ~/.cyclone/token
    monkeypatch.delenv("CYCLONE_TOKEN", raising=False)
    request = store_pb.ListModelVersionsRequest()
    async with aio_channel(store) as anonymous:
        with pytest.raises(aio.AioRpcError) as err:
            await store_grpc.StoreServiceStub(anonymous).ListModelVersions(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    monkeypatch.setenv("CYCLONE_TOKEN", TOKENS[Scope.ADMIN])
    async with aio_channel(store) as channel:
        stub = store_grpc.StoreServiceStub(channel)
        await stub.ListModelVersions(request)
        # Every call kind carries it (grpc.aio files interceptors by kind).
        with pytest.raises(aio.AioRpcError) as missing:
            async for _ in stub.GetTrainingData(store_pb.GetTrainingDataRequest(model="nope")):
                pass
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    def blocking_calls() -> grpc.StatusCode:
        # A thread: the server runs on this test's event loop.
        with sync_channel(store) as channel:
            store_grpc.StoreServiceStub(channel).ListModelVersions(request)
        with sync_channel(store, token=TOKENS[Scope.LABEL]) as channel:
            try:
                store_grpc.StoreServiceStub(channel).ListModelVersions(request)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[attr-defined,no-any-return]
        return grpc.StatusCode.OK

    assert await asyncio.to_thread(blocking_calls) == grpc.StatusCode.PERMISSION_DENIED
