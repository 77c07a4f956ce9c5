"""
The WebSocket endpoint: the Autobahn protocol that makes a browser connection
trustworthy, and the factory that holds the open connections and their limits.

A connection's way in is a straight line: handshake (Origin, subprotocol, a token from
the header, cookie or query) → or a first C{auth} frame within the auth timeout →
C{welcome} → each text frame parsed by L{envelope.parseRequest}, rate-limited, and
handed to the op table L{OPS}. Later features add ops to the table; the envelope does
not change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pprint import pformat
from typing import Any, Protocol
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import encode_truncate
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from marketplace_ws import envelope
from marketplace_ws.auth import Identity, TokenRejected, tokenFromQuery
from marketplace_ws.broker.memory import MemoryBroker
from marketplace_ws.channels import Authoriser
from marketplace_ws.conversations import noConversations
from marketplace_ws.envelope import OpError, Request
from marketplace_ws.hub import Hub
from marketplace_ws.limits import ConnectionLimits, OpLimiter, Rate, TokenBucket
from marketplace_ws.live import Live, TooManyConnections
from marketplace_ws.timers import BucketTimer, Call

SUBPROTOCOL = "marketplace.v1"


class _LazyFormat:
    """pprint.pformat of an object, computed only if a log line is really written."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __str__(self) -> str:
        return pformat(self._value)

    __repr__ = __str__


# Autobahn formats its hundred-odd protocol options with pprint for a debug line on
# every new connection, whether debug logging is on or not: a fifth of a handshake's
# CPU (py-spy, 5,000 connections). Formatting when written costs nothing when not.
autobahn_protocol.pformat = _LazyFormat  # type: ignore[assignment]

# Close codes of SPEC §4 (docs/protocol.rst says what a client should do for each).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_PROTOCOL = 4000
CLOSE_AUTH = 4001
CLOSE_DISCONNECTED = 4003
CLOSE_SLOW = 4008
CLOSE_LIMIT = 4029

#: Push frames at least this long are compressed for connections that negotiated
#: permessage-deflate; shorter ones go out uncompressed to every connection as the one
#: frame prepared for all (see L{MarketplaceFactory.prepare}).
COMPRESS_FROM = 1024

_log = Logger()


class Verifier(Protocol):
    """What the protocol needs of token verification (see L{marketplace_ws.auth})."""

    def verify(self, token: str) -> Deferred[Identity]: ...


def normaliseOrigin(origin: str) -> str:
    """
    C{scheme://host[:port]}, lower case, without the scheme's default port, so that
    C{https://App.example.com:443} and C{https://app.example.com} are one origin.
    """
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        return origin.strip().lower()
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def originAllowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """
    An empty allowlist allows every origin. A browser always sends C{Origin}; a
    request without one is from a non-browser client, which an Origin check cannot
    constrain anyway. C{null} (sandboxed frames, C{file:}) is refused by any allowlist.
    """
    if not allowed or origin is None:
        return True
    if origin.strip().lower() == "null":
        return False
    candidate = normaliseOrigin(origin)
    for entry in allowed:
        if entry.startswith(("https://*.", "http://*.")):
            # Normalised like an origin, so "https://*.example.com:443" matches
            # "https://shop.example.com" as its exact counterpart would.
            scheme, _, suffix = normaliseOrigin(entry.replace("*.", "x.", 1)).partition("://x")
            if candidate.startswith(scheme + "://") and candidate.endswith(suffix):
                return True
        elif candidate == normaliseOrigin(entry):
            return True
    return False


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _cookie(headers: dict[str, str], name: str) -> str | None:
    """
    The cookie C{name}, split the lenient way browsers send cookies. Not with
    C{http.cookies.SimpleCookie}: it silently drops every cookie after one it finds
    invalid (a JSON value, a space, a name without a value), and the other cookies on
    the app's domain are not ours to choose.
    """
    raw = headers.get("cookie")
    if not raw or not name:
        return None
    for pair in raw.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if value:
                return value
    return None


_NO_QUEUE: Any = ()

#: Autobahn's record of the opening handshake, read only until onOpen.
_HANDSHAKE_ATTRIBUTES = (
    "http_headers",
    "http_request_params",
    "http_request_data",
    "http_response_data",
    "http_status_line",
    "http_request_uri",
    "http_request_host",
    "http_request_path",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_origin",
    "_wskey",
)


class _ConnectionLog:
    """
    Autobahn's log for one connection: each of its lines names the connection, as ours
    do, so an operator can follow one connection through the log. Two references per
    connection; C{debug} and C{trace}, called per frame and normally off, are the
    class logger's own methods (txaio's no-op when off), so they cost nothing more.
    """

    __slots__ = ("_id", "_log", "debug", "trace")

    def __init__(self, log: Any, connectionId: str) -> None:
        self._log = log
        self._id = connectionId
        self.debug = log.debug
        self.trace = log.trace

    def _emit(self, level: str, format: Any, kwargs: dict[str, Any]) -> Any:
        kwargs.setdefault("connectionId", self._id)
        if isinstance(format, str):
            format = "connection {connectionId}: " + format
        return getattr(self._log, level)(format, **kwargs)

    def critical(self, format: Any = None, **kwargs: Any) -> Any:
        return self._emit("critical", format, kwargs)

    def error(self, format: Any = None, **kwargs: Any) -> Any:
        return self._emit("error", format, kwargs)

    def warn(self, format: Any = None, **kwargs: Any) -> Any:
        return self._emit("warn", format, kwargs)

    def info(self, format: Any = None, **kwargs: Any) -> Any:
        return self._emit("info", format, kwargs)

    def failure(self, format: Any = None, failure: Any = None, **kwargs: Any) -> Any:
        kwargs["failure"] = failure
        return self._emit("failure", format, kwargs)


class ClientProtocol(WebSocketServerProtocol):
    """
    One browser connection.
    """

    factory: MarketplaceFactory
    identity: Identity | None = None
    connectionId: str = ""
    #: The transport asked us to stop writing (its buffer is full): the peer is not
    #: reading as fast as events arrive.
    _paused = False
    #: Bytes of push frames written since the transport paused us.
    _backlog = 0
    #: The socket of a plain TCP transport, written to directly by flush.
    _socket: Any = None
    #: Frames queued this reactor turn (None: nothing queued).
    _pending: list[bytes] | None = None
    #: The one timeout running for this connection: auth, then the token's expiry
    #: notice, then its expiry.
    _timer: Call | None = None

    @property
    def userId(self) -> str:
        assert self.identity is not None, "not authenticated yet"
        return self.identity.userId

    def _clock(self) -> float:
        return float(self.factory.reactor.seconds())

    # The handshake

    def onConnect(self, request: ConnectionRequest) -> Deferred[str | None]:  # type: ignore[override]
        self.connectionId = uuid.uuid4().hex[:16]
        self.log = _ConnectionLog(self.log, self.connectionId)
        self._garbage = 0
        limits = self.factory.limits
        self._limiter = OpLimiter(limits.rates, self._clock)
        # Rejections drain a bucket of their own: more than abuseLimit of them within
        # about a minute is sustained abuse, not a burst.
        self._abuse = TokenBucket(Rate(limits.abuseLimit / 60.0, limits.abuseLimit), self._clock)
        return Deferred.fromCoroutine(self._handshake(request))

    async def _handshake(self, request: ConnectionRequest) -> str | None:
        limits = self.factory.limits
        if not originAllowed(request.headers.get("origin"), limits.allowedOrigins):
            self._refused("origin", request)
            raise ConnectionDeny(403, "origin not allowed")
        if request.protocols and SUBPROTOCOL not in request.protocols:
            self._refused("subprotocol", request)
            raise ConnectionDeny(400, f"subprotocol {SUBPROTOCOL} required")
        token = (
            _bearer(request.headers)
            or _cookie(request.headers, limits.tokenCookie)
            or tokenFromQuery(request.params)
        )
        if token is not None:
            try:
                self.identity = await self.factory.verifier.verify(token)
            except TokenRejected as e:
                self._refused(e.reason, request)
                if e.reason == "keys_unavailable":
                    raise ConnectionDeny(503, "token keys unavailable, retry later") from None
                raise ConnectionDeny(401, e.message) from None
            if self.state == self.STATE_CLOSED:
                # The client left (or its handshake timed out) while the token was
                # being checked: Autobahn would still open it and leave it registered.
                raise ConnectionDeny(400, "connection closed during the handshake")
        return SUBPROTOCOL if request.protocols else None

    def _refused(self, reason: str, request: ConnectionRequest) -> None:
        self._count(reason)
        _log.info(
            "connection {connectionId} from {peer} refused: {reason}",
            connectionId=self.connectionId,
            peer=request.peer,
            reason=reason,
        )

    def _count(self, reason: str) -> None:
        """Count a connection turned away, by reason (L{Counters.refused})."""
        self.factory.counters.refused[reason] += 1

    def onOpen(self) -> None:
        # Streaming producer: the transport tells us when its send buffer fills up and
        # empties again, which is how a slow consumer is noticed (see deliver).
        self.transport.registerProducer(_Backpressure(self), True)  # type: ignore[union-attr]
        # Plain TCP only: TLS and other wrappers must see every byte (see flush).
        if type(self.transport) is tcp.Server:
            self._socket = self.transport.socket
        self.factory.sockets.add(self)
        self._forgetHandshake()
        if self.identity is not None:
            self._welcome(self.identity)
        else:
            self._later(self.factory.limits.authTimeout, self._authTimedOut)

    def _forgetHandshake(self) -> None:
        """
        Drop what Autobahn kept of the opening handshake (the request and response
        text, headers, query parameters: about 3 KB, the token included) once it is
        done: nothing reads them after onOpen, and they are a quarter of what an idle
        connection costs.
        """
        for name in _HANDSHAKE_ATTRIBUTES:
            setattr(self, name, None)
        # Autobahn's queue for synchronous and chopped sends, an empty deque (760
        # bytes) per connection that this server never fills: a shared empty tuple
        # answers len() the same, and an append would fail loudly, not silently.
        self.send_queue = _NO_QUEUE

    def _authTimedOut(self) -> None:
        if self.identity is None:
            self._count("auth_timeout")
            self.close(CLOSE_AUTH, "authentication timed out")

    def _welcome(self, identity: Identity) -> None:
        if self.state != self.STATE_OPEN:
            # Verified after the connection began closing (auth timeout, the client
            # left): registering it now would keep it listed forever.
            return
        factory = self.factory
        self.identity = identity
        factory.connections.add(self)
        self._scheduleExpiry(identity)
        _log.info(
            "connection {connectionId} open for user {userId}",
            connectionId=self.connectionId,
            userId=identity.userId,
        )
        factory.live.opened(self).addCallbacks(self._opened, self._openFailed)

    def _opened(self, userSeq: int) -> None:
        assert self.identity is not None
        self.factory.counters.accepted += 1
        self.send(
            {
                "type": "welcome",
                "connectionId": self.connectionId,
                "userId": self.identity.userId,
                "expiresAt": self.identity.expiresAt,
                "serverTime": int(time.time() * 1000),
                # Where the user's channel starts for this connection: a client that
                # kept a later seq from before can subscribe with since to recover.
                "userSeq": userSeq,
            }
        )

    def _openFailed(self, failure: Failure) -> None:
        if self.state != self.STATE_OPEN:
            return  # closed meanwhile: the subscription was abandoned, nothing to say
        if failure.check(TooManyConnections):
            self._count("too_many_connections")
            self.close(CLOSE_LIMIT, "too many connections for this user")
            return
        _log.failure(
            "connection {connectionId}: subscribing to its user channel failed",
            failure,
            connectionId=self.connectionId,
        )
        self.close(CLOSE_INTERNAL, "temporarily unavailable, reconnect later")

    def refresh(self, identity: Identity) -> None:
        """
        Take a fresh token for the same user: the connection lives on to its expiry.
        """
        assert self.identity is not None
        if identity.userId != self.identity.userId:
            raise OpError(envelope.FORBIDDEN, "token is for another user")
        self.identity = identity
        self._scheduleExpiry(identity)

    def _scheduleExpiry(self, identity: Identity) -> None:
        """The notice before the token expires, which then sets the expiry itself."""
        if identity.expiresAt is None:
            self._cancelTimer()
            return
        notice = identity.expiresAt - time.time() - self.factory.limits.expiryNotice
        self._later(max(0.0, notice), self._expiring, identity.expiresAt)

    def _expiring(self, expiresAt: int) -> None:
        self.send({"type": "token.expiring", "expiresAt": expiresAt})
        self._later(max(0.0, expiresAt - time.time()), self._expired)

    def _expired(self) -> None:
        self.close(CLOSE_AUTH, "token expired")

    def _later(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        """Run C{f} after C{delay}, in place of whatever timeout was running."""
        self._cancelTimer()
        self._timer = self.factory.timer.call_later(delay, f, *args)

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # Frames

    def send(self, frame: dict[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            counters = self.factory.counters
            kind = frame["type"]
            counters.framesOut[kind] += 1
            if kind == "error":
                counters.errors[frame["error"]["code"]] += 1
            self.sendMessage(envelope.encode(frame), isBinary=False)

    def deliver(self, frame: bytes, prepared: Any) -> None:
        """
        Send one push frame from the hub. While the transport has paused us, what is
        written waits in memory; past C{maxSendBuffer} bytes of it the peer is a slow
        consumer and is closed with 4008 rather than allowed to grow the server.
        """
        if self.state != self.STATE_OPEN:
            return
        if self._paused:
            self._backlog += len(frame)
            if self._backlog > self.factory.limits.maxSendBuffer:
                self.factory.counters.slow += 1
                self.close(CLOSE_SLOW, "too slow to keep up with events")
                return
        if prepared is None:
            self.sendMessage(frame, isBinary=False)
        elif self._perMessageCompress is None or prepared.doNotCompress:
            self._write(prepared.payloadHybi)
        else:
            self.sendPreparedMessage(prepared)

    def _write(self, data: bytes) -> None:
        """
        Queue a prepared frame (sent as it is: what sendPreparedMessage does, without
        Autobahn's per-call bookkeeping) for this reactor turn's flush.

        Every frame a connection gets in one turn leaves in one send() at the end of
        the turn (L{MarketplaceFactory.flush}): Twisted's own write would register the
        socket with epoll, send on the next turn and unregister it, three system calls
        and doWrite's Python per connection, for every subscriber of every event.
        """
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self.factory.dirty(self)
        else:
            pending.append(data)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Everything else this connection writes (replies, pings, close frames) goes
        # after the frames queued before it: order on the wire is order of sending.
        if self._pending is not None:
            self._pending.append(data)
            return
        super().sendData(data, sync, chopsize)

    def flush(self) -> None:
        """
        Send what was queued this turn: straight to the socket when nothing is queued
        in the transport before it; what the kernel does not take (its buffer is full:
        the peer is slow) goes to the transport's queue, behind nothing, so order holds
        and the producer still pauses us.
        """
        pending, self._pending = self._pending, None
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        transport: Any = self.transport
        if transport is None:
            return
        sock = self._socket
        if sock is not None and not transport.dataBuffer and not transport._tempDataLen:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                # Lost: the transport's own write finds out and closes as usual.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def disconnect(self, reason: str) -> None:
        """Closed by the HTTP API (logout, ban): 4003, not to be retried at once."""
        self.close(CLOSE_DISCONNECTED, reason or "disconnected by the server")

    def close(self, code: int, reason: str) -> None:
        _log.info(
            "connection {connectionId} closing with {code}: {reason}",
            connectionId=self.connectionId,
            code=code,
            reason=reason,
        )
        # sendClose() refuses 1001/1003/1008/1011, which SPEC §4 uses: go one level down.
        self.sendCloseFrame(code, encode_truncate(reason, 123))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.close(CLOSE_UNSUPPORTED, "binary frames are not accepted")
            return
        counters = self.factory.counters
        try:
            request = envelope.parseRequest(payload)
        except OpError as e:
            counters.framesIn["invalid"] += 1
            self._garbageFrame(e)
            return
        counters.framesIn[request.type if request.type in self.factory.ops else "unknown"] += 1
        if self.identity is None:
            self._firstFrame(request)
            return
        if not self._limiter.allow(request.type):
            if not self._abuse.take():
                self.close(CLOSE_LIMIT, "rate limit exceeded repeatedly")
            else:
                self.send(envelope.error(request.id, envelope.RATE_LIMITED, "slow down"))
            return
        handler = self.factory.ops.get(request.type)
        if handler is None:
            self._garbageFrame(OpError(envelope.BAD_REQUEST, "unknown type", request.id))
            return
        self._garbage = 0
        d = maybeDeferred(handler, self, request)
        d.addCallbacks(
            lambda result: self.send(envelope.ok(request.id, result)),
            self._failed,
            errbackArgs=(request,),
        )

    def _garbageFrame(self, problem: OpError) -> None:
        self._garbage += 1
        if self._garbage >= self.factory.limits.garbageLimit:
            self.close(CLOSE_PROTOCOL, "too many malformed requests")
        else:
            self.send(envelope.error(problem.requestId, problem.code, problem.message))

    def _failed(self, failure: Failure, request: Request) -> None:
        problem = envelope.explain(failure.value)
        if problem is not None:
            self.send(envelope.error(request.id, problem.code, problem.message))
            return
        _log.failure(
            "connection {connectionId}: {op} failed",
            failure,
            connectionId=self.connectionId,
            op=request.type,
        )
        self.send(envelope.error(request.id, envelope.INTERNAL, "internal error"))

    def _firstFrame(self, request: Request) -> None:
        """
        Before authentication only an C{auth} frame is accepted.
        """
        token = request.params.get("token")
        if request.type != "auth" or not isinstance(token, str) or not token:
            self._count("auth_required")
            self.close(CLOSE_AUTH, "authenticate first")
            return

        def rejected(failure: Failure) -> None:
            if failure.check(TokenRejected):
                self._count(failure.value.reason)
                self.close(CLOSE_AUTH, failure.value.message)
            else:
                self._failed(failure, request)

        d = self.factory.verifier.verify(token)
        d.addCallbacks(self._welcome, rejected)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancelTimer()
        # Autobahn leaves its close-handshake timer running when the TCP connection
        # goes first (a second protocol error drops it at once): it would hold this
        # closed connection for closeHandshakeTimeout seconds.
        closeTimeout = getattr(self, "closeHandshakeTimeoutCall", None)
        if closeTimeout is not None:
            closeTimeout.cancel()
            self.closeHandshakeTimeoutCall = None
        factory = self.factory
        if self in factory.connections:
            factory.connections.discard(self)
            factory.live.closed(self)
            _log.info(
                "connection {connectionId} closed ({code})",
                connectionId=self.connectionId,
                # The code this side sent when it closed first, else the peer's.
                code=self.localCloseCode if self.closedByMe else code,
            )
        factory.sockets.discard(self)
        for waiter in factory.closeWaiters.pop(self, []):
            waiter.callback(None)


class _Backpressure:
    """
    The streaming producer registered on a connection's transport: it only records
    whether the transport wants writing to stop.
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: ClientProtocol) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        self._connection._paused = True

    def resumeProducing(self) -> None:
        self._connection._paused = False
        self._connection._backlog = 0

    def stopProducing(self) -> None:
        pass


class ConformanceProtocol(ClientProtocol):
    """
    Echo every message, for the Autobahn testsuite: the production factory, limits,
    timeouts and permessage-deflate acceptance, without authentication or ops.
    """

    def onConnect(self, request: ConnectionRequest) -> None:  # type: ignore[override]
        self.connectionId = uuid.uuid4().hex[:16]

    def onOpen(self) -> None:
        self.factory.sockets.add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


Handler = Callable[[ClientProtocol, Request], Any | Awaitable[Any]]


def _ping(connection: ClientProtocol, request: Request) -> dict[str, Any]:
    return {"pong": True, "serverTime": int(time.time() * 1000)}


async def _auth(connection: ClientProtocol, request: Request) -> dict[str, Any]:
    """
    Refresh: a fresh token for the same user keeps the connection open.
    """
    token = envelope.field(request, "token", str)
    try:
        identity = await connection.factory.verifier.verify(token)
    except TokenRejected as e:
        code = envelope.UNAVAILABLE if e.reason == "keys_unavailable" else envelope.UNAUTHORIZED
        raise OpError(code, e.message) from None
    connection.refresh(identity)
    return {"expiresAt": identity.expiresAt}


#: The ops of every connection; each factory adds those of its L{Live} (and later
#: features theirs) to its own table.
OPS: dict[str, Handler] = {"ping": _ping, "auth": _auth}


class MarketplaceFactory(WebSocketServerFactory):
    """
    Builds L{ClientProtocol}s with this server's limits and keeps the open ones.
    """

    protocol = ClientProtocol  # type: ignore[assignment]

    def __init__(
        self,
        verifier: Verifier,
        limits: ConnectionLimits | None = None,
        reactor: Any = None,
        live: Live | None = None,
        ops: Mapping[str, Handler] | None = None,
    ) -> None:
        # server=None: no Server header naming Autobahn and its version in the 101.
        super().__init__(server=None, reactor=reactor)
        if reactor is None:
            from twisted.internet import reactor as defaultReactor

            reactor = defaultReactor
        self.reactor = reactor
        # Autobahn's timeouts and our own, for every connection: see timers.py.
        self._batched_timer = self.timer = BucketTimer(reactor)
        self.verifier = verifier
        self.limits = limits = limits or ConnectionLimits()
        if live is None:
            # One process, no database: listings and users work, conversations do not
            # exist. The service passes a Live on its database and broker.
            live = Live(
                Hub(MemoryBroker(reactor)),
                Authoriser(noConversations, reactor),
                reactor,
                limits,
            )
        self.live = live
        live.hub.prepare = self.prepare
        self.ops: dict[str, Handler] = {**OPS, **live.ops, **(ops or {})}
        #: Connections with frames queued this turn, and whether the flush is scheduled.
        self._dirty: list[ClientProtocol] = []
        self._flushing = False
        #: What the connections count (shared with the L{Live}, read by /metrics).
        self.counters = live.counters
        #: Welcomed connections.
        self.connections: set[ClientProtocol] = set()
        #: Every open WebSocket, welcomed or still to authenticate: what shutdown closes.
        self.sockets: set[ClientProtocol] = set()
        self.closeWaiters: dict[ClientProtocol, list[Deferred[None]]] = {}
        #: Connections turned away, by reason: a token's rejection reason (see
        #: L{marketplace_ws.auth.REASONS}), C{origin}, C{subprotocol}, C{auth_timeout},
        #: C{auth_required} (a request before C{auth}) and C{too_many_connections}.
        # Autobahn's server defaults are permissive (no size limits, any Origin, a
        # status page revealing its version, no pings): every option is set here.
        # Origins are checked in the handshake with our own normalisation, so
        # Autobahn's own check is opened fully (allowNullOrigin must be passed on
        # every call: setProtocolOptions resets it).
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=limits.maxFrameSize,
            maxMessagePayloadSize=limits.maxMessageSize,
            openHandshakeTimeout=limits.openHandshakeTimeout,
            closeHandshakeTimeout=limits.closeHandshakeTimeout,
            autoPingInterval=limits.pingInterval,
            autoPingTimeout=limits.pingTimeout,
            allowedOrigins=["*"],
            allowNullOrigin=True,
            perMessageCompressionAccept=self._acceptDeflate,
            utf8validateIncoming=True,
            # Fail a broken connection with a close frame that says why (1002, 1007,
            # 1009) rather than a silent drop, so a client can tell what it did wrong.
            failByDrop=False,
        )

    def _acceptDeflate(self, offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        """
        permessage-deflate with no context takeover and a small window: per-connection
        zlib state is otherwise the largest memory item of a WebSocket server.
        """
        if not self.limits.deflate:
            return None
        bits = self.limits.deflateWindowBits
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(
                    offer,
                    request_no_context_takeover=offer.accept_no_context_takeover,
                    request_max_window_bits=bits if offer.accept_max_window_bits else 0,
                    no_context_takeover=True,
                    window_bits=min(bits, offer.request_max_window_bits or bits),
                    mem_level=self.limits.deflateMemLevel,
                    max_message_size=self.limits.maxMessageSize,
                )
        return None

    def dirty(self, connection: ClientProtocol) -> None:
        """A connection queued a frame: flush it at the end of this reactor turn."""
        self._dirty.append(connection)
        if not self._flushing:
            self._flushing = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Send every connection's frames of the turn, one send() each."""
        dirty, self._dirty = self._dirty, []
        self._flushing = False
        for connection in dirty:
            try:
                connection.flush()
            except Exception:  # noqa: BLE001 - one broken connection must not stop the rest
                _log.failure("flushing {connectionId} failed", connectionId=connection.connectionId)

    def prepare(self, frame: bytes) -> Any:
        """
        One push frame, framed once for every connection. Short frames are marked
        not to be compressed, so connections that negotiated permessage-deflate take
        the same prepared bytes (Autobahn compresses, and so frames, each compressed
        message per connection); long ones are worth compressing per connection.
        """
        return self.prepareMessage(frame, isBinary=False, doNotCompress=len(frame) < COMPRESS_FROM)

    def closeAll(
        self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> Deferred[Any]:
        """
        Close every open connection and fire once each has closed.
        """
        waits = []
        for connection in list(self.sockets):
            waiter: Deferred[None] = Deferred()
            self.closeWaiters.setdefault(connection, []).append(waiter)
            waits.append(waiter)
            connection.close(code, reason)
        return DeferredList(waits)

    def abortAll(self) -> None:
        for connection in list(self.sockets):
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
