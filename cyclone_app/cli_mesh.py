"""`cyclone up`, `down`, `status` and the rollout commands: the mesh as one product.

Registered on the main app by `cyclone_app.cli`; kept apart so the command file stays readable.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from cyclone.local_mesh import DEFAULT_PORTS, default_data_dir, read_mesh, resolve
from cyclone_app.cli_output import console as make_console

if TYPE_CHECKING:
    from rich.table import Table

    from cyclone.local_mesh import MeshInfo
    from services.mesh import Mesh, MeshSettings


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def up(
    data_dir: Annotated[
        Path | None, typer.Option(help="Data dir (models, database, logs); default ~/.cyclone.")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Where the public listener binds (0.0.0.0 for the network).")
    ] = "127.0.0.1",
    public_port: Annotated[
        int, typer.Option(help="Envoy: predictions and labels.")
    ] = DEFAULT_PORTS["public"],
    control_port: Annotated[int, typer.Option(help="Envoy: control plane (loopback).")] = (
        DEFAULT_PORTS["control"]
    ),
    store_port: Annotated[int, typer.Option()] = DEFAULT_PORTS["store"],
    monitor_port: Annotated[int, typer.Option()] = DEFAULT_PORTS["monitor"],
    trainer_port: Annotated[int, typer.Option()] = DEFAULT_PORTS["trainer"],
    dashboard_port: Annotated[int, typer.Option()] = DEFAULT_PORTS["dashboard"],
    database_url: Annotated[
        str | None, typer.Option(help="PostgreSQL URL; default: an embedded PostgreSQL.")
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository; default <data-dir>/models.")
    ] = None,
    auth: Annotated[
        bool, typer.Option("--auth/--no-auth", help="Require a token for the control plane.")
    ] = True,
    idle_timeout: Annotated[
        str,
        typer.Option(
            help="Stop a model revision after this long without requests (30s, 10m, 1h); the"
            " next request starts it again and waits for it. 0 = never."
        ),
    ] = "0",
    replicas: Annotated[
        int | None,
        typer.Option(
            help="Processes per serving model version; default 2 with 2+ cores and 2 GiB"
            " free (a crashed one's requests go to the other), else 1.",
            min=1,
        ),
    ] = None,
    pool: Annotated[
        bool,
        typer.Option(
            "--pool/--no-pool",
            help="Serve small models (model.onnx up to 64 MiB) from a shared pool, one process"
            " per core, loading versions on demand and evicting the least recently used;"
            " --no-pool: a revision (replicas) per version.",
        ),
    ] = True,
    stores: Annotated[
        int,
        typer.Option(
            help="Store processes over the one database, behind Envoy's control listener"
            " (one dying fails no call a client retries).",
            min=1,
            max=8,
        ),
    ] = 1,
    monitors: Annotated[
        int,
        typer.Option(
            help="Monitor processes sharing the models through leases in the store (one"
            " dying hands its models to the others within the lease time).",
            min=1,
            max=8,
        ),
    ] = 1,
    trainers: Annotated[
        int,
        typer.Option(
            help="Trainer processes: all run retraining jobs, one (elected through a lease in"
            " the store) drives Envoy and the rollouts; a standby takes over within the lease"
            " time when it dies.",
            min=1,
            max=8,
        ),
    ] = 1,
) -> None:
    """Start the whole mesh on this machine; Ctrl-C or SIGTERM stops it."""
    from services.mesh import MeshError, MeshSettings

    idle_seconds = _idle_seconds(idle_timeout)
    ports = {
        "public": public_port,
        "control": control_port,
        "store": store_port,
        "monitor": monitor_port,
        "trainer": trainer_port,
        "dashboard": dashboard_port,
    }
    _refuse_unusable_ports(host, ports)
    settings = MeshSettings(
        data_dir=(data_dir or default_data_dir()).resolve(),
        host=host,
        ports=ports,
        database_url=database_url or os.environ.get("CYCLONE_DATABASE_URL") or None,
        model_repository=model_repository,
        auth=auth,
        idle_timeout_seconds=idle_seconds,
        replicas=replicas,
        pool_processes=None if pool else 0,
        stores=stores,
        monitors=monitors,
        trainers=trainers,
    )
    try:
        _run_mesh(settings)
    except MeshError as exc:
        _fail(str(exc))


def _idle_seconds(idle_timeout: str) -> int:
    """`--idle-timeout` in seconds ("0": never)."""
    from cyclone.plan import parse_duration

    text = idle_timeout.strip()
    try:
        return 0 if text == "0" else parse_duration(text)
    except ValueError as exc:
        _fail(f"--idle-timeout: {exc}")


def _refuse_unusable_ports(host: str, ports: dict[str, int]) -> None:
    """Out of range, shared or taken ports stop `up` before the data dir, its lock or the live
    table exist: a refusal leaves nothing behind."""
    from services.mesh import port_taken

    for name, port in ports.items():
        if not 1 <= port <= 65535:
            _fail(f"--{name}-port: must be between 1 and 65535, got {port}")
    shared = sorted({p for p in ports.values() if list(ports.values()).count(p) > 1})
    if shared:
        names = [f"--{n}-port" for n, p in ports.items() if p in shared]
        _fail(f"{', '.join(names)}: must differ, all are {shared[0]}")
    taken = [
        f"{name} port {port} (--{name}-port)"
        for name, port in ports.items()
        if port_taken(host if name == "public" else "127.0.0.1", port)
    ]
    if taken:
        _fail(
            f"already in use: {', '.join(taken)}; nothing was started. Stop what listens there "
            "or pick free ports with those flags (another `cyclone up`? `cyclone status`)"
        )


def _run_mesh(settings: MeshSettings) -> None:
    """Hold the data dir, start the mesh under a live table of its components, say where it
    listens, then supervise it until a signal asks it to stop, and stop it."""
    from rich.live import Live

    from services.mesh import Mesh, MeshError, hold_data_dir

    console = make_console()
    states: dict[str, tuple[str, str]] = {}
    with (
        hold_data_dir(settings.data_dir),
        Live(
            _component_table(settings.data_dir, states),
            console=console,
            transient=False,
            auto_refresh=False,
        ) as live,
    ):

        def progress(component: str, state: str, detail: str) -> None:
            states[component] = (state, detail)
            live.update(_component_table(settings.data_dir, states), refresh=True)

        mesh = Mesh(settings, progress)
        with _stop_on_signals(mesh):
            try:
                info = mesh.start()
            except MeshError as exc:
                live.stop()
                _fail(str(exc))
            try:
                live.stop()
                console.print(_where_it_listens(info, settings))
                mesh.wait()
            finally:
                console.print("stopping…")
                mesh.stop()


_STATE_COLOURS = {"starting": "yellow", "ready": "green", "failed": "red", "stopped": "dim"}


def _component_table(data_dir: Path, states: dict[str, tuple[str, str]]) -> Table:
    """`cyclone up`'s live view: each component's state and detail."""
    from rich.table import Table

    table = Table("component", "state", "detail", title=f"Cyclone in {data_dir}")
    for name, (state, detail) in states.items():
        table.add_row(name, f"[{_STATE_COLOURS.get(state, 'white')}]{state}[/]", detail)
    return table


@contextlib.contextmanager
def _stop_on_signals(mesh: Mesh) -> Iterator[None]:
    """Ctrl-C and SIGTERM ask the mesh to stop (it stops in order); the previous handlers come
    back after."""
    previous = {
        sig: signal.signal(sig, lambda *_: mesh.request_stop())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _where_it_listens(info: MeshInfo, settings: MeshSettings) -> str:
    return (
        f"\n[bold]Cyclone is up[/bold]\n"
        f"  predictions and labels  {info.public}  (gRPC and REST; "
        f"POST http://{info.public}/v1/models/MODEL:predict)\n"
        f"  control plane           {info.control}\n"
        f"  dashboard               {info.dashboard}\n"
        f"  models                  {settings.repository}\n"
        f"  logs                    {settings.data_dir / 'logs'}\n"
        "Ctrl-C stops everything."
    )


def down(
    data_dir: Annotated[Path | None, typer.Option(help="Data dir of the mesh.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to stop.")] = 60.0,
) -> None:
    """Stop the mesh `cyclone up` started on this data dir (or what a killed one left)."""
    mesh = read_mesh(data_dir)
    if mesh is None:
        from services.mesh import data_dir_holder

        directory = (data_dir or default_data_dir()).expanduser().resolve()
        holder = data_dir_holder(directory)
        if holder is not None:
            _fail(
                f"a `cyclone up` (pid {holder}) holds {directory} but has not written where it"
                " listens yet (still starting): try again once it is up",
                1,
            )
        leftovers = _stop_leftovers(directory)
        if leftovers:
            typer.echo(
                f"no `cyclone up` was running in {directory}; stopped what a killed one left:"
                f" {', '.join(leftovers)}"
            )
            return
        _fail(
            f"no `cyclone up` is running in {directory} (nothing to stop;"
            " --data-dir or CYCLONE_DATA_DIR names another data dir)",
            1,
        )
        return
    # The mesh file goes first; "stopped" waits for the processes themselves.
    pids = {mesh.pid, *(c.pid for c in mesh.components.values())}
    os.kill(mesh.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while (read_mesh(data_dir) is not None or _running(pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _running(pids)
    if read_mesh(data_dir) is not None or left:
        _fail(
            f"the mesh (pid {mesh.pid}) is still stopping after {timeout:g}s"
            + (f" (pids {', '.join(map(str, sorted(left)))} still run)" if left else ""),
            1,
        )
    typer.echo(f"stopped the mesh in {mesh.data_dir} ({len(pids)} processes)")


def _stop_leftovers(data_dir: Path) -> list[str]:
    """What a `cyclone up` killed outright left running on `data_dir` (its supervisor gone, its
    store, trainer, monitors, Envoy and revisions in sessions of their own); then the embedded
    PostgreSQL its store left. The model repository comes from the mesh file it left, if any."""
    from cyclone.local_mesh import MESH_FILE
    from services.mesh import stop_strays
    from services.store.embedded import stop_if_running

    repository = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        recorded = json.loads((data_dir / MESH_FILE).read_text()).get("repository")
        repository = Path(recorded) if recorded else None
    stopped = [str(pid) for pid in stop_strays(data_dir, repository)]
    if stop_if_running(data_dir):
        stopped.append("the embedded PostgreSQL")
    with contextlib.suppress(FileNotFoundError):
        (data_dir / MESH_FILE).unlink()
    return stopped


def _running(pids: set[int]) -> set[int]:
    """The pids still running (a zombie waiting for its parent counts as gone)."""
    import psutil

    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.Error:
            continue
    return alive


# ---- status ---------------------------------------------------------------------------------


def _revision_processes(repository: str, data_dir: str = "") -> list[dict[str, Any]]:
    """The mesh's inference processes (the revisions outlive the trainer that started them,
    so they are found by the mesh's model repository): model, version, port, pid. A serving
    pool's process is listed once per pooled version the orchestrator recorded for it."""
    import psutil

    pooled = _pooled_versions(data_dir)
    found: list[dict[str, Any]] = []
    for child in psutil.process_iter():
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        if "serve" not in args or "inference" not in args or repository not in args:
            continue

        def arg(flag: str, argv: list[str] = args) -> str:
            return argv[argv.index(flag) + 1] if flag in argv else ""

        address = f"{arg('--host') or '127.0.0.1'}:{arg('--port')}"
        serves = pooled if "--pool-memory-mb" in args else [(arg("--model"), arg("--version"))]
        found += [
            {"model": model, "version": version, "address": address, "pid": child.pid}
            for model, version in serves
        ]
    return sorted(found, key=lambda r: (r["model"], r["version"], r["address"]))


def _pooled_versions(data_dir: str) -> list[tuple[str, str]]:
    """(model, version) of every pooled revision in `<data_dir>/revisions/running.json`."""
    try:
        state = json.loads((Path(data_dir) / "revisions" / "running.json").read_text())
    except (OSError, ValueError):
        return []
    return [
        (str(e["model"]), str(e["version"]))
        for e in state.values()
        if isinstance(e, dict) and e.get("pooled") and "model" in e and "version" in e
    ]


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _strategy_name(number: int) -> str:
    """A rollout's strategy as a user writes it ("unspecified" for none, the number for one
    this CLI does not know)."""
    from cyclone.rollout_strategies import strategy_from_pb

    try:
        return strategy_from_pb(number) or "unspecified"
    except ValueError:
        return str(number)


def collect_status(
    data_dir: Path | None = None,
    store: str | None = None,
    monitor: str | None = None,
    trainer: str | None = None,
) -> dict[str, Any]:
    """Everything `cyclone status --json` prints, as one JSON-able object. Each service adds
    what it knows; one that does not answer becomes a line in `problems`, not a failure."""
    import grpc

    from cyclone_app.cli_errors import describe_failure

    out: dict[str, Any] = {
        "mesh": _mesh_status(data_dir),
        "models": {},
        "alerts": [],
        "jobs": [],
        "rollouts": [],
    }
    problems: list[str] = []
    for name, flag, add in (
        ("store", store, _add_store_status),
        ("monitor", monitor, _add_monitor_status),
        ("trainer", trainer, _add_trainer_status),
    ):
        target = resolve(name, flag, data_dir)
        try:
            add(target.address, out)
        except grpc.RpcError as exc:
            problems.append(f"{name}: {describe_failure(exc, target)}")
    for model, entry in out["models"].items():
        if entry.get("level") == "RED":
            entry["next"] = next_step([j for j in out["jobs"] if j["model"] == model])
    out["problems"] = problems
    return out


def _mesh_status(data_dir: Path | None) -> dict[str, Any] | None:
    """The running `cyclone up` (its addresses, components and revision processes), if any."""
    mesh = read_mesh(data_dir)
    if mesh is None:
        return None
    return {
        "pid": mesh.pid,
        "data_dir": mesh.data_dir,
        "public": mesh.public,
        "control": mesh.control,
        "dashboard": mesh.dashboard,
        "components": {k: vars(v) for k, v in mesh.components.items()},
        "revisions": _revision_processes(mesh.repository, mesh.data_dir),
    }


def _model_entry(models: dict[str, Any], model: str) -> dict[str, Any]:
    entry: dict[str, Any] = models.setdefault(
        model, {"versions": {}, "serving": None, "split": {}, "level": None}
    )
    return entry


def _add_store_status(address: str, out: dict[str, Any]) -> None:
    """The storage mode, each model's traffic and every version's status (the serving one
    takes all the traffic unless a rollout says otherwise)."""
    from cyclone.client import StoreClient
    from cyclone.store.v1 import store_service_pb2 as spb

    models: dict[str, Any] = out["models"]
    with StoreClient(address) as client:
        stats = client.stats()
        out["storage_mode"] = stats.storage_mode
        for m in stats.models:
            _model_entry(models, m.model)["traffic"] = {
                "predictions": m.predictions,
                "labels": m.labels,
                "label_coverage": m.label_coverage,
                "ingest_lag_seconds": m.ingest_lag_seconds,
            }
        for v in client.model_versions():
            entry = _model_entry(models, v.model)
            status = _enum_name(spb.ModelStatus, v.status, "MODEL_STATUS_")
            entry["versions"][v.version] = {
                "status": status,
                "parent": v.parent_version or None,
                "alert": v.triggering_alert_id or None,
                "training_rows": v.training_rows or None,
                "family": v.family or None,
            }
            if status == "serving":
                entry["serving"] = v.version
                entry["split"] = {v.version: 100.0}


def _add_monitor_status(address: str, out: dict[str, Any]) -> None:
    """Each model's level, reasons and metrics, and the alerts not yet delivered."""
    from cyclone.client import MonitorClient
    from cyclone.monitor.v1 import monitor_service_pb2 as mpb

    with MonitorClient(address) as client:
        for s in client.status():
            entry = _model_entry(out["models"], s.model)
            entry["level"] = _enum_name(mpb.Level, s.level, "LEVEL_").upper()
            entry["reasons"] = list(s.reasons)
            entry["metrics"] = {m.name: m.value if m.HasField("value") else None for m in s.metrics}
            entry["estimated_vs_realized"] = estimated_lines(s.metrics)
        out["alerts"] = [
            {
                "id": a.id,
                "model": a.model,
                "action": a.action,
                "sink": a.sink,
                "status": a.status,
                "reasons": list(a.reasons),
            }
            for a in client.alerts()
            if a.status != "delivered"
        ]


def _add_trainer_status(address: str, out: dict[str, Any]) -> None:
    """The newest jobs and rollouts; a rollout in flight sets its model's traffic split."""
    from cyclone.client import TrainerClient
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    models: dict[str, Any] = out["models"]
    with TrainerClient(address, timeout=10) as client:
        out["jobs"] = [
            {
                "id": j.id,
                "model": j.model,
                "state": _enum_name(tpb.JobState, j.state, "JOB_STATE_"),
                "stage": j.stage,
                "new_version": j.new_version or None,
                "message": j.message,
            }
            for j in client.jobs(limit=20)
        ]
        for r in client.rollouts(limit=20):
            state = _enum_name(tpb.RolloutState, r.state, "ROLLOUT_STATE_")
            out["rollouts"].append(
                {
                    "id": r.id,
                    "model": r.model,
                    "from": r.from_version or None,
                    "to": r.to_version,
                    "strategy": _strategy_name(r.strategy),
                    "state": state,
                    "weight": r.current_weight,
                }
            )
            if state in ("pending", "progressing", "paused") and r.model in models:
                split = {r.to_version: r.current_weight}
                if r.from_version:
                    split[r.from_version] = 100.0 - r.current_weight
                models[r.model]["split"] = split


def next_step(jobs: list[dict[str, Any]]) -> str:
    """What happens next to a RED model, from its newest retraining job (newest first)."""
    if not jobs:
        return "no retraining job yet (the plan's RED actions decide whether one comes)"
    job = jobs[0]
    if job["state"] in ("queued", "running"):
        return f"job {job['id']} {job['state']}: {job['stage']}"
    if job["state"] == "succeeded":
        return f"job {job['id']} registered v{job['new_version']}: its rollout decides"
    return (
        f"no further retraining until the level changes: job {job['id']} {job['state']}:"
        f" {job['message']}"
    )


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="Data dir of the mesh.")] = None,
    store: Annotated[
        str | None, typer.Option(help="Store HOST:PORT (default: the mesh's).")
    ] = None,
    monitor: Annotated[str | None, typer.Option(help="Monitor HOST:PORT.")] = None,
    trainer: Annotated[str | None, typer.Option(help="Trainer HOST:PORT.")] = None,
) -> None:
    """Components, models, versions, traffic split, levels, open alerts, jobs and rollouts."""
    if data_dir is not None:
        # The clients send that data dir's token (`cyclone.auth.client_token`), not ~/.cyclone's.
        os.environ["CYCLONE_DATA_DIR"] = str(data_dir)
    collected = collect_status(data_dir, store, monitor, trainer)
    # No service answered (none running, or none let us in): say so in the exit code too.
    nothing = len(collected["problems"]) == 3
    if as_json:
        typer.echo(json.dumps(collected, indent=2, default=str))
        if nothing:
            raise typer.Exit(1)
        return
    from rich.table import Table

    console = make_console()
    mesh = collected["mesh"]
    if mesh:
        console.print(
            f"mesh pid {mesh['pid']}: public {mesh['public']}, control {mesh['control']}, "
            f"dashboard {mesh['dashboard']}"
        )
        for name, c in mesh["components"].items():
            console.print(f"  {name:<8} {c['address']:<22} pid {c['pid']}")
        for r in mesh["revisions"]:
            console.print(
                f"  revision {r['model']} v{r['version']} on {r['address']} pid {r['pid']}"
            )
    else:
        console.print("no `cyclone up` mesh running here; showing what the services answer")
    if "storage_mode" in collected:
        console.print(f"storage mode: [bold]{collected['storage_mode']}[/bold]")
    table = Table(
        "model", "serving", "predictions", "labels", "coverage", "level", "split", "versions"
    )
    for model, m in sorted(collected["models"].items()):
        split = ", ".join(f"v{v} {w:.0f}%" for v, w in m.get("split", {}).items())
        versions = ", ".join(f"{v}:{info['status']}" for v, info in m.get("versions", {}).items())
        traffic = m.get("traffic", {})
        table.add_row(
            model,
            str(m.get("serving") or "-"),
            str(traffic.get("predictions", "-")),
            str(traffic.get("labels", "-")),
            f"{traffic['label_coverage']:.1%}" if traffic else "-",
            str(m.get("level") or "-"),
            split,
            versions,
        )
    console.print(table)
    for model, m in sorted(collected["models"].items()):
        for reason in m.get("reasons", []):
            console.print(f"{model}: {reason}", markup=False)
        for line in m.get("estimated_vs_realized", []):
            console.print(f"{model}: {line}", markup=False)
        if m.get("next"):
            console.print(f"{model}: next: {m['next']}", markup=False)
    for r in collected["rollouts"][:5]:
        console.print(
            f"rollout {r['id']} {r['model']} {r['from'] or '-'}→{r['to']} {r['strategy']}: "
            f"{r['state']} at {r['weight']:.0f}%"
        )
    for j in collected["jobs"][:5]:
        console.print(f"job {j['id']} {j['model']}: {j['state']} ({j['stage']}) {j['message']}")
    for a in collected["alerts"]:
        console.print(
            f"[yellow]alert #{a['id']} {a['model']} {a['action']}→{a['sink']}: {a['status']}[/]"
        )
    for p in collected["problems"]:
        console.print(f"[red]{p}[/red]", markup=True, highlight=False)
    if nothing:
        raise typer.Exit(1)


def estimated_lines(metrics: Any) -> list[str]:
    """Each estimated metric next to its realized twin (the name without ``estimated_``)."""
    by_name = {m.name: m for m in metrics}
    lines = []
    for name, m in by_name.items():
        if not name.startswith("estimated_") or not m.HasField("value"):
            continue
        twin = by_name.get(name.removeprefix("estimated_"))
        realized = (
            f"realized {twin.name} {twin.value:.4g}"
            if twin is not None and twin.HasField("value")
            else "realized: not enough labels yet"
        )
        lines.append(f"{name} {m.value:.4g} ({m.detail}); {realized}")
    return lines


def announce_import(mesh: Any, directory: Path) -> str:
    """Tell a running mesh about a version just written into its repository: register it;
    a model's first version is served at once, a later one waits for `cyclone rollout`."""
    import asyncio

    from cyclone.channels import aio_channel
    from cyclone.client import TrainerClient
    from cyclone.models.registration import register
    from cyclone.models.repository import ModelFiles
    from cyclone.store.v1 import store_service_pb2 as spb
    from cyclone.store.v1 import store_service_pb2_grpc as store_grpc

    files = ModelFiles(directory.parent.name, directory.name, directory)

    async def registered() -> bool:
        async with aio_channel(mesh.address("store")) as channel:
            stub = store_grpc.StoreServiceStub(channel)
            await register(stub, files, serve_if_first=False)
            listed = await stub.ListModelVersions(
                spb.ListModelVersionsRequest(model=files.name), timeout=10
            )
            return any(v.status == spb.MODEL_STATUS_SERVING for v in listed.model_versions)

    if asyncio.run(registered()):
        return (
            f"registered {files.name} {files.version} with the running mesh (staged); "
            f"`cyclone rollout {files.name} {files.version}` moves traffic to it"
        )
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    with TrainerClient(mesh.address("trainer")) as trainer:
        rollout = trainer.rollout(files.name, files.version)
        deadline = time.monotonic() + 120
        while rollout.state in (tpb.ROLLOUT_STATE_PENDING, tpb.ROLLOUT_STATE_PROGRESSING):
            if time.monotonic() > deadline:
                return f"registered {files.name} {files.version}; still starting (rollout {rollout.id})"
            time.sleep(0.3)
            rollout = trainer.get_rollout(rollout.id)
    if rollout.state != tpb.ROLLOUT_STATE_PROMOTED:
        return (
            f"registered {files.name} {files.version} but it could not be served: {rollout.reason}"
        )
    return (
        f"registered {files.name} {files.version} and serving it through {mesh.public} "
        f"(send header cyclone-model: {files.name} over gRPC)"
    )


# ---- rollouts -------------------------------------------------------------------------------

TrainerAddress = Annotated[str | None, typer.Option("--trainer", help="Trainer HOST:PORT.")]


def _show_rollout(r: Any) -> None:
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    state = _enum_name(tpb.RolloutState, r.state, "ROLLOUT_STATE_")
    strategy = _strategy_name(r.strategy)
    typer.echo(
        f"rollout {r.id} {r.model} {r.from_version or '-'} -> {r.to_version} ({strategy}): "
        f"{state} at {r.current_weight:.0f}%" + (f"; {r.reason}" if r.reason else "")
    )


def _trainer_call(trainer: str | None, call: Any) -> Any:
    import grpc

    from cyclone.client import TrainerClient
    from cyclone_app.cli_errors import describe_failure, waiting_out_failover

    target = resolve("trainer", trainer)
    try:
        with TrainerClient(target.address) as client:
            return waiting_out_failover(lambda: call(client))
    except grpc.RpcError as exc:
        _fail(describe_failure(exc, target), 1)


def _follow(trainer: str | None, rollout_id: str) -> Any:
    """Print each step of a rollout until it ends; the rollout as it ended."""
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    def follow(client: Any) -> Any:
        for event in client._stub.WatchRollout(tpb.WatchRolloutRequest(rollout_id=rollout_id)):
            s = event.step
            typer.echo(f"  {s.weight:>5.1f}%  {s.decision:<12} {s.reason}")
        return client.get_rollout(rollout_id)

    return _trainer_call(trainer, follow)


def rollout(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Registered version to roll out.")],
    strategy: Annotated[
        str, typer.Option(help="A rollout strategy (canary, blue_green, ...); default the plan's.")
    ] = "",
    wait: Annotated[bool, typer.Option(help="Follow the steps until it ends.")] = False,
    trainer: TrainerAddress = None,
) -> None:
    """Move a model's traffic to a version, zero-downtime, with automatic analysis."""
    from cyclone.rollout_strategies import STRATEGIES

    if strategy and strategy not in STRATEGIES:
        _fail(f"--strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    started = _trainer_call(trainer, lambda c: c.rollout(model, version, strategy))
    _show_rollout(started)
    if not wait:
        typer.echo(f"follow it with `cyclone rollouts --model {model}`")
        return
    _show_rollout(_follow(trainer, started.id))


def promote(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    trainer: TrainerAddress = None,
) -> None:
    """Promote a rollout now (skip the remaining steps)."""
    r = _trainer_call(trainer, lambda c: c.promote(rollout_id))
    typer.echo(f"promoted rollout {r.id}: {r.model} {r.to_version} takes all traffic")
    _show_rollout(r)


def rollback(
    model: Annotated[str, typer.Argument(help="Model name.")],
    rollout_id: Annotated[
        str, typer.Option(help="Rollout id; default the model's active one.")
    ] = "",
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    wait: Annotated[bool, typer.Option(help="Follow it until it ends.")] = False,
    trainer: TrainerAddress = None,
) -> None:
    """Send all of a model's traffic back to the previous version.

    During a rollout: roll it back. After a promotion: a rollout of its own back to the version
    the promotion replaced (red-black: started, healthy, then all traffic at once).
    """
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    r = _trainer_call(trainer, lambda c: c.rollback(model, rollout_id, reason))
    if r.state == tpb.ROLLOUT_STATE_ROLLED_BACK:
        typer.echo(
            f"rolled back rollout {r.id}: {r.model} {r.from_version or '-'} serves all traffic"
            f" again, {r.to_version} stopped"
        )
    else:
        typer.echo(
            f"rolling {r.model} back from {r.from_version or '-'} to {r.to_version}"
            f" (rollout {r.id}, {_strategy_name(r.strategy)})"
        )
    if wait and r.state in (
        tpb.ROLLOUT_STATE_PENDING,
        tpb.ROLLOUT_STATE_PROGRESSING,
        tpb.ROLLOUT_STATE_PAUSED,
    ):
        r = _follow(trainer, r.id)
    _show_rollout(r)


def rollouts(
    model: Annotated[str, typer.Option(help="Model name; default all.")] = "",
    trainer: TrainerAddress = None,
) -> None:
    """List rollouts, newest first."""
    for r in _trainer_call(trainer, lambda c: c.rollouts(model)):
        _show_rollout(r)
