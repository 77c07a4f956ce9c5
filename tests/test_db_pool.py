"""
Tests for marketplace_ws.db.pool against a real PostgreSQL (see tests/pg.py).
"""

from __future__ import annotations

import socket
from typing import Any, TypeVar, cast

import attrs
import psycopg2.errors
from psycopg2.extensions import QueryCanceledError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from marketplace_ws.db import (
    Cursor,
    Database,
    DatabaseUnavailable,
    DatabaseUnreachable,
    parse_database_url,
)

from . import pg


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def eventually(check: Any, timeout: float = 20.0) -> Any:
    """Await ``check()`` until it stops raising, for at most ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        try:
            return await check()
        except Exception:
            if reactor.seconds() > deadline:
                raise
        await sleep(0.2)


E = TypeVar("E", bound=BaseException)


async def raised(d: Deferred[Any], kind: type[E]) -> E:
    """What ``d`` failed with (trial's assertFailure is typed as if it succeeded)."""
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got the result {result!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class QueryTests(TestCase):
    async def test_rows(self) -> None:
        db = await pg.open_database(self, size=2)
        self.assertEqual(await db.query("t", "SELECT 1, 'a'"), [(1, "a")])
        self.assertEqual(await db.query("t", "SELECT %s + %s", (2, 3)), [(5,)])
        self.assertEqual(await db.query("t", "SELECT %(x)s::text", {"x": "named"}), [("named",)])
        self.assertEqual(await db.query("t", "SELECT 1 WHERE false"), [])
        # No result at all, and a literal % with no parameters.
        self.assertEqual(await db.query("t", "DO $$ BEGIN PERFORM '100%'; END $$"), [])

    async def test_observe(self) -> None:
        seen: list[tuple[str, float, bool]] = []
        db = await pg.open_database(self, observe=lambda *a: seen.append(a))
        await db.query("good", "SELECT 1")
        await self.assertFailure(db.query("bad", "SELECT nonsense"), Exception)
        await db.transaction("tx", lambda cursor: cursor.execute("SELECT 1"))
        self.assertEqual(
            [(name, ok) for name, _, ok in seen], [("good", True), ("bad", False), ("tx", True)]
        )
        self.assertTrue(all(0 <= seconds < 5 for _, seconds, _ in seen))

    async def test_session_settings(self) -> None:
        schema = pg.fresh_schema(self)
        db = await pg.open_database(self, schema=schema, statement_timeout=12.5)
        [row] = await db.query(
            "t",
            "SELECT current_setting('search_path'), current_setting('application_name'),"
            " current_setting('statement_timeout')",
        )
        self.assertEqual(row, (f'"{schema}", "public"', "marketplace-ws", "12500ms"))

    async def test_statement_timeout(self) -> None:
        """
        A statement longer than statement_timeout fails with psycopg2's error, and the
        connection (the only one) goes on working.
        """
        db = await pg.open_database(self, size=1, statement_timeout=0.2)
        failure = await raised(db.query("slow", "SELECT pg_sleep(3)"), QueryCanceledError)
        self.assertIn("statement timeout", str(failure))
        self.assertEqual(await db.query("t", "SELECT 1"), [(1,)])
        self.assertTrue(db.available)

    async def test_query_errors_keep_the_connection(self) -> None:
        """
        Errors psycopg2 files under OperationalError (timeouts, serialization failures)
        leave the connection in place: no reconnection.
        """
        db = await pg.open_database(self, size=1, statement_timeout=0.2)
        [(pid,)] = await db.query("t", "SELECT pg_backend_pid()")
        await self.assertFailure(db.query("slow", "SELECT pg_sleep(3)"), QueryCanceledError)
        serialization = "DO $$ BEGIN RAISE EXCEPTION 'retry' USING ERRCODE = '40001'; END $$"
        await self.assertFailure(db.query("t", serialization), psycopg2.errors.SerializationFailure)
        await self.assertFailure(
            db.transaction("t", lambda cursor: cursor.execute("SELECT pg_sleep(3)")),
            QueryCanceledError,
        )
        self.assertEqual(await db.query("t", "SELECT pg_backend_pid()"), [(pid,)])

    async def test_slow_query_logged_without_parameters(self) -> None:
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        db = await pg.open_database(self, slow_query=0.1)
        await db.query("lazy", "SELECT pg_sleep(0.15), %s::text", ("secret-param",))
        [event] = [e for e in events if e.get("log_level") == LogLevel.warn]
        text = formatEvent(event)
        self.assertIn("lazy", text)
        self.assertNotIn("secret-param", text + repr(event))

    async def test_host_name(self) -> None:
        """A host name is resolved off the reactor thread and handed to libpq."""
        url = parse_database_url(pg.database_url())
        if url.host != "127.0.0.1":
            raise SkipTest("the test database is not on 127.0.0.1")
        db = await pg.open_database(self, pg.database_url().replace("127.0.0.1", "localhost", 1))
        self.assertEqual(await db.query("t", "SELECT 1"), [(1,)])

    async def test_queueing(self) -> None:
        """More queries than connections wait their turn."""
        db = await pg.open_database(self, size=2)
        results = await gatherResults(
            [db.query("t", "SELECT %s, pg_sleep(0.05)", (i,)) for i in range(6)]
        )
        self.assertEqual([rows[0][0] for rows in results], list(range(6)))
        self.assertEqual(db.inFlight, 0)

    def test_connection_limit_caps_size(self) -> None:
        db = Database(parse_database_url("postgresql://h/db?connection_limit=2"), size=5)
        self.assertEqual(db.size, 2)

    def test_bad_arguments(self) -> None:
        url = parse_database_url(pg.database_url())
        self.assertRaises(ValueError, Database, url, schema="Robert'); DROP")
        self.assertRaises(ValueError, Database, url, size=0)


class TransactionTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.schema = pg.fresh_schema(self)
        self.db = await pg.open_database(self, schema=self.schema)
        await self.db.query("t", f'CREATE SCHEMA "{self.schema}"; CREATE TABLE t (x int)')

    async def count(self) -> int:
        [(n,)] = await self.db.query("t", "SELECT count(*) FROM t")
        return int(n)

    async def test_commit(self) -> None:
        async def work(cursor: Cursor) -> list[tuple[int]]:
            await cursor.execute("INSERT INTO t VALUES (1), (2)")
            await cursor.execute("SELECT x FROM t ORDER BY x")
            rows: list[tuple[int]] = cursor.fetchall()
            return rows

        self.assertEqual(await self.db.transaction("tx", work), [(1,), (2,)])
        self.assertEqual(await self.count(), 2)

    async def test_rollback(self) -> None:
        async def work(cursor: Cursor) -> None:
            await cursor.execute("INSERT INTO t VALUES (1)")
            raise ZeroDivisionError()

        await self.assertFailure(self.db.transaction("tx", work), ZeroDivisionError)
        self.assertEqual(await self.count(), 0)

    async def test_deferred_function(self) -> None:
        """``fn`` may return a Deferred instead of being a coroutine function."""
        result = await self.db.transaction(
            "tx",
            lambda cursor: cursor.execute("INSERT INTO t VALUES (7) RETURNING x").addCallback(
                lambda c: c.fetchone()[0]
            ),
        )
        self.assertEqual(result, 7)

    async def test_isolated(self) -> None:
        """Until COMMIT, other connections do not see the transaction's rows."""
        seen = []

        async def work(cursor: Cursor) -> None:
            await cursor.execute("INSERT INTO t VALUES (1)")
            seen.append(await self.count())

        await self.db.transaction("tx", work)
        self.assertEqual(seen, [0])
        self.assertEqual(await self.count(), 1)


class StartTests(TestCase):
    async def test_unreachable(self) -> None:
        port = free_port()
        db = Database(parse_database_url(f"postgresql://app:s3cretPW@127.0.0.1:{port}/db"))
        failure = await raised(db.start(), DatabaseUnreachable)
        self.assertEqual(
            str(failure), f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused"
        )
        await self.assertFailure(db.query("t", "SELECT 1"), DatabaseUnavailable)

    async def test_password_scrubbed(self) -> None:
        """A driver message that quotes the password does not pass it on."""
        url = attrs.evolve(
            parse_database_url(pg.database_url()), user="s3cretPW", password="s3cretPW"
        )
        failure = await raised(Database(url).start(), DatabaseUnreachable)
        self.assertEqual(
            str(failure),
            f'cannot connect to PostgreSQL at {url.where()}: role "***" does not exist',
        )

    async def test_connect_timeout(self) -> None:
        """A server that accepts and never answers is given up on (libpq would wait)."""
        silent = ServerFactory()
        silent.protocol = Protocol
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port  # type: ignore[attr-defined]
        db = Database(
            parse_database_url(f"postgresql://u:pw@127.0.0.1:{number}/db?connect_timeout=1"), size=2
        )
        started = reactor.seconds()
        failure = await raised(db.start(), DatabaseUnreachable)
        self.assertEqual(
            str(failure), f"cannot connect to PostgreSQL at 127.0.0.1:{number}: timed out after 1 s"
        )
        self.assertLess(reactor.seconds() - started, 3)


class CloseTests(TestCase):
    async def test_close_waits_for_running_queries(self) -> None:
        db = await pg.open_database(self)
        events: list[str] = []
        running = db.query("slow", "SELECT pg_sleep(0.3)")
        running.addCallback(lambda _: events.append("query done"))
        self.assertEqual(db.inFlight, 1)
        closing = db.close()
        closing.addCallback(lambda _: events.append("closed"))
        await self.assertFailure(db.query("late", "SELECT 1"), DatabaseUnavailable)
        await closing
        self.assertEqual(events, ["query done", "closed"])
        self.assertEqual(db.inFlight, 0)
        self.assertFalse(db.available)
        failure = await raised(db.query("after", "SELECT 1"), DatabaseUnavailable)
        self.assertIn("closed", str(failure))
        await db.close()

    async def test_close_timeout(self) -> None:
        """Past the timeout, close() closes anyway; the query fails DatabaseUnavailable."""
        db = await pg.open_database(self)
        running = db.query("slow", "SELECT pg_sleep(5)")
        started = reactor.seconds()
        await db.close(timeout=0.2)
        self.assertLess(reactor.seconds() - started, 2)
        await self.assertFailure(running, DatabaseUnavailable)


class ReconnectionTests(TestCase):
    timeout = 90

    async def test_terminated_backend(self) -> None:
        """
        A connection killed by the server comes back, with its session set up again.
        """
        schema = pg.fresh_schema(self)
        db = await pg.open_database(self, size=1, schema=schema)
        admin = await pg.open_database(self, size=1)
        [(pid,)] = await db.query("t", "SELECT pg_backend_pid()")
        await admin.query("kill", "SELECT pg_terminate_backend(%s)", (pid,))

        async def settings() -> Any:
            return await db.query("t", "SELECT pg_backend_pid(), current_setting('search_path')")

        [(newPid, searchPath)] = await eventually(settings)
        self.assertNotEqual(newPid, pid)
        self.assertEqual(searchPath, f'"{schema}", "public"')

    async def test_server_restart(self) -> None:
        """
        While the server is down queries fail at once with DatabaseUnavailable; once it
        is back the same Database answers again.
        """
        server = await pg.private_server(self)
        url = parse_database_url(server.url)
        db = await pg.open_database(self, server.url, size=3)
        self.assertEqual(await db.query("t", "SELECT 1"), [(1,)])

        running = db.query("slow", "SELECT pg_sleep(30)").addTimeout(10, reactor)
        transaction = db.transaction(
            "slow", lambda cursor: cursor.execute("SELECT pg_sleep(30)")
        ).addTimeout(10, reactor)
        await server.stop()
        for interrupted in [running, transaction]:
            failure = await raised(interrupted, DatabaseUnavailable)
            self.assertIn(url.where(), str(failure))

        for _ in range(3):
            started = reactor.seconds()
            failure = await raised(
                db.query("t", "SELECT 1").addTimeout(5, reactor), DatabaseUnavailable
            )
            self.assertLess(reactor.seconds() - started, 1)
            self.assertIn(url.where(), str(failure))
        self.assertFalse(db.available)

        await server.start()
        self.assertEqual(await eventually(lambda: db.query("t", "SELECT 1")), [(1,)])
        # Every connection comes back, each with its session set up.
        results = await eventually(
            lambda: gatherResults(
                [
                    db.query("t", "SELECT current_setting('search_path'), pg_sleep(0.1)")
                    for _ in range(3)
                ]
            )
        )
        self.assertEqual({rows[0][0] for rows in results}, {'"marketplace_ws", "public"'})


class ListenTests(TestCase):
    async def notify(self, db: Database, channel: str, payload: str) -> None:
        await db.query("t", "SELECT pg_notify(%s, %s)", (channel, payload))

    async def test_listen(self) -> None:
        db = await pg.open_database(self, size=1)
        heard: list[str] = []
        listener = await db.listen("mws_test_listen", heard.append)
        await self.notify(db, "mws_test_listen", "one")
        await self.notify(db, "mws_test_other", "not for us")

        async def check() -> None:
            self.assertEqual(heard, ["one"])

        await eventually(check, timeout=5)
        listener.stop()
        await self.notify(db, "mws_test_listen", "after stop")
        await sleep(0.2)
        self.assertEqual(heard, ["one"])

    async def test_listen_again_after_reconnection(self) -> None:
        """LISTEN is issued again on the new session, and the owner is told to sweep."""
        db = await pg.open_database(self, size=1)
        heard: list[str] = []
        reconnected: Deferred[None] = Deferred()
        await db.listen("mws_test_relisten", heard.append, lambda: reconnected.callback(None))
        await db.query(
            "kill",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query = 'LISTEN \"mws_test_relisten\"'",
        )
        await reconnected.addTimeout(10, reactor)
        await self.notify(db, "mws_test_relisten", "back")

        async def check() -> None:
            self.assertEqual(heard, ["back"])

        await eventually(check, timeout=5)

    async def test_close_stops_listeners(self) -> None:
        db = Database(parse_database_url(pg.database_url()), size=1)
        await db.start()
        await db.listen("mws_test_close", lambda payload: None)
        await db.close()
        [(count,)] = await (await pg.open_database(self, size=1)).query(
            "t",
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query = 'LISTEN \"mws_test_close\"'",
        )
        self.assertEqual(count, 0)
        await self.assertFailure(db.listen("x", lambda payload: None), DatabaseUnavailable)
