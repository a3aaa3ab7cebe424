"""Shared helpers for the benchmark scripts: free ports, subprocess servers, JSON figures."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_process(
    args: list[str], ready_port: int, timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server process and wait until its port accepts connections."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - it is the server's stderr for its whole life
    proc = subprocess.Popen(
        args, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{args} exited: {log.read().decode(errors='replace')[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", ready_port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args} did not open port {ready_port}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Figures:
    """Collects figures; `emit` prints them last, one JSON object per line."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(
        self, figure: str, value: float, unit: str, floor: float, higher_is_better: bool
    ) -> None:
        ratio = (
            (value / floor if higher_is_better else floor / value)
            if value and floor
            else float("nan")
        )
        self.rows.append(
            {
                "figure": figure,
                "value": round(value, 4),
                "unit": unit,
                "floor": round(floor, 4),
                "ratio": round(ratio, 3),
            }
        )
        print(
            f"  {figure:<40} {value:>12.4g} {unit:<8} floor {floor:>10.4g}  ratio {ratio:.3f}",
            flush=True,
        )

    def emit(self) -> None:
        for row in self.rows:
            print(json.dumps(row))


PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
median = statistics.median
