"""
PostgreSQL for the tests.

``database_url()``
    The URL of a database made for this test run (``mws_test_<pid>_<random>``), created on
    first use on the server named by ``MARKETPLACE_WS_TEST_DATABASE_URL`` (default
    ``postgresql://postgres@127.0.0.1:5432/postgres``) and dropped when the process exits.
    If that server cannot be reached: with ``CI=true`` the tests fail, saying how to start
    PostgreSQL; otherwise an embedded server from the ``pgserver`` package is started in a
    temporary directory and stopped at exit.

``fresh_schema(testcase)``
    A new schema name (``schema_<random>``) for one test; the schema is dropped, with
    everything in it, in the test's clean-up. Tests that need isolation use their own.

``open_database(testcase, **kwargs)``
    A started :class:`~marketplace_ws.db.Database` on the test database, closed in
    clean-up.

``private_server(testcase)``
    A PostgreSQL server of the test's own (pgserver, Unix socket in a temporary
    directory) that the test may stop and start; deleted in clean-up. Never restart the
    shared server.

Set-up uses synchronous psycopg2 connections: it is test scaffolding, not the reactor's
path.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any
from unittest import SkipTest
from urllib.parse import urlsplit

import psycopg2
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from marketplace_ws.db import Database, parse_database_url

ENV = "MARKETPLACE_WS_TEST_DATABASE_URL"
DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"

_state: dict[str, str] = {}


def _connect(url: str) -> Any:
    conn = psycopg2.connect(
        parse_database_url(url).dsn(), connect_timeout=5, options="-c lock_timeout=5s"
    )
    conn.autocommit = True
    return conn


def _embedded_server_url() -> str:
    try:
        import pgserver
    except ImportError as e:
        raise RuntimeError(
            f"No PostgreSQL for the tests: set {ENV}, start one ({START_HINT}), "
            f"or pip install pgserver"
        ) from e
    tmp = tempfile.mkdtemp(prefix="mws-test-pg-")
    # Registered before pgserver's own handler, so it runs after the server has stopped.
    atexit.register(shutil.rmtree, tmp, True)
    server = pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
    return str(server.get_uri())


def _server_url() -> str:
    url = os.environ.get(ENV, DEFAULT_SERVER_URL)
    try:
        _connect(url).close()
    except psycopg2.OperationalError as e:
        if os.environ.get("CI") == "true":
            where = parse_database_url(url).where()
            raise RuntimeError(
                f"Cannot reach the test PostgreSQL at {where} ({str(e).splitlines()[0]}). "
                f"Start it with: {START_HINT} (or set {ENV})"
            ) from e
        return _embedded_server_url()
    return url


def _create_database() -> str:
    server = _server_url()
    name = f"mws_test_{os.getpid()}_{secrets.token_hex(4)}"
    conn = _connect(server)
    try:
        conn.cursor().execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()

    def drop() -> None:
        conn = _connect(server)
        try:
            conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()

    atexit.register(drop)
    return urlsplit(server)._replace(path=f"/{name}").geturl()


def database_url() -> str:
    """The URL of this run's test database (created on first call)."""
    if "url" not in _state:
        _state["url"] = _create_database()
    return _state["url"]


def fresh_schema(testcase: SynchronousTestCase) -> str:
    """A schema name of the test's own, dropped (CASCADE) in clean-up."""
    name = f"schema_{secrets.token_hex(6)}"
    url = database_url()

    def drop() -> None:
        conn = _connect(url)
        try:
            conn.cursor().execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            conn.close()

    testcase.addCleanup(drop)
    return name


async def _open(testcase: SynchronousTestCase, url: str, kwargs: dict[str, Any]) -> Database:
    db = Database(parse_database_url(url), **kwargs)
    await db.start()
    testcase.addCleanup(db.close)
    return db


def open_database(
    testcase: SynchronousTestCase, url: str | None = None, **kwargs: Any
) -> Deferred[Database]:
    """A started Database on ``url`` (the test database by default), closed in clean-up."""
    return Deferred.fromCoroutine(_open(testcase, url or database_url(), kwargs))


class PrivateServer:
    """A pgserver instance a test may stop and start."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self.url: str = server.get_uri()

    def stop(self) -> Deferred[None]:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        return deferToThread(
            pg_ctl,
            ["-w", "-m", "fast", "stop"],
            pgdata=self._server.pgdata,
            user=self._server.system_user,
        )

    def start(self) -> Deferred[None]:
        # pgserver's own start-up, with the same socket directory as before.
        return deferToThread(self._server.ensure_postgres_running)


async def _private_server(testcase: SynchronousTestCase) -> PrivateServer:
    try:
        import pgserver
    except ImportError:
        raise SkipTest("pgserver is not installed") from None
    tmp = tempfile.mkdtemp(prefix="mws-test-pg-")
    testcase.addCleanup(shutil.rmtree, tmp, True)
    server = await deferToThread(pgserver.get_server, Path(tmp) / "pgdata", cleanup_mode="delete")
    testcase.addCleanup(deferToThread, server.cleanup)
    return PrivateServer(server)


def private_server(testcase: SynchronousTestCase) -> Deferred[PrivateServer]:
    """A PostgreSQL server of the test's own; deleted in clean-up."""
    return Deferred.fromCoroutine(_private_server(testcase))
