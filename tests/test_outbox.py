"""
Tests for marketplace_ws.outbox against a real PostgreSQL (see tests/pg.py).

The "app" in these tests is a pool of its own that inserts rows the way docs/outbox.rst
tells the Next.js app to: schema-qualified, data as JSON text cast to jsonb, inside its
own transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import psycopg2.errors
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from marketplace_ws.broker import Published
from marketplace_ws.broker.memory import MemoryBroker
from marketplace_ws.channels import Channel
from marketplace_ws.db import Cursor, Database, migrate, parse_database_url
from marketplace_ws.envelope import TOO_LARGE, UNAVAILABLE, OpError
from marketplace_ws.hub import Hub
from marketplace_ws.outbox import OutboxPublisher

from . import pg
from .test_db_pool import eventually, sleep

Row = tuple[str, str, dict[str, Any]]


class Recorder:
    """
    A publish function: publishes on a broker and records, in order, the outbox id of
    every event it published. ``fail(channel, data)`` may return an exception to raise
    instead; ``delay`` makes each publish take that long.
    """

    def __init__(
        self,
        broker: MemoryBroker,
        delay: float = 0.0,
        journal: list[int] | None = None,
    ) -> None:
        self.broker = broker
        self.delay = delay
        self.ids: list[int] = []
        self.attempts = 0
        self.journal = journal if journal is not None else []
        self.fail: Callable[[str, dict[str, Any]], Exception | None] = lambda c, d: None

    def __call__(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        return Deferred.fromCoroutine(self._publish(channel, event, data, idempotencyKey))

    async def _publish(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None
    ) -> Published:
        self.attempts += 1
        if self.delay:
            await sleep(self.delay)
        error = self.fail(str(channel), data)
        if error is not None:
            raise error
        published = await self.broker.publish(str(channel), event, data, idempotencyKey)
        self.ids.append(data["outboxId"])
        self.journal.append(data["outboxId"])
        return published


@attrs.define(eq=False)
class Browser:
    """A hub subscriber keeping the push frames it was sent, as a browser would see them."""

    connectionId: str = "c1"
    userId: str = "u1"
    frames: list[dict[str, Any]] = attrs.field(factory=list)

    def deliver(self, frame: bytes, prepared: Any) -> None:
        self.frames.append(json.loads(frame))


async def appInsert(
    app: Database,
    schema: str,
    rows: list[Row],
    *,
    notify: bool = True,
    commit: bool = True,
    during: tuple[str, tuple[Any, ...]] | None = None,
) -> list[int]:
    """
    Insert rows in one transaction of the app's, as docs/outbox.rst shows; the ids.
    ``notify=False`` disables the trigger for this transaction only: no notification
    is sent (and the table is locked until the end of the transaction). ``during`` is
    a statement run after the inserts, before the end. ``commit=False`` rolls the
    transaction back.
    """
    table = f'"{schema}".outbox'

    async def insert(cursor: Cursor) -> list[int]:
        if not notify:
            await cursor.execute(f"ALTER TABLE {table} DISABLE TRIGGER outbox_notify")
        ids = []
        for channel, event, data in rows:
            await cursor.execute(
                f"INSERT INTO {table} (channel, event, data) VALUES (%s, %s, %s::jsonb)"
                " RETURNING id",
                (channel, event, json.dumps(data)),
            )
            ids.append(cursor.fetchone()[0])
        if not notify:
            await cursor.execute(f"ALTER TABLE {table} ENABLE TRIGGER outbox_notify")
        if during is not None:
            await cursor.execute(*during)
        if not commit:
            raise _RollBack(ids)
        return ids

    try:
        return await app.transaction("app.insert", insert)
    except _RollBack as e:
        return e.ids


def syncInsert(url: str, rows: list[Row], schema: str = "marketplace_ws") -> list[int]:
    """appInsert on a connection of its own, blocking: for a thread."""
    conn = psycopg2.connect(parse_database_url(url).dsn())
    try:
        with conn, conn.cursor() as cursor:
            ids = []
            for channel, event, data in rows:
                cursor.execute(
                    f'INSERT INTO "{schema}".outbox (channel, event, data)'
                    " VALUES (%s, %s, %s::jsonb) RETURNING id",
                    (channel, event, json.dumps(data)),
                )
                [(rowId,)] = cursor.fetchall()
                ids.append(rowId)
            return ids
    finally:
        conn.close()


class _RollBack(Exception):
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


@attrs.frozen
class RowState:
    published: bool
    failed: bool
    error: str | None


async def states(db: Database, schema: str = "") -> dict[int, RowState]:
    table = f'"{schema}".outbox' if schema else "outbox"
    rows = await db.query(
        "t",
        f"SELECT id, published_at IS NOT NULL, failed_at IS NOT NULL, error FROM {table}",
    )
    return {row[0]: RowState(row[1], row[2], row[3]) for row in rows}


async def historyIds(broker: MemoryBroker, channel: str) -> list[int]:
    """The outbox ids of the events a browser recovering the channel from 0 would get."""
    recovery = await broker.history(channel, 0)
    return [event.data["outboxId"] for event in recovery.events]


class OutboxTestCase(TestCase):
    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.schema = pg.fresh_schema(self)
        self.db = await pg.open_database(self, schema=self.schema, size=2)
        await migrate(self.db, self.schema)
        self.app = await pg.open_database(self, size=5)
        self.broker = MemoryBroker(reactor, historySize=1000)

    def publisher(self, publish: Any, db: Database | None = None, **kwargs: Any) -> OutboxPublisher:
        publisher = OutboxPublisher(db or self.db, publish, reactor, **kwargs)
        publisher.startService()
        self.addCleanup(publisher.stopService)
        return publisher

    async def listening(self, publisher: OutboxPublisher) -> None:
        async def check() -> None:
            self.assertTrue(publisher.listening)

        await eventually(check, timeout=10)

    async def insert(self, rows: list[Row], **kwargs: Any) -> list[int]:
        return await appInsert(self.app, self.schema, rows, **kwargs)

    async def allPublished(self, ids: list[int], timeout: float = 10.0) -> None:
        async def check() -> None:
            found = await states(self.db)
            self.assertEqual({i: found[i].published for i in ids}, dict.fromkeys(ids, True))

        await eventually(check, timeout=timeout)


class PublishTests(OutboxTestCase):
    async def test_notified_rows(self) -> None:
        """
        Rows the app commits reach a browser subscribed to their channel in id order,
        each with its outboxId, within moments (the sweep is a minute away), and are
        marked published.
        """
        hub = Hub(self.broker)
        browser = Browser()
        await hub.subscribe(browser, Channel("listing", "7"))
        publisher = self.publisher(hub.publish, sweepInterval=60)
        await self.listening(publisher)
        await sleep(0.2)  # the first drain, of an empty table, is over

        ids = await self.insert(
            [
                ("listing:7", "offer.created", {"offerId": "o1", "amount": 120}),
                ("user:u2", "offer.received", {"offerId": "o1"}),
                ("listing:7", "offer.accepted", {"offerId": "o1"}),
            ]
        )
        await self.allPublished(ids, timeout=5)
        self.assertEqual(
            browser.frames,
            [
                {
                    "type": "event",
                    "channel": "listing:7",
                    "event": "offer.created",
                    "seq": 1,
                    "data": {"offerId": "o1", "amount": 120, "outboxId": ids[0]},
                },
                {
                    "type": "event",
                    "channel": "listing:7",
                    "event": "offer.accepted",
                    "seq": 2,
                    "data": {"offerId": "o1", "outboxId": ids[2]},
                },
            ],
        )
        self.assertEqual(await historyIds(self.broker, "user:u2"), [ids[1]])
        self.assertEqual(publisher.published, 3)

    async def test_rows_from_before_start(self) -> None:
        """Rows committed while no server ran are published, in order, at start."""
        ids = await self.insert([("listing:1", "e", {"n": n}) for n in range(250)])
        recorder = Recorder(self.broker)
        self.publisher(recorder, sweepInterval=60, batchSize=100)
        await self.allPublished(ids)
        self.assertEqual(recorder.ids, ids)
        self.assertEqual(
            [e.data["n"] for e in (await self.broker.history("listing:1", 0)).events],
            list(range(250)),
        )

    async def test_rolled_back_insert(self) -> None:
        """An insert the app rolled back is never published."""
        recorder = Recorder(self.broker)
        publisher = self.publisher(recorder, sweepInterval=0.2)
        await self.listening(publisher)
        [rolledBack] = await self.insert([("listing:1", "e", {})], commit=False)
        [committed] = await self.insert([("listing:1", "e", {})])
        await self.allPublished([committed])
        await sleep(0.5)  # a couple of sweeps more
        self.assertEqual(recorder.ids, [committed])
        self.assertNotIn(rolledBack, await states(self.db))

    async def test_stop_waits_for_batch(self) -> None:
        """
        Stopping lets the batch in progress be marked, so a restart republishes
        nothing and loses nothing.
        """
        ids = await self.insert([("listing:1", "e", {"n": n}) for n in range(10)])
        journal: list[int] = []
        first = Recorder(self.broker, delay=0.1, journal=journal)
        publisher = self.publisher(first, sweepInterval=60)

        async def someDone() -> None:
            self.assertGreaterEqual(len(first.ids), 2)

        await eventually(someDone, timeout=10)
        await publisher.stopService()
        found = await states(self.db)
        self.assertEqual([i for i in ids if found[i].published], first.ids)
        self.assertLess(len(first.ids), 10)
        await sleep(0.3)
        self.assertEqual(first.attempts, len(first.ids))

        second = Recorder(self.broker, journal=journal)
        self.publisher(second, sweepInterval=60)
        await self.allPublished(ids)
        self.assertEqual(journal, ids)


class MissedNotificationTests(OutboxTestCase):
    async def test_sweep(self) -> None:
        """A row whose notification was lost is published by the next sweep."""
        recorder = Recorder(self.broker)
        publisher = self.publisher(recorder, sweepInterval=0.5)
        await self.listening(publisher)
        await sleep(0.2)
        ids = await self.insert([("listing:1", "e", {}), ("listing:1", "e", {})], notify=False)
        await self.allPublished(ids, timeout=3)
        self.assertEqual(recorder.ids, ids)

    async def test_listen_connection_killed(self) -> None:
        """
        Rows committed while the LISTEN connection was down, their notification lost,
        are published as soon as it is back, not at the next sweep a minute later.
        """
        recorder = Recorder(self.broker)
        publisher = self.publisher(recorder, sweepInterval=60)
        await self.listening(publisher)
        await sleep(0.2)
        find = (
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query = 'LISTEN \"marketplace_ws_outbox\"' AND pid <> pg_backend_pid()"
        )
        [(pid,)] = await self.app.query("t", find)
        # The app's transaction holds the table locked from its first statement, so
        # every drain after the kill sees these rows: without the drain that follows
        # the reconnection, only the sweep would.
        ids = await self.insert(
            [("listing:1", "e", {}), ("listing:2", "e", {})],
            notify=False,
            during=("SELECT pg_terminate_backend(%s)", (pid,)),
        )
        await self.allPublished(ids, timeout=10)
        self.assertEqual(recorder.ids, ids)
        [(newPid,)] = await self.app.query("t", find)
        self.assertNotEqual(newPid, pid)

    async def test_session_state_lost(self) -> None:
        """
        Behind PgBouncer's transaction pooling neither LISTEN nor the session's
        search_path holds: the sweep still finds the schema's outbox and publishes.
        """
        db = await pg.open_database(self, schema=self.schema, size=1)
        await db.query("t", "SET search_path TO public")
        recorder = Recorder(self.broker)
        self.publisher(recorder, db=db, sweepInterval=0.5)
        ids = await self.insert([("listing:1", "e", {})], notify=False)
        await self.allPublished(ids, timeout=3)
        self.assertEqual(recorder.ids, ids)

    async def test_server_restart(self) -> None:
        """
        A PostgreSQL restart in the middle of a batch: the rows published but not marked
        go out again (the broker drops them by their idempotency key, so a browser sees
        each once), rows committed while the publisher was reconnecting go out once it
        is back, and nothing is lost.
        """
        server = await pg.private_server(self)
        db = await pg.open_database(self, server.url, size=2)
        await migrate(db)
        app = await pg.open_database(self, server.url, size=1)
        recorder = Recorder(self.broker, delay=0.05)
        self.publisher(recorder, db=db, sweepInterval=0.5)
        before = await appInsert(app, "marketplace_ws", [("listing:1", "e", {})] * 20)

        async def started() -> None:
            self.assertGreaterEqual(len(recorder.ids), 3)

        await eventually(started, timeout=10)
        await server.stop()
        await server.start()
        # At once, from a connection of its own: the publisher's pool, and the app's,
        # reconnect only after their next back-off delay.
        after = await deferToThread(syncInsert, server.url, [("listing:1", "e", {})] * 5)
        ids = before + after

        async def done() -> None:
            found = await states(db, "marketplace_ws")
            self.assertEqual([i for i in ids if found[i].published], ids)

        await eventually(done, timeout=30)
        self.assertEqual(set(recorder.ids), set(ids))
        self.assertEqual(await historyIds(self.broker, "listing:1"), ids)


class ConcurrencyTests(OutboxTestCase):
    async def test_two_publishers(self) -> None:
        """
        Two processes on one database: every row is published exactly once, by one of
        them, and each channel's events go out in the order the app committed them.
        """
        other = await pg.open_database(self, schema=self.schema, size=2)
        journal: list[int] = []
        one = Recorder(self.broker, journal=journal)
        two = Recorder(self.broker, journal=journal)
        for publish, db in [(one, self.db), (two, other)]:
            await self.listening(self.publisher(publish, db=db, sweepInterval=1, batchSize=20))

        async def app(channel: str) -> list[int]:
            ids = []
            for n in range(10):
                ids += await self.insert([(channel, "e", {"n": n})] * 10)
            return ids

        channels = [f"listing:{k}" for k in range(5)]
        inserted = await gatherResults([Deferred.fromCoroutine(app(c)) for c in channels])
        byChannel = dict(zip(channels, inserted, strict=True))
        everything = sorted(i for ids in byChannel.values() for i in ids)
        self.assertEqual(len(everything), 500)
        await self.allPublished(everything, timeout=30)

        self.assertEqual(sorted(journal), everything)
        self.assertEqual(set(one.ids) & set(two.ids), set())
        for channel, ids in byChannel.items():
            self.assertEqual(await historyIds(self.broker, channel), ids)


class FailureTests(OutboxTestCase):
    async def test_unpublishable_rows(self) -> None:
        """
        A row that can never be published is marked failed with the reason, and the
        rows after it are published all the same.
        """
        # As a row inserted before migration 0002 could be.
        await self.db.query("t", "ALTER TABLE outbox DROP CONSTRAINT outbox_data_object")
        recorder = Recorder(self.broker)
        recorder.fail = lambda channel, data: (
            OpError(TOO_LARGE, "event data is larger than 65536 bytes")
            if data.get("huge")
            else None
        )
        ids = await self.insert(
            [
                ("listings:42", "e", {}),
                ("listing:1", "e", {"huge": True}),
                ("listing:1", "e", [1, 2]),  # type: ignore[list-item]
                ("listing:1", "e", {"ok": True}),
            ]
        )
        publisher = self.publisher(recorder, sweepInterval=60)
        await self.allPublished(ids[3:])
        found = await states(self.db)
        self.assertEqual(
            [found[i] for i in ids[:3]],
            [
                RowState(
                    False,
                    True,
                    "channel must be user:, conversation: or listing: followed by an id",
                ),
                RowState(False, True, "too_large: event data is larger than 65536 bytes"),
                RowState(False, True, "data must be a JSON object, not an array"),
            ],
        )
        self.assertEqual(recorder.ids, ids[3:])
        self.assertEqual((publisher.published, publisher.failed), (1, 3))

        # Clearing failed_at and error puts a row back in the queue.
        recorder.fail = lambda channel, data: None
        await self.db.query(
            "t", "UPDATE outbox SET failed_at = NULL, error = NULL WHERE id = %s", (ids[1],)
        )
        await self.insert([("listing:1", "wake", {})])
        await self.allPublished([ids[1]])

    async def test_broker_unavailable(self) -> None:
        """
        While the broker is unavailable rows wait, none is marked failed, and none
        overtakes an earlier one; they go out in order once it is back.
        """
        recorder = Recorder(self.broker)
        down = [True]
        recorder.fail = lambda channel, data: (
            OpError(UNAVAILABLE, "the broker is unreachable") if down[0] else None
        )
        publisher = self.publisher(recorder, sweepInterval=0.2)
        await self.listening(publisher)
        ids = await self.insert([("listing:1", "e", {}), ("listing:2", "e", {})])
        await sleep(0.6)
        self.assertGreaterEqual(recorder.attempts, 2)
        found = await states(self.db)
        self.assertEqual([found[i] for i in ids], [RowState(False, False, None)] * 2)

        down[0] = False
        await self.allPublished(ids)
        self.assertEqual(recorder.ids, ids)
        self.assertEqual(publisher.failed, 0)

    async def test_app_mistakes_fail_the_app_insert(self) -> None:
        """
        Data that is not an object, or a channel that is not kind:id, fails the app's
        own transaction, so its developer sees the mistake at once.
        """
        for row in [
            ("listing:1", "e", [1]),
            ("listing:1", "e", "text"),
            ("listing 1", "e", {}),
            ("listing:", "e", {}),
            ("listing:1/2", "e", {}),
        ]:
            await self.assertFailure(
                Deferred.fromCoroutine(self.insert([("listing:1", "fine", {}), row])),  # type: ignore[list-item]
                psycopg2.errors.CheckViolation,
            )
        self.assertEqual(await states(self.db), {})
