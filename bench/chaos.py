"""Chaos under load: `cyclone up` serving a model through Envoy (gRPC and REST clients) while,
one at a time, the trainer, the monitor, the store and a serving revision (every replica of
it, as if it were the only one) are SIGKILLed. Reports, per fault, the requests sent, the
failures, and the longest latency against the quiet run's p99 (a ratio, this machine is shared).

The short version runs in `make test` (tests/e2e/test_chaos.py); this one runs longer and
also kills Envoy itself (which drops connections: reported, not expected to be zero).

Usage: python -m bench.chaos [--seconds-per-fault 8] [--clients 2]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import joblib

from cyclone.client import InferenceClient, build_request
from cyclone_app.examples import credit_frame, credit_pipeline
from services.launch import free_port

ROW = {"age": 41, "income": 52000, "debt_ratio": 0.31, "city": "porto"}
PORT_NAMES = ("public", "control", "store", "monitor", "trainer", "dashboard")


@dataclasses.dataclass
class Sample:
    at: float  # monotonic seconds
    latency_s: float
    ok: bool
    version: str = ""
    error: str = ""
    prediction_id: str = ""  # gRPC answers
    row: int = -1  # which of the load's rows was sent


class Load:
    """Steady traffic through Envoy: half the clients over gRPC, half over REST."""

    def __init__(
        self,
        public_port: int,
        model: str,
        clients: int = 2,
        rows: list[dict[str, Any]] | None = None,
    ) -> None:
        self.public_port, self.model, self.clients = public_port, model, clients
        self.rows = rows or [ROW]
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _record(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    def _grpc(self) -> None:
        requests = [build_request(self.model, [row], "", {"city"}) for row in self.rows]
        k = 0
        with InferenceClient(f"127.0.0.1:{self.public_port}", timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                k = (k + 1) % len(requests)
                try:
                    answer = client.predict_request(requests[k])
                    self._record(
                        Sample(
                            started,
                            time.monotonic() - started,
                            True,
                            answer.version,
                            prediction_id=answer.prediction_ids[0],
                            row=k,
                        )
                    )
                except Exception as exc:
                    self._record(
                        Sample(started, time.monotonic() - started, False, error=str(exc)[:200])
                    )
                    time.sleep(0.01)

    def _rest(self) -> None:
        body = json.dumps(
            {
                "features": {
                    k: ({"strings": [v]} if isinstance(v, str) else {"numbers": [v]})
                    for k, v in ROW.items()
                }
            }
        ).encode()
        url = f"http://127.0.0.1:{self.public_port}/v1/models/{self.model}:predict"
        while not self._stop.is_set():
            started = time.monotonic()
            request = urllib.request.Request(
                url, data=body, headers={"content-type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    version = json.loads(response.read()).get("version", "")
                self._record(Sample(started, time.monotonic() - started, True, version))
            except Exception as exc:
                self._record(
                    Sample(started, time.monotonic() - started, False, error=str(exc)[:200])
                )
                time.sleep(0.01)

    def start(self) -> None:
        for index in range(self.clients):
            target = self._grpc if index % 2 == 0 else self._rest
            thread = threading.Thread(target=target, daemon=True, name=f"load-{index}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def between(self, start: float, end: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if start <= s.at < end]


class Mesh:
    """`cyclone up` in a subprocess on free ports, with the CLI pointed at it."""

    def __init__(self, data_dir: Path, up_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.up_args = list(up_args)  # more `cyclone up` flags (e.g. --trainers 2)
        self.ports = {name: free_port() for name in PORT_NAMES}
        self.env = {**os.environ, "CYCLONE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
        self.env.pop("CYCLONE_TOKEN", None)
        self.log = data_dir.parent / "up.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> None:
        flags = [a for name, port in self.ports.items() for a in (f"--{name}-port", str(port))]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cyclone_app",
                    "up",
                    "--data-dir",
                    str(self.data_dir),
                    *flags,
                    *self.up_args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        wait_for(lambda: (self.data_dir / "mesh.json").exists(), timeout, self.log_tail)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(120)

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "cyclone_app", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=180,
        )
        if result.returncode != 0:
            raise RuntimeError(f"cyclone {' '.join(args)}: {result.stdout}{result.stderr}")
        return result.stdout

    def component_pid(self, component: str) -> int:
        try:
            raw = json.loads((self.data_dir / "mesh.json").read_text())
            return int(raw["components"][component]["pid"])
        except (OSError, ValueError, KeyError):
            return 0

    def revision_pids(self, model: str) -> list[int]:
        status = json.loads(self.cli("status", "--json"))
        return [r["pid"] for r in status["mesh"]["revisions"] if r["model"] == model]

    def import_credit(self, root: Path, name: str = "credit", seed: int = 0) -> None:
        frame = credit_frame(500, seed=seed)
        joblib.dump(credit_pipeline(frame), root / f"{name}-{seed}.joblib")
        frame.to_csv(root / f"{name}-{seed}.csv", index=False)
        self.cli(
            "model", "import", str(root / f"{name}-{seed}.joblib"), "--name", name,
            "--sample", str(root / f"{name}-{seed}.csv"), "--label-column", "defaulted",
        )  # fmt: skip


def wait_for(check: Callable[[], Any], timeout: float, why: Callable[[], str] = str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s\n{why()}")
        time.sleep(0.2)


@dataclasses.dataclass
class FaultResult:
    fault: str
    requests: int
    failures: int
    worst_latency_s: float
    errors: list[str]


def _short(error: str) -> str:
    """One line of an error: a gRPC status and its details, or the text's first line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    status = next((line for line in lines if line.startswith("status =")), "")
    details = next((line for line in lines if line.startswith("details =")), "")
    if status:
        return (
            f"{status.removeprefix('status = StatusCode.')}: {details.removeprefix('details = ')}"
        )
    return lines[0] if lines else ""


def kill_component(mesh: Mesh, component: str) -> Callable[[], None]:
    def kill() -> None:
        old = mesh.component_pid(component)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: mesh.component_pid(component) not in (0, old), 120, mesh.log_tail)

    return kill


def kill_revision(mesh: Mesh, model: str) -> Callable[[], None]:
    """SIGKILL every replica of the model's serving revision at once: the only-replica case."""

    def kill() -> None:
        old = mesh.revision_pids(model)
        assert old, "no revision process found"
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(set(mesh.revision_pids(model)) - set(old)) >= len(old), 120)

    return kill


def run_faults(
    mesh: Mesh, load: Load, faults: dict[str, Callable[[], None]], settle_s: float
) -> Iterator[FaultResult]:
    for name, fault in faults.items():
        started = time.monotonic()
        fault()
        time.sleep(settle_s)  # traffic keeps flowing through the recovered component
        window = load.between(started, time.monotonic())
        failed = [s for s in window if not s.ok]
        yield FaultResult(
            name,
            len(window),
            len(failed),
            max((s.latency_s for s in window), default=0.0),
            sorted({_short(s.error) for s in failed})[:3],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds-per-fault", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cyclone-chaos-") as tmp:
        root = Path(tmp)
        mesh = Mesh(root / "data")
        mesh.start()
        try:
            mesh.import_credit(root)
            load = Load(mesh.ports["public"], "credit", args.clients)
            wait_for(lambda: InferenceClient(f"127.0.0.1:{mesh.ports['public']}").predict(
                "credit", [ROW], categorical={"city"}), 60)  # fmt: skip
            load.start()
            time.sleep(args.seconds_per_fault)
            quiet = load.between(0, time.monotonic())
            latencies = sorted(s.latency_s for s in quiet if s.ok)
            p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
            faults = {
                "trainer": kill_component(mesh, "trainer"),
                "monitor": kill_component(mesh, "monitor"),
                "store": kill_component(mesh, "store"),
                "revision (every replica)": kill_revision(mesh, "credit"),
                "envoy": kill_component(mesh, "envoy"),
            }
            results = list(run_faults(mesh, load, faults, args.seconds_per_fault))
            load.stop()
        finally:
            mesh.stop()
    print(f"quiet run: {len(quiet)} requests, p99 {p99 * 1000:.1f} ms")
    print(f"{'fault':<26} {'requests':>9} {'failed':>7} {'worst latency / quiet p99':>27}")
    for r in results:
        print(
            f"{r.fault:<26} {r.requests:>9} {r.failures:>7} {r.worst_latency_s / p99:>26.1f}x"
            + (f"  ({'; '.join(r.errors)})" if r.errors else "")
        )


if __name__ == "__main__":
    main()
