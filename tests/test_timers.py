"""
The bucketed timer every connection's timeouts share.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from marketplace_ws.timers import BucketTimer


class BucketTimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000.013)
        self.timer = BucketTimer(self.clock, resolution=0.05)
        self.fired: list[tuple[str, float]] = []

    def note(self, name: str) -> None:
        self.fired.append((name, self.clock.seconds()))

    def test_neverEarlyAtMostOneBucketLate(self) -> None:
        for delay in (0.0, 0.01, 0.3, 0.333, 25.0):
            self.timer.call_later(delay, self.note, str(delay))
        for _ in range(5300):
            self.clock.advance(0.005)
        self.assertEqual(len(self.fired), 5)
        for name, when in self.fired:
            due = 1000.013 + float(name)
            self.assertGreaterEqual(when + 1e-9, due)
            self.assertLess(when - due, 0.05 + 0.005 + 1e-9)

    def test_oneReactorCallPerBucket(self) -> None:
        """Thousands of timeouts in one bucket cost one DelayedCall."""
        for n in range(1000):
            self.timer.call_later(25.0 + n / 100_000, self.note, "x")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(26)
        self.assertEqual(len(self.fired), 1000)
        self.assertEqual(self.timer.pending(), 0)

    def test_cancel(self) -> None:
        kept = self.timer.call_later(1, self.note, "kept")
        dropped = self.timer.call_later(1, self.note, "dropped")
        dropped.cancel()
        dropped.cancel()
        self.assertFalse(dropped.active())
        self.assertTrue(kept.active())
        self.clock.advance(2)
        self.assertEqual([name for name, _ in self.fired], ["kept"])
        self.assertFalse(kept.active())
        kept.cancel()

    def test_cancelledBucketLeavesNoReactorCall(self) -> None:
        """
        When every call of a bucket is cancelled (connections that closed), its
        reactor call goes too: nothing lingers until a far deadline.
        """
        calls = [self.timer.call_later(500, self.note, "x") for _ in range(3)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for call in calls:
            call.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.timer.pending(), 0)
        self.timer.call_later(500, self.note, "again")
        self.clock.advance(501)
        self.assertEqual([name for name, _ in self.fired], ["again"])

    def test_failureDoesNotStopTheBucket(self) -> None:
        def broken() -> None:
            raise RuntimeError("boom")

        self.timer.call_later(1, broken)
        self.timer.call_later(1, self.note, "after")
        self.clock.advance(2)
        self.assertEqual([name for name, _ in self.fired], ["after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
