"""
Channels as a connection lives with them (SPEC §4): the C{subscribe},
C{unsubscribe}, C{presence} and C{typing} ops, and what opening and closing a
connection does to subscriptions and presence.

The line an event travels is: the HTTP API, the outbox or a chat op publishes through
the L{Hub}, the broker gives it its C{seq} and hands it to the hub of every process, and
each hub sends the frame it serialised once to its subscribers. This module decides
who becomes a subscriber: the C{user:<id>} channel at C{welcome}, and any other channel
the L{Authorise} function allows.

Presence has two levels. A user is I{online} while any connection of theirs is open,
anywhere (the C{presence} op and C{GET /api/v1/presence}). A user is I{present} on a
conversation while any connection of theirs is subscribed to it: the first such
connection announces C{presence.join} to the others, the last one to go announces
C{presence.leave}, and C{subscribe} answers who is present. Both are counted by the
broker so they hold across processes. Presence and typing events are ephemeral:
C{seq: null}, never kept in the history.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from marketplace_ws import envelope
from marketplace_ws.broker import Published
from marketplace_ws.channels import Authorise, Channel, parseChannel
from marketplace_ws.envelope import BAD_REQUEST, FORBIDDEN, NOT_FOUND, OpError, Request
from marketplace_ws.hub import Hub
from marketplace_ws.limits import ConnectionLimits
from marketplace_ws.metrics import Counters

if TYPE_CHECKING:
    from marketplace_ws.protocol import ClientProtocol, Handler

_log = Logger()

#: What an event's name may be, wherever it is published from (clients switch on it).
EVENT_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

#: Users one C{presence} request may ask about.
MAX_PRESENCE_USERS = 100


def userChannel(userId: str) -> Channel:
    return Channel("user", userId)


class TooManyConnections(Exception):
    """The user has C{maxConnectionsPerUser} connections open already, anywhere."""


class Live:
    """
    The welcomed connections of one process, by user; their subscriptions, presence
    and typing.

    C{limits.typingTimeout} is how long a C{typing {active: true}} lasts unless
    repeated: the others are told C{active: false} when it runs out or the connection
    closes. C{limits.maxConnectionsPerUser} counts the user's connections on every
    process (the broker counts them).
    """

    def __init__(
        self,
        hub: Hub,
        authorise: Authorise,
        clock: IReactorTime,
        limits: ConnectionLimits | None = None,
        counters: Counters | None = None,
    ) -> None:
        self.hub = hub
        self.counters = counters or Counters()
        self.broker = hub.broker
        self.authorise = authorise
        self.clock = clock
        self.limits = limits = limits or ConnectionLimits()
        hub.maxSubscriptions = limits.maxSubscriptions
        self.typingTimeout = limits.typingTimeout
        #: This process's welcomed connections, by user.
        self.byUser: dict[str, set[ClientProtocol]] = {}
        self._typing: dict[ClientProtocol, dict[str, IDelayedCall]] = {}
        self.broker.setControl(self._control)

    @property
    def ops(self) -> dict[str, Handler]:
        """The ops this module answers, for the connection's op table."""
        return {
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "presence": self._presence,
            "typing": self._typingOp,
        }

    # A connection's life

    def opened(self, connection: ClientProtocol) -> Deferred[int]:
        """
        A connection was authenticated: subscribe it to its user's channel and count
        the user online. Answers the user channel's C{seq}, for the C{welcome}.
        """
        return Deferred.fromCoroutine(self._opened(connection))

    async def _opened(self, connection: ClientProtocol) -> int:
        userId = connection.userId
        self.byUser.setdefault(userId, set()).add(connection)
        count = await self.broker.addPresence(userId, connection.connectionId)
        if count > self.limits.maxConnectionsPerUser:
            raise TooManyConnections()
        result = await self.hub.subscribe(connection, userChannel(userId))
        return int(result["seq"])

    def closed(self, connection: ClientProtocol) -> None:
        """
        A welcomed connection closed: stop its typing, leave its conversations, and
        count it offline.
        """
        userId = connection.userId
        mine = self.byUser.get(userId)
        if mine is not None:
            mine.discard(connection)
            if not mine:
                del self.byUser[userId]
        for conversationId in list(self._typing.get(connection, ())):
            self._stopTyping(connection, conversationId)
        self._typing.pop(connection, None)
        for name in self.hub.subscriptionsOf(connection):
            channel = parseChannel(name)
            if channel.kind == "conversation":
                self._leave(connection, channel)
        self.hub.unsubscribeAll(connection)
        self.broker.removePresence(userId, connection.connectionId).addErrback(
            self._logFailure, "presence of {userId}", userId=userId
        )

    # The HTTP API's view (marketplace_ws.http.api.Backend)

    def publish(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        """
        Every publish of this process goes this way: the HTTP API, chat, the outbox. So
        the event's name is checked here, once for all of them.
        """
        if EVENT_NAME.fullmatch(event) is None:
            return fail(
                OpError(
                    BAD_REQUEST,
                    "event must be 1 to 64 characters of letters, digits and _ . : -",
                )
            )
        self.counters.published[channel.kind] += 1
        return self.hub.publish(channel, event, data, idempotencyKey)

    def online(self, userIds: Sequence[str]) -> Deferred[dict[str, bool]]:
        return self.broker.online(userIds)

    def members(self, channel: Channel) -> Deferred[list[str]]:
        return self.broker.members(str(channel))

    def disconnect(self, userId: str, reason: str) -> Deferred[int]:
        """
        Close every connection of the user, on every process, with 4003 (logout,
        ban); answers how many the user had open.
        """
        return Deferred.fromCoroutine(self._disconnect(userId, reason))

    async def _disconnect(self, userId: str, reason: str) -> int:
        count = await self.broker.connectionCount(userId)
        await self.broker.control("disconnect", {"userId": userId, "reason": reason})
        return count

    def _control(self, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "disconnect":
            for connection in list(self.byUser.get(str(data.get("userId")), ())):
                connection.disconnect(str(data.get("reason") or ""))
        else:
            _log.warn("ignoring control message of unknown kind {kind}", kind=kind)

    # Ops

    async def _subscribe(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        channel = parseChannel(request.params.get("channel"))
        since = request.params.get("since")
        if since is not None and (type(since) is not int or since < 0):
            raise OpError(BAD_REQUEST, "since must be a non-negative integer seq")
        userId = connection.userId
        if not await self.authorise(userId, channel):
            raise OpError(FORBIDDEN, _forbidden(channel))
        result = await self.hub.subscribe(connection, channel, since)
        if channel.kind == "conversation":
            if await self.broker.join(str(channel), userId, connection.connectionId):
                self._announce(channel, "presence.join", userId)
            result["present"] = await self.broker.members(str(channel))
        return result

    def _unsubscribe(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        channel = parseChannel(request.params.get("channel"))
        if not self.hub.unsubscribe(connection, channel):
            raise OpError(NOT_FOUND, f"not subscribed to {channel}")
        if channel.kind == "conversation":
            self._leave(connection, channel)
        return {"channel": str(channel)}

    async def _presence(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        userIds = request.params.get("userIds")
        if (
            not isinstance(userIds, list)
            or not all(isinstance(u, str) and 0 < len(u) <= 255 for u in userIds)
            or len(userIds) > MAX_PRESENCE_USERS
        ):
            raise OpError(
                BAD_REQUEST, f"userIds must be a list of at most {MAX_PRESENCE_USERS} user ids"
            )
        return {"online": await self.broker.online(userIds)}

    async def _typingOp(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        channel = _conversation(request.params.get("conversationId"))
        active = envelope.field(request, "active", bool)
        if not await self.authorise(connection.userId, channel):
            raise OpError(FORBIDDEN, _forbidden(channel))
        if connection.state != connection.STATE_OPEN:
            return {"active": False}
        timers = self._typing.setdefault(connection, {})
        timer = timers.pop(channel.id, None)
        if timer is not None and timer.active():
            timer.cancel()
        if active:
            if len(timers) >= self.limits.maxSubscriptions:
                raise OpError(FORBIDDEN, "typing in too many conversations at once")
            timers[channel.id] = self.clock.callLater(
                self.typingTimeout, self._stopTyping, connection, channel.id
            )
            self._typingEvent(connection, channel, True)
        elif timer is not None:
            self._typingEvent(connection, channel, False)
        if not timers:
            self._typing.pop(connection, None)
        return {"active": active}

    # Helpers

    def _stopTyping(self, connection: ClientProtocol, conversationId: str) -> None:
        timers = self._typing.get(connection, {})
        timer = timers.pop(conversationId, None)
        if timer is None:
            return
        if timer.active():
            timer.cancel()
        if not timers:
            self._typing.pop(connection, None)
        self._typingEvent(connection, Channel("conversation", conversationId), False)

    def _typingEvent(self, connection: ClientProtocol, channel: Channel, active: bool) -> None:
        data: dict[str, Any] = {
            "conversationId": channel.id,
            "userId": connection.userId,
            "active": active,
        }
        if active:
            data["expiresIn"] = self.typingTimeout
        self.broker.broadcast(str(channel), "typing", data, connection.userId).addErrback(
            self._logFailure, "typing on {channel}", channel=str(channel)
        )

    def _leave(self, connection: ClientProtocol, channel: Channel) -> None:
        userId = connection.userId

        def left(last: bool) -> None:
            if last:
                self._announce(channel, "presence.leave", userId)

        self.broker.leave(str(channel), userId, connection.connectionId).addCallback(
            left
        ).addErrback(self._logFailure, "presence on {channel}", channel=str(channel))

    def _announce(self, channel: Channel, event: str, userId: str) -> None:
        self.broker.broadcast(str(channel), event, {"userId": userId}, userId).addErrback(
            self._logFailure, "{event} on {channel}", event=event, channel=str(channel)
        )

    def _logFailure(self, failure: Failure, what: str, **fields: Any) -> None:
        _log.failure("updating " + what + " failed", failure, **fields)


def _conversation(value: Any) -> Channel:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise OpError(BAD_REQUEST, "conversationId must be a conversation's id")
    return parseChannel(f"conversation:{value}")


def _forbidden(channel: Channel) -> str:
    if channel.kind == "user":
        return f"{channel} is its own user's channel only"
    return f"not a participant of {channel}"
