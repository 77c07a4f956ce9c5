"""
Tests for marketplace_ws.db.migrations and the shipped SQL, against a real PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import psycopg2.errors
from psycopg2.extras import Json
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from txpostgres.txpostgres import Connection

from marketplace_ws.db import Database, migrate, parse_database_url, pending
from marketplace_ws.db.migrations import migrations

from . import pg

TABLES = {
    "conversations",
    "participants",
    "messages",
    "notifications",
    "outbox",
    "schema_migrations",
}


class MigrateTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.schema = pg.fresh_schema(self)
        self.db = await pg.open_database(self, schema=self.schema)

    async def tables(self) -> set[str]:
        rows = await self.db.query(
            "t",
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (self.schema,),
        )
        return {name for (name,) in rows}

    def test_shipped(self) -> None:
        """The SQL files are package data, found through importlib.resources."""
        self.assertEqual([(m.version, m.name) for m in migrations()][:1], [("0001", "initial")])

    async def test_fresh_schema(self) -> None:
        versions = [m.version for m in migrations()]
        self.assertEqual(await pending(self.db, self.schema), versions)
        self.assertEqual(await migrate(self.db, self.schema), versions)
        self.assertEqual(await self.tables(), TABLES)
        rows = await self.db.query("t", "SELECT version, name FROM schema_migrations")
        self.assertIn(("0001", "initial"), rows)
        self.assertEqual(await pending(self.db, self.schema), [])

    async def test_second_run_applies_nothing(self) -> None:
        await migrate(self.db, self.schema)
        self.assertEqual(await migrate(self.db, self.schema), [])

    async def test_concurrent(self) -> None:
        """Two processes' pools migrating at once apply each version exactly once."""
        other = await pg.open_database(self, schema=self.schema)
        results = await gatherResults([migrate(self.db, self.schema), migrate(other, self.schema)])
        applied = results[0] + results[1]
        self.assertEqual(sorted(applied), [m.version for m in migrations()])
        rows = await self.db.query(
            "t", "SELECT version, count(*) FROM schema_migrations GROUP BY version"
        )
        self.assertTrue(all(count == 1 for _, count in rows))
        self.assertEqual(await self.tables(), TABLES)

    def test_bad_schema_name(self) -> None:
        for name in ["Upper", "has-dash", "1digit", 'quote"d', "a" * 64, "", "x;drop"]:
            self.assertRaises(ValueError, migrate, self.db, name)
            self.assertRaises(ValueError, pending, self.db, name)

    async def test_outbox_notifies(self) -> None:
        """An outbox insert NOTIFYs marketplace_ws_outbox with the row's id, on commit."""
        await migrate(self.db, self.schema)
        listener = Connection(reactor=reactor)
        await listener.connect(parse_database_url(pg.database_url()).dsn())
        self.addCleanup(listener.close)
        heard: Deferred[Any] = Deferred()
        listener.addNotifyObserver(
            lambda notify: heard.callback(notify) if not heard.called else None
        )
        await listener.runOperation("LISTEN marketplace_ws_outbox")
        [(row_id,)] = await self.db.query(
            "t",
            "INSERT INTO outbox (channel, event, data) VALUES (%s, %s, %s) RETURNING id",
            ("user:u1", "order.paid", Json({"orderId": "o1"})),
        )
        notify = await heard.addTimeout(5, reactor)
        self.assertEqual((notify.channel, notify.payload), ("marketplace_ws_outbox", str(row_id)))

    async def test_constraints(self) -> None:
        await migrate(self.db, self.schema)
        [(cid,)] = await self.db.query(
            "t", "INSERT INTO conversations (listing_id) VALUES ('l1') RETURNING id"
        )
        insert = (
            "INSERT INTO messages (conversation_id, sender_id, kind, body, client_msg_id)"
            " VALUES (%s, %s, %s, %s, %s)"
        )
        await self.db.query("t", insert, (cid, "u1", "user", "hi", "c1"))
        # message.send is idempotent per (sender, clientMsgId).
        await self.assertFailure(
            self.db.query("t", insert, (cid, "u1", "user", "hi", "c1")),
            psycopg2.errors.UniqueViolation,
        )
        # System messages have no sender; user messages must have one; bodies are not empty.
        await self.db.query("t", insert, (cid, None, "system", "Offer accepted", None))
        for bad in [
            (cid, "u1", "system", "x", None),
            (cid, None, "user", "x", None),
            (cid, "u1", "user", "", None),
            (cid, "", "user", "x", None),
        ]:
            await self.assertFailure(
                self.db.query("t", insert, bad), psycopg2.errors.CheckViolation
            )
        notification = (
            "INSERT INTO notifications (user_id, type, title, idempotency_key)"
            " VALUES ('u1', 'offer.received', 'New offer', %s)"
        )
        await self.db.query("t", notification, ("k1",))
        await self.db.query("t", notification, (None,))
        await self.db.query("t", notification, (None,))
        await self.assertFailure(
            self.db.query("t", notification, ("k1",)), psycopg2.errors.UniqueViolation
        )


class SchemaOptionTests(TestCase):
    async def test_schema_from_argument(self) -> None:
        """migrate() takes the schema from its argument, not from the pool's search_path."""
        schema = pg.fresh_schema(self)
        db: Database = await pg.open_database(self)
        self.assertEqual(await migrate(db, schema), [m.version for m in migrations()])
        [(exists,)] = await db.query(
            "t", "SELECT to_regclass(%s) IS NOT NULL", (f"{schema}.outbox",)
        )
        self.assertTrue(exists)
