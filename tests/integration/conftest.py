"""Integration fixtures: one embedded PostgreSQL per session, a fresh database per test."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from services.store.embedded import DATABASE_URL_ENV, start_embedded
from services.store.migrations import run_migrations

_TEMPLATE = "cyclone_test_template"
_counter = itertools.count()


def url_for_database(url: str, dbname: str) -> str:
    return make_conninfo(url, dbname=dbname)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server for the session: ``$CYCLONE_DATABASE_URL`` or an embedded one in a temp dir."""
    env = os.environ.get(DATABASE_URL_ENV)
    if env:
        yield env
        return
    # Not under pytest's basetemp: pytest prunes old basetemps, which would delete the data
    # directory of a server another pytest session is still using.
    data_dir = Path(tempfile.mkdtemp(prefix="cyclone-test-pg-"))
    handle = start_embedded(data_dir, fast_unsafe=True)
    try:
        yield handle.url
    finally:
        handle.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _migrate(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await run_migrations(conn)


@pytest.fixture(scope="session")
def template_database(database_url: str) -> str:
    """A migrated database that per-test databases are copied from (much faster than DDL)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {_TEMPLATE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {_TEMPLATE}")
    asyncio.run(_migrate(url_for_database(database_url, _TEMPLATE)))
    return _TEMPLATE


def _create_database(server_url: str, name: str, template: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        # FILE_COPY: a file-level copy beats WAL-logging every block of a small template.
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")


def _drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def fresh_database_url(database_url: str, template_database: str) -> Iterator[str]:
    """A new, already-migrated database for one test; dropped afterwards."""
    name = f"cyclone_test_{os.getpid()}_{next(_counter)}"
    _create_database(database_url, name, template_database)
    try:
        yield url_for_database(database_url, name)
    finally:
        _drop_database(database_url, name)


@pytest.fixture
def empty_database_url(database_url: str) -> Iterator[str]:
    """A new database without Cyclone's schema (for migration tests)."""
    name = f"cyclone_empty_{os.getpid()}_{next(_counter)}"
    _create_database(database_url, name, "template0")
    try:
        yield url_for_database(database_url, name)
    finally:
        _drop_database(database_url, name)
