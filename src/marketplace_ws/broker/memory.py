"""
The in-process broker: every L{IBroker} duty done in one process's memory, for a
deployment without Redis.

Each publish costs constant time apart from delivery, and memory stays bounded:

  - a channel's history is a deque of at most C{historySize} events, trimmed by age
    when the channel is published to or read, and dropped altogether once its newest
    event is older than C{historyAge};
  - idempotency keys are kept for C{idempotencyWindow} seconds, at most
    C{maxIdempotencyKeys} of them;
  - the C{seq} counters of at most C{maxChannels} channels that nobody watches are
    kept. The least recently published one is forgotten past that, and every channel
    created afterwards starts above the highest C{seq} ever forgotten, so a channel's
    C{seq} never goes backwards and a C{since} from before it was forgotten is answered
    C{recovered: false} rather than with another channel's events.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from marketplace_ws.broker import (
    ControlHandler,
    Delivery,
    Event,
    IBroker,
    Published,
    Reconnected,
    Recovery,
)

_log = Logger()


class _Channel:
    __slots__ = ("history", "seq", "watchers")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        #: None while the channel has nothing recent: an idle channel costs one counter.
        self.history: deque[Event] | None = None
        self.watchers = 0


@implementer(IBroker)
class MemoryBroker:
    def __init__(
        self,
        clock: IReactorTime,
        historySize: int = 100,
        historyAge: float = 300.0,
        idempotencyWindow: float = 600.0,
        maxIdempotencyKeys: int = 100_000,
        maxChannels: int = 100_000,
    ) -> None:
        if historySize < 0 or historyAge < 0 or idempotencyWindow < 0:
            raise ValueError("history size and age and the idempotency window must be >= 0")
        if maxIdempotencyKeys < 0 or maxChannels < 1:
            raise ValueError("maxIdempotencyKeys must be >= 0 and maxChannels >= 1")
        self._clock = clock
        self.historySize = historySize
        self.historyAge = historyAge
        self.idempotencyWindow = idempotencyWindow
        self.maxIdempotencyKeys = maxIdempotencyKeys
        self.maxChannels = maxChannels
        self._deliver: Delivery | None = None
        self._control: ControlHandler | None = None
        self._channels: dict[str, _Channel] = {}
        # Unwatched channels, least recently published first: the ones forgotten when
        # there are more than maxChannels.
        self._evictable: OrderedDict[str, _Channel] = OrderedDict()
        # Channels with a history, least recently published first: a history whose
        # newest event is older than historyAge is at the front, and dropped.
        self._recent: OrderedDict[str, _Channel] = OrderedDict()
        # Above every seq of a forgotten channel: where new channels start.
        self._floor = 0
        # (channel, key) -> (seq, expires); insertion order is expiry order.
        self._keys: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._presence: dict[str, set[str]] = {}
        # channel -> user -> their connections subscribed to it.
        self._members: dict[str, dict[str, set[str]]] = {}

    # Delivery

    def setDelivery(self, deliver: Delivery) -> None:
        self._deliver = deliver

    def setReconnected(self, handler: Reconnected) -> None:
        # Delivery is a function call: it is never interrupted.
        pass

    def watch(self, channel: str) -> Deferred[None]:
        state = self._channel(channel)
        state.watchers += 1
        self._evictable.pop(channel, None)
        return succeed(None)

    def unwatch(self, channel: str) -> Deferred[None]:
        state = self._channels.get(channel)
        if state is not None and state.watchers > 0:
            state.watchers -= 1
            if state.watchers == 0:
                self._evictable[channel] = state
                self._evict()
        return succeed(None)

    # Publishing

    def publish(
        self, channel: str, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        now = self._clock.seconds()
        if idempotencyKey is not None:
            self._expireKeys(now)
            seen = self._keys.get((channel, idempotencyKey))
            if seen is not None:
                return succeed(Published(channel, seen[0], duplicate=True))
        state = self._channel(channel)
        state.seq += 1
        published = Event(channel, state.seq, event, data, now)
        if self.historySize:
            if state.history is None:
                state.history = deque(maxlen=self.historySize)
            state.history.append(published)
            self._trim(state, now)
            self._recent.pop(channel, None)
            self._recent[channel] = state
        if state.watchers == 0:
            self._evictable.move_to_end(channel)
        self._dropIdleHistories(now)
        if idempotencyKey is not None and self.idempotencyWindow > 0 and self.maxIdempotencyKeys:
            self._keys[(channel, idempotencyKey)] = (state.seq, now + self.idempotencyWindow)
            if len(self._keys) > self.maxIdempotencyKeys:
                self._keys.popitem(last=False)
        self._evict()
        if self._deliver is not None:
            try:
                self._deliver(published)
            except Exception:  # noqa: BLE001 - published and kept: the publisher must not retry
                _log.failure("delivering {channel} {seq} failed", channel=channel, seq=state.seq)
        return succeed(Published(channel, state.seq))

    def broadcast(
        self, channel: str, event: str, data: Any, exclude: str | None = None
    ) -> Deferred[None]:
        if self._deliver is not None:
            ephemeral = Event(channel, 0, event, data, self._clock.seconds(), exclude)
            try:
                self._deliver(ephemeral)
            except Exception:  # noqa: BLE001 - as for publish
                _log.failure("delivering {channel} {event} failed", channel=channel, event=event)
        return succeed(None)

    # Reading

    def history(self, channel: str, since: int) -> Deferred[Recovery]:
        state = self._channels.get(channel)
        if state is None:
            return succeed(Recovery((), since == self._floor, self._floor))
        self._trim(state, self._clock.seconds())
        top = state.seq
        history = state.history
        # The history holds consecutive seqs ending at top: it covers since when since
        # is at or after the seq just before its oldest event.
        oldest = history[0].seq if history else top + 1
        if not oldest - 1 <= since <= top:
            return succeed(Recovery((), False, top))
        missed: tuple[Event, ...] = ()
        if history and since < top:
            missed = tuple(islice(history, since - oldest + 1, None))
        return succeed(Recovery(missed, True, top))

    def currentSeq(self, channel: str) -> Deferred[int]:
        state = self._channels.get(channel)
        return succeed(self._floor if state is None else state.seq)

    # Presence

    def addPresence(self, userId: str, connectionId: str) -> Deferred[int]:
        connections = self._presence.setdefault(userId, set())
        connections.add(connectionId)
        return succeed(len(connections))

    def removePresence(self, userId: str, connectionId: str) -> Deferred[int]:
        connections = self._presence.get(userId)
        if connections is None:
            return succeed(0)
        connections.discard(connectionId)
        if not connections:
            del self._presence[userId]
        return succeed(len(connections))

    def connectionCount(self, userId: str) -> Deferred[int]:
        return succeed(len(self._presence.get(userId, ())))

    def online(self, userIds: Iterable[str]) -> Deferred[dict[str, bool]]:
        return succeed({userId: userId in self._presence for userId in userIds})

    def join(self, channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        users = self._members.setdefault(channel, {})
        connections = users.setdefault(userId, set())
        first = not connections
        connections.add(connectionId)
        return succeed(first)

    def leave(self, channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        users = self._members.get(channel)
        connections = None if users is None else users.get(userId)
        if users is None or connections is None or connectionId not in connections:
            return succeed(False)
        connections.discard(connectionId)
        if connections:
            return succeed(False)
        del users[userId]
        if not users:
            del self._members[channel]
        return succeed(True)

    def members(self, channel: str) -> Deferred[list[str]]:
        return succeed(sorted(self._members.get(channel, ())))

    # Control

    def setControl(self, handler: ControlHandler) -> None:
        self._control = handler

    def control(self, kind: str, data: Mapping[str, Any]) -> Deferred[None]:
        if self._control is not None:
            self._control(kind, data)
        return succeed(None)

    # Bookkeeping

    def _channel(self, channel: str) -> _Channel:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = self._evictable[channel] = _Channel(self._floor)
        return state

    def _trim(self, state: _Channel, now: float) -> None:
        history = state.history
        if history is None:
            return
        horizon = now - self.historyAge
        while history and history[0].time < horizon:
            history.popleft()

    def _dropIdleHistories(self, now: float) -> None:
        horizon = now - self.historyAge
        while self._recent:
            channel, state = next(iter(self._recent.items()))
            if state.history and state.history[-1].time >= horizon:
                break
            state.history = None
            del self._recent[channel]

    def _evict(self) -> None:
        while len(self._channels) > self.maxChannels and self._evictable:
            channel, state = self._evictable.popitem(last=False)
            del self._channels[channel]
            self._recent.pop(channel, None)
            self._floor = max(self._floor, state.seq)

    def _expireKeys(self, now: float) -> None:
        keys = self._keys
        while keys:
            key, (_, expires) = next(iter(keys.items()))
            if expires > now:
                break
            del keys[key]
