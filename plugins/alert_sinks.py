"""Built-in alert sinks: a JSON webhook, a Slack incoming webhook, and a recorder.

``record`` appends alerts to a JSONL file (``config: {path: ...}``) or, without a path, to the
in-memory :data:`RECORDED` list. ``trainer`` asks the trainer to retrain (gRPC ``Retrain`` with the
alert id, so a repeated delivery makes no second job); config ``{address: HOST:PORT}``. With
tracing on it sends the active trace as ``traceparent`` metadata.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import Alert, AlertSinkSpec

DEFAULT_TIMEOUT = 10.0
RECORDED: list[Alert] = []


def _post_json(url: str, payload: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"alert sink url must be http(s), got {url!r}")
    headers = {"Content-Type": "application/json", **dict(config.get("headers") or {})}
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    timeout = float(config.get("timeout", DEFAULT_TIMEOUT))
    # urlopen raises HTTPError on 4xx/5xx, which is what tells the monitor to retry.
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def _url(config: Mapping[str, Any]) -> str:
    url = config.get("url")
    if not isinstance(url, str) or not url:
        raise ValueError("alert sink config needs a 'url'")
    return url


def deliver_webhook(alert: Alert, config: Mapping[str, Any]) -> None:
    _post_json(_url(config), alert.to_dict(), config)


def slack_text(alert: Alert) -> str:
    icon = {"GREEN": ":large_green_circle:", "AMBER": ":large_orange_circle:"}.get(
        alert.level, ":red_circle:"
    )
    lines = [
        f"{icon} *{alert.model}* v{alert.version}: {alert.previous_level} -> {alert.level}",
        *(f"• {reason}" for reason in alert.reasons),
    ]
    if alert.actions:
        lines.append(f"actions: {', '.join(alert.actions)}")
    return "\n".join(lines)


def deliver_slack(alert: Alert, config: Mapping[str, Any]) -> None:
    _post_json(_url(config), {"text": slack_text(alert)}, config)


def deliver_record(alert: Alert, config: Mapping[str, Any]) -> None:
    path = config.get("path")
    if path is None:
        RECORDED.append(alert)
        return
    with Path(str(path)).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(alert.to_dict()) + "\n")


def read_recorded(path: str | Path) -> list[Alert]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Alert.from_dict(json.loads(line)) for line in lines if line.strip()]


DEFAULT_TRAINER = "127.0.0.1:8004"


def deliver_trainer(alert: Alert, config: Mapping[str, Any]) -> None:
    """Retrain (or roll back) through the trainer; raises when it is down, so the outbox
    retries later. A rollback with no rollout in progress has nothing to undo: delivered."""
    import grpc

    from cyclone.channels import sync_channel
    from cyclone.telemetry import traceparent_metadata
    from cyclone.trainer.v1 import trainer_service_pb2 as tpb
    from cyclone.trainer.v1 import trainer_service_pb2_grpc as tgrpc

    if not alert.id.isdigit():
        raise ValueError(f"alert id must be a positive integer, got {alert.id!r}")
    address = str(config.get("address") or DEFAULT_TRAINER)
    timeout = float(config.get("timeout", DEFAULT_TIMEOUT))
    reason = "; ".join(alert.reasons) or f"level {alert.level}"
    # The delivery span (when tracing is on): the trainer's Retrain continues the alert's trace.
    metadata = traceparent_metadata()
    with sync_channel(address) as channel:
        trainer = tgrpc.TrainerServiceStub(channel)
        if "rollback" in alert.actions:
            try:
                trainer.Rollback(
                    tpb.RollbackRequest(model=alert.model, alert_id=int(alert.id), reason=reason),
                    timeout=timeout,
                    metadata=metadata,
                )
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
            return
        trainer.Retrain(
            tpb.RetrainRequest(model=alert.model, alert_id=int(alert.id), reason=reason),
            timeout=timeout,
            metadata=metadata,
        )


@hookimpl
def cyclone_register_alert_sinks(register: Callable[[AlertSinkSpec], None]) -> None:
    register(AlertSinkSpec("webhook", deliver_webhook, "POST the alert as JSON to config.url"))
    register(AlertSinkSpec("slack", deliver_slack, "Slack incoming webhook at config.url"))
    register(AlertSinkSpec("record", deliver_record, "append to config.path (JSONL) or memory"))
    register(AlertSinkSpec("trainer", deliver_trainer, "Retrain at config.address (the trainer)"))
