"""
A Python client for marketplace-ws, on Autobahn: connect with a token, send requests
and get their replies by id, receive pushed frames.

L{connect} opens one connection and L{Client} speaks on it: the tests use them as a real
client over real sockets. L{ReconnectingClient} is what a long-running program wants: it
reconnects after server restarts and network drops with exponential backoff, fetches a
fresh token before every attempt and when the server says the token is expiring, and
resubscribes its channels with C{since} so that missed events are replayed. The rules it
follows are the ones a browser client should follow too: docs/client.rst.

C{python -m marketplace_ws.client URL} prints every frame it receives.
"""

from __future__ import annotations

import inspect
import itertools
import json
import random as _random
import re
import sys
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit

from attrs import define, field, frozen
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue, fail, succeed
from twisted.internet.interfaces import IConnector, IDelayedCall
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from marketplace_ws.protocol import SUBPROTOCOL

_log = Logger()


class ServerError(Exception):
    """The server answered a request with an C{error} frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Closed(Exception):
    """The connection closed before the server answered."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class ClientProtocol(WebSocketClientProtocol):
    factory: ClientFactory

    def onOpen(self) -> None:
        self.factory.connection = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.factory.received(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed(code, reason)


class ClientFactory(WebSocketClientFactory):
    protocol = ClientProtocol  # type: ignore[assignment]

    def __init__(
        self, url: str, headers: dict[str, str] | None = None, *, reactor: Any = None
    ) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL], headers=headers or {}, reactor=reactor)
        self.connection: ClientProtocol | None = None
        self.welcome: Deferred[dict[str, Any]] = Deferred()
        self.frames: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.pending: dict[str, Deferred[Any]] = {}
        #: C{(code, reason)} once the connection has closed.
        self.closedWith: tuple[int | None, str | None] | None = None
        self._closeWaiters: list[Deferred[tuple[int | None, str | None]]] = []
        #: When set, pushed frames go here instead of L{frames}: a queue nobody reads
        #: would hold every frame of a long-lived connection.
        self.onFrame: Callable[[dict[str, Any]], None] | None = None

    def received(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        requestId = frame.get("id")
        if kind == "welcome" and not self.welcome.called:
            self.welcome.callback(frame)
            return
        if requestId is not None and requestId in self.pending and kind in ("ok", "error"):
            waiter = self.pending.pop(requestId)
            if kind == "ok":
                waiter.callback(frame.get("result"))
            else:
                error = frame.get("error") or {}
                waiter.errback(ServerError(error.get("code", ""), error.get("message", "")))
            return
        if self.onFrame is not None:
            self.onFrame(frame)
        else:
            self.frames.put(frame)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.welcome.called:
            self.welcome.errback(reason)

    def whenClosed(self) -> Deferred[tuple[int | None, str | None]]:
        """
        Fires with C{(code, reason)} when the connection closes. Each call has a
        Deferred of its own: awaiting a Deferred consumes its result, and every
        caller should see the close code.
        """
        if self.closedWith is not None:
            return succeed(self.closedWith)
        waiter: Deferred[tuple[int | None, str | None]] = Deferred()
        self._closeWaiters.append(waiter)
        return waiter

    def closed(self, code: int | None, reason: str | None) -> None:
        if self.closedWith is not None:
            return
        self.closedWith = (code, reason)
        if not self.welcome.called:
            self.welcome.errback(Closed(code, reason))
        # Taken first: a waiter's callbacks may send the next request.
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            waiter.errback(Closed(code, reason))
        waiters, self._closeWaiters = self._closeWaiters, []
        for closeWaiter in waiters:
            closeWaiter.callback((code, reason))


class Client:
    """
    One open, welcomed connection.
    """

    def __init__(self, factory: ClientFactory, welcome: dict[str, Any]) -> None:
        self._factory = factory
        self.welcome = welcome
        self._ids = itertools.count(1)

    @property
    def frames(self) -> DeferredQueue[dict[str, Any]]:
        """Frames that are not replies: events and server notices, in order."""
        return self._factory.frames

    @property
    def closed(self) -> Deferred[tuple[int | None, str | None]]:
        """Fires with C{(code, reason)} when the connection closes (a new Deferred each time)."""
        return self._factory.whenClosed()

    def sendRaw(self, payload: bytes, isBinary: bool = False) -> None:
        assert self._factory.connection is not None
        self._factory.connection.sendMessage(payload, isBinary=isBinary)

    def request(self, kind: str, **params: Any) -> Deferred[Any]:
        """
        Send a request; the Deferred fires with its result or fails with ServerError,
        or with L{Closed} if the connection closes first (or has closed already).
        """
        connection = self._factory.connection
        if connection is None or connection.state != connection.STATE_OPEN:
            code, reason = self._factory.closedWith or (None, "the connection is closing")
            return fail(Closed(code, reason))
        requestId = str(next(self._ids))
        waiter: Deferred[Any] = Deferred()
        self._factory.pending[requestId] = waiter
        self.sendRaw(json.dumps({"id": requestId, "type": kind, **params}).encode())
        return waiter

    def close(self, code: int = 1000) -> Deferred[tuple[int | None, str | None]]:
        if self._factory.connection is not None:
            self._factory.connection.sendClose(code)
        return self.closed


async def connect(
    url: str, token: str | None = None, *, headers: dict[str, str] | None = None
) -> Client:
    """
    Connect and wait for the C{welcome} frame.

    @param token: sent as C{Authorization: Bearer}; leave it out when C{url} carries
        C{?token=}.
    @raise Closed: when the server refuses or closes the connection first.
    """
    allHeaders = dict(headers or {})
    if token is not None:
        allHeaders["Authorization"] = f"Bearer {token}"
    factory = ClientFactory(url, allHeaders)
    connectWS(factory)
    welcome = await factory.welcome
    return Client(factory, welcome)


# Reconnecting ----------------------------------------------------------------------


class Action(Enum):
    """
    What a close asks of the client (docs/client.rst has the table of close codes).
    """

    #: Do not reconnect: the app disconnected this user (4003), or we closed.
    STOP = "stop"
    #: The token was refused or expired (4001, HTTP 401): fetch a fresh one and
    #: reconnect at once, but only once in a row; after that, back off.
    REAUTH = "reauth"
    #: The server went away or the network dropped (1001, 1006, 1011, 4008, anything
    #: unknown): reconnect with backoff.
    RETRY = "retry"
    #: Too many connections or sustained rate-limit abuse (4029): reconnect after
    #: L{Backoff.limited} seconds plus backoff, so the limit has time to clear.
    LIMITED = "limited"
    #: The client sent something it must not (1002, 1003, 1007, 1008, 1009, 4000, an
    #: HTTP 4xx refusal of the handshake): reconnect with backoff, and report it,
    #: because it is a bug to fix, not weather to wait out.
    FAULT = "fault"


CLOSE_CODE_ACTIONS: dict[int, Action] = {
    1002: Action.FAULT,
    1003: Action.FAULT,
    1007: Action.FAULT,
    1008: Action.FAULT,
    1009: Action.FAULT,
    4000: Action.FAULT,
    4001: Action.REAUTH,
    4003: Action.STOP,
    4029: Action.LIMITED,
}

# Autobahn reports a refused handshake as an unclean close whose reason holds the
# HTTP status: 'connection was closed uncleanly ("WebSocket connection upgrade
# failed [401]: Unauthorized")'.
_UPGRADE_FAILED = re.compile(r"upgrade failed \[(\d{3})\]")


def handshakeStatus(reason: str | None) -> int | None:
    """
    The HTTP status of a refused opening handshake, from Autobahn's close reason;
    C{None} when the handshake was not refused with a status.
    """
    found = _UPGRADE_FAILED.search(reason or "")
    return int(found.group(1)) if found else None


def closeAction(code: int | None, reason: str | None = None) -> Action:
    """
    What a close the client did not ask for means: see L{Action}. C{code} is C{None}
    when no WebSocket connection was made (refused TCP connection, DNS failure).
    """
    action = CLOSE_CODE_ACTIONS.get(code) if code is not None else None
    if action is not None:
        return action
    status = handshakeStatus(reason)
    if status == 401:
        return Action.REAUTH
    if status == 429:
        return Action.LIMITED
    if status is not None and 400 <= status < 500:
        # 400 (subprotocol), 403 (Origin): trying again unchanged will not help.
        return Action.FAULT
    return Action.RETRY


def _atLeast(minimum: float, strictly: bool = False) -> Callable[[Any, Any, float], None]:
    def check(instance: Any, attribute: Any, value: float) -> None:
        if value < minimum or (strictly and value == minimum):
            bound = "greater than" if strictly else "at least"
            raise ValueError(f"Backoff.{attribute.name} is {value!r}: it must be {bound} {minimum}")

    return check


@frozen
class Backoff:
    """
    Exponential backoff with full jitter: attempt M{n} (0 for the first retry after
    a connection that stayed up) waits a uniformly random time in
    M{[0, min(cap, base * factor ** n))}.

    Jitter is the point: after a deploy every client of a process is dropped at
    the same moment, and without it they would all come back at the same moments
    too. Full jitter spreads them over the whole window (see "Exponential Backoff
    and Jitter", AWS Architecture Blog, 2015).

    @ivar limited: for L{Action.LIMITED} (4029), added to the jittered delay, so a
        client turned away for having too many connections does not knock again
        within the second.
    """

    base: float = field(default=0.5, validator=_atLeast(0.0, strictly=True))
    factor: float = field(default=2.0, validator=_atLeast(1.0))
    cap: float = field(default=30.0, validator=_atLeast(0.0, strictly=True))
    limited: float = field(default=5.0, validator=_atLeast(0.0))

    def __attrs_post_init__(self) -> None:
        if self.cap < self.base:
            raise ValueError(
                f"Backoff.cap ({self.cap!r}) is below Backoff.base ({self.base!r}):"
                " raise cap or lower base"
            )

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry C{attempt}."""
        try:
            return float(min(self.cap, self.base * self.factor**attempt))
        except OverflowError:
            return self.cap

    def delay(self, attempt: int, random: Callable[[], float]) -> float:
        """
        The wait before retry C{attempt}; C{random} returns a float in M{[0, 1)}.
        """
        return random() * self.ceiling(attempt)

    def after(self, action: Action, attempt: int, random: Callable[[], float]) -> float:
        """The wait before retry C{attempt} after a close that asks for C{action}."""
        wait = self.delay(attempt, random)
        if action is Action.LIMITED:
            wait += self.limited
        return wait


#: Where a L{ReconnectingClient} is: C{connecting} (fetching a token, connecting,
#: waiting for the welcome), C{open} (welcomed), C{waiting} (disconnected; the next
#: attempt is C{delay} seconds away) and C{closed} (stopped for good).
Phase: TypeAlias = Literal["connecting", "open", "waiting", "closed"]


@frozen
class State:
    """
    What L{ReconnectingClient.onState} is told at each change, enough to show
    "reconnecting in 4 s…" or "you were signed out".

    @ivar attempt: retries since the last connection that stayed up (the backoff
        exponent).
    @ivar code: the close code that led here (C{None} when no WebSocket connection
        was made, and on the first attempt).
    @ivar action: what L{closeAction} made of that close.
    @ivar delay: in C{waiting}, the seconds until the next attempt.
    """

    phase: Phase
    attempt: int = 0
    code: int | None = None
    reason: str | None = None
    action: Action | None = None
    delay: float | None = None


#: Returns a token, or an awaitable of one (a Deferred or a coroutine): called before
#: every connection attempt and when the server says the token is expiring.
TokenProvider: TypeAlias = Callable[[], Awaitable[str] | str]

#: Error codes after which a resubscription is tried again on the same connection.
_TRANSIENT = frozenset({"unavailable", "rate_limited", "internal"})


def _sequenced(frame: dict[str, Any]) -> int | None:
    """
    The C{seq} of an event frame, or C{None} for events outside the channel's
    sequence (ephemeral ones such as typing carry C{null}), which recovery ignores.
    """
    seq = frame.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return seq
    return None


def _seqOf(frame: dict[str, Any]) -> int:
    return _sequenced(frame) or 0


@define
class _Pending:
    """A subscribe waiting for its reply, and the channel's events meanwhile."""

    since: int | None
    remember: bool
    buffer: list[dict[str, Any]] = field(factory=list)
    waiters: list[Deferred[dict[str, Any]]] = field(factory=list)

    def join(self) -> Deferred[dict[str, Any]]:
        waiter: Deferred[dict[str, Any]] = Deferred()
        self.waiters.append(waiter)
        return waiter

    def settle(self, outcome: dict[str, Any] | Failure) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)


class ReconnectingClient:
    """
    A client that stays connected: it reconnects with L{Backoff} after every close
    that L{closeAction} says to retry, with a token from C{getToken} each time, and
    restores its subscriptions with C{since} so no event is missed or repeated.

    Requests made while there is no open connection fail at once with L{Closed}:
    a request queued across a reconnect could run minutes late, or twice, and only
    the application knows whether it still should. Watch L{onState} and retry when
    the phase is C{open} again.

    Pushed frames (events, C{token.expiring}, other notices) go to C{onFrame} if it is
    given, else to the L{frames} queue, in order. Events of a channel being
    (re)subscribed are held until the subscription's reply, then passed on in
    C{seq} order, once each.

    @param getToken: see L{TokenProvider}. Sent as C{Authorization: Bearer}.
    @param backoff: the delays between attempts.
    @param stableAfter: seconds a welcomed connection must stay up before the
        backoff starts again from the first delay; a server that welcomes and then
        drops at once still meets a growing delay.
    @param onState: told of every L{State} change.
    @param onRecoveryFailed: called with a channel whose missed events could not be
        replayed (the gap is older than the server's history): page its history
        with the C{history} op. Events after the gap follow it.
    @param onSubscriptionLost: called with a channel and the L{ServerError} when
        resubscribing is refused for good (C{forbidden}: the user left the
        conversation; C{not_found}): the channel is forgotten.
    @param ping: WebSocket ping interval and timeout in seconds, or C{None}: a
        connection whose network went silent is noticed, not trusted forever.
    @param reactor: connects (C{IReactorTCP}, C{IReactorSSL}) and times
        (C{IReactorTime}); a C{MemoryReactorClock} in tests.
    @param random: returns a float in M{[0, 1)} for the jitter.
    """

    def __init__(
        self,
        url: str,
        getToken: TokenProvider,
        *,
        backoff: Backoff | None = None,
        stableAfter: float = 10.0,
        onState: Callable[[State], None] | None = None,
        onFrame: Callable[[dict[str, Any]], None] | None = None,
        onRecoveryFailed: Callable[[str], None] | None = None,
        onSubscriptionLost: Callable[[str, ServerError], None] | None = None,
        headers: dict[str, str] | None = None,
        ping: tuple[float, float] | None = (30.0, 10.0),
        reactor: Any = None,
        random: Callable[[], float] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as defaultReactor

            reactor = defaultReactor
        self.url = url
        self.getToken = getToken
        self.backoff = backoff or Backoff()
        self.stableAfter = stableAfter
        self.onState = onState
        self.onFrame = onFrame
        self.onRecoveryFailed = onRecoveryFailed
        self.onSubscriptionLost = onSubscriptionLost
        self.headers = dict(headers or {})
        self.ping = ping
        self.reactor = reactor
        self.random = random or _random.random
        self.state = State("closed")
        #: The latest welcome frame (kept after the connection closes).
        self.welcome: dict[str, Any] | None = None
        self.frames: DeferredQueue[dict[str, Any]] = DeferredQueue()

        self._client: Client | None = None
        self._factory: ClientFactory | None = None
        self._connector: IConnector | None = None
        self._waiting: Deferred[Any] | None = None
        self._running: Deferred[None] | None = None
        self._stopping = False
        self._stopWaiters: list[Deferred[State]] = []
        self._openWaiters: list[Deferred[dict[str, Any]]] = []
        self._lastClose: tuple[int | None, str | None] = (None, "not connected yet")

        self._failures = 0
        self._reauthUsed = False
        self._stableCall: IDelayedCall | None = None

        self._channels: set[str] = set()
        self._userChannel: str | None = None
        self._lastSeq: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._retries: dict[str, int] = {}
        self._retryCalls: dict[str, IDelayedCall] = {}

    # The application's side

    def start(self) -> None:
        """Start connecting (at once); again does nothing."""
        if self._running is None:
            self._running = Deferred.fromCoroutine(self._run())

    def close(self) -> Deferred[State]:
        """
        Stop for good: close the connection with 1000, or abandon the attempt or the
        wait in progress. Fires with the final state.
        """
        self._stopping = True
        factory = self._factory
        if factory is not None and factory.connection is not None:
            factory.connection.sendClose(1000)
        elif self._connector is not None:
            self._connector.disconnect()
        if self._waiting is not None:
            self._waiting.cancel()
        if self._running is None:
            self._setState(State("closed", code=1000, action=Action.STOP))
            self._stopped()
        return self.whenStopped()

    def whenStopped(self) -> Deferred[State]:
        """Fires with the final L{State} once the client has stopped (a new Deferred each time)."""
        if self._stopping and self.state.phase == "closed":
            return succeed(self.state)
        waiter: Deferred[State] = Deferred()
        self._stopWaiters.append(waiter)
        return waiter

    def whenOpen(self) -> Deferred[dict[str, Any]]:
        """
        Fires with the welcome of the open connection, or of the next one; fails with
        L{Closed} if the client stops first.
        """
        if self._client is not None and self.welcome is not None:
            return succeed(self.welcome)
        if self._stopping and self.state.phase == "closed":
            return fail(Closed(*self._lastClose))
        waiter: Deferred[dict[str, Any]] = Deferred()
        self._openWaiters.append(waiter)
        return waiter

    @property
    def channels(self) -> frozenset[str]:
        """The channels this client resubscribes to after every reconnect."""
        return frozenset(self._channels)

    def lastSeq(self, channel: str) -> int | None:
        """The C{seq} of the latest event passed on for C{channel}, if any."""
        return self._lastSeq.get(channel)

    def request(self, kind: str, **params: Any) -> Deferred[Any]:
        """
        Send a request on the open connection: see L{Client.request}. Fails with
        L{Closed} at once while disconnected.
        """
        client = self._client
        if client is None:
            return fail(Closed(*self._lastClose))
        return client.request(kind, **params)

    def subscribe(self, channel: str) -> Deferred[dict[str, Any]]:
        """
        Subscribe to C{channel} and keep it subscribed across reconnects, recovering
        missed events with C{since}. Fires with the server's result (C{channel},
        C{seq}, C{recovered}, C{replayed}); fails with L{ServerError} (the channel is
        then not remembered) or, while disconnected, with L{Closed}.
        """
        client = self._client
        if client is None:
            return fail(Closed(*self._lastClose))
        return self._subscribe(client, channel, remember=True)

    def unsubscribe(self, channel: str) -> Deferred[Any]:
        """
        Forget C{channel}: no more resubscribing, and its events stop once the server
        has the request. While disconnected there is nothing to tell the server: it
        fires with C{None}.
        """
        self._channels.discard(channel)
        self._lastSeq.pop(channel, None)
        self._cancelRetry(channel)
        pending = self._pending.get(channel)
        if pending is not None:
            pending.remember = False
        if self._client is None:
            return succeed(None)
        return self._client.request("unsubscribe", channel=channel)

    # The connection loop

    async def _run(self) -> None:
        final = State("closed", code=1000, action=Action.STOP)
        try:
            while not self._stopping:
                code, reason = await self._attempt()
                self._lastClose = (code, reason)
                if self._stopping:
                    break
                action = closeAction(code, reason)
                self._report(code, reason, action)
                if action is Action.STOP:
                    final = State("closed", self._failures, code, reason, action)
                    break
                delay = self._delayFor(action)
                self._setState(State("waiting", self._failures, code, reason, action, delay))
                if delay > 0:
                    await self._wait(deferLater(self.reactor, delay))
        except CancelledError:
            pass  # close() ended the wait
        except Exception:  # noqa: BLE001 - a bug here must not silently end reconnecting
            _log.failure("marketplace-ws client: the reconnect loop failed")
            final = State("closed", self._failures, None, "client error", Action.STOP)
        self._stopping = True
        self._setState(final)
        self._stopped()

    async def _attempt(self) -> tuple[int | None, str | None]:
        """
        One connection, from token to close: C{(code, reason)} of how it ended.
        """
        code, reason = self._lastClose if self.state.phase == "waiting" else (None, None)
        self._setState(State("connecting", self._failures, code, reason, self.state.action))
        try:
            token = await self._wait(self._token())
        except CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - getToken is the application's code
            _log.warn("marketplace-ws client: getToken failed: {error}", error=repr(e))
            return None, f"getToken failed: {e!r}"
        if self._stopping:
            return 1000, "closed by the client"
        factory = ClientFactory(
            self.url, {**self.headers, "Authorization": f"Bearer {token}"}, reactor=self.reactor
        )
        factory.onFrame = self._pushed
        if self.ping is not None:
            factory.setProtocolOptions(autoPingInterval=self.ping[0], autoPingTimeout=self.ping[1])
        self._factory = factory
        try:
            self._connector = self._dial(factory)
            welcome = await factory.welcome
        except Closed as e:
            self._factory = None
            return e.code, e.reason
        except Exception as e:  # noqa: BLE001 - any failure to connect is retried
            self._factory = None
            return None, str(e)
        finally:
            self._connector = None
        self._opened(factory, welcome)
        code, reason = await factory.whenClosed()
        self._lost()
        return code, reason

    def _dial(self, factory: ClientFactory) -> IConnector:
        tls = None
        if factory.isSecure:
            # Autobahn's default for wss is a context that checks no certificate.
            tls = optionsForClientTLS(str(factory.host))
        connector: IConnector = connectWS(factory, tls)
        return connector

    def _token(self) -> Deferred[str]:
        async def fetch() -> str:
            token = self.getToken()
            if inspect.isawaitable(token):
                token = await token
            if not isinstance(token, str) or not token:
                raise ValueError(f"getToken returned {type(token).__name__}, not a token")
            return token

        return Deferred.fromCoroutine(fetch())

    async def _wait(self, waiting: Deferred[Any]) -> Any:
        """Await C{waiting} where L{close} can cancel it."""
        self._waiting = waiting
        try:
            return await waiting
        finally:
            self._waiting = None

    def _delayFor(self, action: Action) -> float:
        if action is Action.REAUTH and not self._reauthUsed:
            # An expired token is routine: the fresh one should work at once. A
            # second refusal in a row means the fresh one is bad too: back off.
            self._reauthUsed = True
            return 0.0
        delay = self.backoff.after(action, self._failures, self.random)
        self._failures += 1
        return delay

    def _report(self, code: int | None, reason: str | None, action: Action) -> None:
        if action is Action.STOP:
            _log.warn(
                "marketplace-ws client: disconnected by the server ({code}: {reason});"
                " not reconnecting",
                code=code,
                reason=reason,
            )
        elif action is Action.FAULT:
            _log.error(
                "marketplace-ws client: the server closed with {code} ({reason}): this"
                " client sent something it must not; see docs/protocol.rst",
                code=code,
                reason=reason,
            )
        else:
            _log.info(
                "marketplace-ws client: closed with {code} ({reason}); reconnecting",
                code=code,
                reason=reason,
            )

    def _opened(self, factory: ClientFactory, welcome: dict[str, Any]) -> None:
        client = self._client = Client(factory, welcome)
        self.welcome = welcome
        userChannel = f"user:{welcome.get('userId')}"
        if self._userChannel is not None and self._userChannel != userChannel:
            # A token for another user: the old user's position means nothing now.
            self._lastSeq.pop(self._userChannel, None)
        self._userChannel = userChannel
        # The server subscribed the user's channel before the welcome, from userSeq
        # on. Events before that are replayed only when asked for with since, and
        # only the client knows where it stopped.
        userSeq = welcome.get("userSeq")
        last = self._lastSeq.get(userChannel)
        resubscribe = sorted(self._channels - {userChannel})
        if isinstance(userSeq, int) and last in (None, userSeq):
            self._lastSeq[userChannel] = userSeq
        elif last is not None:
            resubscribe.insert(0, userChannel)
        for channel in resubscribe:
            self._subscribe(client, channel, remember=False).addErrback(lambda f: None)
        self._stableCall = self.reactor.callLater(self.stableAfter, self._stable)
        self._setState(State("open", self._failures))
        waiters, self._openWaiters = self._openWaiters, []
        for waiter in waiters:
            waiter.callback(welcome)

    def _stable(self) -> None:
        self._stableCall = None
        self._failures = 0
        self._reauthUsed = False

    def _lost(self) -> None:
        self._client = None
        self._factory = None
        if self._stableCall is not None and self._stableCall.active():
            self._stableCall.cancel()
        self._stableCall = None
        for channel in list(self._retryCalls):
            self._cancelRetry(channel)

    def _setState(self, state: State) -> None:
        self.state = state
        if self.onState is not None:
            self._callApp(self.onState, state)

    def _stopped(self) -> None:
        waiters, self._stopWaiters = self._stopWaiters, []
        for waiter in waiters:
            waiter.callback(self.state)
        openWaiters, self._openWaiters = self._openWaiters, []
        for openWaiter in openWaiters:
            openWaiter.errback(Closed(*self._lastClose))

    def _callApp(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # noqa: BLE001 - the application's bug must not stop the client
            _log.failure("marketplace-ws client: callback {callback!r} failed", callback=callback)

    def _deliver(self, frame: dict[str, Any]) -> None:
        if self.onFrame is not None:
            self._callApp(self.onFrame, frame)
        else:
            self.frames.put(frame)

    # Frames and subscriptions

    def _pushed(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "token.expiring" and self._client is not None:
            Deferred.fromCoroutine(self._refresh(self._client))
        channel = frame.get("channel")
        if kind == "resync" and isinstance(channel, str):
            # The server lost events it could not replay (its Redis restarted): what
            # follows continues from its seq; the application reloads what it shows.
            seq = frame.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool):
                self._lastSeq[channel] = seq
            self._recoveryFailed(channel)
            self._deliver(frame)
            return
        seq = _sequenced(frame) if kind == "event" else None
        if seq is not None and isinstance(channel, str):
            pending = self._pending.get(channel)
            if pending is not None:
                pending.buffer.append(frame)
                return
            if channel in self._channels or channel == self._userChannel:
                self._lastSeq[channel] = seq
        self._deliver(frame)

    async def _refresh(self, client: Client) -> None:
        """
        Answer C{token.expiring} with C{auth}: the connection lives on. If it fails,
        the server closes with 4001 at expiry and the reconnect fetches a token then.
        """
        try:
            token = await self._token()
            await client.request("auth", token=token)
        except Closed:
            pass
        except Exception as e:  # noqa: BLE001 - reported; the 4001 path recovers
            _log.warn("marketplace-ws client: token refresh failed: {error}", error=repr(e))

    def _subscribe(
        self, client: Client, channel: str, *, remember: bool
    ) -> Deferred[dict[str, Any]]:
        pending = self._pending.get(channel)
        if pending is None:
            since = self._lastSeq.get(channel)
            pending = self._pending[channel] = _Pending(since, remember)
            params: dict[str, Any] = {"channel": channel}
            if since is not None:
                params["since"] = since
            client.request("subscribe", **params).addBoth(self._answered, client, channel, pending)
        pending.remember = pending.remember or remember
        return pending.join()

    def _answered(
        self, outcome: dict[str, Any] | Failure, client: Client, channel: str, pending: _Pending
    ) -> None:
        if self._pending.get(channel) is pending:
            del self._pending[channel]
        if isinstance(outcome, Failure):
            if outcome.check(ServerError):
                self._refused(client, channel, pending, outcome.value)
            # Closed: the buffered events are dropped and lastSeq stays at since, so
            # the next connection's subscribe replays them.
        else:
            self._recovered(channel, pending, outcome if isinstance(outcome, dict) else {})
        pending.settle(outcome)

    def _recovered(self, channel: str, pending: _Pending, result: dict[str, Any]) -> None:
        events = self._ordered(pending.buffer)
        recovered = result.get("recovered")
        since = pending.since
        if since is not None and recovered is True:
            events = [frame for frame in events if _seqOf(frame) > since]
        seq = result.get("seq")
        top = max([seq if isinstance(seq, int) else 0, *map(_seqOf, events)])
        if pending.remember:
            self._channels.add(channel)
        self._retries.pop(channel, None)
        if channel not in self._channels and channel != self._userChannel:
            return  # unsubscribed while this was on its way
        if top > 0:
            self._lastSeq[channel] = top
        if since is not None and recovered is False:
            # Before the events after the gap, so an app that pages history first
            # sees them in their place.
            self._recoveryFailed(channel)
        for frame in events:
            self._deliver(frame)

    def _refused(self, client: Client, channel: str, pending: _Pending, error: ServerError) -> None:
        if channel == self._userChannel:
            # The server's own subscription of the user's channel is live whatever
            # this answer was: pass on what came, say a gap may remain, and carry on
            # from where the live subscription is.
            events = self._ordered(pending.buffer)
            userSeq = client.welcome.get("userSeq")
            top = max([userSeq if isinstance(userSeq, int) else 0, *map(_seqOf, events)])
            if top > 0:
                self._lastSeq[channel] = top
            if pending.since is not None:
                self._recoveryFailed(channel)
            for frame in events:
                self._deliver(frame)
            return
        if channel not in self._channels:
            return  # a first subscribe: its caller hears the error
        if error.code in _TRANSIENT and client is self._client:
            tries = self._retries.get(channel, 0)
            self._retries[channel] = tries + 1
            delay = self.backoff.delay(tries, self.random)
            self._retryCalls[channel] = self.reactor.callLater(delay, self._retry, client, channel)
            return
        _log.warn(
            "marketplace-ws client: resubscribing {channel} refused ({code}: {message});"
            " forgetting it",
            channel=channel,
            code=error.code,
            message=error.message,
        )
        self._channels.discard(channel)
        self._lastSeq.pop(channel, None)
        self._retries.pop(channel, None)
        if self.onSubscriptionLost is not None:
            self._callApp(self.onSubscriptionLost, channel, error)

    def _retry(self, client: Client, channel: str) -> None:
        self._retryCalls.pop(channel, None)
        if client is self._client and channel in self._channels:
            self._subscribe(client, channel, remember=False).addErrback(lambda f: None)

    def _cancelRetry(self, channel: str) -> None:
        call = self._retryCalls.pop(channel, None)
        if call is not None and call.active():
            call.cancel()

    def _recoveryFailed(self, channel: str) -> None:
        _log.info(
            "marketplace-ws client: {channel} could not be recovered; the application"
            " pages its history",
            channel=channel,
        )
        if self.onRecoveryFailed is not None:
            self._callApp(self.onRecoveryFailed, channel)

    @staticmethod
    def _ordered(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """C{seq} order, each C{seq} once."""
        bySeq: dict[int, dict[str, Any]] = {}
        for frame in frames:
            bySeq.setdefault(_seqOf(frame), frame)
        return [bySeq[seq] for seq in sorted(bySeq)]


def main() -> None:
    from twisted.internet.task import react

    if len(sys.argv) != 2 or urlsplit(sys.argv[1]).scheme not in ("ws", "wss"):
        sys.exit("usage: python -m marketplace_ws.client ws://host:port/?token=TOKEN")

    async def run(reactor: Any) -> None:
        client = await connect(sys.argv[1])
        print(json.dumps(client.welcome), flush=True)
        client._factory.onFrame = lambda frame: print(json.dumps(frame), flush=True)
        await client.closed

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
