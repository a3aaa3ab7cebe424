"""A store for benchmarks: a scratch database (on $CYCLONE_DATABASE_URL's server or an embedded
PostgreSQL with fsync off) and `cyclone serve store` on it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator

import psycopg
from psycopg.conninfo import make_conninfo

from bench._common import PYTHON, free_port, start_process
from services.store.embedded import DATABASE_URL_ENV, start_embedded


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty database on $CYCLONE_DATABASE_URL's server or on an embedded one."""
    with contextlib.ExitStack() as stack:
        server_url = os.environ.get(DATABASE_URL_ENV)
        if not server_url:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="cyclone-bench-pg-"))
            server_url = stack.enter_context(start_embedded(tmp, fast_unsafe=True)).url
        name = f"cyclone_bench_store_{os.getpid()}"
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {name}")
        try:
            yield make_conninfo(server_url, dbname=name)
        finally:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_store_process(url: str, *flags: str) -> tuple[subprocess.Popen[bytes], str]:
    """`cyclone serve store` on database `url` (more `flags` of its own); process, address."""
    port = free_port()
    command = [PYTHON, "-m", "cyclone_app", "serve", "store", "--port", str(port)]
    command += ["--database-url", url, "--metrics-port", "-1", *flags]
    store = start_process(command, port, timeout=60)
    return store, f"127.0.0.1:{port}"
