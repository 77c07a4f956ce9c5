"""
The chatters: both users of N conversations, one WebSocket connection each, in one
process, on the lean client of L{_subscribers} (same handshake, same masked frames),
which here also sends requests and reads their replies.

Each connection subscribes to its C{conversation:<id>}. During a phase the process
sends C{message.send} at a fixed rate (or flat out), each message from the next
connection in turn (C{a0 … a<n-1>, b0 … b<n-1>}), so every conversation sees messages
both ways. A message's body starts with C{t=<wall clock ns>}, taken just before the
frame is written; the other participant's connection subtracts it from its own clock
when C{message.created} arrives (send-to-delivered latency), and the sender times its
request to the C{ok} reply (ack latency). The sender's own copy of C{message.created}
(it is subscribed too) is counted as an echo, not as a delivery.

Driven by the parent over a pipe, like the subscribers: C{connect}, then per phase
C{reset}, C{run}, C{progress} (polled until the deliveries are in), C{collect}, and
finally C{stop}.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _publisher import paced
from _stats import bucket
from _subscribers import (
    _TEXT,
    Counters,
    Subscriber,
    closeAll,
    connectOne,
    frame,
    obey,
    raiseFileLimit,
    runLoop,
    upgradeRequest,
)


class ChatCounters(Counters):
    """What the chatters of one process did and saw since the last L{reset}."""

    def reset(self) -> None:
        super().reset()
        self.sent = 0
        self.acked = 0
        self.duplicates = 0
        self.failed = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.firstError: str | None = None
        self.echoes = 0
        #: Request-to-reply times (microseconds), see L{_stats}.
        self.ackHistogram: dict[int, int] = {}
        self.maxAck = 0

    def error(self, what: str, detail: str) -> None:
        self.failed += 1
        self.errors[what] += 1
        self.firstError = self.firstError or detail

    def summary(self) -> dict[str, Any]:
        summary = super().summary()
        summary.update(
            {
                "sent": self.sent,
                "acked": self.acked,
                "duplicates": self.duplicates,
                "failed": self.failed,
                "errors": dict(self.errors),
                "firstError": self.firstError,
                "echoes": self.echoes,
                "ackHistogram": self.ackHistogram,
                "maxAck": self.maxAck,
            }
        )
        return summary


def _record(histogram: dict[int, int], microseconds: int) -> None:
    key = bucket(max(0, microseconds))
    histogram[key] = histogram.get(key, 0) + 1


class Chatter(Subscriber):
    """One participant's connection: subscribed to its conversation, sends messages."""

    # Not the subscribers' hot path: a few thousand frames a second at most, each a
    # reply or an event decoded as JSON (text, reassembled when fragmented, ping, close:
    # Subscriber._other).
    stamped = False

    def __init__(
        self,
        counters: ChatCounters,
        request: bytes,
        accept: bytes,
        userId: str,
        conversationId: int,
        opened: asyncio.Future[None],
        answered: Callable[[], None],
    ) -> None:
        subscribe = frame(
            _TEXT,
            json.dumps(
                {"id": "s", "type": "subscribe", "channel": f"conversation:{conversationId}"}
            ).encode(),
        )
        super().__init__(counters, request, accept, subscribe, opened)
        self.chat = counters
        self.userId = userId
        self.conversationId = conversationId
        #: Request id -> perf_counter_ns when it was written.
        self.pending: dict[str, int] = {}
        #: Called once per request answered (or lost): frees its in-flight slot.
        self.answered = answered

    def send(self, number: int, padding: bytes) -> None:
        counters = self.chat
        counters.sent += 1
        transport = self.transport
        if transport is None or transport.is_closing():
            counters.error("connection closed", f"{self.userId}: connection closed")
            self.answered()
            return
        requestId = b"m%d" % number
        payload = (
            b'{"id":"%s","type":"message.send","conversationId":%d,"body":"t=%d%s",'
            b'"clientMsgId":"%s"}'
            % (requestId, self.conversationId, time.time_ns(), padding, requestId)
        )
        self.pending[requestId.decode()] = time.perf_counter_ns()
        transport.write(frame(_TEXT, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for _ in self.pending:
            self.chat.error("connection lost", f"{self.userId}: connection lost: {exc}")
            self.answered()
        self.pending.clear()

    def _message(self, message: bytes) -> None:
        now = time.time_ns()
        reply = json.loads(message)
        kind = reply.get("type")
        counters = self.chat
        if kind == "event":
            data = reply.get("data") or {}
            body = data.get("body", "") if reply.get("event") == "message.created" else ""
            if not body.startswith("t="):
                counters.other += 1
            elif data.get("senderId") == self.userId:
                counters.echoes += 1
            else:
                latency = (now - int(body[2:].split(" ", 1)[0])) // 1000
                counters.maxLatency = max(counters.maxLatency, latency)
                _record(counters.histogram, latency)
                counters.received += 1
                counters.last = now
                if not counters.first:
                    counters.first = now
            return
        requestId = reply.get("id")
        if requestId == "s":
            assert self.transport is not None
            if kind == "ok":
                self.subscribed = True
                counters.open += 1
                if not self.opened.done():
                    self.opened.set_result(None)
            else:
                self._fail(f"subscribe answered {reply.get('error')}")
            return
        sent = self.pending.pop(requestId, None) if isinstance(requestId, str) else None
        if sent is None:
            if kind == "welcome":
                assert self.transport is not None
                self.transport.write(self.subscribe)
            else:
                counters.other += 1
            return
        if kind == "ok":
            elapsed = (time.perf_counter_ns() - sent) // 1000
            counters.acked += 1
            counters.maxAck = max(counters.maxAck, elapsed)
            _record(counters.ackHistogram, elapsed)
            if (reply.get("result") or {}).get("duplicate"):
                counters.duplicates += 1
        else:
            error = reply.get("error") or {}
            counters.error(str(error.get("code", kind)), json.dumps(reply)[:300])
        self.answered()


class Chatters:
    """The connections of one process: both users of each of its conversations."""

    def __init__(self, port: int, pairs: list[tuple[int, str, str, str, str]]) -> None:
        self.port = port
        self.pairs = pairs
        self.counters = ChatCounters()
        self.senders: list[Chatter] = []
        self.gate: asyncio.Semaphore | None = None
        self.outstanding = 0
        self.number = 0

    def _answered(self) -> None:
        self.outstanding -= 1
        if self.gate is not None:
            self.gate.release()

    async def connect(self, concurrency: int, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        failures: collections.Counter[str] = collections.Counter()
        opened: dict[str, Chatter] = {}

        async def one(userId: str, token: str, conversationId: int) -> None:
            request, accept = upgradeRequest(self.port, token, False)
            async with gate:
                ready: asyncio.Future[None] = loop.create_future()
                protocol = Chatter(
                    self.counters, request, accept, userId, conversationId, ready, self._answered
                )
                if await connectOne(protocol, self.port, timeout, failures):
                    opened[userId] = protocol

        started = time.monotonic()
        await asyncio.gather(
            *(
                one(user, token, conversationId)
                for conversationId, userA, tokenA, userB, tokenB in self.pairs
                for user, token in ((userA, tokenA), (userB, tokenB))
            )
        )
        seconds = time.monotonic() - started
        # Every a first, then every b: consecutive messages go to different conversations.
        order = [p[1] for p in self.pairs] + [p[3] for p in self.pairs]
        self.senders = [opened[user] for user in order if user in opened]
        gc.collect()
        gc.freeze()
        return {"connected": len(self.senders), "failures": dict(failures), "seconds": seconds}

    async def run(
        self, rate: float | None, seconds: float, inFlight: int, padding: bytes, wait: float
    ) -> dict[str, Any]:
        """
        Send for C{seconds}: at C{rate} a second on a schedule (C{None}: flat out), with
        at most C{inFlight} requests unanswered; when all are, the next waits, so an
        overloaded server shows as a lower achieved rate. Then wait (at most C{wait}
        seconds) for the last replies.
        """
        loop = asyncio.get_running_loop()
        senders = self.senders
        count = len(senders)
        if not count:
            return {"seconds": 0.0, "unanswered": 0}
        self.gate = gate = asyncio.Semaphore(inFlight)
        self.outstanding = 0
        started = loop.time()
        stop = started + seconds
        async for _ in paced(rate, started, stop):
            await gate.acquire()
            if loop.time() >= stop:
                gate.release()
                break
            self.number += 1
            self.outstanding += 1
            senders[self.number % count].send(self.number, padding)
        deadline = loop.time() + wait
        while self.outstanding > 0 and loop.time() < deadline:
            await asyncio.sleep(0.002)
        ended = loop.time()
        self.gate = None
        return {"seconds": ended - started, "unanswered": self.outstanding}

    async def stop(self, wait: float) -> None:
        await closeAll(self.senders, self.counters, wait)


def serve(
    pipe: Connection,
    port: int,
    pairs: list[tuple[int, str, str, str, str]],
    options: dict[str, Any],
) -> None:
    """The chatter process's main: obey the parent's commands until C{stop}."""
    raiseFileLimit(2 * len(pairs) + 256)
    chatters = Chatters(port, pairs)
    runLoop(options["loop"], _serve(pipe, chatters, options))


async def _serve(pipe: Connection, chatters: Chatters, options: dict[str, Any]) -> None:
    counters = chatters.counters

    async def connect() -> dict[str, Any]:
        return await chatters.connect(options["concurrency"], options["timeout"])

    async def progress() -> tuple[int, int, int]:
        return counters.received, counters.acked, counters.open

    await obey(pipe, counters, chatters.stop, connect=connect, run=chatters.run, progress=progress)
