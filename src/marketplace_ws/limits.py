"""
The limits of a connection, and the token buckets that enforce its rate limits.

A bucket holds at most C{burst} tokens and gains C{rate} per second; each request
takes one. Its state is two floats, so a connection's limits cost a few dozen bytes
whatever the client sends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from attrs import field, frozen


@frozen
class Rate:
    """C{rate} requests a second on average, C{burst} at once."""

    rate: float
    burst: float

    @classmethod
    def parse(cls, text: str) -> Rate:
        """
        C{"20/s:40"} (20 a second, bursts of 40), C{"5/s"} (burst = rate), C{"120/m"}.
        """
        spec, _, burstText = text.strip().partition(":")
        count, _, unit = spec.partition("/")
        seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip() or "s")
        if seconds is None:
            raise ValueError(f"{text!r}: the unit after / must be s, m or h")
        try:
            perUnit = float(count)
            burst = float(burstText) if burstText else max(1.0, perUnit)
        except ValueError:
            raise ValueError(f"{text!r} is not RATE/UNIT[:BURST] (for example 20/s:40)") from None
        rate = perUnit / seconds
        # Negated so that NaN, which compares false with everything, is refused too: it
        # would make a bucket that always (NaN rate) or never (NaN burst) allows.
        if not (0 < rate < math.inf and 1 <= burst < math.inf):
            raise ValueError(f"{text!r}: rate must be positive and burst at least 1, both finite")
        return cls(rate=rate, burst=burst)


def parseRates(text: str) -> dict[str, Rate]:
    """
    C{"message.send=5/s:10,typing=2/s,*=30/s:60"}: a rate per op, C{*} for the rest.
    """
    rates: dict[str, Rate] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        op, sep, spec = part.partition("=")
        if not sep or not op.strip():
            raise ValueError(f"{part.strip()!r} is not OP=RATE (for example typing=2/s)")
        if op.strip() in rates:
            raise ValueError(f"{op.strip()!r} has two rates; give each op one")
        rates[op.strip()] = Rate.parse(spec)
    return rates


class TokenBucket:
    __slots__ = ("_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: Rate, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate.burst
        self._stamp = clock()

    def take(self) -> bool:
        now = self._clock()
        # The reactor's clock is wall time: when it steps back (NTP), no refill, but no
        # debt of an hour's worth of tokens either.
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self._rate.burst, self._tokens + elapsed * self._rate.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class OpLimiter:
    """
    The buckets of one connection, created on first use of each op.
    """

    __slots__ = ("_buckets", "_clock", "_rates")

    def __init__(self, rates: Mapping[str, Rate], clock: Callable[[], float]) -> None:
        self._rates = rates
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, op: str) -> bool:
        # Ops without a rate of their own share the "*" bucket, so random op names
        # cannot create buckets without bound.
        key = op if op in self._rates else "*"
        bucket = self._buckets.get(key)
        if bucket is None:
            rate = self._rates.get(key)
            if rate is None:
                return True
            bucket = self._buckets[key] = TokenBucket(rate, self._clock)
        return bucket.take()


@frozen
class ConnectionLimits:
    """
    Every limit of a WebSocket connection; none may grow memory without bound.
    """

    maxMessageSize: int = 64 * 1024
    maxFrameSize: int = 64 * 1024
    openHandshakeTimeout: float = 10.0
    closeHandshakeTimeout: float = 5.0
    authTimeout: float = 10.0
    pingInterval: float = 25.0
    pingTimeout: float = 10.0
    maxConnectionsPerUser: int = 10
    rates: Mapping[str, Rate] = field(factory=lambda: {"*": Rate(20, 40)})
    #: Rate-limited requests within about a minute before the connection is closed
    #: with 4029.
    abuseLimit: int = 50
    #: Malformed frames in a row before the connection is closed with 4000.
    garbageLimit: int = 10
    expiryNotice: float = 60.0
    allowedOrigins: tuple[str, ...] = ()
    tokenCookie: str = "mws_token"
    deflate: bool = False
    deflateWindowBits: int = 11
    deflateMemLevel: int = 4
    #: Channels one connection may be subscribed to at once.
    maxSubscriptions: int = 100
    #: Bytes queued for a connection whose transport has asked us to pause, before it
    #: is closed as a slow consumer (4008).
    maxSendBuffer: int = 1024 * 1024
    #: Seconds a typing indicator lasts unless repeated.
    typingTimeout: float = 6.0
