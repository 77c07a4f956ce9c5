"""
Rate specs and the token buckets that enforce them, on a fake clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from marketplace_ws.limits import OpLimiter, Rate, TokenBucket, parseRates


class RateParseTests(SynchronousTestCase):
    def test_rateAndBurst(self) -> None:
        self.assertEqual(Rate.parse("20/s:40"), Rate(rate=20.0, burst=40.0))

    def test_burstDefaultsToTheCount(self) -> None:
        self.assertEqual(Rate.parse("5/s"), Rate(5.0, 5.0))
        self.assertEqual(Rate.parse("0.5/s"), Rate(0.5, 1.0))

    def test_units(self) -> None:
        self.assertEqual(Rate.parse("120/m"), Rate(2.0, 120.0))
        self.assertEqual(Rate.parse("3600/h:10"), Rate(1.0, 10.0))
        self.assertEqual(Rate.parse("7"), Rate(7.0, 7.0))

    def test_whitespace(self) -> None:
        self.assertEqual(Rate.parse(" 5 / s : 8 "), Rate(5.0, 8.0))

    def test_badSpecs(self) -> None:
        """
        Every bad spec is a L{ValueError} naming the spec as written, so the start-up
        error shows the operator what to fix.
        """
        for text in (
            "",
            "fast",
            "abc/s",
            "5/s:lots",
            "5/x",
            "5/sec",
            "0/s",
            "-1/s",
            "5/s:0.5",
            "5/s:0",
            # Not numbers a bucket can work with: NaN compares false with everything.
            "nan/s",
            "5/s:nan",
            "inf/s",
            "5/s:inf",
            "1e400/s",
        ):
            with self.assertRaises(ValueError, msg=text) as raised:
                Rate.parse(text)
            self.assertIn(repr(text), str(raised.exception))


class ParseRatesTests(SynchronousTestCase):
    def test_perOpAndDefault(self) -> None:
        self.assertEqual(
            parseRates("message.send=5/s:10, typing=2/s,*=30/s:60"),
            {"message.send": Rate(5, 10), "typing": Rate(2, 2), "*": Rate(30, 60)},
        )

    def test_emptyParts(self) -> None:
        self.assertEqual(parseRates(""), {})
        self.assertEqual(parseRates(" , typing=2/s,"), {"typing": Rate(2, 2)})

    def test_badSpecs(self) -> None:
        for text in ("typing", "=5/s", "typing=", "typing=fast", "typing=2/s,ping", "*=5/x"):
            with self.assertRaises(ValueError, msg=text):
                parseRates(text)

    def test_opGivenTwice(self) -> None:
        """Two rates for one op is a mistake to report, not a silent last-one-wins."""
        with self.assertRaises(ValueError) as raised:
            parseRates("typing=1/s,ping=5/s,typing=9/s")
        self.assertIn("'typing'", str(raised.exception))


class TokenBucketTests(SynchronousTestCase):
    def takeAll(self, bucket: TokenBucket, attempts: int = 100) -> int:
        return sum(bucket.take() for _ in range(attempts))

    def test_burstThenRefused(self) -> None:
        clock = Clock()
        bucket = TokenBucket(Rate(2, 5), clock.seconds)
        self.assertEqual(self.takeAll(bucket), 5)

    def test_refillsAtTheRate(self) -> None:
        clock = Clock()
        bucket = TokenBucket(Rate(2, 5), clock.seconds)
        self.takeAll(bucket)
        clock.advance(0.45)
        self.assertFalse(bucket.take())
        clock.advance(0.1)
        self.assertTrue(bucket.take())
        self.assertFalse(bucket.take())
        clock.advance(1.0)
        self.assertEqual(self.takeAll(bucket), 2)

    def test_neverMoreThanTheBurst(self) -> None:
        clock = Clock()
        bucket = TokenBucket(Rate(2, 5), clock.seconds)
        clock.advance(3600)
        self.assertEqual(self.takeAll(bucket), 5)

    def test_slowRates(self) -> None:
        clock = Clock()
        bucket = TokenBucket(Rate.parse("30/m:1"), clock.seconds)
        self.assertTrue(bucket.take())
        clock.advance(1.9)
        self.assertFalse(bucket.take())
        clock.advance(0.2)
        self.assertTrue(bucket.take())

    def test_clockSteppingBack(self) -> None:
        """
        The reactor's clock is wall time, which NTP may step back: the bucket then
        neither refills nor falls an hour into debt.
        """
        clock = Clock()
        clock.advance(10_000)
        bucket = TokenBucket(Rate(2, 5), clock.seconds)
        self.assertEqual(self.takeAll(bucket, 3), 3)
        clock.rightNow -= 3600
        self.assertEqual(self.takeAll(bucket), 2)
        clock.advance(0.5)
        self.assertTrue(bucket.take())


class OpLimiterTests(SynchronousTestCase):
    def test_opsHaveBucketsOfTheirOwn(self) -> None:
        clock = Clock()
        limiter = OpLimiter({"typing": Rate(1, 2), "*": Rate(1, 3)}, clock.seconds)
        self.assertEqual([limiter.allow("typing") for _ in range(3)], [True, True, False])
        self.assertEqual([limiter.allow("ping") for _ in range(4)], [True, True, True, False])
        clock.advance(1)
        self.assertTrue(limiter.allow("typing"))
        self.assertTrue(limiter.allow("ping"))

    def test_otherOpsShareTheDefault(self) -> None:
        """
        Ops without a rate of their own share C{*}: inventing op names gains a
        client nothing.
        """
        clock = Clock()
        limiter = OpLimiter({"*": Rate(1, 3)}, clock.seconds)
        allowed = [limiter.allow(f"made.up.{n}") for n in range(5)]
        self.assertEqual(allowed, [True, True, True, False, False])

    def test_withoutDefaultOtherOpsAreUnlimited(self) -> None:
        clock = Clock()
        limiter = OpLimiter({"typing": Rate(1, 1)}, clock.seconds)
        self.assertTrue(all(limiter.allow("ping") for _ in range(1000)))
        self.assertEqual([limiter.allow("typing") for _ in range(2)], [True, False])

    def test_bucketStartsFullOnFirstUse(self) -> None:
        clock = Clock()
        limiter = OpLimiter({"*": Rate(1, 2)}, clock.seconds)
        clock.advance(1000)
        self.assertEqual([limiter.allow("ping") for _ in range(3)], [True, True, False])
