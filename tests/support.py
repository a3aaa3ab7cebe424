"""Helpers every test module shares: expected gRPC errors, waiting for a condition, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from services.launch import free_port

__all__ = ["eventually", "expect_error", "free_port", "make_pki", "store_and_trainer"]


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, *fragments: str) -> str:
    """Await `call`, which must fail with `code` and details containing every fragment."""
    with pytest.raises(aio.AioRpcError) as info:
        await call
    details = info.value.details() or ""
    assert info.value.code() == code, details
    for fragment in fragments:
        assert fragment in details, details
    return details


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(root: Path, client_name: str = "client") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl).

    Keys of the returned dict: ca.key, ca.pem, server.key, server.pem, client.key, client.pem.
    """
    files = {"ca.key": root / "ca.key", "ca.pem": root / "ca.pem"}
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", str(files["ca.key"]), "-out", str(files["ca.pem"]),
    )  # fmt: skip
    for who, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("client", f"DNS:{client_name}")):
        key, csr, pem, ext = (root / f"{who}.{s}" for s in ("key", "csr", "pem", "ext"))
        ext.write_text(f"subjectAltName={san}\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
            "-keyout", str(key), "-out", str(csr),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(files["ca.pem"]),
            "-CAkey", str(files["ca.key"]), "-CAcreateserial", "-days", "1",
            "-extfile", str(ext), "-out", str(pem),
        )  # fmt: skip
        files[f"{who}.key"], files[f"{who}.pem"] = key, pem
    return files


@contextlib.asynccontextmanager
async def store_and_trainer(
    database_url: str, repository: Path, data_dir: Path, **trainer: Any
) -> AsyncIterator[tuple[Any, Any]]:
    """A store on `database_url` and a trainer running Envoy in front of `repository`'s models
    (public and control listeners on free loopback ports); `trainer` overrides its settings."""
    from services.launch import start_store, start_trainer
    from services.store.main import StoreSettings
    from services.trainer.main import TrainerSettings

    store_settings = StoreSettings(
        port=0, database_url=database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(store_settings) as store:
        settings = TrainerSettings(
            **{
                "port": 0,
                "store": store.address,
                "model_repository": repository,
                "data_dir": data_dir,
                "log_level": "WARNING",
                "envoy": True,
                "public_host": "127.0.0.1",
                "public_port": 0,
                "control_port": 0,
                "monitor": "",
                **trainer,
            }
        )
        async with await start_trainer(settings) as started:
            yield store, started
