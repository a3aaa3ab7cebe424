from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import pytest

import plugins.alert_sinks as sinks
from cyclone.plugin_api import Alert, AlertSinkSpec
from cyclone.plugins import Plugins, build_plugin_manager

ALERT = Alert(
    id="a1",
    model="churn",
    version="3",
    level="RED",
    previous_level="GREEN",
    reasons=["accuracy = 0.7 is 20% worse than baseline 0.875"],
    actions=["retrain", "notify"],
    created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
)


class Receiver:
    def __init__(self, status: int) -> None:
        self.status = status
        self.bodies: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(getattr(request, "param", 200))
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()
    thread.join()


def test_cyclone_register_alert_sinks_hook() -> None:
    pm = build_plugin_manager(load_entrypoints=False, extra_plugins=[sinks])
    got: list[AlertSinkSpec] = []
    pm.hook.cyclone_register_alert_sinks(register=got.append)
    assert {s.name for s in got} == {"webhook", "slack", "record", "trainer"}
    assert set(Plugins(pm).alert_sinks) == {"webhook", "slack", "record", "trainer"}


def test_webhook_posts_alert_json(receiver: Receiver) -> None:
    sinks.deliver_webhook(ALERT, {"url": receiver.url})
    [body] = receiver.bodies
    assert Alert.from_dict(body) == ALERT


def test_slack_posts_text(receiver: Receiver) -> None:
    sinks.deliver_slack(ALERT, {"url": receiver.url})
    [body] = receiver.bodies
    assert set(body) == {"text"}
    assert "churn" in body["text"] and "GREEN -> RED" in body["text"]
    assert ALERT.reasons[0] in body["text"] and "retrain" in body["text"]


@pytest.mark.parametrize("receiver", [500], indirect=True)
def test_webhook_raises_on_server_error(receiver: Receiver) -> None:
    with pytest.raises(HTTPError):
        sinks.deliver_webhook(ALERT, {"url": receiver.url})


def test_webhook_needs_http_url() -> None:
    with pytest.raises(ValueError, match="url"):
        sinks.deliver_webhook(ALERT, {})
    with pytest.raises(ValueError, match="http"):
        sinks.deliver_webhook(ALERT, {"url": "file:///etc/passwd"})


def test_record_to_file_and_memory(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    sinks.deliver_record(ALERT, {"path": str(path)})
    sinks.deliver_record(ALERT, {"path": str(path)})
    assert sinks.read_recorded(path) == [ALERT, ALERT]
    before = len(sinks.RECORDED)
    sinks.deliver_record(ALERT, {})
    assert sinks.RECORDED[before:] == [ALERT]
    del sinks.RECORDED[before:]
