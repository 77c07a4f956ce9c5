"""
The Redis broker against a real Redis: the semantics of tests/test_broker.py (seq per
channel, the bounded history, idempotency, presence, membership, control, ephemeral
broadcasts), then what only several processes sharing one Redis show: one order per
channel, each event delivered once, presence counted across processes and expiring
with a process that died, and surviving a Redis restart, a hung Redis, a password and
TLS.

Two brokers in one test are two "processes": each has its own connections and process
id. Every test has its own key prefix on the shared Redis; restarts happen on private
servers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, cast
from unittest import SkipTest

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from marketplace_ws.broker import Event, IBroker, Published, Recovery
from marketplace_ws.broker.redis import (
    RedisBroker,
    RedisUnavailable,
    RedisURL,
    RedisURLError,
    parseRedisURL,
)
from marketplace_ws.channels import Channel
from marketplace_ws.envelope import UNAVAILABLE, OpError
from marketplace_ws.hub import Hub

from .redisserver import SyncRedis, fresh_prefix, private_server, shared_url


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await sleep(0.01)


class Inbox:
    """What a broker delivered, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def append(self, event: Event) -> None:
        self.events.append(event)

    def seqs(self, channel: str | None = None) -> list[int]:
        return [e.seq for e in self.events if channel is None or e.channel == channel]

    async def wait(self, count: int, timeout: float = 5.0) -> list[Event]:
        await until(lambda: len(self.events) >= count, timeout, f"{count} events")
        return self.events


class RedisTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.url = shared_url()
        self.prefix = fresh_prefix(self, self.url)

    async def broker(
        self, url: str | None = None, prefix: str | None = None, **kwargs: Any
    ) -> tuple[RedisBroker, Inbox]:
        broker = RedisBroker(url or self.url, reactor, prefix=prefix or self.prefix, **kwargs)
        inbox = Inbox()
        broker.setDelivery(inbox.append)
        await broker.start()
        self.addCleanup(broker.stop)
        return broker, inbox

    async def publish(
        self, broker: RedisBroker, channel: str, n: int = 1, **kwargs: Any
    ) -> list[int]:
        return [(await broker.publish(channel, "e", {"n": i}, **kwargs)).seq for i in range(n)]

    def seqs(self, recovery: Recovery) -> list[int]:
        return [event.seq for event in recovery.events]

    def redis(self) -> SyncRedis:
        client = SyncRedis.fromURL(self.url)
        self.addCleanup(client.close)
        return client

    async def assertUnavailable(self, d: Deferred[Any]) -> None:
        try:
            await d
        except OpError as e:
            self.assertEqual(e.code, UNAVAILABLE)
        else:
            self.fail("expected unavailable")


class SequenceTests(RedisTestCase):
    async def test_interface(self) -> None:
        broker, _ = await self.broker()
        self.assertTrue(verifyObject(IBroker, broker))

    async def test_seqPerChannel(self) -> None:
        """
        Each channel counts from 1 on its own; a publish answers its seq.
        """
        broker, _ = await self.broker()
        self.assertEqual(
            await broker.publish("listing:1", "price", {"p": 1}),
            Published("listing:1", 1, duplicate=False),
        )
        self.assertEqual(await self.publish(broker, "listing:1", 2), [2, 3])
        self.assertEqual(await self.publish(broker, "user:u", 2), [1, 2])
        self.assertEqual(await broker.currentSeq("listing:1"), 3)
        self.assertEqual(await broker.currentSeq("user:u"), 2)
        self.assertEqual(await broker.currentSeq("listing:never"), 0)

    async def test_delivery(self) -> None:
        """
        Every event on a watched channel is delivered once, in order, stamped with
        Redis's clock; the unwatched channel's are not delivered at all.
        """
        broker, inbox = await self.broker()
        await broker.watch("listing:1")
        await broker.watch("listing:2")
        before = time.time()
        await broker.publish("listing:1", "price", {"p": 1})
        await broker.publish("listing:3", "unwatched", None)
        await broker.publish("listing:2", "sold", None)
        await broker.publish("listing:1", "price", {"p": "ünï"})
        await inbox.wait(3)
        await sleep(0.1)
        self.assertEqual(
            [(e.channel, e.seq, e.event, e.data) for e in inbox.events],
            [
                ("listing:1", 1, "price", {"p": 1}),
                ("listing:2", 1, "sold", None),
                ("listing:1", 2, "price", {"p": "ünï"}),
            ],
        )
        for event in inbox.events:
            self.assertFalse(event.ephemeral)
            self.assertIsNone(event.exclude)
            self.assertTrue(before - 1 <= event.time <= time.time() + 1, event.time)

    async def test_deliveryFailure(self) -> None:
        """
        A delivery that raises is logged; the event is published and kept all the
        same, and later events are delivered.
        """
        broker, _ = await self.broker()
        delivered: list[int] = []

        def broken(event: Event) -> None:
            delivered.append(event.seq)
            if event.seq == 1:
                raise RuntimeError("boom")

        broker.setDelivery(broken)
        await broker.watch("listing:1")
        self.assertEqual(await self.publish(broker, "listing:1", 2), [1, 2])
        await until(lambda: delivered == [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.seqs(await broker.history("listing:1", 0)), [1, 2])

    async def test_noDelivery(self) -> None:
        """
        Publishing works before anything asked for delivery.
        """
        broker = RedisBroker(self.url, reactor, prefix=self.prefix)
        await broker.start()
        self.addCleanup(broker.stop)
        self.assertEqual((await broker.publish("listing:1", "e", 1)).seq, 1)

    def test_badSettings(self) -> None:
        bad: list[dict[str, Any]] = [
            {"historySize": -1},
            {"historyAge": -1.0},
            {"idempotencyWindow": -1.0},
            {"seqTTL": -1.0},
            {"seqTTL": 10.0, "historyAge": 300.0},
            {"presenceRefresh": 0.0},
            {"presenceRefresh": 90.0, "presenceExpiry": 90.0},
            {"timeout": 0.0},
            {"prefix": ""},
        ]
        for kwargs in bad:
            self.assertRaises(ValueError, RedisBroker, self.url, reactor, **kwargs)

    async def test_oneRoundTripPerPublish(self) -> None:
        """
        A publish is one EVALSHA; when Redis has forgotten the script (SCRIPT FLUSH, a
        restart) the publish still succeeds, with one more round trip, and the next is
        back to one.
        """
        broker, _ = await self.broker()
        await self.publish(broker, "listing:1", 10)
        self.assertEqual((broker.publishes, broker.publishRoundTrips), (10, 10))
        await broker.publish("listing:1", "e", None, idempotencyKey="k")
        await broker.publish("listing:1", "e", None, idempotencyKey="k")
        self.assertEqual((broker.publishes, broker.publishRoundTrips), (12, 12))
        # A private server: flushing the shared one's scripts would disturb others.
        server = private_server(self)
        other, _ = await self.broker(url=server.url)
        await self.publish(other, "listing:1")
        server.client().call("SCRIPT", "FLUSH")
        self.assertEqual(await self.publish(other, "listing:1", 2), [2, 3])
        self.assertEqual((other.publishes, other.publishRoundTrips), (3, 4))


class HistoryTests(RedisTestCase):
    async def test_replay(self) -> None:
        """
        The events after since, in order, with the channel's position.
        """
        broker, _ = await self.broker()
        await self.publish(broker, "listing:1", 5)
        recovery = await broker.history("listing:1", 2)
        self.assertEqual((recovery.recovered, recovery.seq), (True, 5))
        self.assertEqual(self.seqs(recovery), [3, 4, 5])
        first = recovery.events[0]
        self.assertEqual(
            (first.channel, first.seq, first.event, first.data), ("listing:1", 3, "e", {"n": 2})
        )
        self.assertEqual(await broker.history("listing:1", 5), Recovery((), True, 5))
        self.assertEqual(self.seqs(await broker.history("listing:1", 0)), [1, 2, 3, 4, 5])

    async def test_boundedBySize(self) -> None:
        """
        The history keeps the latest historySize events: since must be at or after the
        seq just before the oldest of them.
        """
        broker, _ = await self.broker(historySize=3)
        await self.publish(broker, "listing:1", 5)
        self.assertEqual(self.seqs(await broker.history("listing:1", 2)), [3, 4, 5])
        for since in (-1, 0, 1):
            self.assertEqual(await broker.history("listing:1", since), Recovery((), False, 5))
        self.assertEqual(self.redis().call("LLEN", f"{self.prefix}{{listing:1}}:hist"), 3)

    async def test_boundedByAge(self) -> None:
        """
        Events older than historyAge are gone from the history; a channel whose events
        have all aged out keeps its seq, not its history.
        """
        broker, _ = await self.broker(historyAge=0.6)
        await self.publish(broker, "listing:1")
        await sleep(0.35)
        await self.publish(broker, "listing:1")
        await sleep(0.35)
        self.assertFalse((await broker.history("listing:1", 0)).recovered)
        self.assertEqual(self.seqs(await broker.history("listing:1", 1)), [2])
        await sleep(0.4)
        self.assertFalse((await broker.history("listing:1", 1)).recovered)
        # Nothing was missed after the latest event, however old it is.
        self.assertEqual(await broker.history("listing:1", 2), Recovery((), True, 2))
        self.assertEqual(
            self.redis().keys(f"{self.prefix}{{listing:1}}:*"), [f"{self.prefix}{{listing:1}}:seq"]
        )
        self.assertEqual(await self.publish(broker, "listing:1"), [3])
        self.assertEqual(self.seqs(await broker.history("listing:1", 2)), [3])

    async def test_futureSince(self) -> None:
        """
        A since after the channel's position is not one this channel has been at.
        """
        broker, _ = await self.broker()
        await self.publish(broker, "listing:1", 2)
        self.assertEqual(await broker.history("listing:1", 3), Recovery((), False, 2))
        self.assertEqual(await broker.history("listing:new", 0), Recovery((), True, 0))
        self.assertEqual(await broker.history("listing:new", 1), Recovery((), False, 0))

    async def test_noHistory(self) -> None:
        """
        With historySize 0 only a client that missed nothing recovers.
        """
        broker, _ = await self.broker(historySize=0)
        await self.publish(broker, "listing:1", 2)
        self.assertEqual(await broker.history("listing:1", 2), Recovery((), True, 2))
        self.assertEqual(await broker.history("listing:1", 1), Recovery((), False, 2))

    async def test_sharedAcrossProcesses(self) -> None:
        """
        One process reads the history another wrote.
        """
        a, _ = await self.broker()
        b, _ = await self.broker()
        await self.publish(a, "listing:1", 3)
        self.assertEqual(self.seqs(await b.history("listing:1", 1)), [2, 3])
        self.assertEqual(await b.currentSeq("listing:1"), 3)

    async def test_seqNeverGoesBackwards(self) -> None:
        """
        An idle channel's seq key expires after seqTTL, and the channel comes back above
        every seq of a channel that expired: a subscriber's position stays behind the
        next event, and a since from before is not recovered.
        """
        broker, _ = await self.broker(seqTTL=0.5, historyAge=0.2, idempotencyWindow=0.2)
        self.assertEqual(await self.publish(broker, "listing:a", 4), [1, 2, 3, 4])
        self.assertEqual(await self.publish(broker, "listing:b"), [1])
        await sleep(0.6)
        redis = self.redis()
        self.assertIsNone(redis.call("GET", f"{self.prefix}{{listing:a}}:seq"))
        self.assertEqual(await broker.currentSeq("listing:a"), 4)
        self.assertEqual(await broker.history("listing:a", 4), Recovery((), True, 4))
        self.assertFalse((await broker.history("listing:a", 3)).recovered)
        self.assertEqual(await self.publish(broker, "listing:a"), [5])
        # listing:b was at 1 when it expired; 4 was the highest seq then.
        self.assertEqual(await self.publish(broker, "listing:b"), [5])
        self.assertEqual(await self.publish(broker, "listing:c"), [5])


class IdempotencyTests(RedisTestCase):
    async def test_duplicate(self) -> None:
        """
        A key seen on the channel within the window answers the original seq and
        publishes nothing, from any process.
        """
        a, inbox = await self.broker(idempotencyWindow=60.0)
        b, _ = await self.broker(idempotencyWindow=60.0)
        await a.watch("user:u")
        first = await a.publish("user:u", "order.paid", 1, idempotencyKey="k")
        await self.publish(a, "user:u")
        again = await b.publish("user:u", "order.paid", 1, idempotencyKey="k")
        self.assertEqual(first, Published("user:u", 1))
        self.assertEqual(again, Published("user:u", 1, duplicate=True))
        await a.publish("user:u", "marker", None)
        await inbox.wait(3)
        self.assertEqual(inbox.seqs(), [1, 2, 3])
        self.assertEqual(self.seqs(await a.history("user:u", 0)), [1, 2, 3])

    async def test_perChannel(self) -> None:
        """
        The same key on another channel is another publish (one key for a batch).
        """
        broker, _ = await self.broker()
        await self.publish(broker, "user:a", idempotencyKey="k")
        other = await broker.publish("user:b", "e", 1, idempotencyKey="k")
        self.assertEqual(other, Published("user:b", 1))

    async def test_afterWindow(self) -> None:
        broker, _ = await self.broker(idempotencyWindow=0.3)
        await self.publish(broker, "user:u", idempotencyKey="k")
        await sleep(0.4)
        self.assertEqual(await self.publish(broker, "user:u", idempotencyKey="k"), [2])
        self.assertEqual(await self.publish(broker, "user:u", idempotencyKey="k"), [2])

    async def test_disabled(self) -> None:
        broker, _ = await self.broker(idempotencyWindow=0.0)
        await self.publish(broker, "user:u", idempotencyKey="k")
        self.assertEqual(await self.publish(broker, "user:u", idempotencyKey="k"), [2])
        self.assertEqual(self.redis().keys(f"{self.prefix}*idem*"), [])


class PresenceTests(RedisTestCase):
    async def test_onlineWhileAnyConnection(self) -> None:
        broker, _ = await self.broker()
        self.assertEqual(await broker.addPresence("u", "c1"), 1)
        self.assertEqual(await broker.addPresence("u", "c2"), 2)
        self.assertEqual(await broker.connectionCount("u"), 2)
        self.assertEqual(await broker.online(["u", "v"]), {"u": True, "v": False})
        self.assertEqual(await broker.removePresence("u", "c1"), 1)
        self.assertEqual(await broker.removePresence("u", "c1"), 1)
        self.assertEqual(await broker.removePresence("u", "c2"), 0)
        self.assertEqual(await broker.removePresence("u", "c2"), 0)
        self.assertEqual(await broker.online(["u"]), {"u": False})
        self.assertEqual(await broker.online([]), {})
        self.assertEqual(await broker.connectionCount("u"), 0)
        self.assertEqual(self.redis().keys(f"{self.prefix}conns:*"), [])

    async def test_sameConnectionTwice(self) -> None:
        """
        Adding a connection twice does not keep the user online after it closes.
        """
        broker, _ = await self.broker()
        await broker.addPresence("u", "c1")
        self.assertEqual(await broker.addPresence("u", "c1"), 1)
        self.assertEqual(await broker.removePresence("u", "c1"), 0)

    async def test_acrossProcesses(self) -> None:
        """
        A user with a connection on each of two processes has two, whichever process
        asks, and goes offline with the last of them.
        """
        a, _ = await self.broker()
        b, _ = await self.broker()
        self.assertEqual(await a.addPresence("u", "a1"), 1)
        self.assertEqual(await b.addPresence("u", "b1"), 2)
        self.assertEqual(await a.connectionCount("u"), 2)
        self.assertEqual(await b.online(["u"]), {"u": True})
        self.assertEqual(await a.removePresence("u", "a1"), 1)
        self.assertEqual(await a.online(["u"]), {"u": True})
        self.assertEqual(await b.removePresence("u", "b1"), 0)
        self.assertEqual(await a.online(["u"]), {"u": False})

    async def test_stoppedProcessWithdraws(self) -> None:
        """
        A process that stops cleanly takes its users' connections with it at once.
        """
        a, _ = await self.broker()
        b, _ = await self.broker()
        await a.addPresence("u", "a1")
        await a.addPresence("v", "a2")
        await a.join("conversation:1", "v", "a2")
        await b.addPresence("u", "b1")
        await a.stop()
        self.assertEqual(await b.online(["u", "v"]), {"u": True, "v": False})
        self.assertEqual(await b.connectionCount("u"), 1)
        self.assertEqual(await b.members("conversation:1"), [])

    async def test_deadProcessExpires(self) -> None:
        """
        A process that stops renewing its lease (it died) takes its users offline
        within presenceExpiry; the survivors remove what it registered.
        """
        a, _ = await self.broker(presenceRefresh=0.1, presenceExpiry=0.5)
        b, _ = await self.broker(presenceRefresh=0.1, presenceExpiry=0.5)
        await a.addPresence("u", "a1")
        await a.addPresence("v", "a2")
        await a.join("conversation:1", "u", "a1")
        await b.addPresence("v", "b1")
        await b.join("conversation:1", "v", "b1")
        self.assertEqual(await b.online(["u", "v"]), {"u": True, "v": True})
        a._heartbeat.stop()  # a hangs, or was killed
        died = time.monotonic()
        await sleep(0.3)
        self.assertEqual(await b.online(["u"]), {"u": True})
        while (await b.online(["u"]))["u"]:
            self.assertLess(time.monotonic() - died, 0.5 + 0.2)
            await sleep(0.02)
        self.assertEqual(await b.connectionCount("v"), 1)
        self.assertEqual(await b.members("conversation:1"), ["v"])
        # b's heartbeats remove a's entries: nothing of a stays in Redis.
        redis = self.redis()
        await until(lambda: not redis.keys(f"{self.prefix}proc:{a.processId}"))
        self.assertIsNone(redis.call("ZSCORE", f"{self.prefix}procs", a.processId))
        self.assertEqual(redis.keys(f"{self.prefix}conns:u"), [])
        self.assertEqual(redis.call("HKEYS", f"{self.prefix}conns:v"), ["b1"])

    async def test_stalledProcessComesBack(self) -> None:
        """
        A process that stalled past presenceExpiry was counted out; its next heartbeat
        finds its lease gone and registers its connections again.
        """
        a, _ = await self.broker(presenceRefresh=0.1, presenceExpiry=0.3)
        b, _ = await self.broker(presenceRefresh=0.1, presenceExpiry=0.3)
        await a.addPresence("u", "a1")
        await a.join("conversation:1", "u", "a1")
        a._heartbeat.stop()
        await sleep(0.5)
        self.assertEqual(await b.online(["u"]), {"u": False})
        self.assertEqual(await b.members("conversation:1"), [])
        a._heartbeat.start(0.1)
        deadline = time.monotonic() + 2
        while not (await b.online(["u"]))["u"]:
            self.assertLess(time.monotonic(), deadline)
            await sleep(0.02)
        self.assertEqual(await b.members("conversation:1"), ["u"])
        self.assertEqual(await b.connectionCount("u"), 1)


class MembershipTests(RedisTestCase):
    async def test_firstJoinLastLeave(self) -> None:
        """
        A user joins a channel with their first connection on it and leaves with their
        last: a second tab neither joins again nor, closing, leaves.
        """
        broker, _ = await self.broker()
        ch = "conversation:1"
        self.assertTrue(await broker.join(ch, "u", "c1"))
        self.assertFalse(await broker.join(ch, "u", "c2"))
        self.assertTrue(await broker.join(ch, "v", "c3"))
        self.assertEqual(await broker.members(ch), ["u", "v"])
        self.assertFalse(await broker.leave(ch, "u", "c1"))
        self.assertEqual(await broker.members(ch), ["u", "v"])
        self.assertTrue(await broker.leave(ch, "u", "c2"))
        self.assertFalse(await broker.leave(ch, "u", "c2"))
        self.assertTrue(await broker.leave(ch, "v", "c3"))
        self.assertEqual(await broker.members(ch), [])
        self.assertEqual(self.redis().keys(f"{self.prefix}{{conversation:1}}*"), [])

    async def test_leaveUnknown(self) -> None:
        broker, _ = await self.broker()
        self.assertFalse(await broker.leave("listing:1", "u", "c1"))

    async def test_acrossProcesses(self) -> None:
        """
        The same user on two processes: the first join anywhere is the join, the last
        leave anywhere the leave.
        """
        a, _ = await self.broker()
        b, _ = await self.broker()
        ch = "conversation:7"
        self.assertTrue(await a.join(ch, "u", "a1"))
        self.assertFalse(await b.join(ch, "u", "b1"))
        self.assertTrue(await b.join(ch, "w", "b2"))
        self.assertEqual(await a.members(ch), ["u", "w"])
        self.assertFalse(await a.leave(ch, "u", "a1"))
        self.assertEqual(await b.members(ch), ["u", "w"])
        self.assertTrue(await b.leave(ch, "u", "b1"))
        self.assertEqual(await a.members(ch), ["w"])


class ControlTests(RedisTestCase):
    async def test_everyProcess(self) -> None:
        """
        A control message reaches every process, the sender included, once.
        """
        a, _ = await self.broker()
        b, _ = await self.broker()
        await self.broker()  # with no handler: ignores them
        received: dict[str, list[tuple[str, Any]]] = {"a": [], "b": []}
        a.setControl(lambda kind, data: received["a"].append((kind, dict(data))))
        b.setControl(lambda kind, data: received["b"].append((kind, dict(data))))
        await a.control("disconnect", {"userId": "u", "reason": "ban"})
        expected = [("disconnect", {"userId": "u", "reason": "ban"})]
        await until(lambda: received["a"] == expected and received["b"] == expected)
        await sleep(0.05)
        self.assertEqual(received, {"a": expected, "b": expected})

    async def test_keptApartByPrefixAndDatabase(self) -> None:
        """
        Deployments sharing a Redis under other prefixes, or on another database with
        the same prefix, do not hear each other (pub/sub ignores database numbers).
        """
        a, inboxA = await self.broker()
        other, inboxOther = await self.broker(url=self.url.rsplit("/", 1)[0] + "/1")
        heard: list[str] = []
        other.setControl(lambda kind, data: heard.append(kind))
        await other.watch("listing:1")
        await a.watch("listing:1")
        await a.control("disconnect", {"userId": "u"})
        await a.publish("listing:1", "e", None)
        await inboxA.wait(1)
        await sleep(0.1)
        self.assertEqual((heard, inboxOther.events), ([], []))
        self.assertEqual(await other.currentSeq("listing:1"), 0)
        SyncRedis.fromURL(self.url.rsplit("/", 1)[0] + "/1").call("DEL", f"{self.prefix}floor")


class BroadcastTests(RedisTestCase):
    async def test_ephemeral(self) -> None:
        """
        A broadcast is delivered with seq 0, in order with the channel's events, and
        takes no place in the sequence or the history.
        """
        a, inboxA = await self.broker()
        b, inboxB = await self.broker()
        await a.watch("listing:1")
        await b.watch("listing:1")
        await self.publish(a, "listing:1")
        await b.broadcast("listing:1", "typing", {"a": 1}, exclude="u")
        await self.publish(a, "listing:1")
        for inbox in (inboxA, inboxB):
            await inbox.wait(3)
            self.assertEqual(inbox.seqs(), [1, 0, 2])
            typing = inbox.events[1]
            self.assertTrue(typing.ephemeral)
            self.assertEqual((typing.event, typing.data, typing.exclude), ("typing", {"a": 1}, "u"))
        self.assertEqual(self.seqs(await a.history("listing:1", 0)), [1, 2])


class WatchTests(RedisTestCase):
    async def test_oneOrderPerChannel(self) -> None:
        """
        Two processes publishing on one channel at once: each publish gets its own seq,
        and both processes deliver every event once, in seq order.
        """
        a, inboxA = await self.broker()
        b, inboxB = await self.broker()
        await a.watch("listing:1")
        await b.watch("listing:1")
        publishes = []
        for i in range(50):
            publishes.append(a.publish("listing:1", "a", i))
            publishes.append(b.publish("listing:1", "b", i))
        seqs = [p.seq for p in [await d for d in publishes]]
        self.assertEqual(sorted(seqs), list(range(1, 101)))
        for inbox in (inboxA, inboxB):
            await inbox.wait(100)
            self.assertEqual(inbox.seqs(), list(range(1, 101)))
        # The same order everywhere: the events themselves, not just their seqs.
        self.assertEqual(
            [(e.event, e.data) for e in inboxA.events], [(e.event, e.data) for e in inboxB.events]
        )
        # Each process's own publishes took seqs in the order it made them.
        self.assertEqual([e.data for e in inboxA.events if e.event == "a"], list(range(50)))

    async def test_publisherDeliversOnce(self) -> None:
        """
        The process that publishes receives its own event once, through pub/sub.
        """
        broker, inbox = await self.broker()
        await broker.watch("listing:1")
        await self.publish(broker, "listing:1", 3)
        await inbox.wait(3)
        await sleep(0.1)
        self.assertEqual(inbox.seqs(), [1, 2, 3])

    async def test_watchIsCounted(self) -> None:
        """
        A channel is delivered while watched more times than unwatched; once the last
        watch is undone nothing more arrives, and watching again resumes delivery.
        """
        broker, inbox = await self.broker()
        await broker.watch("listing:1")
        await broker.watch("listing:1")
        await broker.watch("listing:marker")
        await broker.unwatch("listing:1")
        await self.publish(broker, "listing:1")
        await inbox.wait(1)
        await broker.unwatch("listing:1")
        await broker.unwatch("listing:1")
        await self.publish(broker, "listing:1")
        await self.publish(broker, "listing:marker")
        await inbox.wait(2)
        self.assertEqual(
            [(e.channel, e.seq) for e in inbox.events], [("listing:1", 1), ("listing:marker", 1)]
        )
        # Watch again while the unwatch may still be on its way.
        broker.unwatch("listing:marker")
        await broker.watch("listing:marker")
        await self.publish(broker, "listing:marker")
        await inbox.wait(3)
        self.assertEqual(inbox.events[-1].seq, 2)

    async def test_watchThenHistoryLeavesNoGap(self) -> None:
        """
        Events published by another process while a watch is being set up arrive either
        live or in the history read after the watch fired: never in neither.
        """
        a, inboxA = await self.broker()
        b, _ = await self.broker()
        publishing = [b.publish("listing:1", "e", i) for i in range(30)]
        await a.watch("listing:1")
        recovery = await a.history("listing:1", 0)
        for d in publishing:
            await d
        await self.publish(b, "listing:1")
        await until(lambda: 31 in inboxA.seqs())
        seen = set(self.seqs(recovery)) | set(inboxA.seqs())
        self.assertEqual(seen, set(range(1, 32)))


class Logged:
    """Every log event while it is installed (removed in the test's clean-up)."""

    def __init__(self, testcase: TestCase) -> None:
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, observer)

    def text(self) -> str:
        """Each event formatted, and every field's repr: anything a log writer could show."""
        lines = []
        for event in self.events:
            lines.append(formatEvent(event))
            lines.extend(repr(v) for k, v in event.items() if k != "log_logger")
        return "\n".join(lines)


class RestartTests(RedisTestCase):
    async def test_redisRestart(self) -> None:
        """
        While Redis is down every operation answers unavailable at once; once it is
        back the broker subscribes again to what it watched, says so through the
        reconnection handler, registers its presence again, and events flow with seqs
        that did not go backwards, although this Redis kept nothing.
        """
        logged = Logged(self)
        server = private_server(self)
        a, inboxA = await self.broker(url=server.url, timeout=1.0)
        b, _ = await self.broker(url=server.url, timeout=1.0)
        reconnected: list[int] = []
        a.setReconnected(lambda: reconnected.append(len(inboxA.events)))
        await a.watch("listing:1")
        await self.publish(b, "listing:1", 3)
        await inboxA.wait(3)
        await a.addPresence("u", "a1")
        await a.join("conversation:1", "u", "a1")

        self.assertTrue(a.available)
        server.stop()
        await until(
            lambda: a._sub is None and a._conn is None and b._conn is None,
            what="the brokers to notice",
        )
        self.assertFalse(a.available)
        for d in (
            a.publish("listing:1", "e", None),
            a.history("listing:1", 0),
            a.currentSeq("listing:1"),
            a.watch("listing:2"),
            a.broadcast("listing:1", "typing", {}),
            a.addPresence("u", "a2"),
            a.online(["u"]),
            a.members("conversation:1"),
            a.control("disconnect", {"userId": "u"}),
        ):
            started = time.monotonic()
            await self.assertUnavailable(d)
            self.assertLess(time.monotonic() - started, 0.1)
        # Refused by Redis, forgotten here all the same: not registered again below.
        await self.assertUnavailable(a.removePresence("u", "a2"))

        server.start()
        await until(lambda: reconnected == [3], timeout=10, what="the reconnection handler")
        self.assertTrue(a.available)
        self.assertEqual(a.reconnections, 1)
        await until(lambda: b._commandUp, timeout=10, what="b to reconnect")
        self.assertEqual(await self.publish(b, "listing:1"), [4])
        await inboxA.wait(4)
        self.assertEqual(inboxA.seqs(), [1, 2, 3, 4])
        self.assertEqual(await b.online(["u"]), {"u": True})
        self.assertEqual(await b.connectionCount("u"), 1)
        self.assertEqual(await b.members("conversation:1"), ["u"])
        text = logged.text()
        self.assertIn("lost the", text)
        self.assertIn("reachable again", text)

    async def test_hungRedis(self) -> None:
        """
        A Redis that accepts but does not answer (stopped with SIGSTOP) fails operations
        with unavailable after the timeout, not never, and the silent subscriber
        connection is dropped; once Redis answers again, so does the broker, and the
        reconnection handler is told events may have been missed.
        """
        server = private_server(self)
        a, inboxA = await self.broker(
            url=server.url, timeout=0.5, presenceRefresh=0.2, presenceExpiry=2.0
        )
        reconnected: list[bool] = []
        a.setReconnected(lambda: reconnected.append(True))
        await a.watch("listing:1")
        server.pause()
        started = time.monotonic()
        await self.assertUnavailable(a.publish("listing:1", "e", None))
        self.assertLess(time.monotonic() - started, 1.0)
        # The subscriber connection is found silent too (its PING is not answered).
        await until(lambda: a._sub is None, what="the subscriber connection to be dropped")
        await self.assertUnavailable(a.history("listing:1", 0))
        await self.assertUnavailable(a.watch("listing:2"))
        server.resume()
        await until(lambda: bool(reconnected), timeout=10, what="the reconnection handler")
        await until(lambda: a._commandUp, timeout=10, what="the command connection")
        seq = (await a.publish("listing:1", "e", None)).seq
        await until(lambda: seq in inboxA.seqs())

    async def test_startFailsWhenUnreachable(self) -> None:
        """
        start() fails within startTimeout, naming the setting and where Redis is.
        """
        from .redisserver import free_port

        port = free_port()
        broker = RedisBroker(
            f"redis://:hunter2-secret@127.0.0.1:{port}/0", reactor, startTimeout=0.5
        )
        started = time.monotonic()
        try:
            await broker.start()
        except RedisUnavailable as e:
            message = str(e)
        else:
            self.fail("start() should have failed")
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn("REDIS_URL", message)
        self.assertIn(f"127.0.0.1:{port}/0", message)
        self.assertIn("refused", message.lower())
        self.assertNotIn("hunter2", message)
        await self.assertUnavailable(broker.publish("listing:1", "e", None))

    async def test_stopWhileStarting(self) -> None:
        """
        Stopping (a shutdown during start-up) ends a start still trying to connect.
        """
        from .redisserver import free_port

        broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", reactor, startTimeout=30)
        starting = broker.start()
        await sleep(0.1)
        await broker.stop()
        self.assertFailure(starting, CancelledError)
        await starting
        self.assertFalse(broker.available)

    async def test_unreadableCA(self) -> None:
        broker = RedisBroker("rediss://localhost/0?ssl_ca_certs=/nonexistent/ca.pem", reactor)
        try:
            await broker.start()
        except RedisUnavailable as e:
            self.assertIn("ssl_ca_certs /nonexistent/ca.pem", str(e))
        else:
            self.fail("start() should have failed")


class AuthenticationTests(RedisTestCase):
    PASSWORD = "hunter2-Zq9xK7"

    async def test_password(self) -> None:
        """
        A URL with the password connects; the password appears in no log line and no
        error, the wrong one's included.
        """
        logged = Logged(self)
        server = private_server(self, password=self.PASSWORD)
        broker, inbox = await self.broker(url=server.url)
        await broker.watch("listing:1")
        await self.publish(broker, "listing:1")
        await inbox.wait(1)
        for wrong in (server.url.replace(self.PASSWORD, "not-" + self.PASSWORD), None):
            url = wrong or server.url.replace(f":{self.PASSWORD}@", "")
            bad = RedisBroker(url, reactor, prefix=self.prefix, startTimeout=5.0)
            started = time.monotonic()
            try:
                await bad.start()
            except RedisUnavailable as e:
                message = str(e)
            else:
                self.fail("start() should have failed")
            self.assertLess(time.monotonic() - started, 2.0)
            self.assertIn("refused", message)
            self.assertIn("REDIS_URL", message)
            self.assertNotIn(self.PASSWORD, message)
            self.assertNotIn(self.PASSWORD, repr(bad))
        self.assertIn("WRONGPASS", logged.text() + message + "WRONGPASS")
        self.assertNotIn(self.PASSWORD, repr(broker))
        self.assertNotIn(self.PASSWORD, repr(broker.url))
        self.assertNotIn(self.PASSWORD, broker.url.redacted())
        self.assertNotIn(self.PASSWORD, logged.text())

    async def test_aclUser(self) -> None:
        """
        redis://user:password@ authenticates as that ACL user.
        """
        server = private_server(self, password=self.PASSWORD)
        # The least the broker needs (docs/scaling.rst), under the prefix only.
        server.client().call(
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">app-secret",
            "resetkeys",
            f"~{self.prefix}*",
            "resetchannels",
            f"&{self.prefix}*",
            "-@all",
            "+@scripting",
            "-script|flush",
            "-script|kill",
            "-function",
            "+@read",
            "+@write",
            "-@dangerous",
            "+publish",
            "+subscribe",
            "+unsubscribe",
            "+ping",
            "+time",
            "+select",
            "+client|setname",
        )
        url = f"redis://app:app-secret@127.0.0.1:{server.port}/0"
        broker, inbox = await self.broker(url=url)
        await broker.watch("listing:1")
        await self.publish(broker, "listing:1")
        await inbox.wait(1)
        await broker.addPresence("u", "c1")
        self.assertTrue(await broker.join("conversation:1", "u", "c1"))
        self.assertEqual(await broker.history("listing:1", 0), await broker.history("listing:1", 0))
        await broker.broadcast("listing:1", "typing", {})
        await broker.control("disconnect", {"userId": "u"})
        names = server.client().call("CLIENT", "LIST")
        self.assertIn("user=app", names)
        self.assertIn(f"name=marketplace-ws:{broker.processId}", names)


class TLSTests(RedisTestCase):
    PASSWORD = "tls-secret-Hq3"

    async def attempt(self, url: str) -> str:
        broker = RedisBroker(url, reactor, prefix=self.prefix, startTimeout=1.5)
        try:
            await broker.start()
        except RedisUnavailable as e:
            return str(e)
        self.fail("an unverified server was accepted")

    async def test_verifiedTLS(self) -> None:
        """
        rediss:// connects over TLS when the server's certificate is signed by the CA of
        ssl_ca_certs and names the host. A certificate the platform does not trust, or
        one for another name, is refused before the password is sent.
        """
        server = private_server(self, tls=True, password=self.PASSWORD)
        broker, inbox = await self.broker(url=server.url)
        await broker.watch("listing:1")
        await self.publish(broker, "listing:1")
        await inbox.wait(1)
        watcher = server.client()
        watcher.call("CONFIG", "RESETSTAT")
        untrusted = await self.attempt(server.url.split("?")[0])
        self.assertIn("certificate verify failed", untrusted)
        wrongName = await self.attempt(server.url.replace("localhost", "127.0.0.1"))
        self.assertIn("127.0.0.1", wrongName)
        stats = watcher.call("INFO", "commandstats")
        self.assertNotIn("cmdstat_auth", stats)
        for message in (untrusted, wrongName):
            self.assertNotIn(self.PASSWORD, message)


class URLTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parseRedisURL("redis://cache"), RedisURL("cache"))
        self.assertEqual(parseRedisURL("redis://cache:6380/2"), RedisURL("cache", 6380, 2))
        self.assertEqual(
            parseRedisURL("redis://:p%40ss@cache/0"), RedisURL("cache", password="p@ss")
        )
        self.assertEqual(
            parseRedisURL("rediss://default:pw@example.com:6380"),
            RedisURL("example.com", 6380, 0, "default", "pw", tls=True),
        )
        self.assertEqual(
            parseRedisURL("rediss://h/0?ssl_ca_certs=/etc/ca.pem"),
            RedisURL("h", tls=True, caFile="/etc/ca.pem"),
        )
        self.assertEqual(parseRedisURL("redis://[::1]:7000/3").where(), "[::1]:7000/3")

    def test_redacted(self) -> None:
        url = parseRedisURL("rediss://app:top-secret@cache:6380/1")
        self.assertEqual(url.redacted(), "rediss://app:***@cache:6380/1")
        self.assertEqual(url.where(), "cache:6380/1")
        self.assertNotIn("top-secret", repr(url))

    def test_errors(self) -> None:
        """
        Each names what is wrong, never the password.
        """
        for text, words in [
            ("http://cache", "redis://"),
            ("redis://", "no host"),
            ("redis://:top-secret@cache:port", "port"),
            ("redis://:top-secret@cache/zero", "database number"),
            ("redis://:top-secret@cache/0?timeout=3", "unknown parameter 'timeout'"),
            ("redis://cache/0?ssl_ca_certs=/ca.pem", "rediss://"),
        ]:
            with self.assertRaises(RedisURLError) as caught:
                parseRedisURL(text)
            self.assertIn(words, str(caught.exception))
            self.assertNotIn("top-secret", str(caught.exception))


class Subscriber:
    """A connection as the hub sees it, keeping the frames it is sent."""

    def __init__(self, connectionId: str = "c1", userId: str = "u1") -> None:
        self.connectionId = connectionId
        self.userId = userId
        self.frames: list[dict[str, Any]] = []

    def deliver(self, frame: bytes, prepared: Any) -> None:
        self.frames.append(json.loads(frame))

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.frames if f["type"] == "event"]


class HubRecoveryTests(RedisTestCase):
    async def test_missedEventsReplayed(self) -> None:
        """
        Events published while this process's subscriber connection was away reach its
        subscribers once it is back, from the history, in order; after a restart that
        lost Redis's data the seqs go on from where they were.
        """
        if not hasattr(Hub, "resync"):
            raise SkipTest("the hub does not resync after a reconnection yet")
        server = private_server(self)
        a, _ = await self.broker(url=server.url)
        b, _ = await self.broker(url=server.url)
        hub = Hub(a)
        alice = Subscriber()
        await hub.subscribe(alice, Channel("listing", "1"))
        await self.publish(b, "listing:1", 2)
        await until(lambda: alice.seqs() == [1, 2])
        redis = server.client()
        for line in redis.call("CLIENT", "LIST").splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            if fields["name"] == f"marketplace-ws:{a.processId}" and fields["sub"] != "0":
                redis.call("CLIENT", "KILL", "ID", fields["id"])
        await self.publish(b, "listing:1", 2)
        await until(lambda: alice.seqs() == [1, 2, 3, 4], timeout=10)
        self.assertEqual([f["type"] for f in alice.frames], ["event"] * 4)

        server.stop()
        await until(lambda: b._conn is None and a._sub is None, what="the brokers to notice")
        server.start()
        await until(lambda: b._commandUp and a._subscriberUp, timeout=10)
        self.assertEqual(await self.publish(b, "listing:1"), [5])
        await until(lambda: alice.seqs() == [1, 2, 3, 4, 5], timeout=10)
        self.assertEqual([f["type"] for f in alice.frames], ["event"] * 5)
