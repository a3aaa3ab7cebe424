"""MLServer, the peer of bench/inference.py: its own virtualenv and a server process per config.

MLServer 1.7 pins `protobuf<7`, and Cyclone's committed stubs need the protobuf 7 runtime, so
the two cannot share one environment (`pip install mlserver` into Cyclone's venv backtracks
without end). MLServer therefore runs from `.venv-mlserver` (created on first use by
`python -m bench.mlserver_peer setup`, or by bench/inference.py), serving the benchmark's ONNX
file through `bench/mlserver_runtime.py`. MLServer 1.7's default worker mode needs uvloop < 0.22.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

from bench._common import ROOT, free_port, start_process
from cyclone.oip.v2 import open_inference_pb2 as oip
from cyclone.oip.v2 import open_inference_pb2_grpc as oip_grpc

REQUIREMENTS = ["mlserver>=1.7,<2", "uvloop<0.22", "onnxruntime>=1.19,<2"]
VENV = ROOT / ".venv-mlserver"


def mlserver_executable(venv: Path = VENV) -> Path:
    """The `mlserver` command of `venv`, installing MLServer there first if needed."""
    executable = venv / "bin" / "mlserver"
    if not executable.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *REQUIREMENTS], check=True)
    return executable


def start_mlserver(
    executable: Path, onnx_file: Path, workdir: Path, parallel_workers: int | None
) -> tuple[subprocess.Popen[bytes], int]:
    """MLServer serving `onnx_file` as model `rf`; (process, gRPC port) once the model is ready.

    `parallel_workers` None keeps MLServer's default (one worker process)."""
    workdir.mkdir(parents=True)
    model_dir = workdir / "rf"
    model_dir.mkdir()
    shutil.copy(onnx_file, model_dir / "model.onnx")
    grpc_port = free_port()
    settings: dict[str, object] = {
        "grpc_port": grpc_port,
        "http_port": free_port(),
        "metrics_port": free_port(),
        "host": "127.0.0.1",
        "debug": False,
    }
    if parallel_workers is not None:
        settings["parallel_workers"] = parallel_workers
    (workdir / "settings.json").write_text(json.dumps(settings))
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "rf",
                "implementation": "bench.mlserver_runtime.OnnxRuntime",
                "parameters": {"uri": "./model.onnx"},
            }
        )
    )
    process = start_process(
        [str(executable), "start", str(workdir)],
        grpc_port,
        timeout=120.0,
        env={"PYTHONPATH": str(ROOT)},
    )
    wait_model_ready(f"127.0.0.1:{grpc_port}", "rf", process)
    return process, grpc_port


def wait_model_ready(
    address: str, model: str, process: subprocess.Popen[bytes], timeout: float = 120.0
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"MLServer exited with {process.returncode}")
            try:
                if stub.ModelReady(oip.ModelReadyRequest(name=model), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"MLServer at {address}: model {model!r} not ready in {timeout:.0f}s")


if __name__ == "__main__":
    if sys.argv[1:] != ["setup"]:
        sys.exit("usage: python -m bench.mlserver_peer setup")
    print(mlserver_executable())
