"""The `cyclone` command line. Heavy imports stay inside commands so `--help` is instant."""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(help="Cyclone: serve, log, monitor and retrain ML models.", no_args_is_help=True)
serve_app = typer.Typer(help="Run a Cyclone service.", no_args_is_help=True)
model_app = typer.Typer(help="Manage models in a model repository.", no_args_is_help=True)
plan_app = typer.Typer(help="Read and change monitoring plans.", no_args_is_help=True)
plugins_app = typer.Typer(help="Inspect plugins.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(model_app, name="model")
app.add_typer(plan_app, name="plan")
app.add_typer(plugins_app, name="plugins")

_WHERE = "default: ${env}, else the running `cyclone up`'s, else 127.0.0.1:{port}"
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Store HOST:PORT; " + _WHERE.format(env="CYCLONE_STORE", port=8002),
    ),
]
MonitorOpt = Annotated[
    str | None,
    typer.Option(
        "--monitor",
        help="Monitor HOST:PORT; " + _WHERE.format(env="CYCLONE_MONITOR", port=8003),
    ),
]
TrainerOpt = Annotated[
    str | None,
    typer.Option(
        "--trainer",
        help="Trainer HOST:PORT; " + _WHERE.format(env="CYCLONE_TRAINER", port=8004),
    ),
]

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML settings file.")]
HostOpt = Annotated[str | None, typer.Option(help="Address to bind.")]
PortOpt = Annotated[int | None, typer.Option(help="gRPC port (0 picks a free one).")]
MetricsPortOpt = Annotated[int | None, typer.Option(help="Prometheus port (0 free, -1 off).")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Cyclone data directory.")]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _settings(cls: Any, flags: dict[str, Any], config: Path | None) -> Any:
    from cyclone.settings import SettingsError, load_settings

    try:
        return load_settings(cls, flags, config_file=config)
    except SettingsError as exc:
        fail(str(exc))


@serve_app.command("inference")
def serve_inference(
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository directory.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Serve only this model (one revision).")] = None,
    version: Annotated[str | None, typer.Option(help="Version of --model; default latest.")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    metrics_port: MetricsPortOpt = None,
    intra_op_threads: Annotated[
        int | None, typer.Option(help="onnxruntime intra-op threads.")
    ] = None,
    inter_op_threads: Annotated[
        int | None, typer.Option(help="onnxruntime inter-op threads.")
    ] = None,
    max_batch_rows: Annotated[
        int | None, typer.Option(help="Most rows one request may carry.")
    ] = None,
    store: Annotated[
        str | None, typer.Option(help="Store HOST:PORT; log every prediction there.")
    ] = None,
    spool_dir: Annotated[
        Path | None, typer.Option(help="Disk spool for when the store is down.")
    ] = None,
    pool_memory_mb: Annotated[
        float | None,
        typer.Option(
            help="Serve as a pool member: load model versions on demand, evict the least"
            " recently used past this many MiB."
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve ONNX models over Cyclone's API and the Open Inference Protocol."""
    from services.launch import run, settings_class

    flags = {k: v for k, v in locals().items() if k != "config"}
    settings = _settings(settings_class("inference"), flags, config)
    if not settings.model_repository.is_dir():
        fail(f"--model-repository: {settings.model_repository} is not a directory")
    run("inference", settings)


@serve_app.command("store")
def serve_store(
    database_url: Annotated[
        str | None, typer.Option(help="PostgreSQL URL; default: Cyclone's embedded PostgreSQL.")
    ] = None,
    data_dir: DataDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    metrics_port: MetricsPortOpt = None,
    retention_days: Annotated[
        int | None,
        typer.Option(help="Drop predictions and labels older than this many days; 0: never."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Run the prediction/label/registry store (PostgreSQL, TimescaleDB when available)."""
    from services.launch import run, settings_class

    flags = {k: v for k, v in locals().items() if k != "config"}
    run("store", _settings(settings_class("store"), flags, config))


@serve_app.command("monitor")
def serve_monitor(
    store: Annotated[str | None, typer.Option(help="Store HOST:PORT.")] = None,
    dashboard_port: Annotated[
        int | None, typer.Option(help="Live dashboard HTTP port (0 free, -1 off).")
    ] = None,
    trainer: Annotated[
        str | None,
        typer.Option(help="Trainer HOST:PORT: retrain/rollback actions go there (else recorded)."),
    ] = None,
    probe_address: Annotated[
        str | None,
        typer.Option(help="Where known-answer probes go (Envoy's public HOST:PORT); default off."),
    ] = None,
    data_dir: DataDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Evaluate monitoring plans on schedule; keep RAG levels; deliver alerts; dashboard."""
    from services.launch import run, settings_class

    flags = {k: v for k, v in locals().items() if k != "config"}
    run("monitor", _settings(settings_class("monitor"), flags, config))


@serve_app.command("trainer")
def serve_trainer(
    store: Annotated[str | None, typer.Option(help="Store HOST:PORT.")] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository new versions are written to.")
    ] = None,
    max_parallel_jobs: Annotated[
        int | None, typer.Option(help="Models retrained at the same time.")
    ] = None,
    envoy: Annotated[
        bool | None,
        typer.Option(
            "--envoy/--no-envoy",
            help="Run Envoy in front: serve every registered model, roll new versions out.",
        ),
    ] = None,
    envoy_apart: Annotated[
        bool | None,
        typer.Option(
            "--envoy-apart/--no-envoy-apart",
            help="With --envoy: Envoy runs apart (cyclone up supervises it); attach to it, adopt"
            " running revisions, and leave both running at exit.",
        ),
    ] = None,
    public_host: Annotated[str | None, typer.Option(help="Envoy public listener host.")] = None,
    public_port: Annotated[int | None, typer.Option(help="Envoy public listener port.")] = None,
    control_port: Annotated[
        int | None, typer.Option(help="Envoy control listener port (loopback).")
    ] = None,
    monitor: Annotated[str | None, typer.Option(help="Monitor HOST:PORT (control routes).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Processes per model revision.")] = None,
    pool_processes: Annotated[
        int | None,
        typer.Option(
            help="Serving pool: shared inference processes for small models (0: a revision"
            " per version)."
        ),
    ] = None,
    pool_memory_mb: Annotated[
        float | None, typer.Option(help="Serving pool: MiB of models each process holds.")
    ] = None,
    pool_threshold_mb: Annotated[
        float | None,
        typer.Option(help="Serving pool: versions whose model.onnx is at most this are pooled."),
    ] = None,
    run_job_file: Annotated[
        Path | None,
        typer.Option(help="Run the one queued job whose id this file holds, then exit (Nomad)."),
    ] = None,
    idle_timeout_seconds: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout",
            help="Seconds without requests before a revision is stopped (scale to zero; the"
            " next request starts it again). 0 = never.",
        ),
    ] = None,
    job_executor: Annotated[
        str | None,
        typer.Option(
            help="Where retraining jobs run: local (worker processes here) or nomad (a dispatch"
            " of the retrain batch job per job; this trainer still rolls out)."
        ),
    ] = None,
    nomad_address: Annotated[
        str | None, typer.Option(help="Nomad HTTP API address (--job-executor nomad).")
    ] = None,
    nomad_token: Annotated[
        str | None, typer.Option(help="Nomad ACL token (or CYCLONE_NOMAD_TOKEN).")
    ] = None,
    nomad_namespace: Annotated[str | None, typer.Option(help="Nomad namespace.")] = None,
    nomad_retrain_job: Annotated[
        str | None, typer.Option(help="The parameterized retrain job to dispatch.")
    ] = None,
    remote_job_timeout_seconds: Annotated[
        float | None,
        typer.Option(
            "--remote-job-timeout",
            help="Seconds a dispatched job may take (plus the plan's retrain.wait).",
        ),
    ] = None,
    leader_lease_seconds: Annotated[
        float | None,
        typer.Option(
            "--leader-lease",
            help="With --envoy and several trainers: seconds a dead leader keeps the traffic"
            " plane before a standby takes it over.",
        ),
    ] = None,
    instance_id: Annotated[
        str | None,
        typer.Option(help="This trainer's lease holder id (default: host, pid, random part)."),
    ] = None,
    advertise_address: Annotated[
        str | None, typer.Option(help="HOST:PORT other trainers reach this one at.")
    ] = None,
    envoy_stores: Annotated[
        str | None,
        typer.Option(help="Comma-separated: every store in Envoy's store cluster (several)."),
    ] = None,
    envoy_trainers: Annotated[
        str | None,
        typer.Option(help="Comma-separated: every trainer in Envoy's trainer cluster (several)."),
    ] = None,
    data_dir: DataDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Retrain models on alerts or by hand; register challengers that beat the champion."""
    from services.launch import run, settings_class

    flags = {k: v for k, v in locals().items() if k != "config"}
    run("trainer", _settings(settings_class("trainer"), flags, config))


@model_app.command("import")
def model_import(
    pipeline: Annotated[
        Path, typer.Argument(help="Fitted scikit-learn pipeline saved with joblib.")
    ],
    name: Annotated[str, typer.Option(help="Model name.")],
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository; default the running mesh's, else ./models."),
    ] = None,
    version: Annotated[str | None, typer.Option(help="Version; default next integer.")] = None,
    sample: Annotated[
        Path | None, typer.Option(help="CSV of real rows: parity check and the drift reference.")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Target column of --sample: baseline metrics.")
    ] = None,
    feature_names: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated feature names, in column order, for a pipeline fitted on a "
            "numpy array (default f0,f1,...)."
        ),
    ] = None,
) -> None:
    """Convert a scikit-learn pipeline to ONNX, check parity, write it into the repository.

    Plain estimators and pipelines take all features as one [N, F] tensor; pipelines with a
    ColumnTransformer take one tensor per feature. The fitted pipeline is kept next to the
    ONNX model as pipeline.joblib.
    """
    import joblib
    import pandas as pd

    from cyclone.local_mesh import read_mesh
    from cyclone.models.convert import ConversionError, categorical_columns, import_pipeline

    mesh = read_mesh()
    if repository is None:
        repository = Path(mesh.repository) if mesh and mesh.repository else Path("models")
    if not pipeline.is_file():
        fail(f"PIPELINE: {pipeline} does not exist")
    try:
        fitted = joblib.load(pipeline)
    except Exception as exc:
        fail(f"PIPELINE: {pipeline} is not a joblib file: {exc}")
    names = None if feature_names is None else feature_names.split(",")
    frame = None
    if sample is not None:
        try:
            # Categories are text ("02134" is not 2134; an empty field is missing).
            frame = pd.read_csv(
                sample, dtype=dict.fromkeys(categorical_columns(fitted, names), str)
            )
        except Exception as exc:
            fail(f"--sample: cannot read {sample}: {exc}")
    try:
        target, schema, report = import_pipeline(
            fitted,
            name,
            repository,
            version=version,
            sample=frame,
            label_column=label_column,
            feature_names=names,
        )
    except (ConversionError, ValueError) as exc:
        fail(str(exc))
    typer.echo(
        f"imported {schema.name} version {schema.version} ({schema.task}, "
        f"{len(schema.features)} features) into {target}; parity max diff {report.max_abs_diff:.2e} "
        f"on {report.rows} rows"
    )
    if mesh is not None and mesh.repository and target.resolve().is_relative_to(mesh.repository):
        import grpc

        from cyclone_app.cli_mesh import announce_import

        try:
            typer.echo(announce_import(mesh, target))
        except grpc.RpcError as exc:
            fail(
                f"imported into {target}, but the running mesh did not take it: "
                f"{exc.code().name}: {exc.details()}",
                1,
            )


def _read_rows(
    rows: list[str], file: Path | None, categorical: Collection[str] = ()
) -> list[dict[str, Any]]:
    parsed: list[dict[str, Any]] = []
    for i, text in enumerate(rows):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            fail(f"--row[{i}]: not JSON: {exc.msg}")
        if not isinstance(row, dict):
            fail(f"--row[{i}]: expected a JSON object of feature: value")
        parsed.append(row)
    if file is not None:
        if file.suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(file, dtype=dict.fromkeys(categorical, str))
            parsed.extend(frame.to_dict(orient="records"))
        else:
            for n, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        parsed.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        fail(f"{file}:{n}: not JSON: {exc.msg}")
    if not parsed:
        fail("give rows with --row '{\"feature\": value}' or --file rows.jsonl|rows.csv")
    return parsed


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="Model name.")],
    row: Annotated[
        list[str] | None, typer.Option(help="One row as a JSON object; repeatable.")
    ] = None,
    file: Annotated[Path | None, typer.Option(help="JSON-lines or CSV file of rows.")] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Inference server or Envoy; default the running mesh's, else :8001."),
    ] = None,
    version: Annotated[str, typer.Option(help="Model version; default the served one.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Score rows against a running inference server."""
    import grpc

    from cyclone.client import InferenceClient, categorical_features
    from cyclone.local_mesh import resolve

    # Rows are checked before anything is asked of a server; a CSV is read once the model's
    # categorical features are known (they are text, whatever the file looks like).
    csv = file is not None and file.suffix == ".csv"
    typed = None if csv else _read_rows(row or [], file)
    target = resolve("public", address)
    try:
        with InferenceClient(target.address) as client:
            categorical = categorical_features(client.get_model(model, version))
            rows_read = typed if typed is not None else _read_rows(row or [], file, categorical)
            predictions = client.predict(model, rows_read, version, categorical)
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    if as_json:
        for p in predictions:
            typer.echo(json.dumps({k: v for k, v in p.__dict__.items() if v is not None}))
        return
    from rich.table import Table

    from cyclone_app.cli_output import console

    table = Table("prediction_id", "prediction", "probabilities", "version")
    for p in predictions:
        shown = f"{p.value:.6g}" if p.value is not None else str(p.label)
        probs = ", ".join(f"{k}: {v:.3f}" for k, v in (p.probabilities or {}).items())
        table.add_row(p.prediction_id, shown, probs, p.version)
    console().print(table)


@app.command("models")
def list_models(
    address: Annotated[
        str | None,
        typer.Option(help="Inference server; default: the running mesh's registry, else :8001."),
    ] = None,
) -> None:
    """List served models: a running mesh's registry, or what one inference server serves."""
    import grpc

    from cyclone.client import InferenceClient, StoreClient
    from cyclone.local_mesh import read_mesh, resolve
    from cyclone.store.v1.store_service_pb2 import ModelStatus

    mesh = read_mesh()
    if address is None and mesh is not None:
        target = resolve("store")
        try:
            with StoreClient(target.address) as store:
                for v in store.model_versions():
                    status = ModelStatus.Name(v.status).removeprefix("MODEL_STATUS_").lower()
                    typer.echo(f"{v.model} {v.version}  {status}  {v.task}")
        except grpc.RpcError as exc:
            _rpc_fail(exc, target)
        return
    target = resolve("public", address)
    try:
        with InferenceClient(target.address) as client:
            models = client.list_models()
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    for m in models:
        features = ", ".join(f.name for f in m.features)
        typer.echo(f"{m.name} {m.version}  [{features}]")


def _rpc_fail(exc: Any, target: Any = None) -> NoReturn:
    """One sentence (what was tried and the way out when nothing answered); the raw error goes
    to the CLI log."""
    from cyclone_app.cli_errors import describe_failure

    fail(describe_failure(exc, target), 1)


def _target(component: str, flag: str | None) -> Any:
    from cyclone.local_mesh import resolve

    return resolve(component, flag)


@app.command()
def label(
    model: Annotated[str, typer.Option(help="Model name.")],
    prediction_id: Annotated[
        list[str] | None, typer.Option("--id", help="Prediction id; repeatable.")
    ] = None,
    value: Annotated[
        list[str] | None, typer.Option(help="Label for the matching --id; repeatable.")
    ] = None,
    file: Annotated[
        Path | None, typer.Option(help="CSV or JSON lines with prediction_id and label columns.")
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Send true labels for earlier predictions to the store."""
    from cyclone.client import StoreClient

    pairs: list[tuple[str, Any]] = list(zip(prediction_id or [], value or [], strict=False))
    if len(prediction_id or []) != len(value or []):
        fail("--id and --value must be given the same number of times")
    if file is not None:
        if file.suffix == ".csv":
            import pandas as pd

            frame = pd.read_csv(file, dtype={"prediction_id": str})
            if not {"prediction_id", "label"} <= set(frame.columns):
                fail(f"{file}: needs prediction_id and label columns")
            pairs.extend(zip(frame["prediction_id"], frame["label"].tolist(), strict=True))
        else:
            for n, line in enumerate(file.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        pairs.append((str(row["prediction_id"]), row["label"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        fail(f"{file}:{n}: expected a JSON object with prediction_id and label")
    if not pairs:
        fail("give labels with --id ID --value LABEL or --file")
    import grpc

    target = _target("store", store)
    try:
        with StoreClient(target.address) as client:
            stored, unmatched = client.add_labels(model, pairs)
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    typer.echo(
        f"stored {stored} label(s)"
        + (f"; {len(unmatched)} not matched to a stored prediction yet" if unmatched else "")
    )


def without_revision_header(plan_yaml: str) -> str:
    """The plan without the leading "# revision N" lines `plan get` prints: a plan saved from
    its output would otherwise carry its old revision into every later `plan get`."""
    lines = plan_yaml.splitlines(keepends=True)
    while lines and lines[0].startswith("# revision "):
        lines.pop(0)
    return "".join(lines)


@plan_app.command("get")
def plan_get(
    model: Annotated[str, typer.Argument(help="Model name.")],
    monitor: MonitorOpt = None,
) -> None:
    """Print a model's monitoring plan (the generated default if none was set)."""
    import grpc

    from cyclone.client import MonitorClient

    target = _target("monitor", monitor)
    try:
        with MonitorClient(target.address) as client:
            plan_yaml, revision = client.get_plan(model)
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    typer.echo(f"# revision {revision}" + (" (generated default)" if revision == 0 else ""))
    typer.echo(without_revision_header(plan_yaml).rstrip())


@plan_app.command("set")
def plan_set(
    model: Annotated[str, typer.Argument(help="Model name.")],
    plan_file: Annotated[Path, typer.Argument(help="Plan YAML file.")],
    monitor: MonitorOpt = None,
) -> None:
    """Validate and store a new revision of a model's monitoring plan."""
    import grpc

    from cyclone.client import MonitorClient

    if not plan_file.is_file():
        fail(f"PLAN_FILE: {plan_file} does not exist")
    target = _target("monitor", monitor)
    try:
        with MonitorClient(target.address) as client:
            revision = client.set_plan(model, without_revision_header(plan_file.read_text()))
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    typer.echo(f"plan of {model} saved as revision {revision}")


@app.command()
def alerts(
    model: Annotated[str, typer.Option(help="Model name; default all.")] = "",
    monitor: MonitorOpt = None,
) -> None:
    """List alerts, newest first."""
    import grpc

    from cyclone.client import MonitorClient

    target = _target("monitor", monitor)
    try:
        with MonitorClient(target.address) as client:
            listed = client.alerts(model)
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    from cyclone.monitor.v1 import monitor_service_pb2 as mpb

    for a in listed:
        level = mpb.Level.Name(a.level).removeprefix("LEVEL_")
        typer.echo(
            f"#{a.id} {a.model} {a.version} {level} {a.action}->{a.sink} {a.status}: {'; '.join(a.reasons)}"
        )


def _job_line(job: Any) -> str:
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb

    state = tpb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
    version = f" -> v{job.new_version}" if job.new_version else ""
    return f"#{job.id} {job.model} {state} [{job.stage}]{version}: {job.message}"


@app.command()
def retrain(
    model: Annotated[str, typer.Argument(help="Model to retrain.")],
    reason: Annotated[str, typer.Option(help="Why, recorded on the job.")] = "by hand",
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = True,
    trainer: TrainerOpt = None,
) -> None:
    """Queue a retraining job; with --wait, print its progress until it ends."""
    import grpc

    from cyclone.client import TrainerClient
    from cyclone_app.cli_errors import waiting_out_failover

    target = _target("trainer", trainer)
    try:
        with TrainerClient(target.address) as client:
            job = waiting_out_failover(lambda: client.retrain(model, reason))
            typer.echo(_job_line(job))
            if wait:
                for update in client.watch(job.id):
                    typer.echo(_job_line(update))
                    job = update
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    if job.decision:
        typer.echo(job.decision)


@app.command()
def jobs(
    model: Annotated[str, typer.Option(help="Model name; default all.")] = "",
    limit: Annotated[int, typer.Option(help="Most jobs to show.")] = 20,
    trainer: TrainerOpt = None,
) -> None:
    """List retraining jobs, newest first."""
    import grpc

    from cyclone.client import TrainerClient
    from cyclone_app.cli_errors import waiting_out_failover

    target = _target("trainer", trainer)
    try:
        with TrainerClient(target.address) as client:
            listed = waiting_out_failover(lambda: client.jobs(model, limit))
    except grpc.RpcError as exc:
        _rpc_fail(exc, target)
    for job in listed:
        typer.echo(_job_line(job))


@plugins_app.command("list")
def plugins_list() -> None:
    """Show loaded plugins, their package, and what they register."""
    from rich.table import Table

    from cyclone.plugins import get_plugins
    from cyclone_app.cli_output import console as make_console

    plugins = get_plugins()
    table = Table("plugin", "module", "package", "hooks", "problem")
    for info in plugins.plugin_infos():
        package = f"{info.distribution} {info.version}" if info.distribution else "-"
        table.add_row(info.name, info.module, package, ", ".join(info.hooks), info.error or "")
    console = make_console()
    console.print(table)
    console.print(
        f"metrics: {', '.join(sorted(plugins.metrics))}\n"
        f"drift tests: {', '.join(sorted(plugins.drift_tests))}\n"
        f"alert sinks: {', '.join(sorted(plugins.alert_sinks))}"
    )
    for problem in plugins.problems:
        console.print(f"[red]{problem.plugin}: {problem.hook}: {problem.error}[/red]")


@app.command()
def demo(
    workdir: Annotated[Path | None, typer.Option(help="Where models, data and logs go.")] = None,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the mesh and dashboard up afterwards (Ctrl-C stops).")
    ] = False,
) -> None:
    """Run the whole loop: import, serve, log, label, monitor, detect a dip, alert."""
    from cyclone_app.demo import run_demo

    run_demo(workdir, keep_running)


@app.command()
def version() -> None:
    """Print Cyclone's version."""
    import cyclone

    typer.echo(cyclone.__version__)


deploy_app = typer.Typer(help="Deploy Cyclone on a cluster.", no_args_is_help=True)
deploy_nomad_app = typer.Typer(help="HashiCorp Nomad job files.", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")
deploy_app.add_typer(deploy_nomad_app, name="nomad")


@deploy_nomad_app.command("render")
def deploy_nomad_render(
    out: Annotated[Path, typer.Option("--out", help="Directory the job files go to.")],
    store: Annotated[
        str | None, typer.Option(help="Store HOST:PORT: render what the registry holds.")
    ] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Without a store: the latest version of every model.")
    ] = None,
    image: Annotated[str, typer.Option(help="Cyclone's container image.")] = "cyclone:0.1.0",
    datacenter: Annotated[
        list[str] | None, typer.Option(help="Nomad datacenter; repeatable.")
    ] = None,
    discovery: Annotated[str, typer.Option(help="Service discovery: nomad or consul.")] = "nomad",
    replicas: Annotated[int, typer.Option(help="Replicas per model revision.")] = 1,
    stores: Annotated[int, typer.Option(help="Store instances (count).")] = 2,
    monitors: Annotated[int, typer.Option(help="Monitor instances (count).")] = 2,
    trainers: Annotated[int, typer.Option(help="Trainer instances (count).")] = 2,
) -> None:
    """Write Nomad job files for the cluster and every serving or canary model version."""
    from cyclone.nomad import render as nomad

    if (store is None) == (model_repository is None):
        fail("give exactly one of --store or --model-repository")
    if replicas < 0:
        fail(f"--replicas: must be >= 0, got {replicas}")
    try:
        settings = nomad.ClusterSettings(
            image=image,
            datacenters=tuple(datacenter or ["dc1"]),
            discovery=discovery,
            stores=stores,
            monitors=monitors,
            trainers=trainers,
        )
    except ValueError as exc:
        fail(f"--{exc}")
    if store is not None:
        import grpc

        try:
            revisions = nomad.revisions_from_store(store, replicas)
        except grpc.RpcError as exc:
            _rpc_fail(exc)
    else:
        assert model_repository is not None
        if not model_repository.is_dir():
            fail(f"--model-repository: {model_repository} is not a directory")
        revisions = nomad.revisions_from_repository(model_repository, replicas)
    written = nomad.write(nomad.render(revisions, settings), out)
    for path in written:
        typer.echo(str(path))


from cyclone_app import cli_mesh  # noqa: E402 - registered last: they extend `app`

app.command("up")(cli_mesh.up)
app.command("down")(cli_mesh.down)
app.command("status")(cli_mesh.status)
app.command("rollout")(cli_mesh.rollout)
app.command("promote")(cli_mesh.promote)
app.command("rollback")(cli_mesh.rollback)
app.command("rollouts")(cli_mesh.rollouts)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
