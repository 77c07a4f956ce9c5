"""
The in-process broker: seq per channel, the bounded history and what it can recover,
idempotency keys, the bounds on memory, and presence.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from marketplace_ws.broker import Event, IBroker, Published, Recovery
from marketplace_ws.broker.memory import MemoryBroker


class BrokerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.delivered: list[Event] = []

    def broker(self, **kwargs: Any) -> MemoryBroker:
        broker = MemoryBroker(self.clock, **kwargs)
        broker.setDelivery(self.delivered.append)
        return broker

    def result(self, d: Deferred[Any]) -> Any:
        return self.successResultOf(d)

    def publish(self, broker: MemoryBroker, channel: str, n: int = 1, **kwargs: Any) -> list[int]:
        return [self.result(broker.publish(channel, "e", {"n": i}, **kwargs)).seq for i in range(n)]

    def seqs(self, recovery: Recovery) -> list[int]:
        return [event.seq for event in recovery.events]


class SequenceTests(BrokerTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IBroker, self.broker()))

    def test_seqPerChannel(self) -> None:
        """
        Each channel counts from 1 on its own; a publish answers its seq.
        """
        broker = self.broker()
        self.assertEqual(
            self.result(broker.publish("listing:1", "price", {"p": 1})),
            Published("listing:1", 1, duplicate=False),
        )
        self.assertEqual(self.publish(broker, "listing:1", 2), [2, 3])
        self.assertEqual(self.publish(broker, "user:u", 2), [1, 2])
        self.assertEqual(self.result(broker.currentSeq("listing:1")), 3)
        self.assertEqual(self.result(broker.currentSeq("user:u")), 2)
        self.assertEqual(self.result(broker.currentSeq("listing:never")), 0)

    def test_delivery(self) -> None:
        """
        Every event is delivered once, in order, stamped with the broker's clock.
        """
        broker = self.broker()
        self.clock.advance(7)
        broker.publish("listing:1", "price", {"p": 1})
        broker.publish("listing:2", "sold", None)
        self.assertEqual(
            self.delivered,
            [
                Event("listing:1", 1, "price", {"p": 1}, 7.0),
                Event("listing:2", 1, "sold", None, 7.0),
            ],
        )

    def test_deliveryFailure(self) -> None:
        """
        A delivery that raises is logged; the event is published and kept all the same.
        """
        broker = MemoryBroker(self.clock)

        def broken(event: Event) -> None:
            raise RuntimeError("boom")

        broker.setDelivery(broken)
        self.assertEqual(self.result(broker.publish("listing:1", "e", 1)).seq, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.seqs(self.result(broker.history("listing:1", 0))), [1])

    def test_noDelivery(self) -> None:
        """
        Publishing works before anything asked for delivery.
        """
        broker = MemoryBroker(self.clock)
        self.assertEqual(self.result(broker.publish("listing:1", "e", 1)).seq, 1)

    def test_badSettings(self) -> None:
        bad: list[dict[str, Any]] = [
            {"historySize": -1},
            {"historyAge": -1.0},
            {"idempotencyWindow": -1.0},
            {"maxIdempotencyKeys": -1},
            {"maxChannels": 0},
        ]
        for kwargs in bad:
            self.assertRaises(ValueError, MemoryBroker, self.clock, **kwargs)


class HistoryTests(BrokerTestCase):
    def test_replay(self) -> None:
        """
        The events after since, in order, with the channel's position.
        """
        broker = self.broker()
        self.publish(broker, "listing:1", 5)
        recovery = self.result(broker.history("listing:1", 2))
        self.assertEqual((recovery.recovered, recovery.seq), (True, 5))
        self.assertEqual(self.seqs(recovery), [3, 4, 5])
        self.assertEqual(
            recovery.events[0], Event("listing:1", 3, "e", {"n": 2}, self.clock.seconds())
        )
        self.assertEqual(self.result(broker.history("listing:1", 5)), Recovery((), True, 5))
        self.assertEqual(self.seqs(self.result(broker.history("listing:1", 0))), [1, 2, 3, 4, 5])

    def test_boundedBySize(self) -> None:
        """
        The history keeps the latest historySize events: since must be at or after the
        seq just before the oldest of them.
        """
        broker = self.broker(historySize=3)
        self.publish(broker, "listing:1", 5)
        self.assertEqual(self.seqs(self.result(broker.history("listing:1", 2))), [3, 4, 5])
        for since in (0, 1):
            self.assertEqual(
                self.result(broker.history("listing:1", since)), Recovery((), False, 5)
            )

    def test_boundedByAge(self) -> None:
        """
        Events older than historyAge are gone from the history.
        """
        broker = self.broker(historyAge=10.0)
        self.publish(broker, "listing:1")
        self.clock.advance(5)
        self.publish(broker, "listing:1")
        self.clock.advance(7)
        self.assertFalse(self.result(broker.history("listing:1", 0)).recovered)
        self.assertEqual(self.seqs(self.result(broker.history("listing:1", 1))), [2])
        self.clock.advance(10)
        self.assertFalse(self.result(broker.history("listing:1", 1)).recovered)
        # Nothing was missed after the latest event, however old it is.
        self.assertEqual(self.result(broker.history("listing:1", 2)), Recovery((), True, 2))

    def test_idleHistoryDropped(self) -> None:
        """
        A channel whose events have all aged out keeps its seq, not its history.
        """
        broker = self.broker(historyAge=10.0)
        self.publish(broker, "listing:1", 3)
        self.clock.advance(11)
        self.publish(broker, "listing:2")
        self.assertIsNone(broker._channels["listing:1"].history)
        self.assertEqual(list(broker._recent), ["listing:2"])
        self.assertEqual(self.publish(broker, "listing:1"), [4])
        self.assertEqual(self.seqs(self.result(broker.history("listing:1", 3))), [4])

    def test_futureSince(self) -> None:
        """
        A since after the channel's position is not one this channel has been at.
        """
        broker = self.broker()
        self.publish(broker, "listing:1", 2)
        self.assertEqual(self.result(broker.history("listing:1", 3)), Recovery((), False, 2))
        self.assertEqual(self.result(broker.history("listing:new", 0)), Recovery((), True, 0))
        self.assertEqual(self.result(broker.history("listing:new", 1)), Recovery((), False, 0))

    def test_noHistory(self) -> None:
        """
        With historySize 0 only a client that missed nothing recovers.
        """
        broker = self.broker(historySize=0)
        self.publish(broker, "listing:1", 2)
        self.assertEqual(self.result(broker.history("listing:1", 2)), Recovery((), True, 2))
        self.assertEqual(self.result(broker.history("listing:1", 1)), Recovery((), False, 2))


class IdempotencyTests(BrokerTestCase):
    def test_duplicate(self) -> None:
        """
        A key seen on the channel within the window answers the original seq and
        publishes nothing.
        """
        broker = self.broker(idempotencyWindow=60.0)
        first = self.result(broker.publish("user:u", "order.paid", 1, idempotencyKey="k"))
        self.publish(broker, "user:u")
        self.clock.advance(59)
        again = self.result(broker.publish("user:u", "order.paid", 1, idempotencyKey="k"))
        self.assertEqual(first, Published("user:u", 1))
        self.assertEqual(again, Published("user:u", 1, duplicate=True))
        self.assertEqual([e.seq for e in self.delivered], [1, 2])
        self.assertEqual(self.seqs(self.result(broker.history("user:u", 0))), [1, 2])

    def test_perChannel(self) -> None:
        """
        The same key on another channel is another publish (one key for a batch).
        """
        broker = self.broker()
        self.publish(broker, "user:a", idempotencyKey="k")
        other = self.result(broker.publish("user:b", "e", 1, idempotencyKey="k"))
        self.assertEqual(other, Published("user:b", 1))

    def test_afterWindow(self) -> None:
        broker = self.broker(idempotencyWindow=60.0)
        self.publish(broker, "user:u", idempotencyKey="k")
        self.clock.advance(60)
        self.assertEqual(self.publish(broker, "user:u", idempotencyKey="k"), [2])
        self.assertEqual(self.publish(broker, "user:u", idempotencyKey="k"), [2])

    def test_capped(self) -> None:
        """
        At most maxIdempotencyKeys are remembered, the oldest forgotten first.
        """
        broker = self.broker(maxIdempotencyKeys=2)
        for key in "abc":
            self.publish(broker, "user:u", idempotencyKey=key)
        self.assertEqual(len(broker._keys), 2)
        self.assertEqual(self.publish(broker, "user:u", idempotencyKey="c"), [3])
        self.assertEqual(self.publish(broker, "user:u", idempotencyKey="a"), [4])

    def test_disabled(self) -> None:
        broker = self.broker(idempotencyWindow=0.0)
        self.publish(broker, "user:u", idempotencyKey="k")
        self.assertEqual(self.publish(broker, "user:u", idempotencyKey="k"), [2])
        self.assertEqual(len(broker._keys), 0)


class ChannelLimitTests(BrokerTestCase):
    def test_forgetLeastRecent(self) -> None:
        """
        Past maxChannels the least recently published unwatched channel is forgotten,
        and comes back above every seq forgotten: its seq never goes backwards, and a
        since from before is not recovered.
        """
        broker = self.broker(maxChannels=2)
        self.publish(broker, "listing:a", 3)
        self.publish(broker, "listing:b", 5)
        self.publish(broker, "listing:a")
        self.publish(broker, "listing:c")
        self.assertEqual(sorted(broker._channels), ["listing:a", "listing:c"])
        self.assertEqual(self.result(broker.currentSeq("listing:b")), 5)
        self.assertEqual(self.result(broker.history("listing:b", 5)), Recovery((), True, 5))
        self.assertFalse(self.result(broker.history("listing:b", 4)).recovered)
        self.assertEqual(self.publish(broker, "listing:b"), [6])
        self.assertFalse(self.result(broker.history("listing:b", 2)).recovered)
        self.assertEqual(sorted(broker._channels), ["listing:b", "listing:c"])
        # listing:a was at 4 when it was forgotten.
        self.assertEqual(self.publish(broker, "listing:a"), [6])

    def test_watchedKept(self) -> None:
        """
        A watched channel is never forgotten; unwatched, it can be.
        """
        broker = self.broker(maxChannels=1)
        self.result(broker.watch("listing:a"))
        self.publish(broker, "listing:a", 2)
        self.publish(broker, "listing:b")
        self.publish(broker, "listing:c")
        self.assertEqual(list(broker._channels), ["listing:a"])
        self.assertEqual(self.publish(broker, "listing:a"), [3])
        self.result(broker.unwatch("listing:a"))
        self.publish(broker, "listing:d")
        self.assertEqual(list(broker._channels), ["listing:d"])
        self.result(broker.unwatch("listing:a"))
        self.assertEqual(self.publish(broker, "listing:a"), [4])

    def test_watchUnknown(self) -> None:
        """
        Watching a channel that has no events yet fixes where it starts.
        """
        broker = self.broker(maxChannels=1)
        self.publish(broker, "listing:a", 4)
        self.publish(broker, "listing:b")
        self.result(broker.watch("listing:x"))
        self.assertEqual(self.result(broker.currentSeq("listing:x")), 4)
        self.publish(broker, "listing:c")
        self.assertEqual(self.result(broker.currentSeq("listing:unknown")), 5)
        self.assertEqual(self.result(broker.currentSeq("listing:x")), 4)
        self.assertEqual(self.publish(broker, "listing:x"), [5])


class PresenceTests(BrokerTestCase):
    def test_onlineWhileAnyConnection(self) -> None:
        broker = self.broker()
        self.assertEqual(self.result(broker.addPresence("u", "c1")), 1)
        self.assertEqual(self.result(broker.addPresence("u", "c2")), 2)
        self.assertEqual(self.result(broker.connectionCount("u")), 2)
        self.assertEqual(self.result(broker.online(["u", "v"])), {"u": True, "v": False})
        self.assertEqual(self.result(broker.removePresence("u", "c1")), 1)
        self.assertEqual(self.result(broker.removePresence("u", "c1")), 1)
        self.assertEqual(self.result(broker.removePresence("u", "c2")), 0)
        self.assertEqual(self.result(broker.removePresence("u", "c2")), 0)
        self.assertEqual(self.result(broker.online(["u"])), {"u": False})
        self.assertEqual(self.result(broker.connectionCount("u")), 0)
        self.assertEqual(broker._presence, {})

    def test_sameConnectionTwice(self) -> None:
        """
        Adding a connection twice does not keep the user online after it closes.
        """
        broker = self.broker()
        broker.addPresence("u", "c1")
        self.assertEqual(self.result(broker.addPresence("u", "c1")), 1)
        self.assertEqual(self.result(broker.removePresence("u", "c1")), 0)


class ControlTests(BrokerTestCase):
    def test_control(self) -> None:
        broker = self.broker()
        received: list[tuple[str, Any]] = []
        self.result(broker.control("nobody", {}))
        broker.setControl(lambda kind, data: received.append((kind, dict(data))))
        self.result(broker.control("disconnect", {"userId": "u"}))
        self.assertEqual(received, [("disconnect", {"userId": "u"})])


class MembershipTests(BrokerTestCase):
    def test_firstJoinLastLeave(self) -> None:
        """
        A user joins a channel with their first connection on it and leaves with their
        last: a second tab neither joins again nor, closing, leaves.
        """
        broker = self.broker()
        ch = "conversation:1"
        self.assertTrue(self.result(broker.join(ch, "u", "c1")))
        self.assertFalse(self.result(broker.join(ch, "u", "c2")))
        self.assertTrue(self.result(broker.join(ch, "v", "c3")))
        self.assertEqual(self.result(broker.members(ch)), ["u", "v"])
        self.assertFalse(self.result(broker.leave(ch, "u", "c1")))
        self.assertEqual(self.result(broker.members(ch)), ["u", "v"])
        self.assertTrue(self.result(broker.leave(ch, "u", "c2")))
        self.assertFalse(self.result(broker.leave(ch, "u", "c2")))
        self.assertTrue(self.result(broker.leave(ch, "v", "c3")))
        self.assertEqual(self.result(broker.members(ch)), [])
        self.assertEqual(broker._members, {})

    def test_leaveUnknown(self) -> None:
        broker = self.broker()
        self.assertFalse(self.result(broker.leave("listing:1", "u", "c1")))


class BroadcastTests(BrokerTestCase):
    def test_ephemeral(self) -> None:
        """
        A broadcast is delivered with seq 0 and takes no place in the sequence or the
        history.
        """
        broker = self.broker()
        self.publish(broker, "listing:1")
        self.result(broker.broadcast("listing:1", "typing", {"a": 1}, exclude="u"))
        self.publish(broker, "listing:1")
        self.assertEqual([e.seq for e in self.delivered], [1, 0, 2])
        self.assertEqual(self.delivered[1].exclude, "u")
        self.assertTrue(self.delivered[1].ephemeral)
        self.assertEqual(self.seqs(self.result(broker.history("listing:1", 0))), [1, 2])


class HistoryModelTests(BrokerTestCase):
    @settings(derandomize=True, max_examples=200, deadline=None)
    @given(
        steps=st.lists(
            st.one_of(
                st.tuples(st.just("publish"), st.sampled_from(["listing:a", "listing:b"])),
                st.tuples(st.just("tick"), st.sampled_from([0.5, 2.0, 7.0])),
            ),
            max_size=40,
        ),
        historySize=st.integers(0, 6),
    )
    def test_history(self, steps: list[tuple[str, Any]], historySize: int) -> None:
        """
        Against a model that keeps everything: the history recovers a since exactly when
        every event after it is among the latest historySize of at most historyAge
        seconds, and then answers exactly those events.
        """
        clock = Clock()
        broker = MemoryBroker(clock, historySize=historySize, historyAge=10.0)
        everything: dict[str, list[tuple[int, float]]] = {"listing:a": [], "listing:b": []}
        for step in steps:
            if step[0] == "tick":
                clock.advance(step[1])
            else:
                seq = self.result(broker.publish(step[1], "e", None)).seq
                everything[step[1]].append((seq, clock.seconds()))
        now = clock.seconds()
        for channel, events in everything.items():
            top = len(events)
            self.assertEqual([seq for seq, _ in events], list(range(1, top + 1)))
            latest = events[max(0, top - historySize) :] if historySize else []
            kept = [seq for seq, at in latest if at >= now - 10.0]
            oldest = kept[0] if kept else top + 1
            for since in range(-1, top + 2):
                recovery = self.result(broker.history(channel, since))
                self.assertEqual(recovery.seq, top)
                self.assertEqual(recovery.recovered, oldest - 1 <= since <= top)
                if recovery.recovered:
                    self.assertEqual(self.seqs(recovery), list(range(since + 1, top + 1)))
                else:
                    self.assertEqual(recovery.events, ())
