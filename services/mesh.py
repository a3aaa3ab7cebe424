"""`cyclone up`: the whole mesh on one machine, started through the launcher and supervised.

Order of start: store (embedded PostgreSQL unless a URL is given), Envoy, trainer (it drives
Envoy's routes and starts the model revisions), monitor (with the dashboard). Each component is
its own process in its own session, logging to `<data_dir>/logs/<component>.log`.

Two planes. The data plane -- Envoy and the model revisions -- outlives the control plane:
Envoy is supervised here (restarted at once on the files that hold its last config) and the
revisions run in sessions of their own, so a trainer, monitor or store that dies is restarted
and adopts them; nothing that serves is swept or restarted. Stop is the reverse order, each
component gracefully (SIGTERM), then its whole process group; the revisions stop before Envoy,
so nothing stays behind. A second `cyclone up` on the same data dir resumes: everything durable
is in the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from cyclone.envoy import edge
from cyclone.envoy.config import EnvoySettings, Layout
from cyclone.local_mesh import MESH_FILE, ComponentInfo, MeshInfo
from services.launch import Spawned, spawn

log = logging.getLogger(__name__)

LOCK_FILE = "mesh.lock"
# A component that exits is restarted, unless it exits this often within the window.
RESTART_LIMIT = 5
RESTART_WINDOW = 120.0
# How often the supervisor looks at its components: Envoy is back within a second of dying.
SUPERVISE_EVERY = 0.1
ENVOY = "envoy"
# Where the local orchestrator keeps the revisions a restarted trainer adopts.
REVISIONS_STATE = Path("revisions") / "running.json"
# A serving version runs in two processes when the machine has the cores and memory for it,
# so a crashed replica's requests are retried on its sibling at once.
REPLICA_MEMORY_BYTES = 2 * 1024**3


def serving_replicas() -> int:
    """Processes per serving revision: 2 with at least 2 cores and 2 GiB available, else 1."""
    import psutil

    cores = os.cpu_count() or 1
    available = psutil.virtual_memory().available
    return 2 if cores >= 2 and available >= REPLICA_MEMORY_BYTES else 1


# The serving pool's memory for models per process under `cyclone up`: 1.5 GiB holds ~500 small
# models across two processes within 4 GiB (docs/serving-pool.md), but never more than
# POOL_MEMORY_SHARE of the memory available at start split over the processes.
POOL_MEMORY_MB = 1536.0
POOL_MEMORY_SHARE = 0.3
POOL_MEMORY_FLOOR_MB = 256.0


def pool_memory_mb(processes: int, available_bytes: int | None = None) -> float:
    """MiB of models each of `processes` pool processes holds before evicting."""
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    share = available_bytes * POOL_MEMORY_SHARE / max(processes, 1) / 1024**2
    return max(POOL_MEMORY_FLOOR_MB, min(POOL_MEMORY_MB, share))


class MeshError(RuntimeError):
    """The mesh cannot start as asked; the message says why and nothing was started."""


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data_dir: Path
    host: str = "127.0.0.1"  # where the public listener binds (0.0.0.0 to serve the network)
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    database_url: str | None = None
    model_repository: Path | None = None
    # Generate a token (mode 0600) and require it for the control plane.
    auth: bool = True
    # Scale to zero: seconds without requests before a model revision is stopped (0 = never).
    idle_timeout_seconds: float = 0.0
    # Processes per serving revision; None decides by the machine (`serving_replicas`).
    replicas: int | None = None
    # Serve small models from a shared pool of this many processes (None: one per core; 0: a
    # revision per version, as before the pool).
    pool_processes: int | None = None
    # Control-plane instances over the one database (docs/scaling-out.md). Several stores sit
    # behind Envoy's control listener, which the trainer, monitors and revisions then call;
    # several monitors share the models through leases in the store.
    # Several trainers all run jobs; one at a time (the holder of the traffic role's lease)
    # drives Envoy and the rollouts, and Envoy's control listener routes trainer calls to it.
    stores: int = 1
    monitors: int = 1
    trainers: int = 1

    def __post_init__(self) -> None:
        if self.stores < 1:
            raise MeshError(f"stores: must be at least 1, got {self.stores}")
        if self.monitors < 1:
            raise MeshError(f"monitors: must be at least 1, got {self.monitors}")
        if self.trainers < 1:
            raise MeshError(f"trainers: must be at least 1, got {self.trainers}")

    @property
    def repository(self) -> Path:
        return self.model_repository or self.data_dir / "models"

    def port(self, name: str) -> int:
        from cyclone.local_mesh import DEFAULT_PORTS

        return self.ports.get(name, DEFAULT_PORTS[name])


@dataclasses.dataclass
class ComponentPlan:
    """How to start one component: `cyclone serve <service> <args>` on `port`; `name` tells
    instances of one service apart (store, store-2, ...)."""

    name: str
    args: list[str]
    port: int
    service: str = ""

    @property
    def serves(self) -> str:
        return self.service or self.name


def instance_name(service: str, index: int) -> str:
    """The first instance keeps the service's name; the others are `<service>-<n>`."""
    return service if index == 1 else f"{service}-{index}"


# Callback for progress: (component, state, detail) with state in starting/ready/failed/stopped.
Progress = Callable[[str, str, str], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serves_control_plane(cmdline: str, data_dir: str) -> bool:
    """A store, trainer or monitor of the mesh of `data_dir` (its `--data-dir` argument)."""
    served = any(f"serve {s} " in cmdline for s in ("store", "trainer", "monitor"))
    return served and f"--data-dir {data_dir} " in f"{cmdline} "


def stop_strays(
    data_dir: Path, repository: Path | None, *, keep: set[int] | None = None, grace: float = 5.0
) -> list[int]:
    """Processes of the mesh of `data_dir` that no supervisor holds: revisions (they run in
    sessions of their own, outliving trainers), and what a mesh killed outright left -- its
    Envoy, store, trainer and monitors -- found by the mesh's data dir (or model `repository`,
    for revisions) in their command line; stopped, and their pids returned. The control plane
    goes first: a stray trainer would start again the revisions stopped under it."""
    directory = str(data_dir)
    keep = keep or {os.getpid()}
    control = _stop_procs(
        lambda argv, cmdline: _serves_control_plane(cmdline, directory), keep, grace
    )
    resolved = str(repository.resolve()) if repository is not None else None

    def data_plane(argv: list[str], cmdline: str) -> bool:
        if Path(argv[0]).name == "envoy":
            return directory in cmdline
        if "serve inference" not in cmdline:
            return False
        return (resolved is not None and resolved in cmdline) or (
            f"--data-dir {directory} " in f"{cmdline} "
        )

    return control + _stop_procs(data_plane, keep, grace)


def _stop_procs(
    matches: Callable[[list[str], str], bool], keep: set[int], grace: float
) -> list[int]:
    import psutil

    strays = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if proc.info["pid"] in keep or not argv:
            continue
        if matches(argv, " ".join(argv)):
            strays.append(proc)
    for proc in strays:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(strays, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in strays]


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def data_dir_holder(data_dir: Path) -> str | None:
    """Who holds `data_dir`'s lock (a live `cyclone up`, starting or running), else None."""
    try:
        handle = (data_dir / LOCK_FILE).open("a+")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[IO[str]]:
    """An exclusive lock on the data dir for the mesh's lifetime (released even on SIGKILL)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = (data_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise MeshError(
            f"data dir {data_dir} is held by another running Cyclone (pid {holder}); "
            "stop it first or use another --data-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield handle
    finally:
        handle.close()


class Mesh:
    """Starts the components in order, watches them, stops them in reverse order."""

    def __init__(self, settings: MeshSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress or (lambda component, state, detail: None)
        self.running: list[Spawned] = []
        self._stopping = threading.Event()
        # Ports of the second and later instances: given (`ports["store-2"]`) or free ones,
        # chosen once so a restarted instance comes back where Envoy expects it.
        self._instance_ports: dict[str, int] = {}
        for service, count in (
            ("store", settings.stores),
            ("monitor", settings.monitors),
            ("trainer", settings.trainers),
        ):
            for index in range(2, count + 1):
                name = instance_name(service, index)
                self._instance_ports[name] = settings.ports.get(name) or _free_port()

    def instance_port(self, name: str) -> int:
        return self._instance_ports.get(name) or self.settings.port(name)

    def store_address(self) -> str:
        """Where the trainer, monitors and revisions reach the store: the store itself, or with
        several, Envoy's control listener in front of them."""
        s = self.settings
        port = s.port("control") if s.stores > 1 else s.port("store")
        return f"127.0.0.1:{port}"

    def trainer_address(self) -> str:
        """Where the monitors and clients reach the trainer: the trainer itself, or with
        several, Envoy's control listener, which routes to the leading one."""
        s = self.settings
        port = s.port("control") if s.trainers > 1 else s.port("trainer")
        return f"127.0.0.1:{port}"

    def _instances(self, service: str, count: int) -> list[str]:
        return [
            f"127.0.0.1:{self.instance_port(instance_name(service, i))}"
            for i in range(1, count + 1)
        ]

    # -- plan --------------------------------------------------------------------------------

    def plan(self) -> list[ComponentPlan]:
        s = self.settings
        common = ["--data-dir", str(s.data_dir)]
        store = self.store_address()
        monitor = f"127.0.0.1:{s.port('monitor')}"
        trainer = self.trainer_address()
        pool_processes = (os.cpu_count() or 1) if s.pool_processes is None else s.pool_processes
        store_args = [*common]
        if s.database_url:
            store_args += ["--database-url", s.database_url]
        stores = [
            ComponentPlan(name, store_args, self.instance_port(name), "store")
            for name in (instance_name("store", i) for i in range(1, s.stores + 1))
        ]
        monitor_args = [
            *common,
            "--store",
            store,
            "--trainer",
            trainer,
            # Known-answer probes go through Envoy, as clients' requests do.
            "--probe-address",
            f"127.0.0.1:{s.port('public')}",
        ]
        monitors = [
            ComponentPlan(
                name,
                # The first monitor serves the dashboard (and is the one Envoy routes to).
                [
                    *monitor_args,
                    "--dashboard-port",
                    str(s.port("dashboard") if name == "monitor" else -1),
                ],
                self.instance_port(name),
                "monitor",
            )
            for name in (instance_name("monitor", i) for i in range(1, s.monitors + 1))
        ]
        trainer_args = [
            *common,
            "--store",
            store,
            "--model-repository",
            str(s.repository.resolve()),
            "--envoy",
            "--envoy-apart",
            "--replicas",
            str(s.replicas or serving_replicas()),
            "--pool-processes",
            str(pool_processes),
            *(
                ["--pool-memory-mb", f"{pool_memory_mb(pool_processes):g}"]
                if pool_processes
                else []
            ),
            "--public-host",
            s.host,
            "--public-port",
            str(s.port("public")),
            "--control-port",
            str(s.port("control")),
            "--monitor",
            monitor,
            *(
                ["--idle-timeout", f"{s.idle_timeout_seconds:g}"]
                if s.idle_timeout_seconds > 0
                else []
            ),
        ]
        if s.stores > 1:
            trainer_args += ["--envoy-stores", ",".join(self._instances("store", s.stores))]
        if s.trainers > 1:
            trainer_args += [
                "--envoy-trainers",
                ",".join(self._instances("trainer", s.trainers)),
            ]
        # The trainers drive Envoy's routes and start the model revisions (the one holding the
        # traffic role's lease at a time); both outlive them. Each keeps its id across
        # restarts, so a restarted leader takes its own lease back at once.
        trainers = [
            ComponentPlan(
                name,
                [*trainer_args, "--instance-id", name],
                self.instance_port(name),
                "trainer",
            )
            for name in (instance_name("trainer", i) for i in range(1, s.trainers + 1))
        ]
        return [
            *stores,
            # The data plane's edge, run by this supervisor (not `cyclone serve`).
            ComponentPlan(ENVOY, [], s.port("public")),
            *trainers,
            *monitors,
        ]

    def envoy_settings(self) -> EnvoySettings:
        s = self.settings
        return edge.edge_settings(
            s.data_dir,
            public_host=s.host,
            public_port=s.port("public"),
            control_port=s.port("control"),
            store=f"127.0.0.1:{s.port('store')}",
            monitor=f"127.0.0.1:{s.port('monitor')}",
            trainer=f"127.0.0.1:{s.port('trainer')}",
            extra_stores=self._instances("store", s.stores)[1:],
            extra_trainers=self._instances("trainer", s.trainers)[1:],
        )

    def ports_in_use(self) -> list[str]:
        s = self.settings
        wanted = {c.name: c.port for c in self.plan() if c.name != ENVOY}
        for extra in ("dashboard", "public", "control"):
            wanted[extra] = s.port(extra)
        return [
            f"{name} port {port}" for name, port in wanted.items() if port_taken("127.0.0.1", port)
        ]

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> MeshInfo:
        """Start every component; on any failure stop what started and raise MeshError."""
        taken = self.ports_in_use()
        if taken:
            raise MeshError(f"already in use: {', '.join(taken)}; nothing was started")
        if self.settings.auth:
            from cyclone.auth import write_local_tokens

            write_local_tokens(self.settings.data_dir)
        # A mesh killed outright may have left revisions (or an Envoy) behind: this mesh
        # starts its own, so there is nothing for its trainer to adopt.
        self._stop_strays()
        (self.settings.data_dir / REVISIONS_STATE).unlink(missing_ok=True)
        try:
            for component in self.plan():
                if self._stopping.is_set():
                    raise MeshError("interrupted while starting")
                self.progress(component.name, "starting", f"port {component.port}")
                started = time.monotonic()
                try:
                    running = self._spawn(component)
                except RuntimeError as exc:
                    self.progress(component.name, "failed", str(exc).splitlines()[0])
                    raise MeshError(f"{component.name} did not start: {exc}") from None
                self.running.append(running)
                self.progress(
                    component.name,
                    "ready",
                    f"{running.address} in {time.monotonic() - started:.1f}s",
                )
        except BaseException:
            self.stop()
            raise
        info = self.info()
        self._write_info(info)
        return info

    def _spawn(self, component: ComponentPlan, *, restart: bool = False) -> Spawned:
        if component.name == ENVOY:
            return self._spawn_envoy(fresh=not restart)
        args = component.args
        if (
            component.serves == "store"
            and component.name != "store"
            and "--database-url" not in args
        ):
            # A second store connects to the first one's embedded PostgreSQL; only the first
            # starts (and stops) it.
            from services.store.embedded import running_url

            url = running_url(self.settings.data_dir)
            if url is None:
                raise RuntimeError("the embedded PostgreSQL of the first store is not running")
            args = [*args, "--database-url", url]
        spawned = spawn(
            component.serves,
            args,
            self.settings.data_dir / "logs" / f"{component.name}.log",
            port=component.port,
            env=self.environment(),
            new_session=True,
        )
        return dataclasses.replace(spawned, component=component.name)

    def _spawn_envoy(self, *, fresh: bool, timeout: float = 30.0) -> Spawned:
        """Run Envoy on a fresh configuration (the mesh starts), or on the files it left (a
        restart: the last clusters and routes the trainer wrote)."""
        settings = self.envoy_settings()
        layout = Layout(settings.work_dir)
        if fresh or not layout.bootstrap.exists():
            edge.prepare(settings)
        layout.admin_address.unlink(missing_ok=True)
        log_path = self.settings.data_dir / "logs" / f"{ENVOY}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                edge.command(settings),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        running = Spawned(ENVOY, f"127.0.0.1:{settings.public_port}", process, log_path)
        deadline = time.monotonic() + timeout
        while not edge.ready(settings):
            if process.poll() is not None or time.monotonic() > deadline:
                running.stop(5)
                raise RuntimeError(f"envoy did not start; log:\n{running.log_tail()}")
            time.sleep(0.05)
        return running

    def environment(self) -> dict[str, str]:
        """What every component gets: the tokens it checks and the token it sends."""
        if not self.settings.auth:
            return {}
        from cyclone.auth import TOKEN_ENV, TOKEN_FILE_NAME, TOKENS_FILE_NAME

        # The mesh's own token, whatever the caller's environment says: the components must
        # send a token their tokens file knows.
        token = (self.settings.data_dir / TOKEN_FILE_NAME).read_text().strip()
        return {
            "CYCLONE_TOKENS_FILE": str(self.settings.data_dir / TOKENS_FILE_NAME),
            TOKEN_ENV: token,
        }

    def info(self) -> MeshInfo:
        s = self.settings
        components = {
            r.component: ComponentInfo(r.address, r.process.pid, str(r.log_path))
            for r in self.running
        }
        first = components.get("trainer")
        if first is not None and s.trainers > 1:
            # Clients reach the leading trainer through Envoy, whichever instance it is.
            components["trainer"] = dataclasses.replace(first, address=self.trainer_address())
        return MeshInfo(
            pid=os.getpid(),
            data_dir=str(s.data_dir),
            public=f"127.0.0.1:{s.port('public')}",
            control=f"127.0.0.1:{s.port('control')}",
            dashboard=f"http://127.0.0.1:{s.port('dashboard')}/",
            components=components,
            repository=str(s.repository.resolve()),
        )

    def _write_info(self, info: MeshInfo) -> None:
        path = self.settings.data_dir / MESH_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(info.to_json())
        tmp.replace(path)

    def dead(self) -> list[Spawned]:
        return [r for r in self.running if r.process.poll() is not None]

    def wait(self, every: float = SUPERVISE_EVERY) -> None:
        """Supervise until `request_stop()` (signals): a component that exits is restarted, at
        once the first time, then with backoff (its process group cleared first, so no child of
        the old one lingers; the revisions run in sessions of their own and are adopted by the
        new trainer). One that keeps failing (RESTART_LIMIT times within RESTART_WINDOW
        seconds) ends the wait."""
        failures: dict[str, list[float]] = {}
        while not self._stopping.wait(every):
            for index, r in enumerate(self.running):
                if r.process.poll() is None:
                    continue
                code = r.process.returncode
                log.error("%s exited (%s); log tail:\n%s", r.component, code, r.log_tail())
                now = time.monotonic()
                recent = [t for t in failures.get(r.component, []) if now - t < RESTART_WINDOW]
                failures[r.component] = [*recent, now]
                if len(failures[r.component]) > RESTART_LIMIT:
                    self.progress(r.component, "failed", f"exited with {code}; giving up")
                    return
                self.progress(r.component, "starting", f"exited with {code}; restarting")
                self._clear_group(r)
                if recent and self._stopping.wait(min(2.0 ** (len(recent)), 30.0)):
                    return
                try:
                    self.running[index] = self._spawn(self._plan_for(r.component), restart=True)
                except RuntimeError as exc:
                    self.progress(r.component, "failed", str(exc).splitlines()[0])
                    continue  # tried again next round, until the limit
                self.progress(r.component, "ready", f"restarted on {self.running[index].address}")
                self._write_info(self.info())

    def _plan_for(self, component: str) -> ComponentPlan:
        return next(c for c in self.plan() if c.name == component)

    @staticmethod
    def _clear_group(running: Spawned) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.process.pid, signal.SIGKILL)

    def _stop_strays(self, grace: float = 5.0) -> list[int]:
        """Processes of this mesh that are not its components (`stop_strays`)."""
        return stop_strays(
            self.settings.data_dir,
            self.settings.repository,
            keep={os.getpid(), *(r.process.pid for r in self.running)},
            grace=grace,
        )

    def request_stop(self) -> None:
        self._stopping.set()

    def stop(self) -> None:
        """Reverse order; graceful first, then the component's whole process group."""
        with contextlib.suppress(FileNotFoundError):
            (self.settings.data_dir / MESH_FILE).unlink()
        for running in reversed(self.running):
            if running.component == ENVOY:
                self._stop_strays()  # the revisions, before the edge in front of them
            running.stop(timeout=30)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(running.process.pid, signal.SIGKILL)  # its children, if any remain
            self.progress(running.component, "stopped", "")
        self.running.clear()
        stray = self._stop_strays()
        if stray:
            log.warning("stopped %d process(es) the components left behind: %s", len(stray), stray)
        if not self.settings.database_url:
            from services.store.embedded import stop_if_running

            # Backstop: a store killed mid-shutdown leaves its PostgreSQL running.
            if stop_if_running(self.settings.data_dir):
                log.warning("stopped the embedded PostgreSQL the store left running")
