"""Client channels to Cyclone services: one place that adds the caller's token and TLS.

Every channel a service or client opens to another Cyclone service comes from here, so a mesh
with tokens or TLS switched on needs no change anywhere else. The token is `$CYCLONE_TOKEN` or
`<data_dir>/token` (see `cyclone.auth.client_token`); TLS is on when `$CYCLONE_TLS_CA_FILE`
names the CA to trust (plus `$CYCLONE_TLS_CERT_FILE`/`$CYCLONE_TLS_KEY_FILE` for mutual TLS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from cyclone.auth import call_metadata, client_token

TLS_CA_ENV = "CYCLONE_TLS_CA_FILE"
TLS_CERT_ENV = "CYCLONE_TLS_CERT_FILE"
TLS_KEY_ENV = "CYCLONE_TLS_KEY_FILE"

Options = Sequence[tuple[str, Any]]


def _credentials() -> grpc.ChannelCredentials | None:
    ca = os.environ.get(TLS_CA_ENV)
    if not ca:
        return None
    cert, key = os.environ.get(TLS_CERT_ENV), os.environ.get(TLS_KEY_ENV)
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


def _with_metadata(details: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    metadata = tuple(details.metadata or ()) + extra
    return details._replace(metadata=metadata)


class _AioTokenMixin:
    # grpc.aio files each interceptor under the first kind it is (an if/elif chain), so one
    # object per call kind is needed: a single class deriving from all four only sees unary.
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata


class _AioUnaryUnary(_AioTokenMixin, aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _AioUnaryStream(_AioTokenMixin, aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _AioStreamUnary(_AioTokenMixin, aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), requests)


class _AioStreamStream(_AioTokenMixin, aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), requests)


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[Any]:
    kinds = (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    return [kind(metadata) for kind in kinds]


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_metadata(details, self._metadata), requests)


def aio_channel(address: str, *, options: Options = (), token: str | None = None) -> aio.Channel:
    """An asyncio channel to `address` with the caller's token and TLS when configured."""
    metadata = call_metadata(token or client_token())
    interceptors = _aio_interceptors(metadata) if metadata else None
    credentials = _credentials()
    if credentials is not None:
        return aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(address: str, *, options: Options = (), token: str | None = None) -> grpc.Channel:
    """A blocking channel to `address` with the caller's token and TLS when configured."""
    credentials = _credentials()
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address, options=options)
    )
    metadata = call_metadata(token or client_token())
    return grpc.intercept_channel(channel, _SyncToken(metadata)) if metadata else channel
