"""`cyclone demo`: the whole loop on one machine, started the way a user would start it.

Trains a credit-default classifier, imports it (ONNX, parity-checked, with its drift
reference and baseline metrics), starts the store (embedded PostgreSQL), an inference
server logging to it and the monitor, each as its own process; then serves healthy
traffic with late labels (GREEN), then traffic from a shifted world (RED, alerts
queued and delivered: a retrain request and a notification).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from cyclone.client import InferenceClient, MonitorClient, StoreClient
from cyclone.examples import CREDIT_FEATURES, credit_frame, credit_pipeline
from cyclone.models.convert import import_pipeline
from cyclone.store.v1.store_service_pb2 import MODEL_STATUS_SERVING

console = Console()


@contextlib.contextmanager
def _service(name: str, args: list[str], logs: Path) -> Iterator[str]:
    from services.launch import spawn

    with spawn(name, args, logs / f"{name}.log") as running:
        console.print(f"  [green]✓[/green] {name} on {running.address} (log: {running.log_path})")
        yield running.address


def _until(check: Callable[[], Any], timeout: float = 30.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


def _traffic(inference: str, store: str, *, rows: int, seed: int, shift: float) -> int:
    frame = credit_frame(rows, seed=seed, shift=shift)
    records = frame[CREDIT_FEATURES].to_dict(orient="records")
    ids: list[str] = []
    with InferenceClient(inference) as client:
        for start in range(0, rows, 50):  # the way an application calls: small batches
            ids.extend(
                p.prediction_id for p in client.predict("credit", records[start : start + 50])
            )
    # Labels arrive later (here: right away); the store joins them to their predictions.
    with StoreClient(store) as client:
        unmatched: list[str] = []
        for start in range(0, rows, 500):
            pairs = list(
                zip(
                    ids[start : start + 500],
                    frame["defaulted"].astype(str)[start : start + 500],
                    strict=True,
                )
            )
            unmatched.extend(client.add_labels("credit", pairs)[1])
    if unmatched:
        console.print(
            f"    {len(unmatched)} labels arrived before their predictions reached the store; they join later"
        )
    return len(ids)


def _show(status: Any) -> None:
    from cyclone.monitor.v1 import monitor_service_pb2 as mpb

    level = mpb.Level.Name(status.level).removeprefix("LEVEL_")
    colour = {"GREEN": "green", "AMBER": "yellow", "RED": "red"}.get(level, "white")
    shown = {m.name: m.value for m in status.metrics if m.HasField("value")}
    drifted = sorted({d.feature for d in status.drift if d.drifted})
    console.print(
        f"  level [bold {colour}]{level}[/bold {colour}] over {status.rows} rows ({status.labelled_rows} labelled): "
        + ", ".join(
            f"{k} {shown[k]:.3f}" for k in ("accuracy", "roc_auc", "f1_macro") if k in shown
        )
    )
    console.print(f"  drifted features: {', '.join(drifted) or 'none'}")
    for reason in status.reasons:
        console.print(f"  • {reason}")


def run_demo(workdir: Path | None = None, keep_running: bool = False) -> None:
    root = workdir or Path(tempfile.mkdtemp(prefix="cyclone-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    logs, repo, data = root / "logs", root / "models", root / "data"
    logs.mkdir(exist_ok=True)
    console.rule("[bold]Cyclone demo")
    console.print(f"working directory: {root}")

    console.print("\n[bold]1. Train and import a model[/bold]")
    train = credit_frame(4000, seed=0)
    pipeline = credit_pipeline(train)
    target, schema, parity = import_pipeline(
        pipeline, "credit", repo, sample=train, label_column="defaulted"
    )
    baseline = json.loads((target / "evaluation.json").read_text())["metrics"]
    console.print(
        f"  credit v{schema.version}: {schema.task}, features {', '.join(schema.feature_names)}; "
        f"ONNX parity max diff {parity.max_abs_diff:.1e}; baseline accuracy {baseline['accuracy']:.3f}"
    )

    console.print(
        "\n[bold]2. Start the mesh[/bold] (store on embedded PostgreSQL, inference, monitor)"
    )
    from services.launch import free_port

    dashboard_port = free_port()
    common = ["--data-dir", str(data)]
    with (
        _service("store", common, logs) as store,
        _service(
            "inference",
            [
                *common,
                "--model-repository",
                str(repo),
                "--model",
                "credit",
                "--store",
                store,
            ],
            logs,
        ) as inference,
        _service(
            "monitor",
            [
                *common,
                "--store",
                store,
                "--dashboard-port",
                str(dashboard_port),
            ],
            logs,
        ) as monitor,
        StoreClient(store) as store_client,
        MonitorClient(monitor) as monitor_client,
    ):
        _until(
            lambda: any(
                v.status == MODEL_STATUS_SERVING for v in store_client.model_versions("credit")
            )
        )
        mode = store_client.stats().storage_mode
        console.print(f"  storage mode: {mode}")
        console.print(f"  live dashboard: http://127.0.0.1:{dashboard_port}/")

        console.print("\n[bold]3. Healthy traffic[/bold]: 1500 predictions, labels arrive later")
        served = _traffic(inference, store, rows=1500, seed=1, shift=0.0)
        _until(lambda: sum(m.labels for m in store_client.stats("credit").models) >= served)
        status = monitor_client.evaluate_now("credit").status
        _show(status)

        console.print(
            "\n[bold]4. The world shifts[/bold]: incomes fall, debt rises, the old rule stops holding"
        )
        # A short window, as a team would use for a fast-moving portfolio.
        plan_yaml, _ = monitor_client.get_plan("credit")
        monitor_client.set_plan("credit", plan_yaml.replace("duration: 1h", "rows: 1500"))
        _traffic(inference, store, rows=1500, seed=2, shift=1.0)
        _until(lambda: sum(m.labels for m in store_client.stats("credit").models) >= 2 * served)
        response = monitor_client.evaluate_now("credit")
        _show(response.status)

        console.print("\n[bold]5. Alerts[/bold] (outbox → sinks, retried until delivered)")
        delivered = _until(
            lambda: [a for a in monitor_client.alerts("credit") if a.status == "delivered"],
            timeout=20,
        )
        for alert in monitor_client.alerts("credit"):
            console.print(f"  #{alert.id} {alert.action} → {alert.sink}: {alert.status}")
        if not delivered:
            raise SystemExit("demo: alerts were not delivered")
        console.print(
            f"  retrain requests recorded in {data / 'alerts.jsonl'} (the trainer picks them up once deployed)"
        )

        stats = store_client.stats("credit").models[0]
        console.print(
            f"\n[bold]Store[/bold]: {stats.predictions} predictions, {stats.labels} labels "
            f"({stats.label_coverage:.0%} coverage), mode {mode}"
        )
        if keep_running:
            console.print(
                f"\nThe mesh keeps running: dashboard http://127.0.0.1:{dashboard_port}/, "
                f"store {store}, inference {inference}, monitor {monitor}. Ctrl-C stops it."
            )
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    console.rule("[bold]demo complete")


if __name__ == "__main__":  # pragma: no cover
    run_demo(Path(os.environ["CYCLONE_DEMO_DIR"]) if "CYCLONE_DEMO_DIR" in os.environ else None)
