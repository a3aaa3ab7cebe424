"""`cyclone up --stores N --monitors N --trainers N`: what the supervisor plans to start (nothing is started).

Several stores sit behind Envoy's control listener (the trainer and monitors call it), each on
its own port in the store cluster; the second and later monitors run without a dashboard; one
of each is planned exactly as before."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.mesh import Mesh, MeshError, MeshSettings


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_one_of_each_is_planned_as_before(tmp_path: Path) -> None:
    mesh = Mesh(MeshSettings(data_dir=tmp_path))
    plan = {c.name: c for c in mesh.plan()}
    assert list(plan) == ["store", "envoy", "trainer", "monitor"]
    assert _arg(plan["monitor"].args, "--store") == "127.0.0.1:8002"
    assert _arg(plan["trainer"].args, "--store") == "127.0.0.1:8002"
    assert _arg(plan["monitor"].args, "--dashboard-port") == "8090"
    assert _arg(plan["monitor"].args, "--trainer") == "127.0.0.1:8004"
    assert "--envoy-trainers" not in plan["trainer"].args
    assert "--envoy-stores" not in plan["trainer"].args
    assert mesh.envoy_settings().extra_stores == ()
    assert mesh.envoy_settings().extra_trainers == ()


def test_two_stores_and_two_monitors(tmp_path: Path) -> None:
    mesh = Mesh(MeshSettings(data_dir=tmp_path, stores=2, monitors=2, ports={"store-2": 18012}))
    plan = {c.name: c for c in mesh.plan()}
    assert list(plan) == ["store", "store-2", "envoy", "trainer", "monitor", "monitor-2"]
    assert (plan["store-2"].serves, plan["store-2"].port) == ("store", 18012)
    assert plan["monitor-2"].serves == "monitor"
    assert plan["monitor-2"].port not in (8003, plan["monitor"].port)
    # Everything that calls the store goes through Envoy's control listener.
    for caller in ("trainer", "monitor", "monitor-2"):
        assert _arg(plan[caller].args, "--store") == "127.0.0.1:8081", caller
    assert _arg(plan["monitor"].args, "--dashboard-port") == "8090"
    assert _arg(plan["monitor-2"].args, "--dashboard-port") == "-1"
    envoy = mesh.envoy_settings()
    assert envoy.store is not None and envoy.store.port == 8002
    assert [e.port for e in envoy.extra_stores] == [18012]
    # Planned twice (a restart): the same ports.
    assert {c.name: c.port for c in mesh.plan()} == {c.name: c.port for c in plan.values()}
    # The trainer writes Envoy's store cluster with every store, not the control listener.
    assert _arg(plan["trainer"].args, "--envoy-stores") == "127.0.0.1:8002,127.0.0.1:18012"


def test_two_trainers_behind_the_control_listener(tmp_path: Path) -> None:
    mesh = Mesh(MeshSettings(data_dir=tmp_path, trainers=2, ports={"trainer-2": 18014}))
    plan = {c.name: c for c in mesh.plan()}
    assert list(plan) == ["store", "envoy", "trainer", "trainer-2", "monitor"]
    assert (plan["trainer-2"].serves, plan["trainer-2"].port) == ("trainer", 18014)
    # Both drive the same Envoy when they lead, with the same trainer cluster; each keeps
    # its own holder id across restarts.
    for name in ("trainer", "trainer-2"):
        args = plan[name].args
        assert _arg(args, "--envoy-trainers") == "127.0.0.1:8004,127.0.0.1:18014"
        assert _arg(args, "--instance-id") == name
    # The monitor's alerts reach whichever trainer leads, through Envoy.
    assert _arg(plan["monitor"].args, "--trainer") == "127.0.0.1:8081"
    envoy = mesh.envoy_settings()
    assert envoy.trainer is not None and envoy.trainer.port == 8004
    assert [e.port for e in envoy.extra_trainers] == [18014]


@pytest.mark.parametrize("field", ["stores", "monitors", "trainers"])
def test_no_instance_is_refused(tmp_path: Path, field: str) -> None:
    with pytest.raises(MeshError, match=field):
        MeshSettings(data_dir=tmp_path, **{field: 0})  # type: ignore[arg-type]
