"""Envoy benchmark: Predict direct vs through Envoy (c1, c32: throughput ratio and added p50),
and REST (JSON transcoding) vs gRPC, both through Envoy.

Model: the same RandomForestRegressor as bench/inference.py, one inference process. The floor of
each Envoy figure is the same call made directly to the inference server in the same run.

Usage: python -m bench.envoy [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench._common import PYTHON, Figures, free_port, percentile, start_process, stop_process
from bench.inference import PREDICT, predict_payload, unary_load
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.models.convert import import_pipeline
from cyclone.traffic import Endpoint, Revision, TrafficSplit
from cyclone_app.examples import bench_regressor


def rest_load(address: str, body: bytes, concurrency: int, seconds: float) -> tuple[float, float]:
    """Throughput and p50 (ms) of `concurrency` threads, each on one keep-alive connection."""
    host, port = address.rsplit(":", 1)
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {"content-type": "application/json"}
        mine: list[float] = []
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/models/rf:predict", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"REST predict: HTTP {response.status}")
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, percentile(latencies, 0.5) * 1e3


async def with_envoy(work_dir: Path, port: int) -> EnvoyProxy:
    proxy = EnvoyProxy(
        EnvoySettings(
            work_dir=work_dir,
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            rate_limit_per_client=None,  # one client on purpose: measure the proxy, not the limit
        )
    )
    await proxy.start()
    rev = Revision("rf", "1", (Endpoint("127.0.0.1", port),))
    await proxy.apply(TrafficSplit("rf", {rev.name: 100}, {rev.name: rev}))
    await proxy.wait_healthy(rev, 10)
    return proxy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    model, x = bench_regressor()
    row = x[0].astype(np.float32)
    payload = predict_payload(row)
    rest = json.dumps(
        {"features": {f"f{i}": {"numbers": [float(v)]} for i, v in enumerate(row)}}
    ).encode()
    figures = Figures()
    with tempfile.TemporaryDirectory() as tmp:
        import_pipeline(model, "rf", Path(tmp) / "models")
        port = free_port()
        server = start_process(
            [PYTHON, "-m", "cyclone_app", "serve", "inference", "--model-repository",
             f"{tmp}/models", "--model", "rf", "--port", str(port), "--metrics-port", "-1"],
            port,
        )  # fmt: skip
        loop = asyncio.new_event_loop()
        proxy = loop.run_until_complete(with_envoy(Path(tmp) / "envoy", port))
        try:
            direct, envoy = f"127.0.0.1:{port}", proxy.public_address
            print(f"Predict {len(payload)} B, REST {len(rest)} B; {args.seconds:.0f}s per figure")
            grpc_via: dict[int, tuple[float, float, float]] = {}
            for conc in (1, 32):
                floor = loop.run_until_complete(
                    unary_load(direct, PREDICT, payload, conc, args.seconds)
                )
                ours = loop.run_until_complete(
                    unary_load(envoy, PREDICT, payload, conc, args.seconds)
                )
                grpc_via[conc] = ours
                figures.add(f"envoy_predict_c{conc}_throughput", ours[0], "req/s", floor[0], True)
                figures.add(f"envoy_predict_c{conc}_p50", ours[1], "ms", floor[1], False)
                # Target: added p50 <= 0.5 ms at c1 (ratio >= 1 meets it).
                figures.add(
                    f"envoy_predict_c{conc}_added_p50", ours[1] - floor[1], "ms", 0.5, False
                )
            for conc in (1, 8):
                if conc not in grpc_via:
                    grpc_via[conc] = loop.run_until_complete(
                        unary_load(envoy, PREDICT, payload, conc, args.seconds)
                    )
                throughput, p50 = rest_load(envoy, rest, conc, args.seconds)
                figures.add(
                    f"envoy_rest_c{conc}_throughput", throughput, "req/s", grpc_via[conc][0], True
                )
                figures.add(f"envoy_rest_c{conc}_p50", p50, "ms", grpc_via[conc][1], False)
        finally:
            loop.run_until_complete(proxy.stop())
            loop.close()
            stop_process(server)
    figures.emit()


if __name__ == "__main__":
    main()
