"""Every CLI command finds its target the same way: flag > CYCLONE_* variable > the running
mesh of the data dir > the default port; and when nothing answers it says what it tried and
how to start it, without gRPC internals."""

from __future__ import annotations

import json
import os
import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from cyclone.local_mesh import ADDRESS_ENV, MESH_FILE, resolve
from cyclone_app.cli import app, without_revision_header

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_mesh(data_dir: Path, pid: int, **addresses: str) -> None:
    components = {name: {"address": a, "pid": pid} for name, a in addresses.items()}
    info = {
        "pid": pid,
        "data_dir": str(data_dir),
        "public": addresses.get("public", "127.0.0.1:18080"),
        "control": "127.0.0.1:18081",
        "dashboard": "http://127.0.0.1:18090/",
        "components": components,
    }
    (data_dir / MESH_FILE).write_text(json.dumps(info))


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CYCLONE_DATA_DIR", str(tmp_path))
    for name in ADDRESS_ENV.values():
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_the_flag_wins_over_everything(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mesh(data_dir, os.getpid(), monitor="127.0.0.1:18003")
    monkeypatch.setenv("CYCLONE_MONITOR", "10.0.0.1:1")
    target = resolve("monitor", "10.0.0.2:2")
    assert (target.address, target.source) == ("10.0.0.2:2", "--monitor")


def test_the_environment_wins_over_the_mesh(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_mesh(data_dir, os.getpid(), trainer="127.0.0.1:18004")
    monkeypatch.setenv("CYCLONE_TRAINER", "10.0.0.1:1")
    target = resolve("trainer")
    assert (target.address, target.source) == ("10.0.0.1:1", "$CYCLONE_TRAINER")


def test_the_running_mesh_wins_over_the_default(data_dir: Path) -> None:
    _write_mesh(data_dir, os.getpid(), store="127.0.0.1:18002", public="127.0.0.1:18080")
    assert resolve("store").address == "127.0.0.1:18002"
    assert resolve("public").address == "127.0.0.1:18080"
    assert "the `cyclone up` running in" in resolve("store").describe()


def test_a_mesh_whose_process_is_gone_is_ignored(data_dir: Path) -> None:
    _write_mesh(data_dir, 2**22 + 12345, store="127.0.0.1:18002")  # no such pid
    target = resolve("store")
    assert (target.address, target.source) == ("127.0.0.1:8002", "default")
    assert resolve("public").address == "127.0.0.1:8001"
    assert "no `cyclone up` is running in" in target.describe()


COMMANDS = [
    ("monitor", ["plan", "get", "credit"]),
    ("monitor", ["alerts"]),
    ("store", ["label", "--model", "credit", "--id", "x", "--value", "1"]),
    ("trainer", ["retrain", "credit", "--no-wait"]),
    ("trainer", ["jobs"]),
    ("trainer", ["rollouts"]),
    ("trainer", ["rollback", "credit"]),
    ("trainer", ["promote", "1"]),
    ("public", ["predict", "--model", "credit", "--row", '{"age": 1}']),
]


@pytest.mark.parametrize(("component", "argv"), COMMANDS, ids=[" ".join(c[1]) for c in COMMANDS])
def test_every_command_goes_to_the_running_mesh_and_says_how_to_start_it(
    data_dir: Path, component: str, argv: list[str]
) -> None:
    """A mesh on other ports (nothing listening: it just went away) is where each command
    goes; the error names that address and `cyclone up`, in one sentence."""
    address = f"127.0.0.1:{_free_port()}"
    _write_mesh(data_dir, os.getpid(), **{component: address})
    (data_dir / "logs").mkdir()
    result = runner.invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert f"at {address} (the `cyclone up` running in {data_dir})" in result.output
    assert "start it with `cyclone up`" in result.output
    for internal in ("debug_error_string", "AioRpcError", "_InactiveRpcError", "StatusCode."):
        assert internal not in result.output
    assert address in (data_dir / "logs" / "cli.log").read_text()  # the raw error, for later


def test_with_nothing_running_the_error_names_where_the_address_came_from(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("CYCLONE_MONITOR", address)
    result = runner.invoke(app, ["alerts"])
    assert result.exit_code == 1
    assert f"the monitor at {address} (from $CYCLONE_MONITOR)" in result.output
    assert "start it with `cyclone up`" in result.output


def test_a_plan_saved_from_plan_get_loses_its_revision_header() -> None:
    text = "# revision 0 (generated default)\nmodel: credit\n# a comment of the user\n"
    assert without_revision_header(text) == "model: credit\n# a comment of the user\n"


def test_status_with_nothing_running_says_so_and_exits_non_zero(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CYCLONE_STORE", "CYCLONE_MONITOR", "CYCLONE_TRAINER"):
        monkeypatch.setenv(name, f"127.0.0.1:{_free_port()}")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1, result.output
    assert "no `cyclone up` mesh running here" in result.output
    assert result.output.count("start it with `cyclone up`") == 3
    assert runner.invoke(app, ["status", "--json"]).exit_code == 1


def test_down_with_nothing_running_names_the_data_dir(data_dir: Path) -> None:
    result = runner.invoke(app, ["down"])
    assert result.exit_code == 1
    assert f"no `cyclone up` is running in {data_dir}" in result.output


def test_down_while_a_starting_up_holds_the_data_dir_stops_nothing(data_dir: Path) -> None:
    """A `cyclone up` still starting holds the data dir's lock but wrote no mesh file yet:
    down must not sweep its components as a killed mesh's leftovers; it says so, exit 1."""
    from services.mesh import data_dir_holder, hold_data_dir

    assert data_dir_holder(data_dir) is None  # positive control: nobody holds it yet
    with hold_data_dir(data_dir):
        assert data_dir_holder(data_dir) == str(os.getpid())
        result = runner.invoke(app, ["down"])
    assert result.exit_code == 1, result.output
    assert f"pid {os.getpid()}" in result.output and "still starting" in result.output
    assert data_dir_holder(data_dir) is None  # released with the holder


def test_status_of_another_data_dir_sends_that_data_dirs_token(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cyclone status --data-dir X` reaches X's mesh with X's token (its services refuse any
    other); when none of them lets it in, the exit code says so."""

    other = tmp_path_factory.mktemp("other-mesh")
    (data_dir / "token").write_text("token-of-the-default-dir\n")
    (other / "token").write_text("token-of-the-other-dir\n")
    monkeypatch.delenv("CYCLONE_TOKEN", raising=False)
    sent: list[str] = []

    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        sent.extend(v for k, v in context.invocation_metadata() if k == "authorization")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: wrong token")

    class AnyMethod(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((AnyMethod(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        _write_mesh(other, os.getpid(), store=address, monitor=address, trainer=address)
        result = runner.invoke(app, ["status", "--data-dir", str(other)])
    finally:
        server.stop(0)
    assert sent, result.output
    assert set(sent) == {"Bearer token-of-the-other-dir"}
    assert result.exit_code == 1, result.output
