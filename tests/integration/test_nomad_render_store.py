"""`cyclone deploy nomad render --store`: job files follow what the registry holds."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from grpc import aio
from typer.testing import CliRunner

from cyclone.nomad.validate import check_directory
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone_app.cli import app
from services.launch import settings_class, start_store

pytestmark = pytest.mark.integration


async def test_render_follows_the_registry(fresh_database_url: str, tmp_path: Path) -> None:
    settings = settings_class("store")(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(settings) as store:
        address = f"127.0.0.1:{store.port}"
        schema = {"features": [{"name": "x", "kind": "numeric"}], "class_labels": ["0", "1"]}
        async with aio.insecure_channel(address) as channel:
            stub = store_grpc.StoreServiceStub(channel)
            for version, status in [
                ("1", store_pb.MODEL_STATUS_RETIRED),
                ("2", store_pb.MODEL_STATUS_SERVING),
                ("3", store_pb.MODEL_STATUS_STAGED),
            ]:
                await stub.RegisterModelVersion(
                    store_pb.RegisterModelVersionRequest(
                        model_version=store_pb.ModelVersion(
                            model="credit",
                            version=version,
                            task="classification",
                            schema_json=json.dumps(schema),
                        )
                    )
                )
                await stub.SetModelStatus(
                    store_pb.SetModelStatusRequest(model="credit", version=version, status=status)
                )
        out = tmp_path / "jobs"
        args = ["deploy", "nomad", "render", "--out", str(out), "--store", address]
        result = await asyncio.to_thread(CliRunner().invoke, app, args)
        assert result.exit_code == 0, result.output
        # Only the serving version runs; retired and staged ones get no job.
        assert [p.name for p in (out / "revisions").iterdir()] == ["credit--2.nomad.hcl"]
        check_directory(out, "cyclone:0.1.0")

    result = await asyncio.to_thread(
        CliRunner().invoke, app, [*args[:-1], "127.0.0.1:1"]
    )  # the store is gone
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.output
