"""
A pool of txpostgres connections that survives a database restart.

txpostgres' own ``ConnectionPool`` opens its connections once and never reconnects, and
the stock ``DeadConnectionDetector`` treats every ``OperationalError`` as a dead
connection -- a deadlock, a serialization failure or a lock timeout would throw away a
healthy connection. This pool gives each connection a detector that reconnects only
when the connection is really gone, re-runs the session set-up afterwards, and skips
connections that are down: when none is usable a query fails at once with
:class:`DatabaseUnavailable` instead of waiting for the database to return.

Every query goes through one timed path (:meth:`Database.query`,
:meth:`Database.transaction`), so metrics and slow-query logs see all of them. Nothing
here blocks the reactor: host names are resolved in the reactor's thread pool and handed
to libpq as ``hostaddr`` (libpq's own lookup would block), and the connect timeout is
enforced here because libpq ignores ``connect_timeout`` for asynchronous connections.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import attrs
import psycopg2
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector
from txpostgres.retrying import simpleBackoffIterator

from .url import DatabaseURL

__all__ = [
    "Cursor",
    "Database",
    "DatabaseUnavailable",
    "DatabaseUnreachable",
    "Listener",
    "check_schema_name",
]

T = TypeVar("T")

#: What :meth:`Database.transaction` hands to its function: a ``txpostgres.Cursor``, whose
#: ``execute`` returns a Deferred (firing with the cursor); then ``fetchall()`` as usual.
#: txpostgres has no type hints, hence ``Any``.
Cursor: TypeAlias = Any

log = Logger()

APPLICATION_NAME = "marketplace-ws"

# Applied unless DATABASE_URL says otherwise. Keepalives make a vanished server (no RST,
# e.g. a failed-over cloud database) show up as a dead connection within about a minute
# instead of the kernel's two hours; statement_timeout cannot help there.
_CONNECTION_DEFAULTS = {
    "fallback_application_name": APPLICATION_NAME,
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
_DEFAULT_CONNECT_TIMEOUT = 10.0

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_SESSION_SETUP = (
    "SELECT set_config('statement_timeout', %s, false), set_config('search_path', %s, false)"
)

# "connection to server at "h" (1.2.3.4), port 5432 failed: " and the socket variant:
# libpq's preamble before the reason.
_LIBPQ_PREAMBLE = re.compile(r'^connection to server (?:at|on socket) "[^"]*"[^:]*failed:\s*')


def _reconnect_delays() -> Iterator[float]:
    """At once, then after about 0.9 s, growing to 5 s: a restart takes a few seconds."""
    delays: Iterator[float] = simpleBackoffIterator(
        initialDelay=0.5, maxDelay=5.0, factor=1.7, maxRetries=0
    )
    return delays


class DatabaseUnavailable(Exception):
    """
    No connection can run a query now (the server is down, the pool is reconnecting or
    closed). The message names the server (``host:port``), never the password.
    """


class UnstorableValue(ValueError):
    """
    A parameter PostgreSQL cannot store: text with a NUL character (psycopg2 refuses
    it) or an unpaired surrogate (not UTF-8), or JSON with \\u0000 (jsonb refuses it).
    JSON allows all three, so a client can send them: the caller's input is wrong,
    nothing failed.
    """


def _unstorable(e: Exception) -> bool:
    if isinstance(e, UnicodeEncodeError):
        return True
    if isinstance(e, ValueError) and "NUL" in str(e):
        return True
    # 22P05: untranslatable character (jsonb's \u0000).
    return isinstance(e, psycopg2.DataError) and getattr(e, "pgcode", None) == "22P05"


class DatabaseUnreachable(DatabaseUnavailable):
    """
    :meth:`Database.start` could not connect, e.g. ``cannot connect to PostgreSQL at
    127.0.0.1:5999: connection refused``.
    """


def check_schema_name(name: str) -> str:
    """
    Return ``name`` if it is a plain lower-case identifier; it is put into SQL unquoted
    (``search_path``, ``CREATE SCHEMA``), so nothing else is allowed.
    """
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(
            f"schema name {name!r} is not a plain identifier: use lower-case letters, digits "
            f"and _, start with a letter or _, at most 63 characters"
        )
    return name


def _reason(error: object, password: str | None) -> str:
    """The first line of a driver error, without libpq's preamble or the password."""
    if isinstance(error, Failure):
        error = error.value
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    text = _LIBPQ_PREAMBLE.sub("", text).removeprefix("FATAL:").strip()
    if password:
        text = text.replace(password, "***")
    if text[1:2].islower():
        text = text[0].lower() + text[1:]
    return text


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _ConnectTimedOut(Exception):
    pass


class _Cursor(txpostgres.Cursor):  # type: ignore[misc, unused-ignore]
    def _handleCancellation(self, f: Failure) -> Failure:
        # txpostgres turns QueryCanceledError into a bare CancelledError, losing "canceling
        # statement due to statement timeout"; keep psycopg2's error.
        return f


class _Detector(DeadConnectionDetector):  # type: ignore[misc, unused-ignore]
    """
    txpostgres' detector, changed in three ways: a connection is dead only when it is
    really gone (see :meth:`_isDead`); the reconnection loop can be stopped, leaving no
    timer behind; and the pool hears of each death through ``onDeath``.
    """

    def __init__(self, reactor: Any, onDeath: Callable[[Failure], None]) -> None:
        super().__init__(
            deathChecker=self._isDead, reconnectionIterator=_reconnect_delays, reactor=reactor
        )
        # False until the connection has been up once: failures before that belong to
        # Database.start(), which reports them instead of retrying.
        self.armed = False
        self.stopped = False
        self._onDeath = onDeath
        self._sleeping: Deferred[None] | None = None

    def _isDead(self, f: Failure) -> bool:
        if not self.armed or self.stopped:
            return False
        if isinstance(
            f.value, (psycopg2.InterfaceError, txpostgres.RollbackFailed, ConnectionClosed)
        ):
            return True
        # Timeouts, deadlocks and serialization failures are OperationalErrors too, on a
        # connection that is fine; psycopg2 marks the connection closed when it is not.
        return isinstance(f.value, psycopg2.OperationalError) and bool(
            self.reconnectable.pollable().closed
        )

    def startReconnecting(self, f: Failure) -> None:
        self._onDeath(f)
        Deferred.fromCoroutine(self._reconnectLoop()).addErrback(
            lambda f: log.failure("Reconnection loop failed", f)
        )

    async def _reconnectLoop(self) -> None:
        for delay in self.reconnectionIterator():
            if delay:
                self._sleeping = deferLater(self.reactor, delay, lambda: None)
                try:
                    await self._sleeping
                except CancelledError:
                    return
                finally:
                    self._sleeping = None
            if self.stopped:
                return
            try:
                await self.reconnect()
            except Exception as e:  # noqa: BLE001 -- whatever failed, try again later
                if self.stopped:
                    return
                reason = _reason(e, self.reconnectable.url.password)
                log.debug("Reconnection attempt failed: {reason}", reason=reason)
                continue
            await self.connectionRecovered()
            return

    def reconnect(self) -> Deferred[None]:
        conn: _Connection = self.reconnectable
        conn.closeQuietly()
        return Deferred.fromCoroutine(conn.open())

    def stop(self) -> None:
        self.stopped = True
        if self._sleeping is not None:
            self._sleeping.cancel()


class _Connection(txpostgres.Connection):  # type: ignore[misc, unused-ignore]
    """
    One pooled connection. ``ready`` means connected with the session set up; ``busy``
    means checked out by a query or transaction.
    """

    cursorFactory = _Cursor

    def __init__(
        self,
        reactor: Any,
        url: DatabaseURL,
        connectTimeout: float,
        onDeath: Callable[[_Connection, Failure], None],
    ) -> None:
        super().__init__(reactor=reactor, detector=_Detector(reactor, self._died))
        self.url = url
        self.connectTimeout = connectTimeout
        self.ready = False
        self.busy = False
        self._onDeath = onDeath
        self.detector.setReconnectable(self)

    def _died(self, f: Failure) -> None:
        self.ready = False
        self._onDeath(self, f)

    async def _resolve(self) -> DatabaseURL:
        """Look the host name up off the reactor thread; libpq gets the addresses."""
        url = self.url
        host = url.host
        if host is None or url.is_socket or "hostaddr" in url.options:
            return url
        try:
            ipaddress.ip_address(host)
            return url
        except ValueError:
            pass
        try:
            infos = await deferToThreadPool(
                self.reactor,
                self.reactor.getThreadPool(),
                socket.getaddrinfo,
                host,
                url.port or 5432,
                type=socket.SOCK_STREAM,
            )
        except OSError as e:
            raise OSError(f'could not resolve host name "{host}": {e.strerror or e}') from e
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        # libpq pairs each hostaddr with a host entry (kept for TLS verification).
        return attrs.evolve(
            url,
            host=",".join([host] * len(addresses)),
            options={**url.options, "hostaddr": ",".join(addresses)},
        )

    async def open(self) -> None:
        """Connect, giving up after ``connectTimeout`` seconds."""
        url = await self._resolve()
        if self.detector.stopped:
            raise DatabaseUnavailable("the database pool is closed")
        connecting = self.connect(url.dsn())
        # Closing the half-open connection errbacks ``connecting``.
        timer = self.reactor.callLater(self.connectTimeout, self.closeQuietly)
        try:
            await connecting
        except Exception as e:
            if not timer.active():
                raise _ConnectTimedOut(f"timed out after {self.connectTimeout:g} s") from e
            raise
        finally:
            if timer.active():
                timer.cancel()

    def closeQuietly(self) -> None:
        if self._connection is not None:
            self.close()

    def rows(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> Deferred[list[tuple[Any, ...]]]:
        """Like ``runQuery``, but statements without a result give ``[]``."""
        return self._doit(self._rows, sql, params)  # type: ignore[no-any-return, unused-ignore]

    def _rows(self, sql: str, params: Any) -> Deferred[list[tuple[Any, ...]]]:
        d: Deferred[Any] = self.cursor().execute(sql, params)
        return d.addCallback(lambda c: c.fetchall() if c.description is not None else [])

    def transact(self, fn: Callable[[Cursor], Awaitable[T]]) -> Deferred[T]:
        """
        ``fn(cursor)`` between BEGIN and COMMIT, ROLLBACK if it fails. txpostgres'
        ``runInteraction`` logs a failed ROLLBACK as an unhandled error, which is what
        every transaction cut short by a restart ends with; here the connection is closed
        instead, and the detector takes it from there.
        """
        return self._doit(  # type: ignore[no-any-return, unused-ignore]
            lambda: Deferred.fromCoroutine(self._transact(fn))
        )

    async def _transact(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        cursor = self.cursor()
        await cursor.execute("BEGIN")
        try:
            result = await fn(cursor)
        except BaseException:
            try:
                await cursor.execute("ROLLBACK")
            except psycopg2.Error:
                self.closeQuietly()
            raise
        await cursor.execute("COMMIT")
        return result

    def doRead(self) -> BaseException | None:
        # When the server closes an idle connection, psycopg2's poll() raises here; the
        # reactor would log that as an unhandled error. Returning it instead makes the
        # reactor call connectionLost with it, which wakes the detector. When libpq has
        # already dropped the socket, fileno() is -1 and txpostgres' addReader raises
        # ValueError: the same event, seen a moment later.
        try:
            super().doRead()
        except psycopg2.Error as e:
            return e
        except ValueError as e:
            try:
                lost = self.fileno() == -1
            except psycopg2.Error:
                lost = True
            if not lost:
                raise  # a bug, not a lost connection
            return e
        return None


class Listener:
    """
    A ``LISTEN`` on a connection of its own, outside the pool. LISTEN belongs to the
    session: after a reconnection it is issued again and ``reconnected`` is called,
    because notifications sent meanwhile are lost and the caller must sweep for them.
    """

    def __init__(self, conn: _Connection, channel: str) -> None:
        self._conn = conn
        self.channel = channel

    def stop(self) -> None:
        """Stop listening and close the connection."""
        self._conn.detector.stop()
        self._conn.closeQuietly()


class Database:
    """
    A fixed-size pool of PostgreSQL connections for the reactor thread.

    :param url: where to connect; ``url.connection_limit`` caps ``size``.
    :param size: connections to open.
    :param statement_timeout: seconds before the server cancels a statement (0: never).
    :param schema: our schema, first on each connection's ``search_path``.
    :param reactor: defaults to the global reactor.
    :param observe: called as ``observe(query_name, seconds, ok)`` after every query and
        transaction, for metrics.
    :param slow_query: queries taking at least this many seconds are logged (name and
        duration, never parameters) at warn level.
    """

    def __init__(
        self,
        url: DatabaseURL,
        *,
        size: int = 5,
        statement_timeout: float = 30.0,
        schema: str = "marketplace_ws",
        reactor: Any = None,
        observe: Callable[[str, float, bool], None] | None = None,
        slow_query: float = 1.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"the pool size must be at least 1, not {size}")
        if statement_timeout < 0:
            raise ValueError("statement_timeout must not be negative")
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.url = url
        self.schema = check_schema_name(schema)
        self.size = min(size, url.connection_limit or size)
        self._reactor = reactor
        self._observe = observe
        self._slow = slow_query
        self._setupParams = (
            str(round(statement_timeout * 1000)),
            f"{_quote_ident(schema)}, {_quote_ident(url.schema or 'public')}",
        )
        self._connectURL = attrs.evolve(url, options={**_CONNECTION_DEFAULTS, **url.options})
        timeout = float(url.options.get("connect_timeout", _DEFAULT_CONNECT_TIMEOUT))
        self._connectTimeout = timeout
        self._connections: list[_Connection] = []
        self._idle: deque[_Connection] = deque()
        self._waiters: deque[Deferred[_Connection]] = deque()
        self._inFlight = 0
        self._closing = False
        self._drained: Deferred[None] | None = None
        self._closed = False
        self._closeWaiters: list[Deferred[None]] = []
        self._listeners: list[Listener] = []

    @property
    def inFlight(self) -> int:
        """Queries and transactions running or waiting for a connection."""
        return self._inFlight

    @property
    def available(self) -> bool:
        """True when at least one connection is up (and the pool is open)."""
        return not self._closing and any(c.ready for c in self._connections)

    def _unavailable(self) -> DatabaseUnavailable:
        if self._closing:
            return DatabaseUnavailable(f"the pool for PostgreSQL at {self.url.where()} is closed")
        return DatabaseUnavailable(
            f"PostgreSQL at {self.url.where()} is unavailable (reconnecting)"
        )

    # -- start-up -----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Open every connection. Fails with :class:`DatabaseUnreachable` (and leaves nothing
        open) if any cannot connect.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._connections:
            raise RuntimeError("Database.start() was called twice")
        if self._closing:
            raise self._unavailable()
        connections = [
            _Connection(self._reactor, self._connectURL, self._connectTimeout, self._died)
            for _ in range(self.size)
        ]
        self._connections = connections
        for conn in connections:
            conn.detector.addRecoveryHandler(
                lambda conn=conn: Deferred.fromCoroutine(self._recovered(conn))
            )
        results = await DeferredList(
            [Deferred.fromCoroutine(self._openOne(c)) for c in connections], consumeErrors=True
        )
        failures = [result for ok, result in results if not ok]
        if failures or self._closing:
            self._connections = []
            for conn in connections:
                conn.detector.stop()
                conn.closeQuietly()
            if self._closing:
                raise self._unavailable()
            reason = _reason(failures[0], self.url.password)
            raise DatabaseUnreachable(
                f"cannot connect to PostgreSQL at {self.url.where()}: {reason}"
            ) from None
        for conn in connections:
            conn.detector.armed = True
            conn.ready = True
            self._offer(conn)

    async def _openOne(self, conn: _Connection) -> None:
        await conn.open()
        await self._setUp(conn)

    def _setUp(self, conn: _Connection) -> Deferred[None]:
        return conn.runOperation(_SESSION_SETUP, self._setupParams)  # type: ignore[no-any-return, unused-ignore]

    # -- connection states --------------------------------------------------------------

    def _died(self, conn: _Connection, f: Failure) -> None:
        reason = _reason(f, self.url.password)
        if any(c.ready for c in self._connections):
            log.info(
                "Lost a connection to PostgreSQL at {where} ({reason}); reconnecting",
                where=self.url.where(),
                reason=reason,
            )
            return
        log.warn(
            "PostgreSQL at {where} is unavailable ({reason}); reconnecting",
            where=self.url.where(),
            reason=reason,
        )
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(self._unavailable())

    async def _recovered(self, conn: _Connection) -> None:
        try:
            await self._setUp(conn)
        except Exception as e:  # noqa: BLE001 -- any failure: reconnect and set up again
            log.info(
                "Session set-up failed after reconnecting ({reason}); retrying",
                reason=_reason(e, self.url.password),
            )
            if not conn.detector.connectionIsDead:
                # The close counts as a death: the detector starts over.
                conn.closeQuietly()
            return
        if not any(c.ready for c in self._connections):
            log.info("PostgreSQL at {where} is back", where=self.url.where())
        conn.ready = True
        self._offer(conn)

    def _offer(self, conn: _Connection) -> None:
        """Hand a free, ready connection to the next waiter, or keep it idle."""
        if not conn.ready or conn.busy:
            return
        if self._waiters:
            conn.busy = True
            self._waiters.popleft().callback(conn)
        elif conn not in self._idle:
            self._idle.append(conn)

    def _acquire(self) -> Deferred[_Connection]:
        while self._idle:
            conn = self._idle.popleft()
            if conn.ready:
                conn.busy = True
                return succeed(conn)
        if not any(c.ready for c in self._connections):
            return fail(self._unavailable())
        waiter: Deferred[_Connection] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _release(self, conn: _Connection) -> None:
        conn.busy = False
        self._offer(conn)

    # -- queries ------------------------------------------------------------------------

    def query(
        self, name: str, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()
    ) -> Deferred[list[tuple[Any, ...]]]:
        """
        Run one statement (in its own implicit transaction) and fire with its rows, ``[]``
        when it returns none. ``name`` labels it in metrics and logs. Without ``params``
        the SQL is sent as it is (a ``%`` needs no doubling).
        """
        args = params if params else None
        return Deferred.fromCoroutine(self._timed(name, lambda conn: conn.rows(sql, args)))

    def transaction(self, name: str, fn: Callable[[Cursor], Awaitable[T]]) -> Deferred[T]:
        """
        Run ``fn(cursor)`` between BEGIN and COMMIT on one connection; ROLLBACK if it
        raises. ``fn`` may be an ``async def`` or return a Deferred; in it, ``await
        cursor.execute(sql, params)`` then ``cursor.fetchall()``.
        """
        return Deferred.fromCoroutine(self._timed(name, lambda conn: conn.transact(fn)))

    async def _timed(self, name: str, work: Callable[[_Connection], Deferred[T]]) -> T:
        """The one path of every query: a connection, the work, timing, errors."""
        if self._closing:
            raise self._unavailable()
        started = self._reactor.seconds()
        self._inFlight += 1
        ok = False
        try:
            conn = await self._acquire()
            try:
                result = await work(conn)
            except Exception as e:
                if self._connectionFailed(conn, e):
                    raise self._unavailable() from e
                if _unstorable(e):
                    raise UnstorableValue(
                        "a value holds a NUL character or an unpaired surrogate, which"
                        " PostgreSQL text cannot store"
                    ) from e
                raise
            finally:
                self._release(conn)
            ok = True
            return result
        finally:
            self._inFlight -= 1
            self._finished(name, self._reactor.seconds() - started, ok)

    def _connectionFailed(self, conn: _Connection, e: Exception) -> bool:
        if isinstance(e, (ConnectionDead, ConnectionClosed, txpostgres.RollbackFailed)):
            return True
        if isinstance(e, (psycopg2.InterfaceError, psycopg2.OperationalError)):
            # The detector has already judged this failure by now.
            return bool(conn.detector.connectionIsDead or conn.detector.stopped)
        return False

    def _finished(self, name: str, seconds: float, ok: bool) -> None:
        if self._observe is not None:
            try:
                self._observe(name, seconds, ok)
            except Exception:  # noqa: BLE001 -- metrics must never fail a query
                log.failure("Query observer failed")
        if seconds >= self._slow:
            log.warn("Slow database query {query}: {seconds:.3f} s", query=name, seconds=seconds)
        if self._drained is not None and not self._inFlight:
            # On the next turn, so the last caller has its result before connections close.
            self._reactor.callLater(0, self._checkDrained)

    def _checkDrained(self) -> None:
        if self._drained is not None and not self._inFlight and not self._drained.called:
            self._drained.callback(None)

    # -- LISTEN -------------------------------------------------------------------------

    def listen(
        self,
        channel: str,
        notified: Callable[[str], object],
        reconnected: Callable[[], object] | None = None,
    ) -> Deferred[Listener]:
        """
        Call ``notified(payload)`` for every NOTIFY on ``channel``, on a connection
        opened for it (not counted in ``size``), until :meth:`Listener.stop` or
        :meth:`close`. After the connection is lost and regained, ``reconnected()`` is
        called: sweep for what was missed. Fails with :class:`DatabaseUnavailable`.
        """
        return Deferred.fromCoroutine(self._listen(channel, notified, reconnected))

    async def _listen(
        self,
        channel: str,
        notified: Callable[[str], object],
        reconnected: Callable[[], object] | None,
    ) -> Listener:
        if self._closing:
            raise self._unavailable()
        conn = _Connection(self._reactor, self._connectURL, self._connectTimeout, self._lost)
        sql = f"LISTEN {_quote_ident(channel)}"
        conn.addNotifyObserver(lambda n: notified(n.payload) if n.channel == channel else None)

        async def relisten() -> None:
            try:
                await conn.runOperation(sql)
            except Exception:  # noqa: BLE001 -- any failure: reconnect and LISTEN again
                if not conn.detector.connectionIsDead:
                    conn.closeQuietly()
                return
            log.info("Listening on {channel} again", channel=channel)
            if reconnected is not None:
                try:
                    await maybeDeferred(reconnected)
                except Exception:  # noqa: BLE001 -- the caller's problem, not the listener's
                    log.failure("Reconnection callback for {channel} failed", channel=channel)

        conn.detector.addRecoveryHandler(lambda: Deferred.fromCoroutine(relisten()))
        try:
            await conn.open()
            await conn.runOperation(sql)
        except Exception as e:  # noqa: BLE001 -- reported as DatabaseUnavailable
            conn.detector.stop()
            conn.closeQuietly()
            reason = _reason(e, self.url.password)
            raise DatabaseUnavailable(
                f"cannot LISTEN {channel} on PostgreSQL at {self.url.where()}: {reason}"
            ) from None
        conn.detector.armed = True
        listener = Listener(conn, channel)
        self._listeners.append(listener)
        return listener

    def _lost(self, conn: _Connection, f: Failure) -> None:
        log.warn(
            "Lost the LISTEN connection to PostgreSQL at {where} ({reason}); reconnecting",
            where=self.url.where(),
            reason=_reason(f, self.url.password),
        )

    # -- shutdown -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> Deferred[None]:
        """
        Refuse new work (it fails with :class:`DatabaseUnavailable`), wait up to
        ``timeout`` seconds for what is running, then close every connection. Calling it
        again waits for the same close.
        """
        if self._closed:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._closeWaiters.append(done)
        if not self._closing:
            self._closing = True
            Deferred.fromCoroutine(self._close(timeout)).addErrback(
                lambda f: log.failure("Closing the database pool failed", f)
            )
        return done

    async def _close(self, timeout: float) -> None:
        if self._inFlight:
            self._drained = Deferred()
            self._drained.addTimeout(timeout, self._reactor)
            try:
                await self._drained
            except TimeoutError:
                log.warn(
                    "Closing the database pool with {count} queries still running "
                    "after {timeout} s",
                    count=self._inFlight,
                    timeout=timeout,
                )
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(self._unavailable())
        for conn in self._connections:
            conn.detector.stop()
            conn.ready = False
            conn.closeQuietly()
        for listener in self._listeners:
            listener.stop()
        self._idle.clear()
        self._closed = True
        closeWaiters, self._closeWaiters = self._closeWaiters, []
        for done in closeWaiters:
            done.callback(None)
