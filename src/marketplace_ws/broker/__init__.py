"""
The broker: what carries events between the processes of one deployment (SPEC §7).

The hub of each process publishes through the broker and receives every event on the
channels it watches through the delivery function it registered. Everything that must
be consistent across processes happens behind this interface, so that the Redis
implementation can do each of them in one atomic step: allocating a channel's next
C{seq}, keeping its bounded history, remembering idempotency keys, and counting which
users are online.

L{memory.MemoryBroker} does all of it in one process; it is what runs without
C{REDIS_URL}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from zope.interface import Interface


@frozen
class Event:
    """
    One event as published on a channel: C{seq} is its place in the channel, C{time}
    when the broker accepted it (seconds, the broker's clock). Ephemeral events
    (L{IBroker.broadcast}) have C{seq} 0.
    """

    channel: str
    seq: int
    event: str
    data: Any
    time: float
    #: For ephemeral events (C{seq} 0): a user whose connections must not receive it,
    #: the one who caused it (a typing indicator goes to the others only).
    exclude: str | None = None

    @property
    def ephemeral(self) -> bool:
        """Not part of the channel's sequence: never kept, never replayed."""
        return self.seq == 0


@frozen
class Published:
    """
    The answer to a publish: the event's C{seq}; C{duplicate} when its idempotency key
    was seen within the window, in which case C{seq} is the original event's and
    nothing was published again.
    """

    channel: str
    seq: int
    duplicate: bool = False


@frozen
class Recovery:
    """
    What a channel's history holds after C{since}.

    When C{recovered}, C{events} are every event with C{since < seq <= self.seq}, in
    order. Otherwise the history no longer reaches back to C{since} (or C{since} is not
    a position this channel has been at), C{events} is empty, and C{seq} is where the
    channel is now.
    """

    events: tuple[Event, ...]
    recovered: bool
    seq: int


Delivery = Callable[[Event], None]

#: Receives control messages: C{handler(kind, data)}.
ControlHandler = Callable[[str, Mapping[str, Any]], None]

#: Told that events may have been missed: C{handler()}.
Reconnected = Callable[[], None]


class IBroker(Interface):
    """
    Sequence, history, idempotency and presence, shared by every process.
    """

    def setDelivery(deliver: Delivery) -> None:
        """
        Send every event published on a watched channel, by any process, to
        C{deliver}, once each and in C{seq} order per channel.
        """

    def watch(channel: str) -> Deferred[None]:
        """
        Start delivering this channel's events to this process. Fires once every event
        published after it fires is sure to be delivered, so that a history read after
        it leaves no gap with live delivery.

        Watches are counted: a channel is delivered while it has been watched more
        times than unwatched. (The hub unwatches only a watch that has fired, but may
        watch a channel again while an unwatch is in flight.)
        """

    def setReconnected(handler: Reconnected) -> None:
        """
        Call C{handler()} when delivery was interrupted and is sure again: events
        published meanwhile on watched channels were not delivered (Redis pub/sub does
        not keep them), and each subscriber must recover them from the history. The
        in-process broker never misses one.
        """

    def unwatch(channel: str) -> Deferred[None]:
        """
        Undo one L{watch} (the last local subscriber has gone).
        """

    def publish(
        channel: str, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        """
        Give the event the channel's next C{seq}, keep it in the channel's history and
        deliver it. With an C{idempotencyKey} already used on this channel within the
        window, do nothing and answer the original C{seq}.

        C{data} must be JSON-serialisable.
        """

    def broadcast(
        channel: str, event: str, data: Any, exclude: str | None = None
    ) -> Deferred[None]:
        """
        Deliver an ephemeral event (typing, presence changes) to every process
        watching the channel: no C{seq}, no history, no idempotency. C{exclude} names
        a user whose connections skip it.
        """

    def history(channel: str, since: int) -> Deferred[Recovery]:
        """
        The events after C{since}, if the history still holds all of them.
        """

    def currentSeq(channel: str) -> Deferred[int]:
        """
        The C{seq} of the channel's latest event (or where it starts, before any).
        """

    def addPresence(userId: str, connectionId: str) -> Deferred[int]:
        """
        A connection of this user opened: how many the user has open now, anywhere,
        this one included (1: the user just came online). Per-user connection limits
        are checked against it.
        """

    def removePresence(userId: str, connectionId: str) -> Deferred[int]:
        """
        A connection of this user closed: how many the user still has open (0: the
        user just went offline).
        """

    def connectionCount(userId: str) -> Deferred[int]:
        """
        How many connections the user has open, anywhere.
        """

    def online(userIds: Iterable[str]) -> Deferred[dict[str, bool]]:
        """
        Which of these users have at least one open connection anywhere.
        """

    def join(channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        """
        A connection of this user subscribed to the channel. C{True} when it is the
        user's first, anywhere: the moment to announce C{presence.join}.
        """

    def leave(channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        """
        A connection of this user left the channel. C{True} when it was the user's
        last, anywhere: the moment to announce C{presence.leave}.
        """

    def members(channel: str) -> Deferred[list[str]]:
        """
        The users with at least one connection subscribed to the channel, sorted.
        """

    def setControl(handler: ControlHandler) -> None:
        """
        Send every control message (L{control}), from any process, to C{handler}.
        """

    def control(kind: str, data: Mapping[str, Any]) -> Deferred[None]:
        """
        Send a control message to every process, this one included: how the HTTP API
        received by one process reaches connections held by others (C{disconnect}).
        C{data} must be JSON-serialisable.
        """


__all__ = [
    "ControlHandler",
    "Delivery",
    "Event",
    "IBroker",
    "Published",
    "Reconnected",
    "Recovery",
]
