"""
The publisher: C{POST /api/v1/publish} over kept-alive HTTP/1.1 connections, at a fixed
rate or as fast as answers come back, with a bounded number of requests in flight.

Each connection carries one request at a time (no pipelining), as the Next.js
backend's HTTP client does; a fixed number of them bounds what is in flight, so a
server that falls behind slows the publisher down instead of queueing without limit.
Every event's C{data.t} is the publisher's wall clock in nanoseconds just before the
request is written, which the subscribers subtract from their own clock.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

from _stats import bucket


async def paced(rate: float | None, start: float, stop: float) -> AsyncIterator[None]:
    """
    Go on at C{start + i / rate} (event loop time) for i = 0, 1, … while that is before
    C{stop}; with no C{rate} (flat out), at once each time until C{stop}. The caller's
    work for a turn runs before the next one is due.
    """
    loop = asyncio.get_running_loop()
    index = 0
    while True:
        if rate is not None:
            due = start + index / rate
            if due >= stop:
                return
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elif loop.time() >= stop:
            return
        yield
        index += 1


class ResponseError(Exception):
    """The connection broke or answered something that is not HTTP/1.1."""


class Connection:
    """One kept-alive HTTP/1.1 connection, reopened when the server closes it."""

    def __init__(self, port: int, head: bytes) -> None:
        self.port = port
        self.head = head
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            status = int(lines[0][9:12])
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" in headers:
                content = await self.reader.readexactly(int(headers[b"content-length"]))
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                content = await self._chunked()
            else:
                content = await self.reader.read()
                headers[b"connection"] = b"close"
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            self.close()
            raise ResponseError(f"bad response: {e}") from None
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, content

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await self.reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                return b"".join(parts)
            parts.append((await self.reader.readexactly(size + 2))[:-2])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class PhaseResult:
    """What the publisher did during one phase."""

    def __init__(self) -> None:
        self.attempted = 0
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.firstError: str | None = None
        #: Request-to-response times in microseconds (see L{_stats}).
        self.histogram: dict[int, int] = {}
        self.started = 0.0
        self.ended = 0.0

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def asDict(self) -> dict[str, Any]:
        return {
            "attempted": self.attempted,
            "ok": self.ok,
            "errors": dict(self.errors),
            "firstError": self.firstError,
            "seconds": self.seconds,
        }


class Publisher:
    def __init__(
        self, port: int, secret: str, channel: str, payloadBytes: int, inFlight: int
    ) -> None:
        head = (
            "POST /api/v1/publish HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {secret}\r\n"
            "Content-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        self.connections = [Connection(port, head) for _ in range(inFlight)]
        self.prefix = f'{{"channel":"{channel}","event":"bench","data":{{"t":'.encode()
        self.padding = f',"p":"{"x" * payloadBytes}"}}}}'.encode() if payloadBytes else b"}}"
        self.sequence = 0

    def body(self) -> bytes:
        self.sequence += 1
        return b'%s%d,"n":%d%s' % (self.prefix, time.time_ns(), self.sequence, self.padding)

    async def _publish(self, connection: Connection, result: PhaseResult) -> None:
        result.attempted += 1
        started = time.perf_counter_ns()
        try:
            status, content = await connection.post(self.body())
        except (OSError, ResponseError) as e:
            error = f"{type(e).__name__}: {e}"
            result.errors[error[:80]] += 1
            result.firstError = result.firstError or error
            return
        if status == 200:
            result.ok += 1
            elapsed = bucket((time.perf_counter_ns() - started) // 1000)
            result.histogram[elapsed] = result.histogram.get(elapsed, 0) + 1
        else:
            result.errors[f"HTTP {status}"] += 1
            result.firstError = result.firstError or f"HTTP {status}: {content[:300]!r}"

    async def probe(self) -> tuple[bool, str]:
        """One publish, to learn whether the API is there before the phases start."""
        result = PhaseResult()
        await self._publish(self.connections[0], result)
        return result.ok == 1, result.firstError or "ok"

    async def fixedRate(self, rate: float, seconds: float) -> PhaseResult:
        """
        Publish at C{rate} per second for C{seconds}. When every connection is busy the
        next publish waits for one, so an overloaded server shows as a lower achieved
        rate, not as an ever-growing queue here.
        """
        loop = asyncio.get_running_loop()
        result = PhaseResult()
        idle: asyncio.Queue[Connection] = asyncio.Queue()
        for connection in self.connections:
            idle.put_nowait(connection)
        tasks: set[asyncio.Task[None]] = set()

        async def one(connection: Connection) -> None:
            try:
                await self._publish(connection, result)
            finally:
                idle.put_nowait(connection)

        result.started = time.monotonic()
        start = loop.time()
        stop = start + seconds
        async for _ in paced(rate, start, stop):
            connection = await idle.get()
            if loop.time() >= stop:
                idle.put_nowait(connection)
                break
            task = asyncio.create_task(one(connection))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        result.ended = time.monotonic()
        return result

    async def flatOut(self, seconds: float) -> PhaseResult:
        """Publish as fast as answers come back, one request per connection, for C{seconds}."""
        result = PhaseResult()
        result.started = time.monotonic()
        stop = result.started + seconds

        async def worker(connection: Connection) -> None:
            while time.monotonic() < stop:
                await self._publish(connection, result)

        await asyncio.gather(*(worker(c) for c in self.connections))
        result.ended = time.monotonic()
        return result

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
