"""Inference benchmark: Cyclone's Predict and OIP ModelInfer next to MLServer and a bare echo.

Model: RandomForestRegressor(50 trees, depth 10) on 12 float features, 1-row requests. In one
run, interleaved (the order rotates every repetition), the same closed-loop grpc.aio load
generator drives:
- the floor: a bare grpc.aio echo server (bytes in, the same bytes out) given the ModelInfer
  payload, so a ratio is what Cyclone's parsing, validation, onnxruntime and response cost;
- the second floor: bench/bare_onnx_server.py, grpc.aio + onnxruntime and nothing else (no
  validation, ids, metrics or logging): what a grpc.aio server could reach here;
- Cyclone (`cyclone serve inference`, through `services.launch.spawn`): ModelInfer with one
  [1, 12] FP32 tensor, ModelInfer with one [1, 1] tensor per feature, and Predict;
- the same ModelInfer on a second Cyclone server logging every prediction to a store (a
  scratch database on an embedded PostgreSQL, all on this machine; `--no-logging` skips it);
- MLServer 1.7 serving the same ONNX file through bench/mlserver_runtime.py, with
  `parallel_workers: 0` (its fastest) and its default (one worker process); see
  bench/mlserver_peer.py for why it runs from its own virtualenv (`--no-mlserver` skips it).
Server CPU per request is the utime + stime of the server's whole process tree (/proc) over
the figure, divided by its requests. Figures are medians over `--reps`; the text lines also
give min..max. The machine is shared: figures are noisy, compare ratios from one run.

Usage: python bench/inference.py [--seconds 3] [--reps 3] [--no-mlserver] [--no-logging]
       [--log-flush-intervals 0.2[,0.05...]] [--store-nice N]
(`--log-flush-intervals`: one logging server per interval; `--store-nice N`: also the logged
case with the store and its PostgreSQL backends at niceness N during that case only;
`--baseline TREE`: another source tree's server, unlogged and logging to the same store, in
the same interleaved run.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from grpc import aio

from bench._common import PYTHON, Figures, free_port, percentile, start_process, stop_process
from bench._store_process import scratch_database, start_store_process
from bench.mlserver_peer import mlserver_executable, start_mlserver
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.models.convert import import_pipeline
from cyclone.oip.v2 import open_inference_pb2 as oip
from cyclone_app.examples import bench_regressor
from services.launch import spawn

PREDICT = "/cyclone.inference.v1.InferenceService/Predict"
STREAM = "/cyclone.inference.v1.InferenceService/PredictStream"
INFER = "/inference.GRPCInferenceService/ModelInfer"
ECHO = "/bench.Echo/Unary"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def predict_payload(row: np.ndarray) -> bytes:
    request = pb.PredictRequest(model="rf")
    for i, value in enumerate(row):
        request.features[f"f{i}"].numbers.append(float(value))
    return request.SerializeToString()


def infer_payload(row: np.ndarray) -> bytes:
    request = oip.ModelInferRequest(model_name="rf")
    request.inputs.add(name="input", datatype="FP32", shape=[1, len(row)])
    request.raw_input_contents.append(row.astype("<f4").tobytes())
    return request.SerializeToString()


def infer_per_feature_payload(row: np.ndarray) -> bytes:
    request = oip.ModelInferRequest(model_name="rf")
    for i, value in enumerate(row):
        request.inputs.add(name=f"f{i}", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(np.float32(value).astype("<f4").tobytes())
    return request.SerializeToString()


def tree_cpu_seconds(root: int) -> float:
    """utime + stime (and reaped children's) of `root` and every live descendant."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = sum(int(v) for v in fields[11:15]) / CLOCK_TICKS
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


@dataclass
class Sample:
    throughput: float  # req/s
    p50: float  # ms
    p99: float  # ms
    cpu_us: float  # server CPU per request, µs


@dataclass
class Case:
    name: str
    address: str
    method: str
    payload: bytes
    server_pid: int
    # Processes run at this niceness during the case only (back to 0 after): the store and
    # its PostgreSQL, to see what their CPU bursts cost the serving process's tail.
    niced: Callable[[], list[int]] | None = None
    nice: int = 0


@contextlib.contextmanager
def niceness(case: Case) -> Iterator[None]:
    pids = case.niced() if case.niced is not None else []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).nice(case.nice)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).nice(0)  # lowering it back needs root (the bench's host)


def measure(case: Case, concurrency: int, seconds: float) -> Sample:
    cpu_before = tree_cpu_seconds(case.server_pid)
    calls: list[int] = []
    throughput, p50, p99 = asyncio.run(
        unary_load(case.address, case.method, case.payload, concurrency, seconds, calls)
    )
    cpu = tree_cpu_seconds(case.server_pid) - cpu_before
    return Sample(throughput, p50, p99, cpu / max(1, calls[0]) * 1e6)


async def unary_load(
    address: str,
    method: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    calls: list[int] | None = None,
) -> tuple[float, float, float]:
    """Throughput (req/s), p50 and p99 latency (ms) of `concurrency` closed-loop callers.

    `calls`, when given, gets the number of calls made (warm-up included) appended."""
    async with aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        for _ in range(50):
            await call(payload)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await call(payload)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    if calls is not None:
        calls.append(50 + len(latencies))
    return (
        len(latencies) / elapsed,
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
    )


async def stream_load(
    address: str, method: str, payload: bytes, seconds: float, window: int = 64
) -> float:
    """Messages per second through one bidi stream, with up to `window` in flight."""
    async with aio.insecure_channel(address) as channel:
        call = channel.stream_stream(method)()
        in_flight = asyncio.Semaphore(window)
        stop_at = time.perf_counter() + seconds
        sent = 0

        async def writer() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at:
                await in_flight.acquire()
                await call.write(payload)
                sent += 1
            await call.done_writing()

        received = 0
        started = time.perf_counter()
        writing = asyncio.create_task(writer())
        async for _ in call:
            received += 1
            in_flight.release()
        await writing
        elapsed = time.perf_counter() - started
    return received / elapsed


def ort_in_process(model_dir: Path, row: np.ndarray, repeats: int = 3000) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feed = {"input": row.reshape(1, -1).astype(np.float32)}
    for _ in range(200):
        session.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    return (time.perf_counter() - t0) / repeats * 1e3


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.4g} (range {min(values):.4g}..{max(values):.4g})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-mlserver", action="store_true", help="leave MLServer out")
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds of quiet before each figure"
    )
    parser.add_argument(
        "--no-logging", action="store_true", help="leave out the case logging to a store"
    )
    parser.add_argument(
        "--log-flush-intervals",
        default="0.2",
        help="the logging server's flush interval (s); more, comma-separated, add a server each",
    )
    parser.add_argument(
        "--store-nice",
        type=int,
        default=0,
        help="also the logged case with the store and PostgreSQL at this niceness (needs root)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another Cyclone source tree (e.g. `git archive` of an older commit), served too",
    )
    args = parser.parse_args()
    model, x = bench_regressor()
    row = x[0].astype(np.float32)
    figures = Figures()
    predict, infer = predict_payload(row), infer_payload(row)
    per_feature = infer_per_feature_payload(row)
    stopping: list[Callable[[], object]] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        model_dir, _, _ = import_pipeline(model, "rf", Path(tmp) / "models")
        try:
            echo_port = free_port()
            echo = start_process([PYTHON, "-m", "bench.echo_server", str(echo_port)], echo_port)
            stopping.append(lambda: stop_process(echo))
            bare_port = free_port()
            bare = start_process(
                [
                    PYTHON,
                    "-m",
                    "bench.bare_onnx_server",
                    str(bare_port),
                    str(model_dir / "model.onnx"),
                ],
                bare_port,
            )
            stopping.append(lambda: stop_process(bare))
            cyclone = spawn(
                "inference",
                ["--model-repository", f"{tmp}/models", "--model", "rf", "--metrics-port", "-1"],
                Path(tmp) / "inference.log",
            )
            stopping.append(cyclone.stop)
            ours = cyclone.process.pid
            cases = [
                Case("echo", f"127.0.0.1:{echo_port}", ECHO, infer, echo.pid),
                Case("bare_onnx_server", f"127.0.0.1:{bare_port}", INFER, infer, bare.pid),
                Case("model_infer", cyclone.address, INFER, infer, ours),
                Case("model_infer_per_feature", cyclone.address, INFER, per_feature, ours),
                Case("predict", cyclone.address, PREDICT, predict, ours),
            ]
            if not args.no_logging:
                # The same server logging every prediction to a store (on this machine too).
                url = stack.enter_context(scratch_database())
                store, store_address = start_store_process(url)
                stopping.append(lambda: stop_process(store))
                for k, interval in enumerate(args.log_flush_intervals.split(",")):
                    serve = ["--model-repository", f"{tmp}/models", "--model", "rf"]
                    serve += ["--metrics-port", "-1", "--store", store_address]
                    logged = spawn(
                        "inference",
                        serve,
                        Path(tmp) / f"logged{k}.log",
                        env={"CYCLONE_LOG_FLUSH_INTERVAL": interval},
                    )
                    stopping.append(logged.stop)
                    # The first interval is the one the figures compare; others are extra cases.
                    name = "model_infer_logged" + (f"_flush{interval}" if k else "")
                    cases.append(Case(name, logged.address, INFER, infer, logged.process.pid))
                    if args.store_nice and not k:

                        def store_side(store_pid: int = store.pid) -> list[int]:
                            # The store and PostgreSQL's backends serving its database (their
                            # titles name it; the postmaster daemonizes, so not our children).
                            database = url.rsplit("dbname=", 1)[-1].split()[0]
                            pids = [store_pid]
                            for proc in psutil.process_iter(["cmdline"]):
                                if database in " ".join(proc.info["cmdline"] or ()):
                                    pids.append(proc.pid)
                            return pids

                        niced = Case(
                            f"{name}_store_nice{args.store_nice}",
                            logged.address,
                            INFER,
                            infer,
                            logged.process.pid,
                            store_side,
                            args.store_nice,
                        )
                        cases.append(niced)
            if args.baseline is not None:
                base = spawn(
                    "inference",
                    [
                        "--model-repository",
                        f"{tmp}/models",
                        "--model",
                        "rf",
                        "--metrics-port",
                        "-1",
                    ],
                    Path(tmp) / "baseline.log",
                    env={"PYTHONPATH": str(args.baseline.resolve())},
                )
                stopping.append(base.stop)
                cases.append(
                    Case("baseline_model_infer", base.address, INFER, infer, base.process.pid)
                )
                if not args.no_logging:
                    # The baseline logging to the same store, at the first flush interval.
                    base_logged = spawn(
                        "inference",
                        [
                            "--model-repository",
                            f"{tmp}/models",
                            "--model",
                            "rf",
                            "--metrics-port",
                            "-1",
                            "--store",
                            store_address,
                        ],
                        Path(tmp) / "baseline-logged.log",
                        env={
                            "PYTHONPATH": str(args.baseline.resolve()),
                            "CYCLONE_LOG_FLUSH_INTERVAL": args.log_flush_intervals.split(",")[0],
                        },
                    )
                    stopping.append(base_logged.stop)
                    cases.append(
                        Case(
                            "baseline_model_infer_logged",
                            base_logged.address,
                            INFER,
                            infer,
                            base_logged.process.pid,
                        )
                    )
                cases.append(
                    Case("baseline_predict", base.address, PREDICT, predict, base.process.pid)
                )
            if not args.no_mlserver:
                try:
                    executable = mlserver_executable()
                    for label, workers in (("mlserver_pw0", 0), ("mlserver_default", None)):
                        peer, port = start_mlserver(
                            executable, model_dir / "model.onnx", Path(tmp) / label, workers
                        )
                        stopping.append(lambda peer=peer: stop_process(peer))  # type: ignore[misc]
                        cases.append(Case(label, f"127.0.0.1:{port}", INFER, infer, peer.pid))
                except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                    # The rest of the figures stand without the peer.
                    print(f"MLServer left out: {exc}")
            print(
                f"payload: Predict {len(predict)} B, ModelInfer {len(infer)} B, per feature "
                f"{len(per_feature)} B; {args.seconds:.0f}s per figure, {args.reps} reps"
            )
            samples: dict[tuple[str, int], list[Sample]] = {}
            for rep in range(args.reps):
                for conc in (1, 32):
                    # Rotate the order so no case always runs first or after the same one.
                    shift = (rep * 2 + (conc == 32)) % len(cases)
                    for case in cases[shift:] + cases[:shift]:
                        # Let the previous case's background work end first (the logging
                        # server's last flush, the store's inserts), so no case pays for it.
                        time.sleep(args.settle)
                        with niceness(case):
                            sample = measure(case, conc, args.seconds)
                        samples.setdefault((case.name, conc), []).append(sample)
                        print(
                            f"  rep {rep} c{conc:<2} {case.name:<24} {sample.throughput:8.0f} req/s"
                            f"  p50 {sample.p50:6.2f} ms  p99 {sample.p99:6.2f} ms"
                            f"  cpu {sample.cpu_us:6.0f} us/req",
                            flush=True,
                        )
            add_unary_figures(figures, samples, [c.name for c in cases])
            stream_msg = pb.PredictStreamRequest(
                request=pb.PredictRequest.FromString(predict)
            ).SerializeToString()
            stream_floor = asyncio.run(
                stream_load(
                    f"127.0.0.1:{echo_port}", "/bench.Echo/Stream", stream_msg, args.seconds
                )
            )
            stream = asyncio.run(stream_load(cyclone.address, STREAM, stream_msg, args.seconds))
            figures.add("predict_stream_throughput", stream, "msg/s", stream_floor, True)
            for conc in (1, 32):
                unary = statistics.median(s.throughput for s in samples[("predict", conc)])
                figures.add(f"predict_stream_vs_unary_c{conc}", stream, "msg/s", unary, True)
            floor_ms = 1e3 / statistics.median(s.throughput for s in samples[("model_infer", 1)])
            figures.add(
                "onnxruntime_in_process_1row", ort_in_process(model_dir, row), "ms", floor_ms, False
            )
        finally:
            for stop in reversed(stopping):
                stop()
    figures.emit()


def add_unary_figures(
    figures: Figures, samples: dict[tuple[str, int], list[Sample]], names: list[str]
) -> None:
    """Medians: each case against the echo floor, then Cyclone's ModelInfer against MLServer."""
    med = statistics.median

    def throughput_ratio(figure: str, value: list[Sample], floor: list[Sample]) -> None:
        figures.add(
            figure,
            med(s.throughput for s in value),
            "req/s",
            med(s.throughput for s in floor),
            True,
        )

    for conc in (1, 32):
        echo = samples[("echo", conc)]
        floor = {
            "throughput": med(s.throughput for s in echo),
            "p50": med(s.p50 for s in echo),
            "p99": med(s.p99 for s in echo),
            "cpu": med(s.cpu_us for s in echo),
        }
        print(f"c{conc} echo floor: {spread([s.throughput for s in echo])} req/s")
        for name in names[1:]:
            runs = samples[(name, conc)]
            for key, unit in (("throughput", "req/s"), ("p50", "ms"), ("p99", "ms")):
                values = [getattr(s, key) for s in runs]
                print(f"  c{conc} {name} {key}: {spread(values)} {unit}")
                figures.add(
                    f"{name}_c{conc}_{key}", med(values), unit, floor[key], key == "throughput"
                )
            cpu = [s.cpu_us for s in runs]
            print(f"  c{conc} {name} cpu: {spread(cpu)} us/req")
            figures.add(f"{name}_c{conc}_cpu_per_request", med(cpu), "us", floor["cpu"], False)
        ours = samples[("model_infer", conc)]
        bare = samples[("bare_onnx_server", conc)]
        # How much of what a bare grpc.aio + onnxruntime server reaches Cyclone keeps.
        throughput_ratio(f"model_infer_c{conc}_throughput_vs_bare_onnx_server", ours, bare)
        if ("model_infer_logged", conc) in samples:
            # What logging every prediction costs: the same server with and without a store.
            logged = samples[("model_infer_logged", conc)]
            throughput_ratio(f"model_infer_c{conc}_throughput_logging_on_vs_off", logged, ours)
            # The target: logging costs at most 15 % of p99 (ratio >= 0.87).
            for name in [n for n in names if n.startswith("model_infer_logged")]:
                figures.add(
                    f"{name}_c{conc}_p99_vs_not_logged",
                    med(s.p99 for s in samples[(name, conc)]),
                    "ms",
                    med(s.p99 for s in ours),
                    False,
                )
        for peer in ("mlserver_pw0", "mlserver_default"):
            if (peer, conc) not in samples:
                continue
            theirs = samples[(peer, conc)]
            # Per-repetition ratios: the cases of one repetition ran back to back.
            speedups = [a.throughput / b.throughput for a, b in zip(ours, theirs, strict=True)]
            print(f"  c{conc} model_infer / {peer} throughput: {spread(speedups)}")
            throughput_ratio(f"model_infer_c{conc}_throughput_vs_{peer}", ours, theirs)
            # The ceiling for a grpc.aio server here: the bare one against the peer.
            throughput_ratio(f"bare_onnx_server_c{conc}_throughput_vs_{peer}", bare, theirs)
            figures.add(
                f"model_infer_c{conc}_p99_vs_{peer}",
                med(s.p99 for s in ours),
                "ms",
                med(s.p99 for s in theirs),
                False,
            )


if __name__ == "__main__":
    main()
