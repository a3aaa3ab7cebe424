"""TLS and mutual TLS on a real server, with certificates made for the test by openssl."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from support import make_pki

from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from services.inference.main import InferenceSettings
from services.launch import start_inference

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _predict(channel: aio.Channel) -> pb.PredictResponse:
    request = pb.PredictRequest(model="credit")
    for name, value in {"age": 41.0, "income": 52000.0, "debt_ratio": 0.31}.items():
        request.features[name].numbers.append(value)
    request.features["city"].strings.append("porto")
    return await pb_grpc.InferenceServiceStub(channel).Predict(request, timeout=5)


def _credentials(pki: dict[str, Path], client_cert: bool) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca.pem"].read_bytes(),
        private_key=pki["client.key"].read_bytes() if client_cert else None,
        certificate_chain=pki["client.pem"].read_bytes() if client_cert else None,
    )


async def test_tls_serves_encrypted_and_refuses_plaintext(
    model_repo: Any, pki: dict[str, Path]
) -> None:
    settings = InferenceSettings(
        model_repository=model_repo.root,
        port=0,
        log_level="WARNING",
        tls_cert_file=pki["server.pem"],
        tls_key_file=pki["server.key"],
    )
    async with await start_inference(settings) as started:
        async with aio.secure_channel(started.address, _credentials(pki, False)) as channel:
            response = await _predict(channel)
            assert len(response.prediction_ids) == 1
        async with aio.insecure_channel(started.address) as plain:
            with pytest.raises(aio.AioRpcError) as err:
                await _predict(plain)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate(model_repo: Any, pki: dict[str, Path]) -> None:
    settings = InferenceSettings(
        model_repository=model_repo.root,
        port=0,
        log_level="WARNING",
        tls_cert_file=pki["server.pem"],
        tls_key_file=pki["server.key"],
        tls_client_ca_file=pki["ca.pem"],
    )
    async with await start_inference(settings) as started:
        async with aio.secure_channel(started.address, _credentials(pki, True)) as channel:
            assert len((await _predict(channel)).prediction_ids) == 1
        async with aio.secure_channel(started.address, _credentials(pki, False)) as anonymous:
            with pytest.raises(aio.AioRpcError) as err:
                await _predict(anonymous)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_certificate_is_refused_naming_both_settings(
    model_repo: Any, pki: dict[str, Path]
) -> None:
    from cyclone.server import server_credentials

    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file"):
        server_credentials(InferenceSettings(tls_cert_file=pki["server.pem"]))
