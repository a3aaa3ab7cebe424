"""The live dashboard: one static page that polls two JSON endpoints of the monitor.

Served from a background thread with the standard library's HTTP server, so the
monitor needs no web framework. The page reads `/api/status` (the latest
evaluation per model, as GetStatus returns it) and `/api/alerts` every two seconds.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from services.monitor import convert
from services.monitor.records import ModelStatus, QueuedAlert

log = logging.getLogger(__name__)

StatusSource = Callable[[], list[ModelStatus]]
AlertSource = Callable[[], list[QueuedAlert]]


def _json(messages: list[Message]) -> bytes:
    """The page reads what GetStatus and ListAlerts answer, as JSON."""
    body = [MessageToDict(m, preserving_proto_field_name=True) for m in messages]
    return json.dumps(body).encode()


def _page() -> bytes:
    return resources.files("services.monitor").joinpath("static/dashboard.html").read_bytes()


class Dashboard:
    def __init__(self, host: str, port: int, statuses: StatusSource, alerts: AlertSource) -> None:
        page = _page()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path in ("/", "/index.html"):
                        self._send(200, "text/html; charset=utf-8", page)
                    elif path == "/api/status":
                        body = _json([convert.status_to_pb(s) for s in statuses()])
                        self._send(200, "application/json", body)
                    elif path == "/api/alerts":
                        body = _json([convert.alert_to_pb(a) for a in alerts()])
                        self._send(200, "application/json", body)
                    else:
                        self._send(404, "application/json", b'{"error": "not found"}')
                except Exception as exc:  # the store may be down: say so, keep serving
                    log.warning("dashboard %s failed: %s", path, exc)
                    self._send(503, "application/json", json.dumps({"error": str(exc)}).encode())

            def _send(self, code: int, content_type: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # one line per poll would drown the monitor's log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dashboard", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
