"""The live dashboard: a static page plus JSON reads and a Server-Sent Events stream.

Served from background threads with the standard library's HTTP server, so the monitor needs
no web framework and the user no build step (the chart library is vendored under
`static/vendor/`). The page gets everything by push on `/api/events`:

- `snapshot` first on every (re)connection: statuses, versions with lineage, alerts, training
  jobs, rollouts and each model's live counts (predictions and labels stored now);
- `status` each time an evaluation lands (it carries the level, so a level change shows at once);
- `alerts`, `jobs`, `rollouts`, `versions`, `traffic`, `counts` when what the store holds
  changed (one
  watcher thread reads the store for all clients, and only while someone is watching);
- `heartbeat` every `heartbeat_seconds`, so proxies keep the stream open and the page can tell
  a quiet monitor from a dead one.

Chart history is read once per model from `/api/history?model=...`; later points arrive as
`status` events. Protobuf stays at the edge: `StoreReader` turns store messages into the domain
records of `records.py` through `convert.py`, and the page gets those records as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from google.protobuf.json_format import MessageToDict

from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.wire import ts
from services.monitor import convert
from services.monitor.records import (
    LiveCounts,
    MetricPoint,
    ModelStatus,
    QueuedAlert,
    RolloutSummary,
    TrafficPoint,
    TrainingJobSummary,
    VersionLineage,
)

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".LICENSE": "text/plain; charset=utf-8",
}
# How far back the charts start.
HISTORY = timedelta(hours=6)


class DashboardSource(Protocol):
    """What the dashboard shows, as domain records; the store may be down (then it raises)."""

    def statuses(self) -> list[ModelStatus]: ...
    def versions(self) -> list[VersionLineage]: ...
    def alerts(self) -> list[QueuedAlert]: ...
    def jobs(self) -> list[TrainingJobSummary]: ...
    def rollouts(self) -> list[RolloutSummary]: ...
    def history(self, model: str, since: datetime) -> list[MetricPoint]: ...
    def traffic(self, model: str, since: datetime) -> list[TrafficPoint]: ...
    def counts(self) -> list[LiveCounts]: ...


class StoreReader:
    """`DashboardSource` over the store's gRPC API (blocking stub: the server is threaded)."""

    def __init__(
        self,
        store: store_grpc.StoreServiceStub,
        statuses: Callable[[], list[ModelStatus]],
        timeout: float = 5.0,
    ) -> None:
        self._store = store
        self._statuses = statuses
        self._timeout = timeout

    def statuses(self) -> list[ModelStatus]:
        return self._statuses()

    def versions(self) -> list[VersionLineage]:
        response = self._store.ListModelVersions(
            store_pb.ListModelVersionsRequest(), timeout=self._timeout
        )
        return [convert.lineage_from_store(v) for v in response.model_versions]

    def alerts(self) -> list[QueuedAlert]:
        response = self._store.ListAlerts(store_pb.ListAlertsRequest(limit=50), timeout=5)
        return [convert.alert_from_store(a) for a in response.alerts]

    def jobs(self) -> list[TrainingJobSummary]:
        response = self._store.ListTrainingJobs(
            store_pb.ListTrainingJobsRequest(limit=50), timeout=self._timeout
        )
        return [convert.job_from_store(j) for j in response.jobs]

    def rollouts(self) -> list[RolloutSummary]:
        response = self._store.ListRollouts(
            store_pb.ListRolloutsRequest(limit=20), timeout=self._timeout
        )
        return [convert.rollout_from_store(r) for r in response.rollouts]

    def history(self, model: str, since: datetime) -> list[MetricPoint]:
        request = store_pb.ListMetricPointsRequest(model=model, start=ts(since))
        response = self._store.ListMetricPoints(request, timeout=self._timeout)
        return [convert.point_from_store(p) for p in response.points]

    def traffic(self, model: str, since: datetime) -> list[TrafficPoint]:
        request = store_pb.ListPredictionStatsRequest(model=model, start=ts(since))
        response = self._store.ListPredictionStats(request, timeout=self._timeout)
        return [convert.traffic_from_store(s) for s in response.stats]

    def counts(self) -> list[LiveCounts]:
        response = self._store.GetStats(store_pb.GetStatsRequest(), timeout=self._timeout)
        return [LiveCounts(m.model, m.predictions, m.labels) for m in response.models]


# --- JSON for the page --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Records -> JSON values: datetimes as ISO strings, non-finite numbers as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return value


def status_json(status: ModelStatus) -> dict[str, Any]:
    """A status as GetStatus answers it (the monitor's public message), in JSON."""
    body: dict[str, Any] = MessageToDict(
        convert.status_to_pb(status), preserving_proto_field_name=True
    )
    return body


def counts_json(counts: list[LiveCounts]) -> dict[str, dict[str, int]]:
    return {c.model: {"predictions": c.predictions, "labels": c.labels} for c in counts}


def alert_json(alert: QueuedAlert) -> dict[str, Any]:
    body: dict[str, Any] = MessageToDict(
        convert.alert_to_pb(alert), preserving_proto_field_name=True
    )
    return body


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=False, separators=(",", ":")).encode()


def sse_frame(event: str, data: Any) -> bytes:
    """One Server-Sent Event; JSON has no raw newlines, so one `data:` line suffices."""
    return b"event: " + event.encode() + b"\ndata: " + encode(data) + b"\n\n"


# --- fan-out to the connected pages -------------------------------------------------------------


class EventHub:
    """Thread-safe fan-out of encoded events, one bounded queue per client.

    A client that stops reading (its queue fills) is dropped rather than slowing the others.
    `None` in a queue tells its handler to end the stream.
    """

    def __init__(self, max_queued: int = 256) -> None:
        self._lock = threading.Lock()
        self._queues: set[queue.Queue[bytes | None]] = set()
        self._max_queued = max_queued

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._queues)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[queue.Queue[bytes | None]]:
        q: queue.Queue[bytes | None] = queue.Queue(self._max_queued)
        with self._lock:
            self._queues.add(q)
        try:
            yield q
        finally:
            with self._lock:
                self._queues.discard(q)

    def publish(self, frame: bytes) -> None:
        with self._lock:
            targets = list(self._queues)
        for q in targets:
            try:
                q.put_nowait(frame)
            except queue.Full:
                self._drop(q)

    def _drop(self, q: queue.Queue[bytes | None]) -> None:
        with self._lock:
            self._queues.discard(q)
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        q.put_nowait(None)

    def close(self) -> None:
        with self._lock:
            targets, self._queues = list(self._queues), set()
        for q in targets:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)


# --- the server ---------------------------------------------------------------------------------


def _static_files() -> dict[str, tuple[bytes, str]]:
    """Every file under static/ (and one level of subfolders), by URL path."""
    root = resources.files("services.monitor").joinpath("static")
    files: dict[str, tuple[bytes, str]] = {}

    def add(entry: Traversable, prefix: str) -> None:
        for child in entry.iterdir():
            if child.is_dir():
                if not prefix:
                    add(child, child.name + "/")
                continue
            suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
            content_type = CONTENT_TYPES.get(suffix)
            if content_type is not None:
                files["/static/" + prefix + child.name] = (child.read_bytes(), content_type)

    add(root, "")
    return files


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    # Pages come and go; a closed tab mid-response is normal, not an error to print.
    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("dashboard client %s went away", client_address, exc_info=True)


class Dashboard:
    def __init__(
        self,
        host: str,
        port: int,
        source: DashboardSource,
        *,
        heartbeat_seconds: float = 15.0,
        refresh_seconds: float = 1.0,
        traffic_seconds: float = 5.0,
    ) -> None:
        self.source = source
        self.hub = EventHub()
        self.heartbeat_seconds = heartbeat_seconds
        self.refresh_seconds = refresh_seconds
        self.traffic_seconds = traffic_seconds
        self._stopping = threading.Event()
        self._last: dict[str, bytes] = {}
        files = _static_files()
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                path, query = url.path, parse_qs(url.query)
                try:
                    if path in ("/", "/index.html"):
                        self._send(200, *files["/static/dashboard.html"])
                    elif path in files:
                        self._send(200, *files[path])
                    elif path == "/api/events":
                        dashboard._stream(self)
                    elif path == "/api/snapshot":
                        self._json(dashboard.snapshot())
                    elif path == "/api/status":
                        self._json([status_json(s) for s in source.statuses()])
                    elif path == "/api/alerts":
                        self._json([alert_json(a) for a in source.alerts()])
                    elif path == "/api/history":
                        model = (query.get("model") or [""])[0]
                        if not model:
                            self._send(400, b'{"error": "model: required"}', "application/json")
                        else:
                            self._json(dashboard.history(model))
                    else:
                        self._send(404, b'{"error": "not found"}', "application/json")
                except (BrokenPipeError, ConnectionResetError):
                    return  # the page went away
                except Exception as exc:  # the store may be down: say so, keep serving
                    log.warning("dashboard %s failed: %s", path, exc)
                    with contextlib.suppress(OSError):
                        self._send(503, encode({"error": str(exc)}), "application/json")

            def _json(self, value: Any) -> None:
                self._send(200, encode(value), "application/json")

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # one line per request would drown the monitor's log

        self._server = _Server((host, port), Handler)
        self.port = int(self._server.server_address[1])
        self._threads = [
            threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True),
            threading.Thread(target=self._watch_store, name="dashboard-watch", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.hub.close()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # -- what is pushed ----------------------------------------------------------------------

    def publish_status(self, status: ModelStatus) -> None:
        """An evaluation landed (called from the monitor's event loop; never blocks)."""
        self.hub.publish(sse_frame("status", status_json(status)))

    def snapshot(self) -> dict[str, Any]:
        source = self.source
        return {
            "statuses": [status_json(s) for s in source.statuses()],
            "versions": _plain(source.versions()),
            "alerts": [alert_json(a) for a in source.alerts()],
            "jobs": _plain(source.jobs()),
            "rollouts": _plain(source.rollouts()),
            "counts": counts_json(source.counts()),
        }

    def history(self, model: str) -> dict[str, Any]:
        since = datetime.now(UTC) - HISTORY
        return {
            "model": model,
            "points": _plain(self.source.history(model, since)),
            "traffic": _plain(self.source.traffic(model, since)),
        }

    def _stream(self, handler: BaseHTTPRequestHandler) -> None:
        """One page's event stream; returns when the page goes away or the server stops."""
        with self.hub.subscribe() as q:
            handler.send_response(200)
            handler.send_header("Content-Type", "text/event-stream")
            handler.send_header("Cache-Control", "no-store")
            handler.send_header("X-Accel-Buffering", "no")
            handler.end_headers()
            try:
                snapshot = sse_frame("snapshot", self.snapshot())
            except Exception as exc:
                snapshot = sse_frame("problem", {"message": f"store unavailable: {exc}"})
            handler.wfile.write(b"retry: 2000\n\n" + snapshot)
            handler.wfile.flush()
            while not self._stopping.is_set():
                try:
                    frame = q.get(timeout=self.heartbeat_seconds)
                except queue.Empty:
                    frame = sse_frame("heartbeat", {"time": datetime.now(UTC).isoformat()})
                if frame is None:
                    return
                handler.wfile.write(frame)
                handler.wfile.flush()

    def _publish_if_changed(self, event: str, data: Any) -> None:
        frame = sse_frame(event, data)
        if self._last.get(event) != frame:
            self._last[event] = frame
            self.hub.publish(frame)

    def _watch_store(self) -> None:
        """Read the store for all pages at once and push what changed; idle with no page open."""
        next_traffic = 0.0
        healthy = True
        while not self._stopping.wait(self.refresh_seconds):
            if not self.hub.clients:
                self._last.clear()  # a new page gets a snapshot; start comparing afresh
                continue
            try:
                self._publish_if_changed("versions", _plain(self.source.versions()))
                self._publish_if_changed("alerts", [alert_json(a) for a in self.source.alerts()])
                self._publish_if_changed("jobs", _plain(self.source.jobs()))
                self._publish_if_changed("rollouts", _plain(self.source.rollouts()))
                if time.monotonic() >= next_traffic:
                    next_traffic = time.monotonic() + self.traffic_seconds
                    since = datetime.now(UTC) - HISTORY
                    models = sorted({s.model for s in self.source.statuses()})
                    traffic = {m: _plain(self.source.traffic(m, since)) for m in models}
                    self._publish_if_changed("traffic", traffic)
                    self._publish_if_changed("counts", counts_json(self.source.counts()))
                if not healthy:
                    healthy = True
                    self._publish_if_changed("problem", {"message": ""})
            except Exception as exc:
                if healthy:
                    log.warning("dashboard: reading the store failed: %s", exc)
                healthy = False
                self._publish_if_changed("problem", {"message": f"store unavailable: {exc}"})
