"""
The hub: fan-out of one serialised frame, subscriptions and their limit, recovery with
C{since} (in order, no gap, no duplicate, even while events keep coming during the
history lookup), channel names, and the authorisation hook.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from marketplace_ws import hub as hubModule
from marketplace_ws.broker import (
    ControlHandler,
    Delivery,
    Event,
    IBroker,
    Published,
    Reconnected,
    Recovery,
)
from marketplace_ws.broker.memory import MemoryBroker
from marketplace_ws.channels import Authoriser, Channel, parseChannel
from marketplace_ws.envelope import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    NOT_FOUND,
    UNAVAILABLE,
    OpError,
)
from marketplace_ws.hub import Hub

from . import strategies  # noqa: F401 - the hypothesis profile

LISTING = Channel("listing", "1")
OTHER = Channel("listing", "2")

T = TypeVar("T")


class Recorder:
    """A subscriber that keeps what it is sent."""

    def __init__(self, connectionId: str = "c1", userId: str = "u1") -> None:
        self.connectionId = connectionId
        self.userId = userId
        self.sent: list[tuple[bytes, Any]] = []

    def deliver(self, frame: bytes, prepared: Any) -> None:
        self.sent.append((frame, prepared))

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(frame) for frame, _ in self.sent]

    def seqs(self, channel: Channel = LISTING) -> list[int]:
        return [f["seq"] for f in self.frames() if f["channel"] == str(channel)]


def now(d: Deferred[T]) -> T:
    """The result of a Deferred that has one (the in-memory broker's)."""
    results: list[T] = []
    d.addCallback(results.append)
    return results[0]


class Pending:
    """A broker answer the test computes and fires when it chooses."""

    def __init__(self, kind: str, channel: str, compute: Callable[[], Any]) -> None:
        self.kind = kind
        self.channel = channel
        self._compute = compute
        self.deferred: Deferred[Any] = Deferred()
        self.answered = False
        self.answer: Any = None

    def snapshot(self) -> None:
        """Read the broker's state now: the answer is what it was at this moment."""
        if not self.answered:
            self.answer = self._compute()
            self.answered = True

    def fire(self) -> None:
        self.snapshot()
        self.deferred.callback(self.answer)

    def fail(self, exception: Exception) -> None:
        self.deferred.errback(Failure(exception))


@implementer(IBroker)
class ControlledBroker:
    """
    A L{MemoryBroker} whose C{watch}, C{currentSeq} and C{history} answer when the test
    says, as a remote broker would. Like Redis pub/sub, events reach the hub only on
    channels whose watch has taken effect (its snapshot).
    """

    def __init__(self, inner: MemoryBroker) -> None:
        self.inner = inner
        self.pending: list[Pending] = []
        self.watching: Counter[str] = Counter()
        self.watchCalls: list[str] = []
        #: Every answer given: ("history", channel, since, Recovery) or
        #: ("currentSeq", channel, None, seq).
        self.answers: list[tuple[str, str, int | None, Any]] = []
        self._deliver: Delivery | None = None
        self.reconnected: Reconnected | None = None
        inner.setDelivery(self._filter)

    def _filter(self, event: Event) -> None:
        if self.watching[event.channel] > 0 and self._deliver is not None:
            self._deliver(event)

    def _later(self, kind: str, channel: str, compute: Callable[[], Any]) -> Deferred[Any]:
        pending = Pending(kind, channel, compute)
        self.pending.append(pending)
        return pending.deferred

    def take(self, kind: str | None = None) -> Pending:
        for pending in self.pending:
            if kind is None or pending.kind == kind:
                self.pending.remove(pending)
                return pending
        raise AssertionError(f"nothing pending of kind {kind}")

    def fireAll(self) -> None:
        while self.pending:
            self.pending.pop(0).fire()

    def setDelivery(self, deliver: Delivery) -> None:
        self._deliver = deliver

    def setReconnected(self, handler: Reconnected) -> None:
        self.reconnected = handler

    def interrupt(self, channel: Channel = LISTING) -> Callable[[], None]:
        """
        Drop the channel's events from now on, as pub/sub does while the connection to
        Redis is lost; the function returned resubscribes and says so.
        """
        self.watching[str(channel)] -= 1

        def reconnect() -> None:
            self.watching[str(channel)] += 1
            assert self.reconnected is not None
            self.reconnected()

        return reconnect

    def watch(self, channel: str) -> Deferred[None]:
        self.watchCalls.append(channel)

        def watched() -> None:
            self.watching[channel] += 1

        return self._later("watch", channel, watched)

    def unwatch(self, channel: str) -> Deferred[None]:
        self.watching[channel] -= 1
        return succeed(None)

    def publish(
        self, channel: str, event: str, data: Any, idempotencyKey: str | None = None
    ) -> Deferred[Published]:
        return self.inner.publish(channel, event, data, idempotencyKey)

    def history(self, channel: str, since: int) -> Deferred[Recovery]:
        def read() -> Recovery:
            recovery = now(self.inner.history(channel, since))
            self.answers.append(("history", channel, since, recovery))
            return recovery

        return self._later("history", channel, read)

    def currentSeq(self, channel: str) -> Deferred[int]:
        def read() -> int:
            seq = now(self.inner.currentSeq(channel))
            self.answers.append(("currentSeq", channel, None, seq))
            return seq

        return self._later("currentSeq", channel, read)

    def addPresence(self, userId: str, connectionId: str) -> Deferred[int]:
        return self.inner.addPresence(userId, connectionId)

    def removePresence(self, userId: str, connectionId: str) -> Deferred[int]:
        return self.inner.removePresence(userId, connectionId)

    def connectionCount(self, userId: str) -> Deferred[int]:
        return self.inner.connectionCount(userId)

    def setControl(self, handler: ControlHandler) -> None:
        self.inner.setControl(handler)

    def control(self, kind: str, data: Mapping[str, Any]) -> Deferred[None]:
        return self.inner.control(kind, data)

    def online(self, userIds: Iterable[str]) -> Deferred[dict[str, bool]]:
        return self.inner.online(userIds)

    def broadcast(
        self, channel: str, event: str, data: Any, exclude: str | None = None
    ) -> Deferred[None]:
        return self.inner.broadcast(channel, event, data, exclude)

    def join(self, channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        return self.inner.join(channel, userId, connectionId)

    def leave(self, channel: str, userId: str, connectionId: str) -> Deferred[bool]:
        return self.inner.leave(channel, userId, connectionId)

    def members(self, channel: str) -> Deferred[list[str]]:
        return self.inner.members(channel)


class HubTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.broker = MemoryBroker(self.clock, historySize=5)
        self.hub = Hub(self.broker)

    def controlled(self, **kwargs: Any) -> ControlledBroker:
        """Replace the hub with one on a L{ControlledBroker}."""
        broker = ControlledBroker(self.broker)
        self.hub = Hub(broker, **kwargs)
        return broker

    def publish(self, channel: Channel = LISTING, n: int = 1) -> list[int]:
        return [
            self.successResultOf(self.hub.publish(channel, "e", {"n": i})).seq for i in range(n)
        ]

    def subscribe(
        self, subscriber: Recorder, channel: Channel = LISTING, since: int | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.successResultOf(
            self.hub.subscribe(subscriber, channel, since)
        )
        return result

    def refused(self, d: Deferred[Any], code: str) -> OpError:
        error = self.failureResultOf(d, OpError).value
        self.assertEqual(error.code, code)
        assert isinstance(error, OpError)
        return error


class DeliveryTests(HubTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IBroker, ControlledBroker(self.broker)))

    def test_live(self) -> None:
        """
        A subscriber receives the push frame of each event after it subscribed.
        """
        self.publish(n=2)
        alice = Recorder()
        self.assertEqual(
            self.subscribe(alice),
            {"channel": "listing:1", "seq": 2, "recovered": None, "replayed": 0},
        )
        self.assertEqual(self.successResultOf(self.hub.publish(LISTING, "price", {"p": 5})).seq, 3)
        self.publish(OTHER)
        self.assertEqual(
            alice.sent,
            [
                (
                    b'{"type":"event","channel":"listing:1","event":"price","seq":3,"data":{"p":5}}',
                    None,
                )
            ],
        )

    def test_serialisedOnce(self) -> None:
        """
        However many subscribers a channel has, each event is serialised and prepared
        once, and every subscriber is handed the same objects.
        """
        encoded: list[Any] = []
        original = hubModule.encode

        def counting(frame: Any) -> bytes:
            encoded.append(frame)
            return original(frame)

        self.patch(hubModule, "encode", counting)
        prepared: list[bytes] = []

        def prepare(frame: bytes) -> object:
            prepared.append(frame)
            return object()

        self.hub.prepare = prepare
        subscribers = [Recorder(f"c{i}") for i in range(5)]
        for subscriber in subscribers:
            self.subscribe(subscriber)
        self.publish(n=2)
        self.assertEqual(len(encoded), 2)
        self.assertEqual(len(prepared), 2)
        for n in range(2):
            frames = {id(s.sent[n][0]) for s in subscribers}
            shared = {id(s.sent[n][1]) for s in subscribers}
            self.assertEqual(len(frames), 1)
            self.assertEqual(len(shared), 1)
            self.assertIs(subscribers[0].sent[n][0], prepared[n])

    def test_ephemeral(self) -> None:
        """
        A broadcast reaches live subscribers with seq null, skips the excluded user's
        connections, and does not move anyone's position.
        """
        alice, alice2, bob = Recorder("a", "alice"), Recorder("a2", "alice"), Recorder("b", "bob")
        for subscriber in (alice, alice2, bob):
            self.subscribe(subscriber)
        self.successResultOf(self.broker.broadcast("listing:1", "typing", {"x": 1}, "alice"))
        self.assertEqual((alice.sent, alice2.sent), ([], []))
        self.assertEqual(
            bob.frames(),
            [
                {
                    "type": "event",
                    "channel": "listing:1",
                    "event": "typing",
                    "seq": None,
                    "data": {"x": 1},
                }
            ],
        )
        self.publish()
        self.assertEqual(bob.seqs()[-1], 1)
        self.assertEqual(alice.seqs(), [1])

    def test_ephemeralNotHeld(self) -> None:
        """
        A subscriber still recovering misses ephemeral events: they are not held back
        with the sequenced ones.
        """
        broker = self.controlled()
        alice = Recorder()
        subscribing = self.hub.subscribe(alice, LISTING)
        broker.take("watch").fire()
        self.successResultOf(self.broker.broadcast("listing:1", "typing", {}, None))
        broker.take("currentSeq").fire()
        self.successResultOf(subscribing)
        self.assertEqual(alice.sent, [])

    def test_nobodyListening(self) -> None:
        """
        An event on a channel without local subscribers costs no serialisation.
        """
        calls: list[bytes] = []
        self.hub.prepare = calls.append
        self.patch(hubModule, "encode", lambda frame: self.fail("serialised"))
        self.publish()
        self.assertEqual(calls, [])

    def test_unsubscribe(self) -> None:
        alice, bob = Recorder("a"), Recorder("b")
        self.subscribe(alice)
        self.subscribe(bob)
        self.subscribe(alice, OTHER)
        self.publish()
        self.assertTrue(self.hub.unsubscribe(alice, LISTING))
        self.assertFalse(self.hub.unsubscribe(alice, LISTING))
        self.publish()
        self.publish(OTHER)
        self.assertEqual(alice.seqs(), [1])
        self.assertEqual(alice.seqs(OTHER), [1])
        self.assertEqual(bob.seqs(), [1, 2])
        self.assertEqual(self.hub.subscriptionsOf(alice), {"listing:2"})
        self.assertEqual(self.hub.subscriberCount(LISTING), 1)

    def test_unsubscribeAll(self) -> None:
        alice, bob = Recorder("a"), Recorder("b")
        self.subscribe(alice)
        self.subscribe(alice, OTHER)
        self.subscribe(bob)
        self.hub.unsubscribeAll(alice)
        self.hub.unsubscribeAll(alice)
        self.publish()
        self.publish(OTHER)
        self.assertEqual(alice.sent, [])
        self.assertEqual(bob.seqs(), [1])
        self.assertEqual(self.hub.subscriptionsOf(alice), frozenset())
        self.assertEqual(self.hub.subscriberCount(OTHER), 0)

    def test_unwatch(self) -> None:
        """
        The broker is asked for a channel while it has local subscribers.
        """
        broker = self.controlled()
        alice, bob = Recorder("a"), Recorder("b")
        first = self.hub.subscribe(alice, LISTING)
        second = self.hub.subscribe(bob, LISTING)
        broker.fireAll()
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(broker.watchCalls, ["listing:1"])
        self.hub.unsubscribe(alice, LISTING)
        self.assertEqual(broker.watching["listing:1"], 1)
        self.hub.unsubscribeAll(bob)
        self.assertEqual(broker.watching["listing:1"], 0)

    def test_unwatchAfterWatch(self) -> None:
        """
        A channel left while its watch is in flight is unwatched once the watch has
        taken effect, never before: a broker could otherwise apply the unwatch first
        and drop a later subscriber's channel (a failing schedule, kept).
        """
        broker = self.controlled()
        alice, bob = Recorder("a"), Recorder("b")
        first = self.hub.subscribe(alice, LISTING)
        self.hub.unsubscribe(alice, LISTING)
        self.assertEqual(broker.watching["listing:1"], 0)
        second = self.hub.subscribe(bob, LISTING)
        broker.pending.pop(1).fire()
        broker.take("currentSeq").fire()
        self.publish()
        self.assertEqual(bob.seqs(), [1])
        broker.fireAll()
        self.refused(first, CONFLICT)
        self.assertEqual(self.successResultOf(second)["seq"], 0)
        self.assertEqual(broker.watching["listing:1"], 1)
        self.hub.unsubscribe(bob, LISTING)
        self.assertEqual(broker.watching["listing:1"], 0)

    def test_brokenSubscriber(self) -> None:
        """
        A subscriber that raises is logged; the others still receive the event.
        """

        class Broken(Recorder):
            def deliver(self, frame: bytes, prepared: Any) -> None:
                raise RuntimeError("gone")

        alice, bob = Broken("a"), Recorder("b")
        self.subscribe(alice)
        self.subscribe(bob)
        self.publish()
        self.assertEqual(bob.seqs(), [1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_gapRecovered(self) -> None:
        """
        An event the broker failed to deliver (its link dropped) is noticed at the
        next one, whose seq jumps: the missed event is replayed from the history
        first, then the next, each once, in order.
        """
        alice = Recorder()
        self.subscribe(alice)
        self.publish()
        self.broker.setDelivery(lambda event: None)
        self.publish()
        self.broker.setDelivery(self.hub.deliver)
        self.publish()
        self.publish()
        self.assertEqual(alice.seqs(), [1, 2, 3, 4])

    def test_unsubscribedByDelivery(self) -> None:
        """
        A subscriber closed by its own delivery (a slow consumer) leaves the others
        their event, and is not sent any more.
        """
        bob = Recorder("b")

        class Closing(Recorder):
            def deliver(inner, frame: bytes, prepared: Any) -> None:
                super().deliver(frame, prepared)
                self.hub.unsubscribeAll(inner)
                self.hub.unsubscribeAll(bob)

        alice, carol = Closing("a"), Recorder("c")
        for subscriber in (alice, bob, carol):
            self.subscribe(subscriber)
        self.publish(n=2)
        self.assertEqual(alice.seqs(), [1])
        self.assertEqual(bob.seqs(), [])
        self.assertEqual(carol.seqs(), [1, 2])


class RecoveryTests(HubTestCase):
    def test_replay(self) -> None:
        """
        The events after since come first, in order, then live ones; the reply comes
        after the replay.
        """
        self.publish(n=4)
        alice = Recorder()
        result = self.subscribe(alice, since=1)
        self.assertEqual(
            result, {"channel": "listing:1", "seq": 4, "recovered": True, "replayed": 3}
        )
        self.publish()
        self.assertEqual(alice.seqs(), [2, 3, 4, 5])
        self.assertEqual([prepared for _, prepared in alice.sent], [None] * 4)

    def test_nothingMissed(self) -> None:
        self.publish(n=2)
        alice = Recorder()
        self.assertEqual(
            self.subscribe(alice, since=2),
            {"channel": "listing:1", "seq": 2, "recovered": True, "replayed": 0},
        )

    def test_notRecovered(self) -> None:
        """
        When the history does not reach back to since, the client is told so, nothing
        is replayed, and every event after the reply's seq follows.
        """
        self.publish(n=8)
        alice = Recorder()
        self.assertEqual(
            self.subscribe(alice, since=1),
            {"channel": "listing:1", "seq": 8, "recovered": False, "replayed": 0},
        )
        self.publish()
        self.assertEqual(alice.seqs(), [9])

    def test_publishedDuringLookup(self) -> None:
        """
        Events published while the history is read arrive once each, in order, after
        the replay: those the history held too are not sent twice.
        """
        broker = self.controlled()
        self.publish(n=2)
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING, since=1)
        broker.take("watch").fire()
        self.publish(n=2)  # 3, 4: live and in the history
        history = broker.take("history")
        history.snapshot()
        self.publish(n=2)  # 5, 6: live only
        self.assertEqual(alice.sent, [])
        history.fire()
        self.assertEqual(
            self.successResultOf(d),
            {"channel": "listing:1", "seq": 6, "recovered": True, "replayed": 3},
        )
        self.publish()
        self.assertEqual(alice.seqs(), [2, 3, 4, 5, 6, 7])

    def test_positionDuringLookup(self) -> None:
        """
        Without since, the reply's seq is where the subscription starts: events up to
        it are not sent, every one after it is.
        """
        broker = self.controlled()
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING)
        self.publish()  # not watched yet
        broker.take("watch").fire()
        self.publish()  # 2: before the position
        position = broker.take("currentSeq")
        position.snapshot()
        self.publish()  # 3: after it
        position.fire()
        self.assertEqual(
            self.successResultOf(d),
            {"channel": "listing:1", "seq": 3, "recovered": None, "replayed": 0},
        )
        self.assertEqual(alice.seqs(), [3])

    def test_unsubscribedDuringLookup(self) -> None:
        broker = self.controlled()
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING, since=0)
        broker.take("watch").fire()
        self.publish()
        self.assertTrue(self.hub.unsubscribe(alice, LISTING))
        broker.take("history").fire()
        self.refused(d, CONFLICT)
        self.assertEqual(alice.sent, [])
        self.assertEqual(broker.watching["listing:1"], 0)

    def test_disconnectedWhileWatching(self) -> None:
        broker = self.controlled()
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING, since=0)
        self.hub.unsubscribeAll(alice)
        broker.fireAll()
        self.refused(d, CONFLICT)
        self.assertEqual(broker.pending, [])
        self.assertEqual(self.hub.subscriberCount(LISTING), 0)

    def test_tooBusyToRecover(self) -> None:
        """
        More than maxPending events during one lookup fail the subscribe rather than
        hold them all.
        """
        broker = self.controlled(maxPending=2)
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING, since=0)
        broker.take("watch").fire()
        self.publish(n=3)
        broker.take("history").fire()
        self.refused(d, UNAVAILABLE)
        self.assertEqual(alice.sent, [])
        self.assertEqual(self.hub.subscriptionsOf(alice), frozenset())
        self.assertEqual(broker.watching["listing:1"], 0)

    def test_brokerFails(self) -> None:
        """
        A failed history read fails the subscribe, which leaves nothing behind.
        """
        broker = self.controlled()
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING, since=0)
        broker.take("watch").fire()
        broker.take("history").fail(OpError(UNAVAILABLE, "redis is down"))
        self.refused(d, UNAVAILABLE)
        self.assertEqual(self.hub.subscriptionsOf(alice), frozenset())
        self.assertEqual(self.hub.subscriberCount(LISTING), 0)

    def test_watchShared(self) -> None:
        """
        Subscribers arriving while the channel is being watched wait for the watch
        before they read the history.
        """
        broker = self.controlled()
        alice, bob = Recorder("a"), Recorder("b")
        first = self.hub.subscribe(alice, LISTING, since=0)
        second = self.hub.subscribe(bob, LISTING, since=0)
        self.assertEqual([p.kind for p in broker.pending], ["watch"])
        broker.take("watch").fire()
        self.assertEqual([p.kind for p in broker.pending], ["history", "history"])
        broker.fireAll()
        self.assertTrue(self.successResultOf(first)["recovered"])
        self.assertTrue(self.successResultOf(second)["recovered"])

    def test_watchFails(self) -> None:
        """
        A failed watch fails every subscribe waiting for it; the next subscribe
        watches again.
        """
        broker = self.controlled()
        alice, bob = Recorder("a"), Recorder("b")
        first = self.hub.subscribe(alice, LISTING)
        second = self.hub.subscribe(bob, LISTING)
        broker.take("watch").fail(OpError(UNAVAILABLE, "redis is down"))
        self.refused(first, UNAVAILABLE)
        self.refused(second, UNAVAILABLE)
        self.assertEqual(self.hub.subscriberCount(LISTING), 0)
        third = self.hub.subscribe(alice, LISTING)
        broker.fireAll()
        self.assertEqual(self.successResultOf(third)["seq"], 0)
        self.assertEqual(broker.watchCalls, ["listing:1", "listing:1"])

    def test_watchFailsUnheard(self) -> None:
        """
        A watch failing after every subscriber left is logged.
        """
        broker = self.controlled()
        alice = Recorder()
        d = self.hub.subscribe(alice, LISTING)
        self.hub.unsubscribe(alice, LISTING)
        broker.take("watch").fail(RuntimeError("redis is down"))
        self.refused(d, CONFLICT)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_watchFailsAtOnce(self) -> None:
        broker = self.controlled()
        self.patch(broker, "watch", lambda channel: fail(OpError(UNAVAILABLE, "redis is down")))
        self.refused(self.hub.subscribe(Recorder(), LISTING), UNAVAILABLE)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_subscribeTwiceWhileRecovering(self) -> None:
        """
        A second subscribe to the same channel waits for the first, then answers where
        the subscription is.
        """
        broker = self.controlled()
        self.publish(n=2)
        alice = Recorder()
        first = self.hub.subscribe(alice, LISTING, since=0)
        second = self.hub.subscribe(alice, LISTING, since=0)
        broker.fireAll()
        self.assertEqual(self.successResultOf(first)["replayed"], 2)
        self.assertEqual(
            self.successResultOf(second),
            {"channel": "listing:1", "seq": 2, "recovered": True, "replayed": 0},
        )
        self.assertEqual(alice.seqs(), [1, 2])

    def test_subscribeAgainAfterFailure(self) -> None:
        """
        A subscribe waiting for one that fails makes its own subscription.
        """
        broker = self.controlled()
        alice = Recorder()
        first = self.hub.subscribe(alice, LISTING)
        second = self.hub.subscribe(alice, LISTING)
        broker.take("watch").fail(OpError(UNAVAILABLE, "redis is down"))
        self.refused(first, UNAVAILABLE)
        broker.fireAll()
        self.assertEqual(self.successResultOf(second)["seq"], 0)
        self.assertEqual(self.hub.subscriptionsOf(alice), {"listing:1"})

    def test_subscribeAgain(self) -> None:
        """
        Subscribing again to a live subscription: without since or with one it has
        been at, nothing is sent; with an older one, the events from before it started
        (user:<id> is subscribed at welcome, before the client can say since).
        """
        self.publish(n=4)
        alice = Recorder()
        self.subscribe(alice)
        self.publish()
        self.assertEqual(
            self.subscribe(alice),
            {"channel": "listing:1", "seq": 5, "recovered": None, "replayed": 0},
        )
        self.assertEqual(self.subscribe(alice, since=4)["replayed"], 0)
        self.assertEqual(self.subscribe(alice, since=5)["replayed"], 0)
        self.assertEqual(
            self.subscribe(alice, since=6),
            {"channel": "listing:1", "seq": 5, "recovered": False, "replayed": 0},
        )
        self.assertEqual(
            self.subscribe(alice, since=2),
            {"channel": "listing:1", "seq": 5, "recovered": True, "replayed": 2},
        )
        self.assertEqual(self.subscribe(alice, since=1)["replayed"], 1)
        self.assertEqual(self.subscribe(alice, since=2)["replayed"], 0)
        self.assertEqual(alice.seqs(), [5, 3, 4, 2])
        self.publish(n=6)
        self.assertFalse(self.subscribe(alice, since=0)["recovered"])

    def test_subscribeAgainAbandoned(self) -> None:
        broker = self.controlled()
        self.publish(n=2)
        alice = Recorder()
        first = self.hub.subscribe(alice, LISTING)
        broker.fireAll()
        self.assertEqual(self.successResultOf(first)["seq"], 2)
        again = self.hub.subscribe(alice, LISTING, since=0)
        self.hub.unsubscribe(alice, LISTING)
        broker.fireAll()
        self.refused(again, CONFLICT)
        self.assertEqual(alice.sent, [])


class ResyncTests(HubTestCase):
    """
    After the broker missed events (Redis went away), every live subscription recovers
    them from the history, or is told it cannot.
    """

    def live(self, subscriber: Recorder, channel: Channel = LISTING) -> None:
        d = self.hub.subscribe(subscriber, channel)
        self.broker_.fireAll()
        self.successResultOf(d)

    def setUp(self) -> None:
        super().setUp()
        self.broker_ = self.controlled()

    def test_replayed(self) -> None:
        """
        The missed events are replayed in order, with the events that arrived live
        during the lookup after them, each once.
        """
        alice, bob = Recorder("c1"), Recorder("c2", "u2")
        self.live(alice)
        self.live(bob)
        self.publish(n=2)
        reconnect = self.broker_.interrupt()
        self.publish(n=2)
        reconnect()
        lookup = self.broker_.take("history")
        self.assertEqual((lookup.channel, self.broker_.pending), ("listing:1", []))
        self.publish()
        self.assertEqual(alice.seqs(), [1, 2])
        lookup.fire()
        self.publish()
        for subscriber in (alice, bob):
            self.assertEqual(subscriber.seqs(), [1, 2, 3, 4, 5, 6])
            self.assertEqual({f["type"] for f in subscriber.frames()}, {"event"})

    def test_nothingMissed(self) -> None:
        alice = Recorder()
        self.live(alice)
        self.publish()
        self.broker_.interrupt()()
        self.broker_.fireAll()
        self.publish()
        self.assertEqual(alice.seqs(), [1, 2])

    def test_tooOld(self) -> None:
        """
        When the history no longer holds every missed event, the subscriber is sent a
        resync frame with the channel's seq, then the events after it.
        """
        alice = Recorder()
        self.live(alice)
        self.publish()
        reconnect = self.broker_.interrupt()
        self.publish(n=7)
        reconnect()
        self.broker_.fireAll()
        self.publish()
        self.assertEqual(
            alice.frames()[1:],
            [
                {"type": "resync", "channel": "listing:1", "seq": 8, "recovered": False},
                {"type": "event", "channel": "listing:1", "event": "e", "seq": 9, "data": {"n": 0}},
            ],
        )

    def test_seqWentBack(self) -> None:
        """
        Redis lost the channel (restarted without persistence): the subscriber is told
        where the channel is now, and receives what comes next.
        """
        alice = Recorder()
        self.live(alice)
        self.publish(n=3)
        reconnect = self.broker_.interrupt()
        fresh = MemoryBroker(self.clock, historySize=5)
        fresh.setDelivery(self.broker_._filter)
        self.broker_.inner = fresh
        reconnect()
        self.broker_.fireAll()
        self.publish()
        self.assertEqual(
            alice.frames()[3:],
            [
                {"type": "resync", "channel": "listing:1", "seq": 0, "recovered": False},
                {"type": "event", "channel": "listing:1", "event": "e", "seq": 1, "data": {"n": 0}},
            ],
        )

    def test_lookupFails(self) -> None:
        """
        When the history cannot be read, the subscriber is told to reload rather than
        left with a gap; what arrived live meanwhile follows.
        """
        alice = Recorder()
        self.live(alice)
        self.publish()
        reconnect = self.broker_.interrupt()
        self.publish()
        reconnect()
        lookup = self.broker_.take("history")
        self.publish()
        lookup.fail(OpError(UNAVAILABLE, "Redis is unreachable"))
        self.assertEqual(len(self.flushLoggedErrors(OpError)), 1)
        self.assertEqual(
            [(f["type"], f["seq"]) for f in alice.frames()],
            [("event", 1), ("resync", 1), ("event", 3)],
        )

    def test_subscribeWaits(self) -> None:
        """
        A subscribe to the channel while it recovers answers once it has.
        """
        alice = Recorder()
        self.live(alice)
        self.publish()
        reconnect = self.broker_.interrupt()
        self.publish()
        reconnect()
        again = self.hub.subscribe(alice, LISTING, since=1)
        self.assertNoResult(again)
        self.broker_.fireAll()
        self.assertEqual(self.successResultOf(again)["seq"], 2)
        self.assertEqual(alice.seqs(), [1, 2])

    def test_unsubscribedMeanwhile(self) -> None:
        alice = Recorder()
        self.live(alice)
        reconnect = self.broker_.interrupt()
        self.publish()
        reconnect()
        self.assertTrue(self.hub.unsubscribe(alice, LISTING))
        self.broker_.fireAll()
        self.assertEqual(alice.sent, [])

    def test_recoveringSubscriptionsUntouched(self) -> None:
        """
        A subscribe still recovering reads the history after the interruption anyway:
        only live subscriptions resync.
        """
        alice = Recorder()
        self.publish()
        d = self.hub.subscribe(alice, LISTING, since=0)
        self.broker_.take("watch").fire()
        reconnect = self.broker_.interrupt()
        reconnect()
        self.assertEqual([p.kind for p in self.broker_.pending], ["history"])
        self.broker_.fireAll()
        self.assertEqual(self.successResultOf(d)["replayed"], 1)


class LimitTests(HubTestCase):
    def test_subscriptionLimit(self) -> None:
        """
        Past maxSubscriptions a subscribe is refused with forbidden; recovering
        subscriptions count; subscribing again to a channel does not.
        """
        broker = self.controlled(maxSubscriptions=2)
        alice = Recorder()
        first = self.hub.subscribe(alice, LISTING)
        second = self.hub.subscribe(alice, OTHER)
        error = self.refused(self.hub.subscribe(alice, Channel("listing", "3")), FORBIDDEN)
        self.assertIn("subscription limit of 2", error.message)
        broker.fireAll()
        self.successResultOf(first)
        self.successResultOf(second)
        self.subscribe(alice, LISTING)
        self.hub.unsubscribe(alice, OTHER)
        d = self.hub.subscribe(alice, Channel("listing", "3"))
        broker.fireAll()
        self.successResultOf(d)
        self.assertEqual(self.hub.subscriptionsOf(alice), {"listing:1", "listing:3"})


class ChannelTests(SynchronousTestCase):
    def test_parse(self) -> None:
        for text, channel in [
            ("user:u_1", Channel("user", "u_1")),
            ("conversation:c-9", Channel("conversation", "c-9")),
            ("listing:42", Channel("listing", "42")),
            ("user:auth0|5f7c", Channel("user", "auth0|5f7c")),
            ("user:a@example.com", Channel("user", "a@example.com")),
            ("listing:a:b.c", Channel("listing", "a:b.c")),
            ("listing:" + "x" * 128, Channel("listing", "x" * 128)),
        ]:
            self.assertEqual(parseChannel(text), channel)
            self.assertEqual(str(channel), text)

    def test_malformed(self) -> None:
        for text in [
            None,
            42,
            ["listing:1"],
            "",
            "listing",
            "listing:",
            "order:1",
            "Listing:1",
            ":1",
            "listing:" + "x" * 129,
            "listing:a b",
            "listing:a/b",
            "listing:é",
            "listing:1\n",
        ]:
            error = self.assertRaises(OpError, parseChannel, text)
            self.assertEqual(error.code, BAD_REQUEST, text)
            self.assertNotIn("x" * 20, error.message)

    @given(
        st.sampled_from(["user", "conversation", "listing"]),
        st.from_regex(r"[A-Za-z0-9_\-.:@|]{1,128}", fullmatch=True),
    )
    def test_roundTrip(self, kind: Any, ident: str) -> None:
        channel = Channel(kind, ident)
        self.assertEqual(parseChannel(str(channel)), channel)


class AuthoriserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.asked: list[tuple[str, str]] = []
        self.participants = {("c1", "alice")}
        self.answers: list[Deferred[bool]] | None = None
        self.authorise = Authoriser(self.isParticipant, self.clock, ttl=5.0, maxEntries=3)

    def isParticipant(self, conversationId: str, userId: str) -> Deferred[bool]:
        self.asked.append((conversationId, userId))
        if self.answers is not None:
            d: Deferred[bool] = Deferred()
            self.answers.append(d)
            return d
        if conversationId == "missing":
            return fail(OpError(NOT_FOUND, "no such conversation"))
        return succeed((conversationId, userId) in self.participants)

    def allowed(self, userId: str, channel: Channel) -> bool:
        answer: bool = self.successResultOf(self.authorise(userId, channel))
        return answer

    def test_user(self) -> None:
        self.assertTrue(self.allowed("alice", Channel("user", "alice")))
        self.assertFalse(self.allowed("alice", Channel("user", "bob")))

    def test_listing(self) -> None:
        self.assertTrue(self.allowed("alice", Channel("listing", "1")))

    def test_conversation(self) -> None:
        self.assertTrue(self.allowed("alice", Channel("conversation", "c1")))
        self.assertFalse(self.allowed("bob", Channel("conversation", "c1")))
        self.assertEqual(self.asked, [("c1", "alice"), ("c1", "bob")])

    def test_cached(self) -> None:
        """
        Answers both ways are kept for ttl seconds.
        """
        conversation = Channel("conversation", "c1")
        for _ in range(3):
            self.assertTrue(self.allowed("alice", conversation))
            self.assertFalse(self.allowed("bob", conversation))
        self.assertEqual(len(self.asked), 2)
        self.clock.advance(5)
        self.assertTrue(self.allowed("alice", conversation))
        self.assertEqual(len(self.asked), 3)

    def test_forget(self) -> None:
        """
        When participants change, the next check asks the database.
        """
        conversation = Channel("conversation", "c1")
        self.assertFalse(self.allowed("bob", conversation))
        self.assertFalse(self.allowed("alice", Channel("conversation", "c2")))
        self.participants.add(("c1", "bob"))
        self.authorise.forget("c1")
        self.authorise.forget("c1")
        self.assertTrue(self.allowed("bob", conversation))
        self.assertFalse(self.allowed("alice", Channel("conversation", "c2")))
        self.assertEqual(len(self.asked), 3)

    def test_changedWhileAsking(self) -> None:
        """
        An answer given across a change of participants is not kept.
        """
        self.answers = []
        conversation = Channel("conversation", "c1")
        d = self.authorise("alice", conversation)
        self.authorise.forget("c1")
        self.answers[0].callback(True)
        self.assertTrue(self.successResultOf(d))
        self.authorise("alice", conversation)
        self.assertEqual(len(self.asked), 2)

    def test_failureNotCached(self) -> None:
        missing = Channel("conversation", "missing")
        for _ in range(2):
            error = self.failureResultOf(self.authorise("alice", missing), OpError).value
            self.assertEqual(error.code, NOT_FOUND)
        self.assertEqual(len(self.asked), 2)

    def test_bounded(self) -> None:
        for n in range(5):
            self.allowed("alice", Channel("conversation", f"c{n}"))
        self.assertEqual(len(self.authorise._answers), 3)
        self.assertEqual(sorted(self.authorise._byConversation), ["c2", "c3", "c4"])
        self.allowed("alice", Channel("conversation", "c0"))
        self.assertEqual(len(self.asked), 6)


# Schedules ----------------------------------------------------------------------------

CLIENTS = 3
CHANNELS = [Channel("listing", "a"), Channel("conversation", "b")]
#: Seconds a tick advances the clock: within, near and past the history's age (10).
TICKS = [1.0, 4.0, 11.0]

#: Step kinds, repeated by weight: mostly publishes, subscribes and broker answers.
_kinds = (
    ["publish"] * 4
    + ["subscribe"] * 3
    + ["fire"] * 3
    + ["snapshot", "unsubscribe", "disconnect", "tick"]
)
#: (kind, a, b): a and b pick a client, channel or pending answer (modulo their number).
schedules = st.lists(
    st.tuples(st.sampled_from(_kinds), st.integers(0, 11), st.integers(0, 11)),
    min_size=30,
    max_size=120,
)


@attrs.define(eq=False)
class Attempt:
    """One subscribe of one connection, and everything it received."""

    client: int
    channel: str
    since: int | None
    seqs: list[int] = attrs.field(factory=list)
    result: dict[str, Any] | None = None
    #: How many of seqs had arrived when the subscribe answered.
    seenAtResult: int = 0
    error: Failure | None = None
    ended: bool = False


class Connection:
    """One connection of a client: a subscriber that files what it receives."""

    userId = "u"

    def __init__(self, client: Client, connectionId: str) -> None:
        self.client = client
        self.connectionId = connectionId
        self.current: dict[str, Attempt] = {}

    def deliver(self, frame: bytes, prepared: Any) -> None:
        push = json.loads(frame)
        attempt = self.current.get(push["channel"])
        if attempt is None:
            # Not an assertion: the hub would catch and log it.
            self.client.strays.append((self.connectionId, push))
            return
        attempt.seqs.append(push["seq"])
        self.client.last[push["channel"]] = push["seq"]


class Client:
    """A browser tab: what it has seen survives its reconnects."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.last: dict[str, int] = {}
        #: Frames received on a channel the connection is not subscribed to.
        self.strays: list[tuple[str, Any]] = []
        self.connections = 0
        self.connection = self.reconnect()

    def reconnect(self) -> Connection:
        self.connections += 1
        self.connection = Connection(self, f"{self.n}.{self.connections}")
        return self.connection


#: How often each outcome came up over all examples: the schedules must reach them all.
outcomes: Counter[str] = Counter()


class ScheduleTests(SynchronousTestCase):
    """
    Random interleavings of publishes, subscribes with since (the client's last seen
    seq), unsubscribes, disconnects, passing time, and the broker's answers (read and
    returned at chosen moments, so events are published while lookups are pending).
    """

    def test_schedules(self) -> None:
        outcomes.clear()
        self.runSchedules()
        for outcome in [
            "recovered",
            "replayed",
            "not recovered",
            "position",
            "held back",
            "conflict",
            "live",
        ]:
            self.assertGreater(outcomes[outcome], 0, (outcome, outcomes))

    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(schedules)
    def runSchedules(self, schedule: list[tuple[str, int, int]]) -> None:
        clock = Clock()
        memory = MemoryBroker(clock, historySize=4, historyAge=10.0)
        broker = ControlledBroker(memory)
        hub = Hub(broker)
        clients = [Client(n) for n in range(CLIENTS)]
        attempts: list[Attempt] = []

        def answered(result: dict[str, Any], attempt: Attempt) -> None:
            attempt.result = result
            attempt.seenAtResult = len(attempt.seqs)
            clients[attempt.client].last[attempt.channel] = result["seq"]

        def failed(failure: Failure, attempt: Attempt) -> None:
            attempt.error = failure

        def end(connection: Connection, channel: str) -> None:
            attempt = connection.current.pop(channel, None)
            if attempt is not None:
                attempt.ended = True

        for kind, a, b in schedule:
            client = clients[a % CLIENTS]
            channel = CHANNELS[b % len(CHANNELS)]
            connection = client.connection
            if kind == "publish":
                hub.publish(channel, "e", None)
            elif kind == "subscribe":
                if str(channel) in connection.current:
                    continue
                attempt = Attempt(client.n, str(channel), client.last.get(str(channel)))
                attempts.append(attempt)
                connection.current[str(channel)] = attempt
                d = hub.subscribe(connection, channel, attempt.since)
                d.addCallbacks(answered, failed, callbackArgs=(attempt,), errbackArgs=(attempt,))
            elif kind == "unsubscribe":
                hub.unsubscribe(connection, channel)
                end(connection, str(channel))
            elif kind == "disconnect":
                hub.unsubscribeAll(connection)
                for name in list(connection.current):
                    end(connection, name)
                client.reconnect()
            elif kind == "tick":
                clock.advance(TICKS[a % len(TICKS)])
            elif broker.pending:
                pending = broker.pending[a % len(broker.pending)]
                if kind == "snapshot":
                    pending.snapshot()
                else:
                    broker.pending.remove(pending)
                    pending.fire()
        broker.fireAll()

        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual([client.strays for client in clients], [[]] * CLIENTS)
        for attempt in attempts:
            self.check(attempt, broker, memory)

    def check(self, attempt: Attempt, broker: ControlledBroker, memory: MemoryBroker) -> None:
        seqs = attempt.seqs
        # Every subscription receives consecutive seqs: no gap, no duplicate, in order.
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))) if seqs else [])
        if attempt.error is not None:
            # Only a subscribe abandoned before it answered may fail, with conflict.
            self.assertTrue(attempt.ended)
            error = attempt.error.value
            assert isinstance(error, OpError), attempt.error.getTraceback()
            self.assertEqual(error.code, CONFLICT)
            self.assertEqual(seqs, [])
            outcomes["conflict"] += 1
            return
        result = attempt.result
        answer: tuple[str, str, int | None, bool | None, int | None]
        assert result is not None, attempt
        recovered = result["recovered"]
        if recovered:
            # The client's stream continues from since, across its reconnects.
            start = attempt.since
            outcomes["recovered"] += 1
            if result["replayed"]:
                outcomes["replayed"] += 1
            answer = ("history", attempt.channel, attempt.since, True, None)
        else:
            # Told so: it starts at the position the broker answered.
            start = result["seq"] - attempt.seenAtResult
            if recovered is None:
                self.assertIsNone(attempt.since)
                outcomes["position"] += 1
                answer = ("currentSeq", attempt.channel, None, None, start)
            else:
                outcomes["not recovered"] += 1
                answer = ("history", attempt.channel, attempt.since, False, start)
        assert start is not None
        # The hub tells the client what the broker answered (the broker's own tests
        # check the answers).
        given = []
        for kind, channel, since, value in broker.answers:
            if kind == "currentSeq":
                given.append((kind, channel, since, None, value))
            else:
                given.append(
                    (kind, channel, since, value.recovered, None if value.recovered else value.seq)
                )
        self.assertIn(answer, given)
        if seqs:
            self.assertEqual(seqs[0], start + 1)
        self.assertEqual(result["seq"], start + attempt.seenAtResult)
        if attempt.seenAtResult > result["replayed"]:
            outcomes["held back"] += 1
        if len(seqs) > attempt.seenAtResult:
            outcomes["live"] += 1
        if not attempt.ended:
            # Nothing is left undelivered.
            top = now(memory.currentSeq(attempt.channel))
            self.assertEqual(seqs[-1] if seqs else start, top)
