"""
The running server: database first, then the two listeners; on the way down, the
reverse, within a bounded time.

Start-up is ordered because a listener that accepts browsers before the database is
reachable would greet them and then fail every request. A problem on the way up is
fatal: it is reported as one line naming the setting to fix, and the process exits
non-zero so a supervisor (systemd, Docker, Render) shows the failure instead of a
server that looks alive.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from marketplace_ws.auth import TokenVerifier, verifierFromSettings
from marketplace_ws.backend import ServerBackend
from marketplace_ws.broker import Event, IBroker
from marketplace_ws.broker.memory import MemoryBroker
from marketplace_ws.broker.redis import RedisBroker, RedisUnavailable
from marketplace_ws.channels import Authoriser
from marketplace_ws.chat import Chat
from marketplace_ws.config import BY_FLAG, Config, ConfigError, JWTSettings
from marketplace_ws.conversations import Conversations, noConversations
from marketplace_ws.db import Database, DatabaseUnreachable, migrate, pending
from marketplace_ws.http import site
from marketplace_ws.http.api import apiResource
from marketplace_ws.http.health import Health
from marketplace_ws.http.metrics import MetricsResource
from marketplace_ws.http.ready import Check, Ready
from marketplace_ws.http.upgrade import sharePort
from marketplace_ws.hub import Hub
from marketplace_ws.live import Live
from marketplace_ws.metrics import Metrics
from marketplace_ws.notifications import Notifications
from marketplace_ws.outbox import OutboxPublisher
from marketplace_ws.protocol import ConformanceProtocol, Handler, MarketplaceFactory
from marketplace_ws.tls import ServerTLS, TLSFileError, installReloadOnSIGHUP

_log = Logger()

#: Exit status for a start-up failure caused by configuration (sysexits' EX_CONFIG).
EX_CONFIG = 78
#: Exit status for a dependency not there yet (sysexits' EX_UNAVAILABLE): retried.
EX_UNAVAILABLE = 69


def verifierFor(settings: JWTSettings, reactor: Any) -> TokenVerifier:
    """
    The token verifier the settings describe.

    @raise ConfigError: when the key source and the algorithms do not fit together.
    """
    pem = settings.publicKeyFile.read_bytes() if settings.publicKeyFile else None
    try:
        return verifierFromSettings(
            secret=settings.secret,
            publicKeyPEM=pem,
            jwksURL=settings.jwksURL,
            algorithms=settings.algorithms,
            leeway=settings.leeway,
            audience=settings.audience,
            issuer=settings.issuer,
            userClaim=settings.userClaim,
            reactor=reactor,
        )
    except ValueError as e:
        raise ConfigError("JWT_ALGORITHMS (--jwt-algorithms)", str(e)) from None


def tuneGarbageCollector() -> None:
    """
    Keep the cyclic garbage collector from stalling the reactor. With thousands of
    connections the process tracks a million objects, and a full collection under the
    default thresholds takes 100-200 ms: every client waits, and an event fanned out
    meanwhile arrives that much later (bench/fanout.py at C=5,000 and 50,000
    deliveries/s: p99 174.7 ms by default, 71.5 ms with this). Objects alive at
    start-up (modules, classes) are frozen out of every collection, and collections
    run after 50,000 allocations instead of 700, full ones rarely.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def brokerFor(config: Config, reactor: Any) -> IBroker:
    """Redis when C{REDIS_URL} is set (many processes, one marketplace), else memory."""
    delivery = config.delivery
    if config.redisURL is None:
        return MemoryBroker(
            reactor,
            historySize=delivery.historySize,
            historyAge=delivery.historyAge,
            idempotencyWindow=delivery.idempotencyWindow,
        )
    return RedisBroker(
        config.redisURL,
        reactor,
        historySize=delivery.historySize,
        historyAge=delivery.historyAge,
        idempotencyWindow=delivery.idempotencyWindow,
        # A channel's seq must outlive its history and its idempotency keys.
        seqTTL=max(7 * 86400.0, delivery.historyAge, delivery.idempotencyWindow),
    )


class MarketplaceService(MultiService):
    """
    One marketplace-ws process: the database pool, the WebSocket listener and the
    HTTP listener.
    """

    def __init__(
        self,
        config: Config,
        embedded: Any = None,
        *,
        reactor: Any,
        ownsProcess: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.embedded = embedded
        self.ownsProcess = ownsProcess
        self.exitCode = 0
        #: Set when a shutdown begins: /ready answers 503 from then on.
        self.stopping = False
        #: Both listeners' TLS, when TLS_CERT and TLS_KEY are set; SIGHUP reloads it.
        self.tls: ServerTLS | None = None
        if config.tls is not None:
            try:
                self.tls = ServerTLS(config.tls.certificate, config.tls.key)
            except TLSFileError as e:
                raise ConfigError(BY_FLAG[e.flag], str(e)) from None
        self._uninstallSIGHUP: Callable[[], None] | None = None
        self.metrics = metrics = Metrics()
        self.database: Database | None = None
        if not config.conformance:
            assert config.databaseURL is not None, "developmentDefaults fills it in"
            self.database = Database(
                config.databaseURL,
                size=config.databasePoolSize,
                statement_timeout=config.statementTimeout,
                schema=config.databaseSchema,
                reactor=reactor,
                observe=metrics.observeQuery,
            )
        self.broker = brokerFor(config, reactor)
        hub = Hub(self.broker)
        hub.delivered = self._delivered
        conversations = Conversations(self.database) if self.database is not None else None
        self.authoriser = Authoriser(
            conversations.isParticipant if conversations is not None else noConversations, reactor
        )
        self.live = Live(hub, self.authoriser, reactor, config.limits, metrics.counters)
        self.chat: Chat | None = None
        self.notifications: Notifications | None = None
        ops: dict[str, Handler] = {}
        if self.database is not None and conversations is not None:
            self.chat = Chat(conversations, self.live, self.authoriser, config.chatMaxBody)
            self.notifications = Notifications(self.database, self.live)
            ops = {**self.chat.ops, **self.notifications.ops}
        self.factory = MarketplaceFactory(
            verifierFor(config.jwt, reactor), config.limits, reactor, self.live, ops
        )
        # Started by _start once the database is migrated, not as a child service:
        # MultiService would start it before the database is up.
        self.outbox: OutboxPublisher | None = None
        if self.database is not None:
            self.outbox = OutboxPublisher(
                self.database,
                self.live.publish,
                reactor,
                sweepInterval=config.outbox.sweepInterval,
                batchSize=config.outbox.batchSize,
            )
        if config.conformance:
            self.factory.protocol = ConformanceProtocol
        metrics.gauge(
            "mws_connections",
            "Open, welcomed WebSocket connections.",
            lambda: len(self.factory.connections),
        )
        metrics.gauge(
            "mws_users", "Users with a connection to this process.", lambda: len(self.live.byUser)
        )
        metrics.gauge("mws_channels", "Channels with local subscribers.", hub.channelCount)
        broker = self.broker
        if isinstance(broker, RedisBroker):
            metrics.total(
                "mws_redis_round_trips", "Redis commands sent.", lambda: broker.roundTrips
            )
            metrics.total(
                "mws_redis_publish_round_trips",
                "Redis commands sent for publishes (one each).",
                lambda: broker.publishRoundTrips,
            )
            metrics.total(
                "mws_redis_reconnections", "Reconnections to Redis.", lambda: broker.reconnections
            )
        self.health = Health(reactor.seconds, lambda: len(self.factory.connections))
        self.ports: list[IListeningPort] = []
        self.ready: Deferred[None] = Deferred()
        self._starting: Deferred[None] | None = None

    def _delivered(self, event: Event, sent: int) -> None:
        """Count an event's fan-out once, not per subscriber."""
        if sent:
            self.metrics.counters.framesOut["event"] += sent
            if not event.ephemeral:
                latency = max(0.0, self.reactor.seconds() - event.time)
                self.metrics.publishLatency.observe(latency)

    def site(self) -> Site:
        """The HTTP API and health checks."""
        config = self.config
        backend = ServerBackend(self.live, self.chat, self.notifications, self.stats)
        api = apiResource(backend, config.httpApiSecret, config.httpMaxBody, config.corsOrigins)
        children = {
            b"health": self.health,
            b"ready": Ready(self.readiness()),
            b"metrics": MetricsResource(self.metrics.render, config.metricsToken),
            b"api": api,
        }
        return site(children, config.httpMaxBody, config.corsOrigins)

    def readiness(self) -> dict[str, Check]:
        """What /ready checks: each dependency, and that no shutdown has begun."""
        database = self.database

        def stopping() -> str | None:
            return "shutting down" if self.stopping else None

        checks: dict[str, Check] = {"process": stopping}
        if database is not None:
            checks["database"] = lambda: None if database.available else "unreachable"
        broker = self.broker
        if isinstance(broker, RedisBroker):
            checks["redis"] = lambda: None if broker.available else "unreachable"
        return checks

    def stats(self) -> dict[str, Any]:
        """This process's counts, for C{/api/v1/stats}."""
        counters = self.metrics.counters
        database = self.database
        return {
            "uptime": round(self.reactor.seconds() - self.health.started, 3),
            "connections": len(self.factory.connections),
            "unauthenticated": len(self.factory.sockets) - len(self.factory.connections),
            "users": len(self.live.byUser),
            "channels": self.live.hub.channelCount(),
            "accepted": counters.accepted,
            "refused": dict(counters.refused),
            "slowConsumerDisconnects": counters.slow,
            "framesIn": dict(counters.framesIn),
            "framesOut": dict(counters.framesOut),
            "errors": dict(counters.errors),
            "published": dict(counters.published),
            "outbox": None
            if self.outbox is None
            else {
                "listening": self.outbox.listening,
                "published": self.outbox.published,
                "failed": self.outbox.failed,
            },
            "database": None
            if database is None
            else {"available": database.available, "inFlight": database.inFlight},
        }

    def startService(self) -> None:
        super().startService()
        if self.ownsProcess:
            tuneGarbageCollector()
            self.reactor.addSystemEventTrigger("after", "shutdown", self._exitStatus)
            if self.tls is not None:
                self._uninstallSIGHUP = installReloadOnSIGHUP(self.reactor, self.tls.reload)
        self._starting = Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._fatal)

    def _exitStatus(self) -> None:
        """
        Under C{twist}, hand the supervisor the outcome: non-zero after a failed start;
        0 after a graceful SIGTERM/SIGINT shutdown, which twist would otherwise report by
        re-raising the signal (exit 143), making a clean stop look like a crash to Docker
        and Kubernetes.
        """
        if self.exitCode:
            for stream in (sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
            # twist exits 0 whenever its reactor stops: this is the only way left to
            # report a failed start once everything has been shut down.
            os._exit(self.exitCode)
        self.reactor._exitSignal = None

    async def _start(self) -> None:
        config = self.config
        if self.database is not None:
            await self._startDatabase(self.database)
        if isinstance(self.broker, RedisBroker):
            try:
                await self.broker.start()
            except RedisUnavailable as e:
                raise ConfigError("REDIS_URL (--redis-url)", e.problem, transient=True) from None
        if self.outbox is not None:
            self.outbox.startService()
        else:
            _log.warn("conformance mode: echoing every message, no authentication")
        if config.sharedPort:
            await self._listen(
                "HTTP+WebSocket",
                config.httpEndpoint,
                config.httpSource,
                sharePort(self.site(), self.factory),
            )
        else:
            await self._listen("WebSocket", config.wsEndpoint, config.wsSource, self.factory)
            await self._listen("HTTP", config.httpEndpoint, config.httpSource, self.site())
        _log.info("marketplace-ws ready")
        self.ready.callback(None)

    async def _startDatabase(self, database: Database) -> None:
        config = self.config
        url = database.url
        if url.ignored:
            _log.warn(
                "DATABASE_URL: ignoring parameters libpq does not know: {names}",
                names=", ".join(url.ignored),
            )
        if url.pgbouncer:
            _log.warn(
                "DATABASE_URL has pgbouncer=true: PgBouncer transaction pooling drops "
                "LISTEN and per-session settings; point marketplace-ws at a direct "
                "connection (Prisma's directUrl) for live outbox delivery"
            )
        try:
            await database.start()
        except DatabaseUnreachable as e:
            raise ConfigError("DATABASE_URL (--database-url)", str(e), transient=True) from None
        if config.migrate:
            applied = await migrate(database, config.databaseSchema)
            _log.info(
                "database schema {schema}: {count} migration(s) applied {versions}",
                schema=config.databaseSchema,
                count=len(applied),
                versions=applied,
            )
            return
        # Serving on an older schema fails request by request; say so once, up front.
        missing = await pending(database, config.databaseSchema)
        if missing:
            raise ConfigError(
                "MARKETPLACE_WS_MIGRATE (--migrate)",
                f"database schema {config.databaseSchema} lacks migration(s) "
                f"{', '.join(missing)}: run `marketplace-ws migrate` first, or start with "
                "--migrate",
            )

    async def _listen(self, what: str, description: str, source: str, factory: Any) -> None:
        if self.tls is not None:
            factory = self.tls.wrap(factory)
        endpoint = serverFromString(self.reactor, description)
        try:
            port = await endpoint.listen(factory)
        except CannotListenError as e:
            problem = e.socketError
            reason = getattr(problem, "strerror", None) or str(problem)
            raise ConfigError(
                source, f"cannot listen on {description}: {reason}", transient=True
            ) from None
        self.ports.append(port)
        address = port.getHost()
        _log.info(
            "{what} listening on {host}:{port}",
            what=what,
            host=getattr(address, "host", address),
            port=getattr(address, "port", None),
            listener=what.lower(),
        )

    def _fatal(self, failure: Failure) -> None:
        """
        Report a start-up failure in one line; under C{twist}, make the process exit
        non-zero. In-process users (tests) see it as the failure of C{ready}.
        """
        if failure.check(defer.CancelledError) and not self.running:
            return  # stopped while starting: not a failure
        if failure.check(ConfigError):
            line = str(failure.value)
            self.exitCode = EX_UNAVAILABLE if failure.value.transient else EX_CONFIG
        else:
            _log.failure("start-up failed", failure)
            line = f"start-up failed: {failure.getErrorMessage()}"
            self.exitCode = 1
        _log.critical("{line}", line=line)
        if not self.ownsProcess:
            self.ready.errback(failure)
            return
        # twist has redirected sys.stderr into the log by now: write to the real one.
        stderr = sys.__stderr__
        if stderr is not None:
            stderr.write(f"marketplace-ws: {line}\n")
            stderr.flush()
        self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None]:
        self.stopping = True
        if self._uninstallSIGHUP is not None:
            self._uninstallSIGHUP()
            self._uninstallSIGHUP = None
        super().stopService()
        stopping = Deferred.fromCoroutine(self._stop())
        return stopping

    async def _stop(self) -> None:
        """
        Stop accepting, close every WebSocket with 1001, let in-flight database work
        finish, all within C{shutdownTimeout}; what is still open then is cut.
        """
        timeout = self.config.shutdownTimeout
        deadline = self.reactor.seconds() + timeout
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        self.ports = []
        if self.outbox is not None and self.outbox.running:
            # Before the WebSockets close, so the last batch's events reach them.
            stopping = self.outbox.stopService()
            stopping.addTimeout(max(0.0, deadline - self.reactor.seconds()), self.reactor)
            try:
                await stopping
            except defer.TimeoutError:
                _log.warn("shutdown: the outbox batch in progress did not finish in time")
        count = len(self.factory.connections)
        closing = self.factory.closeAll()
        closing.addTimeout(timeout, self.reactor)
        try:
            await closing
        except defer.TimeoutError:
            _log.warn(
                "shutdown: {left} connection(s) did not close in {timeout}s; cutting them",
                left=len(self.factory.connections),
                timeout=timeout,
            )
            self.factory.abortAll()
        if isinstance(self.broker, RedisBroker):
            # Withdraws this process's presence at once, rather than at lease expiry.
            await self.broker.stop()
        if self.database is not None:
            remaining = max(0.0, deadline - self.reactor.seconds())
            await self.database.close(timeout=remaining)
        if self.embedded is not None:
            await deferToThread(self.embedded.cleanup)
        _log.info("shutdown complete: closed {count} connection(s)", count=count)
