"""
The outbox (SPEC §6): events the Next.js app commits in its own transactions, published
on the channels they name.

The app inserts C{(channel, event, data)} into the C{outbox} table inside the transaction
that makes the change the event announces, so the event exists exactly when the change
was committed. A trigger NOTIFYs C{marketplace_ws_outbox} on commit; L{OutboxPublisher}
LISTENs and drains the table: in one transaction per batch it claims the oldest rows
not yet published, publishes each through the hub, and marks them published. A sweep
every few seconds drains too, catching what no notification announced: rows committed
while the LISTEN connection was down, or every row behind PgBouncer's transaction
pooling, where LISTEN does not work.

Delivery is at least once. A row is marked published after the broker accepted it, so a
crash or a lost database connection in between publishes it again later. Each event
carries the row's id as C{data["outboxId"]}, for clients to drop a duplicate, and is
published with the idempotency key C{outbox:<id>}, so the broker itself drops a second
publication within its idempotency window.

Order: each batch first takes a transaction-level advisory lock for the schema, so the
processes sharing a database drain one batch at a time, each row goes out once, and rows
go out in id order across all of them (claiming with C{FOR UPDATE SKIP LOCKED} alone
would let two processes publish neighbouring batches at once, and a channel's events
out of order). A row committed after a row with a higher id is published after it: only
concurrent transactions can do that, and their order was never decided.

A row that can never be published (a channel of an unknown kind, data that is not an
object, an event the broker refuses) is marked C{failed_at} with its C{error} and
skipped; one that cannot be published I{now} (the database or the broker unavailable)
stops the drain, and waits for the next one in its place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, TypeAlias

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from marketplace_ws.broker import Published
from marketplace_ws.channels import Channel, parseChannel
from marketplace_ws.db import Cursor, Database, DatabaseUnavailable, Listener
from marketplace_ws.envelope import UNAVAILABLE, OpError

__all__ = ["NOTIFY_CHANNEL", "OutboxPublisher", "Publish"]

_log = Logger()

#: What the C{outbox_notify} trigger NOTIFYs, with the row's id as payload.
NOTIFY_CHANNEL = "marketplace_ws_outbox"

#: How the publisher publishes: L{marketplace_ws.live.Live.publish}. It fails with
#: L{OpError} C{unavailable} (or L{DatabaseUnavailable}, or a connection error) when a
#: later attempt may succeed; any other failure is taken as final for that row.
Publish: TypeAlias = Callable[[Channel, str, Any, str | None], Deferred[Published]]

#: The column C{error} holds at most this many characters.
_MAX_ERROR = 1000

# The table is named with its schema: behind PgBouncer's transaction pooling the
# session's search_path does not hold, and the sweep must still find it.
_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_CLAIM = (
    "SELECT id, channel, event, data FROM {table}"
    " WHERE published_at IS NULL AND failed_at IS NULL"
    " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_MARK_PUBLISHED = "UPDATE {table} SET published_at = now() WHERE id = ANY(%s)"
_MARK_FAILED = (
    "UPDATE {table} AS outbox SET failed_at = now(), error = failed.error"
    " FROM unnest(%s::bigint[], %s::text[]) AS failed (id, error)"
    " WHERE outbox.id = failed.id"
)

# Failures after which a later attempt may well succeed.
_TRANSIENT = (
    DatabaseUnavailable,
    ConnectionError,
    TimeoutError,
    DeferredTimeoutError,
    CancelledError,
    ConnectError,
    ConnectionClosed,
)


def _lockKey(schema: str) -> int:
    """A stable 64-bit advisory-lock key per schema (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"marketplace_ws outbox {schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _transient(error: BaseException) -> bool:
    if isinstance(error, OpError):
        return error.code == UNAVAILABLE
    return isinstance(error, _TRANSIENT)


class _Unpublishable(Exception):
    """This row can never be published; the message says why (it goes in C{error})."""


@frozen
class _Batch:
    claimed: int
    published: int
    failed: int
    #: Stopped before the end: a transient failure, or the service stopping.
    interrupted: bool


class OutboxPublisher(Service):
    """
    Publishes the rows of the C{outbox} table of C{database}'s schema, in id order.

    Start it once the schema is migrated; stop it before closing C{database}: stopping
    waits for the batch in progress to be marked (or rolled back), so nothing published
    is left unmarked.

    @param publish: publishes one event (L{marketplace_ws.live.Live.publish}).
    @param clock: for the sweep and the publish timeout.
    @param sweepInterval: seconds between sweeps: the longest a row waits when its
        notification was lost (or never sent, behind PgBouncer).
    @param batchSize: rows claimed, published and marked per transaction.
    @param publishTimeout: seconds one publish may take before the drain stops and
        leaves the row for the next one (its lock held meanwhile keeps the other
        processes waiting, so it must not hang).

    @ivar published: rows this publisher has marked published.
    @ivar failed: rows this publisher has marked failed.
    """

    def __init__(
        self,
        database: Database,
        publish: Publish,
        clock: IReactorTime,
        sweepInterval: float = 5.0,
        batchSize: int = 100,
        publishTimeout: float = 10.0,
    ) -> None:
        if sweepInterval <= 0:
            raise ValueError(f"the outbox sweep interval must be positive, not {sweepInterval}")
        if batchSize < 1:
            raise ValueError(f"the outbox batch size must be at least 1, not {batchSize}")
        if publishTimeout <= 0:
            raise ValueError(f"the outbox publish timeout must be positive, not {publishTimeout}")
        self._database = database
        self._publish = publish
        self._clock = clock
        self.sweepInterval = sweepInterval
        self.batchSize = batchSize
        self.publishTimeout = publishTimeout
        self._lockKey = _lockKey(database.schema)
        # database.schema is a plain identifier (check_schema_name).
        table = f'"{database.schema}".outbox'
        self._claim = _CLAIM.format(table=table)
        self._markPublished = _MARK_PUBLISHED.format(table=table)
        self._markFailed = _MARK_FAILED.format(table=table)
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock
        self._listener: Listener | None = None
        self._connecting: Deferred[None] | None = None
        self._draining: Deferred[None] | None = None
        self._again = False
        # Set while a problem has been logged and not yet resolved: one warning for an
        # outage, not one per sweep.
        self._troubled = False
        self._listenTroubled = False
        self.published = 0
        self.failed = 0

    @property
    def listening(self) -> bool:
        """
        True once LISTEN succeeded (the pool re-issues it after a reconnection); False
        before, or after it failed, when only the sweep publishes.
        """
        return self._listener is not None

    # Life cycle

    def startService(self) -> None:
        """
        LISTEN, then drain what was left from before, then sweep every
        C{sweepInterval} seconds.
        """
        super().startService()
        self._loop.start(self.sweepInterval, now=False).addErrback(
            lambda f: _log.failure("the outbox sweep stopped", f)
        )
        self._connect()

    def stopService(self) -> Deferred[None]:
        """
        Stop sweeping and listening; fire once the batch in progress, if any, is done.
        """
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        # A LISTEN still connecting stops its connection itself once it is up.
        busy = [d for d in (self._draining, self._connecting) if d is not None]
        if not busy:
            return succeed(None)
        done: Deferred[None] = Deferred()
        waiting = len(busy)

        def finished(result: object) -> object:
            nonlocal waiting
            waiting -= 1
            if not waiting:
                done.callback(None)
            return result

        for d in busy:
            d.addBoth(finished)
        return done

    # Waking up

    def _connect(self) -> None:
        """LISTEN, then drain: a row committed before LISTEN took effect is drained."""
        connecting = Deferred.fromCoroutine(self._listen())
        self._connecting = connecting
        connecting.addCallback(lambda _: self._wake()).addErrback(
            lambda f: _log.failure("listening for the outbox failed", f)
        )

        def connected(result: object) -> object:
            if self._connecting is connecting:
                self._connecting = None
            return result

        connecting.addBoth(connected)

    async def _listen(self) -> None:
        try:
            listener = await self._database.listen(NOTIFY_CHANNEL, self._notified, self._wake)
        except DatabaseUnavailable as e:
            if not self._listenTroubled:
                self._listenTroubled = True
                _log.warn(
                    "outbox: {reason}; publishing on each sweep (every {interval} s) "
                    "until LISTEN works",
                    reason=str(e),
                    interval=self.sweepInterval,
                )
            return
        if not self.running:
            listener.stop()
            return
        self._listener = listener
        if self._listenTroubled:
            self._listenTroubled = False
            _log.info("outbox: listening for new rows again")

    def _notified(self, payload: str) -> None:
        self._wake()

    def _sweep(self) -> None:
        # _connecting is set while a LISTEN is on its way: never two at once.
        if self._listener is None and self._connecting is None:
            self._connect()
        self._wake()

    def _wake(self) -> None:
        """Drain now, or once more after the drain running now (many wakes, one drain)."""
        if not self.running:
            return
        if self._draining is not None:
            self._again = True
            return
        draining = Deferred.fromCoroutine(self._drainAll())
        self._draining = draining
        draining.addErrback(lambda f: _log.failure("the outbox drain failed", f))
        draining.addBoth(self._drained, draining)

    def _drained(self, result: object, draining: Deferred[None]) -> object:
        if self._draining is draining:
            self._draining = None
        return result

    # Draining

    async def _drainAll(self) -> None:
        while self.running:
            self._again = False
            if not await self._drain() or not self._again:
                return

    async def _drain(self) -> bool:
        """
        Publish batches until one comes back short. False when a failure or the service
        stopping cut it short.
        """
        while self.running:
            try:
                batch = await self._database.transaction("outbox.drain", self._batch)
            except Exception as e:  # noqa: BLE001 -- the next sweep tries again
                self._trouble(e, "draining the outbox")
                return False
            self.published += batch.published
            self.failed += batch.failed
            if batch.interrupted:
                return False
            if self._troubled:
                self._troubled = False
                _log.info("outbox: publishing again")
            if batch.claimed < self.batchSize:
                return True
        return False

    async def _batch(self, cursor: Cursor) -> _Batch:
        """
        Claim up to C{batchSize} rows, publish them in id order, mark them. A transient
        failure stops the batch; what was published before it is still marked.
        """
        await cursor.execute(_LOCK, (self._lockKey,))
        await cursor.execute(self._claim, (self.batchSize,))
        rows = cursor.fetchall()
        published: list[int] = []
        failed: list[int] = []
        errors: list[str] = []
        interrupted = False
        for rowId, name, event, data in rows:
            # Stopping, or the database gone (this batch cannot be marked, so what it
            # published now would only be published again).
            if not (self.running and self._database.available):
                interrupted = True
                break
            try:
                await self._publishRow(rowId, name, event, data)
            except Exception as e:  # noqa: BLE001 -- sorted into retry later, or never
                if _transient(e):
                    self._trouble(e, f"publishing outbox row {rowId}")
                    interrupted = True
                    break
                failed.append(rowId)
                errors.append(self._unpublishable(rowId, event, e))
            else:
                published.append(rowId)
        if published:
            await cursor.execute(self._markPublished, (published,))
        if failed:
            await cursor.execute(self._markFailed, (failed, errors))
        return _Batch(len(rows), len(published), len(failed), interrupted)

    async def _publishRow(self, rowId: int, name: str, event: str, data: Any) -> None:
        try:
            channel = parseChannel(name)
        except OpError as e:
            raise _Unpublishable(e.message) from None
        if not isinstance(data, dict):
            raise _Unpublishable(f"data must be a JSON object, not {_jsonType(data)}")
        publishing = self._publish(channel, event, {**data, "outboxId": rowId}, f"outbox:{rowId}")
        published = await publishing.addTimeout(self.publishTimeout, self._clock)
        if published.duplicate:
            _log.debug(
                "outbox row {id} was published before (seq {seq})", id=rowId, seq=published.seq
            )

    def _unpublishable(self, rowId: int, event: str, error: Exception) -> str:
        """Log why a row is marked failed (never its data) and say it for C{error}."""
        if isinstance(error, OpError):
            reason = f"{error.code}: {error.message}"
        elif isinstance(error, _Unpublishable):
            reason = str(error)
        else:
            _log.failure("publishing outbox row {id} failed unexpectedly", Failure(error), id=rowId)
            reason = f"internal: {type(error).__name__}"
        reason = reason[:_MAX_ERROR]
        _log.warn(
            "outbox row {id} ({event}) cannot be published, marked failed: {reason}",
            id=rowId,
            event=event,
            reason=reason,
        )
        return reason

    def _trouble(self, error: Exception, doing: str) -> None:
        """Log the first failure of an outage (a traceback if it is unexpected)."""
        if self._troubled:
            return
        self._troubled = True
        if _transient(error):
            _log.warn(
                "outbox: {doing} failed ({reason}); rows wait for the next sweep",
                doing=doing,
                reason=str(error) or type(error).__name__,
            )
        else:
            _log.failure(
                "outbox: {doing} failed; rows wait for the next sweep",
                Failure(error),
                doing=doing,
            )


def _jsonType(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__
