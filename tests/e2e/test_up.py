"""`cyclone up` as a user runs it: a clean data dir, a model imported into the running mesh,
predictions through Envoy, `cyclone status --json`, Ctrl-C leaving nothing behind, a restart
that resumes, and the refusals (a port taken, a data dir in use)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import psutil
import pytest

from cyclone_app.examples import credit_frame, credit_pipeline
from services.launch import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

ROW = {"age": 41, "income": 52000, "debt_ratio": 0.31, "city": "porto"}


def _ports() -> dict[str, int]:
    names = ("public", "control", "store", "monitor", "trainer", "dashboard")
    return {name: free_port() for name in names}


def _flags(ports: dict[str, int]) -> list[str]:
    return [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]


class Up:
    def __init__(self, data_dir: Path, ports: dict[str, int], *extra: str) -> None:
        self.data_dir, self.ports, self.extra = data_dir, ports, extra
        self.env = {
            **os.environ,
            "CYCLONE_DATA_DIR": str(data_dir),
            "COLUMNS": "160",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("CYCLONE_TOKEN", None)
        self.log = data_dir.parent / f"up-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> None:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cyclone",
                    "up",
                    "--data-dir",
                    str(self.data_dir),
                    *_flags(self.ports),
                    *self.extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while not (self.data_dir / "mesh.json").exists():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.3)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)  # Ctrl-C
        return self.process.wait(90)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cyclone_app", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result


def _left_behind(marker: str) -> list[str]:
    """Processes naming `marker` (the data dir) on their command line, but not the test run
    itself (its workers; the data dir under pytest's basetemp has "pytest" in its path)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if any(Path(a).name == "pytest" or "xdist" in a for a in argv) or "pytest" in argv:
            continue
        with_marker = " ".join(argv)
        if marker in with_marker:
            found.append(with_marker)
    return found


def _rest_predict(public_port: int, model: str) -> dict[str, Any]:
    body = {
        "features": {
            k: ({"strings": [v]} if isinstance(v, str) else {"numbers": [v]})
            for k, v in ROW.items()
        }
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{public_port}/v1/models/{model}:predict",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(json.loads(response.read()))


@pytest.fixture(scope="module")
def pipeline_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("pipeline")
    frame = credit_frame(500, seed=0)
    joblib.dump(credit_pipeline(frame), root / "credit.joblib")
    frame.to_csv(root / "sample.csv", index=False)
    yield root


def test_up_import_serve_status_stop_and_resume(tmp_path: Path, pipeline_file: Path) -> None:
    data_dir = tmp_path / "data"
    up = Up(data_dir, _ports())
    up.start()
    try:
        assert (data_dir / "token").stat().st_mode & 0o777 == 0o600
        # A new model imported into the running mesh is served without anything else.
        imported = up.cli(
            "model", "import", str(pipeline_file / "credit.joblib"), "--name", "credit",
            "--sample", str(pipeline_file / "sample.csv"), "--label-column", "defaulted",
        )  # fmt: skip
        assert "serving it through" in imported.stdout, imported.stdout
        predicted = up.cli("predict", "--model", "credit", "--row", json.dumps(ROW), "--json")
        prediction = json.loads(predicted.stdout.splitlines()[0])
        assert prediction["label"] in ("0", "1")
        assert _rest_predict(up.ports["public"], "credit")["version"] == "1"

        assert "credit 1  serving  classification" in up.cli("models").stdout
        status = json.loads(up.cli("status", "--json").stdout)
        assert set(status["mesh"]["components"]) == {"store", "envoy", "trainer", "monitor"}
        assert status["mesh"]["public"] == f"127.0.0.1:{up.ports['public']}"
        revisions = status["mesh"]["revisions"]
        assert 1 <= len(revisions) <= 2  # replicas: two where the machine allows
        assert all(r["model"] == "credit" and psutil.pid_exists(r["pid"]) for r in revisions)
        assert status["models"]["credit"]["serving"] == "1"
        assert status["models"]["credit"]["split"] == {"1": 100.0}
        assert status["problems"] == []

        # A second `cyclone up` on the same data dir is refused; nothing else starts.
        second = subprocess.run(
            [sys.executable, "-m", "cyclone_app", "up", "--data-dir", str(data_dir), *_flags(_ports())],
            capture_output=True, text=True, env=up.env, timeout=60,
        )  # fmt: skip
        assert second.returncode != 0
        assert "held by another running Cyclone" in second.stdout + second.stderr
    finally:
        assert up.stop() == 0, up.log.read_text()[-3000:]
    assert _left_behind(str(data_dir)) == []
    assert not (data_dir / "mesh.json").exists()

    # Restart: the model, its version and its serving status come back.
    again = Up(data_dir, _ports())
    again.start()
    try:
        assert _rest_predict(again.ports["public"], "credit")["version"] == "1"
        status = json.loads(again.cli("status", "--json").stdout)
        assert status["models"]["credit"]["versions"]["1"]["status"] == "serving"
    finally:
        assert again.stop() == 0
    assert _left_behind(str(data_dir)) == []


def test_up_with_two_stores_and_two_monitors_serves_labels_and_stops(
    tmp_path: Path, pipeline_file: Path
) -> None:
    """The trainer renders Envoy's store cluster as the supervisor does: the stores themselves
    (it once pointed it at the control listener, its own address, and the trainer died of
    Envoy's overflow at start)."""
    data_dir = tmp_path / "data"
    up = Up(data_dir, _ports(), "--stores", "2", "--monitors", "2")
    up.start()
    try:
        imported = up.cli(
            "model", "import", str(pipeline_file / "credit.joblib"), "--name", "credit",
            "--sample", str(pipeline_file / "sample.csv"), "--label-column", "defaulted",
        )  # fmt: skip
        assert "serving it through" in imported.stdout, imported.stdout
        predicted = up.cli("predict", "--model", "credit", "--row", json.dumps(ROW), "--json")
        prediction_id = json.loads(predicted.stdout.splitlines()[0])["prediction_id"]
        up.cli("label", "--model", "credit", "--id", prediction_id, "--value", "1")
        status = json.loads(up.cli("status", "--json").stdout)
        components = set(status["mesh"]["components"])
        assert {"store", "store-2", "monitor", "monitor-2", "trainer", "envoy"} <= components
        assert status["problems"] == []
        assert status["models"]["credit"]["serving"] == "1"
    finally:
        assert up.stop() == 0, up.log.read_text()[-3000:]
    assert _left_behind(str(data_dir)) == []


def test_a_port_already_taken_is_refused_and_nothing_starts(tmp_path: Path) -> None:
    ports = _ports()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["store"]))
        taken.listen()
        result = subprocess.run(
            [sys.executable, "-m", "cyclone_app", "up", "--data-dir", str(tmp_path / "d"), *_flags(ports)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "COLUMNS": "160"},
        )  # fmt: skip
    assert result.returncode != 0
    assert f"store port {ports['store']} (--store-port)" in result.stdout + result.stderr
    assert "nothing was started" in result.stdout + result.stderr
    assert "┏" not in result.stdout  # no empty component table
    assert not (tmp_path / "d").exists()  # no data dir, no stray mesh.lock
    assert _left_behind(str(tmp_path / "d")) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--public-port", "99999"], "--public-port: must be between 1 and 65535"),
        (
            ["--public-port", "8002", "--store-port", "8002"],
            "--public-port, --store-port: must differ",
        ),
        (["--idle-timeout", "soon"], "--idle-timeout"),
        (["--stores", "0"], "--stores"),
        (["--monitors", "0"], "--monitors"),
    ],
)
def test_bad_flags_name_the_flag_and_start_nothing(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cyclone_app", "up", "--data-dir", str(tmp_path / "d"), *flags],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert _left_behind(str(tmp_path / "d")) == []


def _component_pid(data_dir: Path, component: str) -> int:
    try:
        return int(json.loads((data_dir / "mesh.json").read_text())["components"][component]["pid"])
    except (OSError, ValueError, KeyError):
        return 0


def _eventually(check: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except Exception:  # the mesh is restarting
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_a_killed_component_is_restarted_and_nothing_leaks(
    tmp_path: Path, pipeline_file: Path
) -> None:
    data_dir = tmp_path / "data"
    up = Up(data_dir, _ports())
    up.start()
    try:
        up.cli(
            "model", "import", str(pipeline_file / "credit.joblib"), "--name", "credit",
            "--sample", str(pipeline_file / "sample.csv"), "--label-column", "defaulted",
        )  # fmt: skip
        assert _rest_predict(up.ports["public"], "credit")["version"] == "1"
        for component in ("store", "trainer", "envoy"):
            old = _component_pid(data_dir, component)
            os.kill(old, signal.SIGKILL)
            new = _eventually(lambda c=component, o=old: _component_pid(data_dir, c) not in (0, o))
            assert new
            # Serving comes back (Envoy restarted on its last config; the revisions never left).
            answer = _eventually(lambda: _rest_predict(up.ports["public"], "credit"))
            assert answer["version"] == "1"
        status = json.loads(up.cli("status", "--json").stdout)
        assert status["problems"] == [] and status["models"]["credit"]["serving"] == "1"
        revisions = status["mesh"]["revisions"]
        # The revision outlived the trainer and was adopted, not doubled.
        assert {r["version"] for r in revisions} == {"1"} and 1 <= len(revisions) <= 2
    finally:
        assert up.stop() == 0, up.log.read_text()[-3000:]
    assert _left_behind(str(data_dir)) == []


def test_up_after_its_supervisor_was_killed_stops_what_it_left(tmp_path: Path) -> None:
    """`cyclone up` SIGKILLed leaves its store, trainer and monitor running (own sessions): a
    new `cyclone up` on the data dir stops them before starting its own. Left running, the
    old trainer restarted the revisions the new mesh stopped and wrote Envoy's files too."""
    data_dir = tmp_path / "data"
    first = Up(data_dir, _ports())
    first.start()
    assert first.process is not None
    old = {c: _component_pid(data_dir, c) for c in ("store", "trainer", "monitor")}
    assert all(old.values()), old
    first.process.kill()
    first.process.wait(10)
    assert all(psutil.pid_exists(pid) for pid in old.values())  # positive control: orphans

    again = Up(data_dir, _ports())
    again.start()
    assert again.process is not None
    pid = again.process.pid
    try:
        _eventually(lambda: json.loads((data_dir / "mesh.json").read_text())["pid"] == pid)
        alive = [
            p
            for p in old.values()
            if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
        ]
        assert alive == []
        status = json.loads(again.cli("status", "--json").stdout)
        assert status["problems"] == []
        serving = [
            p for p in _left_behind(str(data_dir)) if " serve " in p and "inference" not in p
        ]
        assert len(serving) == 3, serving  # one store, one trainer, one monitor
    finally:
        assert again.stop() == 0, again.log.read_text()[-3000:]
    assert _left_behind(str(data_dir)) == []


def test_down_after_its_supervisor_was_killed_stops_what_it_left(tmp_path: Path) -> None:
    """`cyclone down` with the supervisor SIGKILLed: no mesh answers, but its store, trainer,
    monitor, Envoy, revisions and PostgreSQL still run; down stops them all and says so (it
    used to say nothing was running and leave them)."""
    data_dir = tmp_path / "data"
    first = Up(data_dir, _ports())
    first.start()
    assert first.process is not None
    old = {c: _component_pid(data_dir, c) for c in ("store", "trainer", "monitor")}
    first.process.kill()
    first.process.wait(10)
    assert all(psutil.pid_exists(pid) for pid in old.values())  # positive control: orphans
    assert _left_behind(str(data_dir)) != []

    down = first.cli("down", "--data-dir", str(data_dir))
    assert down.returncode == 0, down.stderr
    assert "stopped what a killed one left" in down.stdout
    assert _left_behind(str(data_dir)) == []
    assert not (data_dir / "mesh.json").exists()
    again = first.cli("down", "--data-dir", str(data_dir), check=False)
    assert again.returncode == 1 and "no `cyclone up` is running" in again.stderr
