"""The `cyclone` command line. Heavy imports stay inside commands so `--help` is instant."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

app = typer.Typer(help="Cyclone: serve, log, monitor and retrain ML models.", no_args_is_help=True)
serve_app = typer.Typer(help="Run a Cyclone service.", no_args_is_help=True)
model_app = typer.Typer(help="Manage models in a model repository.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(model_app, name="model")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML settings file.")]
HostOpt = Annotated[str | None, typer.Option(help="Address to bind.")]
PortOpt = Annotated[int | None, typer.Option(help="gRPC port (0 picks a free one).")]
MetricsPortOpt = Annotated[int | None, typer.Option(help="Prometheus port (0 free, -1 off).")]


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
    model_repository: Annotated[Path | None, typer.Option(help="Model repository directory.")] = None,
    model: Annotated[str | None, typer.Option(help="Serve only this model (one revision).")] = None,
    version: Annotated[str | None, typer.Option(help="Version of --model; default latest.")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    metrics_port: MetricsPortOpt = None,
    intra_op_threads: Annotated[int | None, typer.Option(help="onnxruntime intra-op threads.")] = None,
    inter_op_threads: Annotated[int | None, typer.Option(help="onnxruntime inter-op threads.")] = None,
    max_batch_rows: Annotated[int | None, typer.Option(help="Most rows one request may carry.")] = None,
    store: Annotated[str | None, typer.Option(help="Store HOST:PORT; log every prediction there.")] = None,
    spool_dir: Annotated[Path | None, typer.Option(help="Disk spool for when the store is down.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Cyclone data directory.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Serve ONNX models over Cyclone's API and the Open Inference Protocol."""
    from services.inference.main import InferenceSettings, run_inference

    flags = {k: v for k, v in locals().items() if k != "config"}
    settings = _settings(InferenceSettings, flags, config)
    if not settings.model_repository.is_dir():
        fail(f"--model-repository: {settings.model_repository} is not a directory")
    asyncio.run(run_inference(settings))


@serve_app.command("store")
def serve_store(
    database_url: Annotated[
        str | None, typer.Option(help="PostgreSQL URL; default: Cyclone's embedded PostgreSQL.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Cyclone data directory.")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    metrics_port: MetricsPortOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run the prediction/label/registry store (PostgreSQL, TimescaleDB when available)."""
    from services.store.main import StoreSettings, run_store

    flags = {k: v for k, v in locals().items() if k != "config"}
    asyncio.run(run_store(_settings(StoreSettings, flags, config)))


@model_app.command("import")
def model_import(
    pipeline: Annotated[Path, typer.Argument(help="Fitted scikit-learn pipeline saved with joblib.")],
    name: Annotated[str, typer.Option(help="Model name.")],
    repository: Annotated[Path, typer.Option(help="Model repository directory.")] = Path("models"),
    version: Annotated[str | None, typer.Option(help="Version; default next integer.")] = None,
    sample: Annotated[
        Path | None, typer.Option(help="CSV of real rows: parity check and feature ranges.")
    ] = None,
) -> None:
    """Convert a scikit-learn pipeline to ONNX, check parity, write it into the repository."""
    import joblib
    import pandas as pd

    from cyclone.models.convert import ConversionError, import_pipeline

    if not pipeline.is_file():
        fail(f"PIPELINE: {pipeline} does not exist")
    try:
        fitted = joblib.load(pipeline)
    except Exception as exc:
        fail(f"PIPELINE: {pipeline} is not a joblib file: {exc}")
    frame = None
    if sample is not None:
        try:
            frame = pd.read_csv(sample)
        except Exception as exc:
            fail(f"--sample: cannot read {sample}: {exc}")
    try:
        target, schema, report = import_pipeline(fitted, name, repository, version=version, sample=frame)
    except (ConversionError, ValueError) as exc:
        fail(str(exc))
    typer.echo(
        f"imported {schema.name} version {schema.version} ({schema.task}, "
        f"{len(schema.features)} features) into {target}; parity max diff {report.max_abs_diff:.2e} "
        f"on {report.rows} rows"
    )


def _read_rows(rows: list[str], file: Path | None) -> list[dict[str, Any]]:
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

            parsed.extend(pd.read_csv(file).to_dict(orient="records"))
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
    row: Annotated[list[str] | None, typer.Option(help="One row as a JSON object; repeatable.")] = None,
    file: Annotated[Path | None, typer.Option(help="JSON-lines or CSV file of rows.")] = None,
    address: Annotated[str, typer.Option(help="Inference server (or Envoy) address.")] = "127.0.0.1:8001",
    version: Annotated[str, typer.Option(help="Model version; default the served one.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Score rows against a running inference server."""
    import grpc

    from cyclone.client import InferenceClient

    rows = _read_rows(row or [], file)
    try:
        with InferenceClient(address) as client:
            predictions = client.predict(model, rows, version)
    except grpc.RpcError as exc:
        fail(f"{exc.code().name}: {exc.details()}", 1)
    if as_json:
        for p in predictions:
            typer.echo(json.dumps({k: v for k, v in p.__dict__.items() if v is not None}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("prediction_id", "prediction", "probabilities")
    for p in predictions:
        shown = f"{p.value:.6g}" if p.value is not None else str(p.label)
        probs = ", ".join(f"{k}: {v:.3f}" for k, v in (p.probabilities or {}).items())
        table.add_row(p.prediction_id, shown, probs)
    Console().print(table)


@app.command("models")
def list_models(
    address: Annotated[str, typer.Option(help="Inference server address.")] = "127.0.0.1:8001",
) -> None:
    """List the models a running inference server serves."""
    import grpc

    from cyclone.client import InferenceClient

    try:
        with InferenceClient(address) as client:
            models = client.list_models()
    except grpc.RpcError as exc:
        fail(f"{exc.code().name}: {exc.details()}", 1)
    for m in models:
        features = ", ".join(f.name for f in m.features)
        typer.echo(f"{m.name} {m.version}  [{features}]")


@app.command()
def version() -> None:
    """Print Cyclone's version."""
    import cyclone

    typer.echo(cyclone.__version__)


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
