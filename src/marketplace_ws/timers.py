"""
Timers for many connections at once.

Every connection has timeouts running (its open handshake, the next ping, the pong it
waits for, its token's expiry). One C{reactor.callLater} each costs a DelayedCall of
about half a kilobyte per timer, which is a large part of what an idle connection
costs. L{BucketTimer} files each call in a bucket of C{resolution} seconds instead:
one DelayedCall per bucket, shared by every connection whose timeout falls in it, and
a few dozen bytes per call. A call never fires early, and at most C{resolution} late.

(txaio's batched timer, Autobahn's default, does the same with one-second buckets but
truncates deadlines, so its timeouts fire up to a second early and sub-second ones at
once.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()


class Call:
    """One pending call: C{cancel} it, or ask whether it is still C{active}."""

    __slots__ = ("args", "bucket", "done", "f", "kwargs")

    def __init__(
        self,
        bucket: _Bucket,
        f: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.bucket = bucket
        self.f = f
        self.args = args
        self.kwargs = kwargs
        self.done = False

    def active(self) -> bool:
        return not self.done

    def cancel(self) -> None:
        if self.done:
            return
        self.done = True
        # Let go of the connection now rather than when the bucket fires.
        self.f = _nothing
        self.args = ()
        self.kwargs = {}
        self.bucket.cancelled()


def _nothing(*args: Any, **kwargs: Any) -> None:
    pass


class _Bucket:
    """The calls due in one slot, and the one reactor call that runs them."""

    __slots__ = ("calls", "delayed", "due", "live", "timer")

    def __init__(self, timer: BucketTimer, due: int) -> None:
        self.timer = timer
        self.due = due
        self.calls: list[Call] = []
        self.live = 0
        self.delayed: IDelayedCall | None = None

    def cancelled(self) -> None:
        self.live -= 1
        if self.live == 0:
            # Nothing left to run: no reactor call lingers for it (a clean shutdown,
            # a clean test).
            if self.delayed is not None and self.delayed.active():
                self.delayed.cancel()
            self.timer._forget(self)


class BucketTimer:
    """
    C{call_later(delay, f, *args, **kwargs)}, the interface Autobahn uses for its
    timers (a factory's C{_batched_timer}), returning a L{Call}.
    """

    def __init__(self, reactor: IReactorTime, resolution: float = 0.05) -> None:
        self._reactor = reactor
        self._resolution = resolution
        self._buckets: dict[int, _Bucket] = {}

    def call_later(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Call:
        now = self._reactor.seconds()
        due = math.ceil((now + max(0.0, delay)) / self._resolution)
        bucket = self._buckets.get(due)
        if bucket is None:
            bucket = self._buckets[due] = _Bucket(self, due)
            bucket.delayed = self._reactor.callLater(
                max(0.0, due * self._resolution - now), self._fire, bucket
            )
        call = Call(bucket, f, args, kwargs)
        bucket.calls.append(call)
        bucket.live += 1
        return call

    def pending(self) -> int:
        """Calls filed and neither fired nor cancelled."""
        return sum(bucket.live for bucket in self._buckets.values())

    def _forget(self, bucket: _Bucket) -> None:
        if self._buckets.get(bucket.due) is bucket:
            del self._buckets[bucket.due]

    def _fire(self, bucket: _Bucket) -> None:
        self._forget(bucket)
        for call in bucket.calls:
            if call.done:
                continue
            call.done = True
            try:
                call.f(*call.args, **call.kwargs)
            except Exception:  # noqa: BLE001 - one failing timeout must not stop the rest
                _log.failure("timer {f!r} failed", f=call.f)
