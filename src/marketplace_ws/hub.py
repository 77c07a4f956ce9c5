"""
The hub: which local connections listen to which channels, and the one place events
reach them.

Every event arrives from the broker (L{IBroker.setDelivery}), whichever process
published it. The hub serialises its push frame once and hands the same bytes, and the
same Autobahn prepared message, to every subscriber of the channel: the cost of an
event is one C{json.dumps} however many connections receive it, and one WebSocket
framing for all those without permessage-deflate (Autobahn compresses, and so frames,
per connection where it was negotiated).

A subscription that asks for C{since} is recovering until the broker's history answers:
live events for it are held back meanwhile, then the history is replayed in order and
the held events follow, skipping any the history already held. The client sees every
C{seq} once, in order, with no gap. A subscription without C{since} does the same from
the channel's current C{seq}, so its reply tells the client exactly where it starts.

When the broker says delivery was interrupted (Redis was away: pub/sub dropped what was
published meanwhile), every live subscription recovers the same way from where it was,
and one whose missed events are no longer all in the history is sent a C{resync} frame
(C{recovered: false}, the channel's C{seq}) instead of being left with a silent gap.

Authorisation is not the hub's: the C{subscribe} op checks it first
(L{marketplace_ws.channels.Authorise}). The hub enforces the per-connection limit on
subscriptions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from marketplace_ws.broker import Event, IBroker, Published, Recovery
from marketplace_ws.channels import Channel
from marketplace_ws.envelope import CONFLICT, FORBIDDEN, UNAVAILABLE, OpError, encode

_log = Logger()


class Subscriber(Protocol):
    """
    What the hub needs of a connection (L{marketplace_ws.protocol.ClientProtocol}).
    Subscribers are told apart by identity, so they must hash by identity too.
    """

    connectionId: str

    @property
    def userId(self) -> str:
        """Whose connection it is: ephemeral events name a user to skip."""

    def deliver(self, frame: bytes, prepared: Any) -> None:
        """
        Send one push frame. C{prepared} is what the hub's C{prepare} function made of
        C{frame} (an Autobahn C{PreparedMessage}: send it with C{sendPreparedMessage}),
        or C{None} when there is none (replayed events, or no C{prepare}): send
        C{frame} as a text message.
        """


#: Makes the shareable form of a frame once per event: the protocol factory's
#: C{prepareMessage}.
Prepare = Callable[[bytes], Any]


class _Subscription:
    __slots__ = (
        "active",
        "buffer",
        "channel",
        "entry",
        "last",
        "live",
        "send",
        "start",
        "subscriber",
        "waiters",
    )

    def __init__(self, subscriber: Subscriber, entry: _Channel) -> None:
        self.subscriber = subscriber
        #: The subscriber's deliver, looked up once rather than per event.
        self.send = subscriber.deliver
        self.entry = entry
        self.channel = entry.name
        #: False once unsubscribed: a recovery finishing later must not deliver.
        self.active = True
        #: False while recovering: live events go to the buffer instead.
        self.live = False
        self.buffer: list[tuple[int, bytes]] | None = []
        #: The latest seq this subscriber has been sent (or told it is at).
        self.last = 0
        #: Every seq after this one reaches the subscriber (see Hub.subscribe).
        self.start = 0
        #: Other subscribe calls for the same channel waiting for this one to settle.
        self.waiters: list[Deferred[None]] = []

    def settle(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _Channel:
    __slots__ = ("abandoned", "failure", "name", "subscriptions", "waiters", "watched")

    def __init__(self, name: str) -> None:
        self.name = name
        self.subscriptions: dict[Subscriber, _Subscription] = {}
        #: Set once the broker delivers this channel to us; failure if it could not.
        self.watched = False
        self.failure: Failure | None = None
        #: Subscriptions waiting for the watch before they read the history.
        self.waiters: list[Deferred[None]] = []
        #: No longer the hub's entry for the channel: its last subscriber left.
        self.abandoned = False


class Hub:
    """
    Local subscriptions and fan-out. C{prepare} may be set after construction (the
    protocol factory is usually built after the hub).

    @ivar maxSubscriptions: channels one subscriber may be subscribed to at once,
        counting those still recovering.
    @ivar maxPending: live events held back for one recovering subscription. A channel
        busier than that during one history lookup fails the subscribe with
        C{unavailable} rather than grow memory; the client retries with the latest
        C{seq} it has.
    """

    def __init__(
        self,
        broker: IBroker,
        *,
        maxSubscriptions: int = 100,
        maxPending: int = 1000,
        prepare: Prepare | None = None,
    ) -> None:
        self.broker = broker
        self.maxSubscriptions = maxSubscriptions
        self.maxPending = maxPending
        self.prepare = prepare
        #: Called with each event and how many local subscribers it was written to,
        #: once it has been written to all of them (metrics).
        self.delivered: Callable[[Event, int], None] | None = None
        self._channels: dict[str, _Channel] = {}
        self._bySubscriber: dict[Subscriber, dict[str, _Subscription]] = {}
        broker.setDelivery(self.deliver)
        broker.setReconnected(self.resync)

    # Publishing and delivery

    def publish(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        """
        Publish through the broker: the event comes back to every process's hub,
        this one included, through L{deliver}.
        """
        return self.broker.publish(str(channel), event, data, idempotencyKey)

    def deliver(self, event: Event) -> None:
        """
        Send one event from the broker to every local subscriber of its channel.

        This is the fan-out's hot loop: per subscriber, two comparisons and one call
        of the connection's C{deliver}, bound once per subscription.
        """
        entry = self._channels.get(event.channel)
        if entry is None:
            return
        frame = pushFrame(event)
        prepared = None if self.prepare is None else self.prepare(frame)
        # A copy: a subscriber may be unsubscribed while we deliver (a slow consumer
        # closed by its own deliver).
        subscriptions = list(entry.subscriptions.values())
        if event.ephemeral:
            sent = self._broadcast(subscriptions, event, frame, prepared)
        else:
            seq = event.seq
            sent = 0
            gapped: list[_Subscription] = []
            for sub in subscriptions:
                if seq <= sub.last or not sub.active:
                    continue
                if not sub.live:
                    self._hold(sub, seq, frame)
                    continue
                if seq != sub.last + 1:
                    # Events between were lost on their way here (the broker's link
                    # dropped): never skip them silently.
                    gapped.append(sub)
                    continue
                sub.last = seq
                sent += 1
                try:
                    sub.send(frame, prepared)
                except Exception:  # noqa: BLE001 - one broken connection must not stop the rest
                    self._sendFailed(sub)
            if gapped:
                self._recoverLive(entry.name, gapped)
                for sub in gapped:
                    self._hold(sub, seq, frame)
        if self.delivered is not None:
            self.delivered(event, sent)

    def _broadcast(
        self, subscriptions: list[_Subscription], event: Event, frame: bytes, prepared: Any
    ) -> int:
        """Ephemeral events: outside the sequence, to live subscribers only, never held."""
        sent = 0
        exclude = event.exclude
        for sub in subscriptions:
            if not (sub.active and sub.live) or (
                exclude is not None and sub.subscriber.userId == exclude
            ):
                continue
            sent += 1
            try:
                sub.send(frame, prepared)
            except Exception:  # noqa: BLE001 - as in deliver
                self._sendFailed(sub)
        return sent

    def _sendHeld(self, sub: _Subscription) -> None:
        """
        Send the live events held back while a subscription recovered, skipping those
        the history already sent. A send may publish again (and append here) or
        unsubscribe: hence the index.
        """
        held = sub.buffer
        index = 0
        while held is not None and index < len(held) and sub.active:
            seq, frame = held[index]
            index += 1
            if seq > sub.last:
                sub.last = seq
                self._send(sub, frame, None)

    def _hold(self, sub: _Subscription, seq: int, frame: bytes) -> None:
        if sub.buffer is None:
            return
        if len(sub.buffer) >= self.maxPending:
            sub.buffer = None
            return
        sub.buffer.append((seq, frame))

    def _send(self, sub: _Subscription, frame: bytes, prepared: Any) -> None:
        try:
            sub.send(frame, prepared)
        except Exception:  # noqa: BLE001 - one broken connection must not stop the fan-out
            self._sendFailed(sub)

    def _sendFailed(self, sub: _Subscription) -> None:
        _log.failure(
            "delivering to {connectionId} on {channel} failed",
            connectionId=sub.subscriber.connectionId,
            channel=sub.channel,
        )

    # Subscriptions

    def subscribe(
        self, subscriber: Subscriber, channel: Channel, since: int | None = None
    ) -> Deferred[dict[str, Any]]:
        """
        Subscribe and answer the C{subscribe} op's result: C{{"channel", "seq",
        "recovered", "replayed"}}.

        Without C{since}, the subscriber receives every event after C{seq}, the
        channel's position when the subscription took effect; C{recovered} is C{None}.

        With C{since}, the events after it are replayed first, in order, when the
        history still holds them all (C{recovered: true}, C{replayed} of them);
        otherwise nothing is replayed, C{recovered} is C{false}, and the subscriber
        receives every event after C{seq}.

        Everything replayed or held back during the lookup is sent before the
        Deferred fires, so on the wire it precedes the op's reply; C{seq} is the
        latest event the subscriber has been sent (or the channel's position).

        Subscribing again to a channel already subscribed to answers where the
        subscription is; with a C{since} older than where it started, the events
        between are replayed then (after the live events already sent, each once).

        @raise OpError: C{forbidden} past L{maxSubscriptions}; C{conflict} when the
            subscriber unsubscribed (or disconnected) before the history answered;
            C{unavailable} when the channel outran L{maxPending} meanwhile; whatever
            the broker failed with.
        """
        return Deferred.fromCoroutine(self._subscribe(subscriber, str(channel), since))

    async def _subscribe(
        self, subscriber: Subscriber, name: str, since: int | None
    ) -> dict[str, Any]:
        mine = self._bySubscriber.get(subscriber, {})
        existing = mine.get(name)
        while existing is not None and not existing.live:
            waiter: Deferred[None] = Deferred()
            existing.waiters.append(waiter)
            await waiter
            mine = self._bySubscriber.get(subscriber, {})
            existing = mine.get(name)
        if existing is not None:
            return await self._again(existing, since)
        if len(mine) >= self.maxSubscriptions:
            raise OpError(
                FORBIDDEN,
                f"subscription limit of {self.maxSubscriptions} channels reached:"
                " unsubscribe from one first",
            )
        sub = self._add(subscriber, name)
        try:
            return await self._recover(sub, since)
        except BaseException:
            abandoned = not sub.active
            self._remove(sub)
            if abandoned:
                # Whatever else went wrong, the client gave up on this subscribe first.
                raise _abandoned(sub) from None
            raise
        finally:
            sub.settle()

    async def _recover(self, sub: _Subscription, since: int | None) -> dict[str, Any]:
        entry = sub.entry
        if entry.failure is not None:
            entry.failure.raiseException()
        if not entry.watched:
            waiter: Deferred[None] = Deferred()
            entry.waiters.append(waiter)
            await waiter
            self._check(sub)
        replay: tuple[Event, ...] = ()
        recovered: bool | None = None
        if since is None:
            top = start = await self.broker.currentSeq(sub.channel)
        else:
            recovery = await self.broker.history(sub.channel, since)
            top, recovered = recovery.seq, recovery.recovered
            start = since if recovered else top
            if recovered:
                replay = recovery.events
        self._check(sub)
        sub.start = sub.last = start
        replayed = 0
        for event in replay:
            if not sub.active:
                break
            if event.seq > sub.last:
                sub.last = event.seq
                replayed += 1
                self._send(sub, pushFrame(event), None)
        sub.last = max(sub.last, top)
        self._sendHeld(sub)
        self._check(sub)
        sub.live = True
        sub.buffer = None
        return _result(sub, recovered, replayed)

    def resync(self) -> None:
        """
        The broker may have missed events on every watched channel: bring each live
        subscription up to date from the history, holding live events meanwhile as a
        recovering subscribe does.
        """
        for entry in list(self._channels.values()):
            subs = [s for s in entry.subscriptions.values() if s.active and s.live]
            if entry.watched and subs:
                self._recoverLive(entry.name, subs)

    def _recoverLive(self, name: str, subs: list[_Subscription]) -> None:
        """
        Bring live subscriptions that may have missed events up to date from the
        history, holding live events meanwhile as a recovering subscribe does.
        """
        for sub in subs:
            sub.live = False
            sub.buffer = []
        Deferred.fromCoroutine(self._resync(name, subs))

    async def _resync(self, name: str, subs: list[_Subscription]) -> None:
        while subs:
            recovery: Recovery | None = None
            try:
                recovery = await self.broker.history(name, min(sub.last for sub in subs))
            except Exception:  # noqa: BLE001 - the subscribers are told to reload instead
                _log.failure("recovering {channel} after an interruption failed", channel=name)
            # Serialised once for all the subscribers, as live events are.
            replay = (
                [(event.seq, pushFrame(event)) for event in recovery.events]
                if recovery is not None and recovery.recovered
                else []
            )
            overrun = []
            for sub in subs:
                if not sub.active:
                    continue
                if sub.buffer is None:
                    # More live events than maxPending during the lookup: look again.
                    sub.buffer = []
                    overrun.append(sub)
                    continue
                if recovery is not None and recovery.recovered and sub.last <= recovery.seq:
                    for seq, frame in replay:
                        if seq > sub.last and sub.active:
                            sub.last = seq
                            self._send(sub, frame, None)
                else:
                    # A gap the history cannot fill (or Redis lost the channel's seq):
                    # the client reloads, and continues after seq.
                    if recovery is not None:
                        sub.last = recovery.seq
                    self._send(sub, resyncFrame(name, sub.last), None)
                self._sendHeld(sub)
                if sub.active:
                    sub.live = True
                    sub.buffer = None
                    sub.settle()
            subs = overrun

    def _check(self, sub: _Subscription) -> None:
        if not sub.active:
            raise _abandoned(sub)
        if sub.buffer is None:
            raise OpError(UNAVAILABLE, f"{sub.channel} is too busy to recover now: subscribe again")

    async def _again(self, sub: _Subscription, since: int | None) -> dict[str, Any]:
        """
        A subscribe to a channel this subscriber is already subscribed to.
        """
        if since is None or sub.start <= since <= sub.last:
            return _result(sub, None if since is None else True, 0)
        if since > sub.last:
            # Not a position this subscription has been at: the client's state is from
            # elsewhere, and only its own history request can set it right.
            return _result(sub, False, 0)
        recovery = await self.broker.history(sub.channel, since)
        if not recovery.recovered:
            return _result(sub, False, 0)
        if not sub.active:
            raise _abandoned(sub)
        replayed = 0
        # Only what came before the subscription started: everything after it has been
        # sent live. A concurrent call may have lowered start meanwhile.
        for event in recovery.events:
            if since < event.seq <= sub.start:
                replayed += 1
                self._send(sub, pushFrame(event), None)
        sub.start = min(sub.start, since)
        return _result(sub, True, replayed)

    def unsubscribe(self, subscriber: Subscriber, channel: Channel) -> bool:
        """
        Stop delivering a channel to a subscriber; C{False} if it was not subscribed.
        A subscribe still recovering fails with C{conflict}.
        """
        sub = self._bySubscriber.get(subscriber, {}).get(str(channel))
        if sub is None:
            return False
        self._remove(sub)
        return True

    def unsubscribeAll(self, subscriber: Subscriber) -> None:
        """
        Forget a subscriber (its connection closed).
        """
        for sub in list(self._bySubscriber.get(subscriber, {}).values()):
            self._remove(sub)

    def subscriptionsOf(self, subscriber: Subscriber) -> frozenset[str]:
        """The channels a subscriber is subscribed to, recovering or live."""
        return frozenset(self._bySubscriber.get(subscriber, ()))

    def channelCount(self) -> int:
        """How many channels have local subscribers."""
        return len(self._channels)

    def subscriberCount(self, channel: Channel) -> int:
        """How many local subscribers a channel has."""
        entry = self._channels.get(str(channel))
        return 0 if entry is None else len(entry.subscriptions)

    def _add(self, subscriber: Subscriber, name: str) -> _Subscription:
        entry = self._channels.get(name)
        fresh = entry is None
        if entry is None:
            entry = self._channels[name] = _Channel(name)
        sub = _Subscription(subscriber, entry)
        self._bySubscriber.setdefault(subscriber, {})[name] = sub
        entry.subscriptions[subscriber] = sub
        if fresh:
            self.broker.watch(name).addCallbacks(
                self._watched, self._watchFailed, callbackArgs=(entry,), errbackArgs=(entry,)
            )
        return sub

    def _watched(self, ignored: None, entry: _Channel) -> None:
        entry.watched = True
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if entry.abandoned:
            self._unwatch(entry)

    def _watchFailed(self, failure: Failure, entry: _Channel) -> None:
        # Each subscribe waiting fails with this (and removes itself); the next
        # subscribe watches the channel afresh.
        entry.failure = failure
        if self._channels.get(entry.name) is entry:
            del self._channels[entry.name]
        if not entry.subscriptions:
            _log.failure("watching {channel} failed", failure, channel=entry.name)
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def _remove(self, sub: _Subscription) -> None:
        if not sub.active:
            return
        sub.active = False
        sub.buffer = None
        mine = self._bySubscriber.get(sub.subscriber)
        if mine is not None and mine.get(sub.channel) is sub:
            del mine[sub.channel]
            if not mine:
                del self._bySubscriber[sub.subscriber]
        entry = sub.entry
        if entry.subscriptions.get(sub.subscriber) is sub:
            del entry.subscriptions[sub.subscriber]
            if not entry.subscriptions and self._channels.get(sub.channel) is entry:
                del self._channels[sub.channel]
                entry.abandoned = True
                # An unwatch undoes a watch that has taken effect, never one in flight
                # (a broker could apply them out of order): else _watched sends it.
                if entry.watched:
                    self._unwatch(entry)
        sub.settle()

    def _unwatch(self, entry: _Channel) -> None:
        self.broker.unwatch(entry.name).addErrback(
            lambda f: _log.failure("unwatching {channel} failed", f, channel=entry.name)
        )


def _abandoned(sub: _Subscription) -> OpError:
    return OpError(CONFLICT, f"unsubscribed from {sub.channel} while subscribing")


def _result(sub: _Subscription, recovered: bool | None, replayed: int) -> dict[str, Any]:
    return {"channel": sub.channel, "seq": sub.last, "recovered": recovered, "replayed": replayed}


def resyncFrame(channel: str, seq: int) -> bytes:
    """
    Events of the channel were lost and cannot be replayed: reload what it shows, then
    continue with the events after C{seq}.
    """
    return encode({"type": "resync", "channel": channel, "seq": seq, "recovered": False})


def pushFrame(event: Event) -> bytes:
    """The push frame of SPEC §4 for one event; an ephemeral one has C{seq: null}."""
    return encode(
        {
            "type": "event",
            "channel": event.channel,
            "event": event.event,
            "seq": None if event.ephemeral else event.seq,
            "data": event.data,
        }
    )
