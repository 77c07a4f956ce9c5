"""
The subscribers: thousands of WebSocket connections in one process, on a client lean
enough that the server, not the client, is what runs out of CPU.

A general-purpose WebSocket library (Autobahn, websockets) spends far more per frame
than the server does writing it, so 5,000 of its connections would measure the client.
This client is an C{asyncio.Protocol} that does the least RFC 6455 lets it: an HTTP
upgrade request, a check of C{Sec-WebSocket-Accept}, masked frames out (requests,
pongs and the close reply), and a parser for the server's unmasked frames. Once
subscribed, a text frame is not decoded as JSON: one regular expression pulls out the
publisher's timestamp C{t}, and the latency goes into a histogram (see L{_stats}).

The process is driven by its parent over a pipe (L{serve}): C{connect}, then for each
phase C{reset}, C{progress} (polled until the phase's events have arrived) and
C{collect}, and finally C{stop}.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import gc
import hashlib
import json
import os
import re
import resource
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

from _stats import bucket

#: RFC 6455's key-accept GUID.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "marketplace.v1"
#: The server serialises with separators=(",", ":"): no space after the colon.
_STAMP = re.compile(rb'"t":(-?\d+)')

_CONTINUATION, _TEXT, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x8, 0x9, 0xA
#: What every browser offers; the server may answer with its own parameters.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
#: RFC 7692: the tail a sender strips from each compressed message.
_DEFLATE_TAIL = b"\x00\x00\xff\xff"


class HandshakeFailed(Exception):
    """The server refused the connection, the subscribe, or closed it early."""


def frame(opcode: int, payload: bytes) -> bytes:
    """One final client-to-server frame, masked as RFC 6455 requires."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = bytes([0x80 | opcode, 0x80 | length])
    elif length < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    repeated = (key * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )
    return head + key + masked


class Counters:
    """What the subscribers of one process saw since the last L{reset}."""

    def __init__(self) -> None:
        self.open = 0
        self.dropped = 0
        self.reset()

    def reset(self) -> None:
        self.received = 0
        self.other = 0
        self.first = 0
        self.last = 0
        self.maxLatency = 0
        self.histogram: dict[int, int] = {}
        self.closedInPhase = 0
        self.closeCodes: collections.Counter[int] = collections.Counter()

    def summary(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "other": self.other,
            "first": self.first,
            "last": self.last,
            "maxLatency": self.maxLatency,
            "histogram": self.histogram,
            "open": self.open,
            "closedInPhase": self.closedInPhase,
            "dropped": self.dropped,
            "closeCodes": dict(self.closeCodes),
        }


class Subscriber(asyncio.Protocol):
    """One WebSocket connection subscribed to the benchmark's channel."""

    #: Once subscribed, whether a final text frame is timed by its C{"t":} stamp on the
    #: hot path (L{_frames}) rather than decoded as JSON (L{_other}, then L{_message}).
    stamped = True

    def __init__(
        self,
        counters: Counters,
        request: bytes,
        accept: bytes,
        subscribe: bytes,
        opened: asyncio.Future[None],
    ) -> None:
        self.counters = counters
        self.request = request
        self.accept = accept
        self.subscribe = subscribe
        self.opened = opened
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.subscribed = False
        self.closing = False
        self.buffer = b""
        self.fragments: list[bytes] = []
        self.fragmentsCompressed = False
        #: Whether permessage-deflate was negotiated, and its inflater (made on first use).
        self.deflate = False
        self.inflater: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.subscribed:
            self.counters.open -= 1
            self.counters.closedInPhase += 1
            if not self.closing:
                self.counters.dropped += 1
        if not self.opened.done():
            self.opened.set_exception(
                HandshakeFailed(f"connection lost before subscribing: {exc or 'closed'}")
            )

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self._frames(self.buffer + data if self.buffer else data)
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 16384:
                self._fail("handshake response too long")
            return
        head, rest = self.buffer[:end], self.buffer[end + 4 :]
        self.buffer = b""
        lines = head.split(b"\r\n")
        if lines[0][9:12] != b"101":
            self._fail(f"handshake refused: {lines[0].decode(errors='replace')}")
            return
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(b":") for line in lines[1:])
        )
        if headers.get(b"sec-websocket-accept") != self.accept:
            self._fail("bad Sec-WebSocket-Accept")
            return
        self.deflate = b"permessage-deflate" in headers.get(b"sec-websocket-extensions", b"")
        self.upgraded = True
        if rest:
            self._frames(rest)

    def _fail(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeFailed(why))
        assert self.transport is not None
        self.transport.abort()

    def _frames(self, buffer: bytes) -> None:
        # The hot path: every event of every subscriber passes here.
        now = time.time_ns()
        counters = self.counters
        histogram = counters.histogram
        search = _STAMP.search
        position = 0
        size = len(buffer)
        counted = 0
        while size - position >= 2:
            first = buffer[position]
            length = buffer[position + 1] & 0x7F
            if length < 126:
                start = position + 2
            elif length == 126:
                if size - position < 4:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 4], "big")
                start = position + 4
            else:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                start = position + 10
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode == _TEXT and first & 0x80 and self.subscribed and self.stamped:
                if first & 0x40:
                    # RSV1: compressed by permessage-deflate (events of 1 KiB or more).
                    match = search(self._inflate(buffer[start:end]))
                else:
                    match = search(buffer, start, end)
                if match is None:
                    counters.other += 1
                else:
                    latency = (now - int(match[1])) // 1000
                    if latency < 0:
                        latency = 0
                    if latency > counters.maxLatency:
                        counters.maxLatency = latency
                    if latency >= 2048:
                        shift = latency.bit_length() - 11
                        latency = (latency >> shift) << shift
                    histogram[latency] = histogram.get(latency, 0) + 1
                    counted += 1
            else:
                self._other(opcode, first, buffer[start:end])
            position = end
        self.buffer = buffer[position:] if position < size else b""
        if counted:
            counters.received += counted
            counters.last = now
            if not counters.first:
                counters.first = now

    def _inflate(self, payload: bytes) -> bytes:
        # One inflater per connection serves with or without server context takeover.
        if self.inflater is None:
            self.inflater = zlib.decompressobj(-15)
        return bytes(self.inflater.decompress(payload + _DEFLATE_TAIL))

    def _other(self, opcode: int, first: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode in (_TEXT, _CONTINUATION):
            if opcode == _TEXT:
                self.fragmentsCompressed = bool(first & 0x40)
            self.fragments.append(payload)
            if first & 0x80:
                message, self.fragments = b"".join(self.fragments), []
                if self.fragmentsCompressed:
                    message = self._inflate(message)
                self._message(message)
        elif opcode == _PING:
            self.transport.write(frame(_PONG, payload))
        elif opcode == _CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.counters.closeCodes[code] += 1
            if not self.closing:
                self.closing = True
                self.transport.write(frame(_CLOSE, payload[:2]))
            if not self.opened.done():
                reason = payload[2:].decode(errors="replace")
                self.opened.set_exception(HandshakeFailed(f"closed with {code}: {reason}"))

    def _message(self, message: bytes) -> None:
        """A whole text message before the subscription (or a fragmented one after it)."""
        if self.subscribed:
            self._frames(_unmasked(message))
            return
        reply = json.loads(message)
        kind = reply.get("type")
        assert self.transport is not None
        if kind == "welcome":
            self.transport.write(self.subscribe)
        elif kind == "ok" and reply.get("id") == "1":
            self.subscribed = True
            self.counters.open += 1
            if not self.opened.done():
                self.opened.set_result(None)
        elif kind == "error":
            self._fail(f"subscribe answered {reply.get('error')}")

    def close(self) -> None:
        """Start a clean close (1000); the server closes the TCP connection."""
        if self.transport is not None and not self.transport.is_closing():
            self.closing = True
            self.transport.write(frame(_CLOSE, (1000).to_bytes(2, "big")))


def _unmasked(payload: bytes) -> bytes:
    """A final, unmasked text frame, to feed a reassembled message to the hot path."""
    length = len(payload)
    if length < 126:
        return bytes([0x81, length]) + payload
    if length < 1 << 16:
        return bytes([0x81, 126]) + length.to_bytes(2, "big") + payload
    return bytes([0x81, 127]) + length.to_bytes(8, "big") + payload


def upgradeRequest(port: int, token: str, deflate: bool) -> tuple[bytes, bytes]:
    """The HTTP upgrade request for one connection, and the C{Sec-WebSocket-Accept} due."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    extensions = f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if deflate else ""
    request = (
        f"GET /?token={token} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        f"{extensions}\r\n"
    ).encode()
    return request, accept


class Pinger(Subscriber):
    """
    One more connection, subscribed to nothing, that sends C{ping} every C{interval}
    seconds and times the answers: how long the server keeps every other client
    waiting while it fans an event out (the fan-out runs on the same single thread).
    """

    def __init__(self, request: bytes, accept: bytes, opened: asyncio.Future[None]) -> None:
        super().__init__(Counters(), request, accept, b"", opened)
        self.sent: dict[str, int] = {}
        self.number = 0
        self.reset()

    def reset(self) -> None:
        """Start a phase: pings sent before it no longer count."""
        self.sent = {}
        self.histogram: dict[int, int] = {}
        self.maxRtt = 0
        self.answered = 0

    def ping(self) -> None:
        assert self.transport is not None
        self.number += 1
        name = f"p{self.number}"
        self.sent[name] = time.perf_counter_ns()
        self.transport.write(frame(_TEXT, b'{"id":"%s","type":"ping"}' % name.encode()))

    def _message(self, message: bytes) -> None:
        reply = json.loads(message)
        if reply.get("type") == "welcome":
            if not self.opened.done():
                self.opened.set_result(None)
            return
        sent = self.sent.pop(str(reply.get("id")), None)
        if sent is not None:
            rtt = (time.perf_counter_ns() - sent) // 1000
            self.maxRtt = max(self.maxRtt, rtt)
            key = bucket(rtt)
            self.histogram[key] = self.histogram.get(key, 0) + 1
            self.answered += 1

    def summary(self) -> dict[str, Any]:
        """This phase's answers, and the pings still unanswered (sent, in microseconds)."""
        now = time.perf_counter_ns()
        waiting = [(now - sent) // 1000 for sent in self.sent.values()]
        return {
            "answered": self.answered,
            "histogram": self.histogram,
            "maxRtt": max([self.maxRtt, *waiting]),
            "unanswered": len(waiting),
        }


async def openPinger(port: int, token: str, timeout: float = 30.0) -> Pinger:
    loop = asyncio.get_running_loop()
    request, accept = upgradeRequest(port, token, False)
    opened: asyncio.Future[None] = loop.create_future()
    pinger = Pinger(request, accept, opened)
    await asyncio.wait_for(loop.create_connection(lambda: pinger, "127.0.0.1", port), timeout)
    await asyncio.wait_for(opened, timeout)
    return pinger


class Subscribers:
    """The connections of one process, and how to open them."""

    def __init__(self, port: int | list[int], channel: str, deflate: bool) -> None:
        #: The servers' WebSocket ports: the connections are dealt over them in turn.
        self.ports = port if isinstance(port, list) else [port]
        self.channel = channel
        self.deflate = deflate
        self.counters = Counters()
        self.protocols: list[Subscriber] = []

    async def connect(self, tokens: list[str], concurrency: int, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        failures: collections.Counter[str] = collections.Counter()
        subscribe = frame(
            _TEXT,
            json.dumps({"id": "1", "type": "subscribe", "channel": self.channel}).encode(),
        )

        async def one(index: int, token: str) -> None:
            port = self.ports[index % len(self.ports)]
            request, accept = upgradeRequest(port, token, self.deflate)
            async with gate:
                opened: asyncio.Future[None] = loop.create_future()
                protocol = Subscriber(self.counters, request, accept, subscribe, opened)
                if await connectOne(protocol, port, timeout, failures):
                    self.protocols.append(protocol)

        started = time.monotonic()
        await asyncio.gather(*(one(i, token) for i, token in enumerate(tokens)))
        seconds = time.monotonic() - started
        # Thousands of long-lived protocol objects: keep the cyclic collector from
        # walking them again and again while frames are being timed.
        gc.collect()
        gc.freeze()
        return {
            "connected": len(self.protocols),
            "deflate": sum(p.deflate for p in self.protocols),
            "failures": dict(failures),
            "seconds": seconds,
            "loop": f"{type(loop).__module__}.{type(loop).__name__}",
        }

    async def stop(self, wait: float) -> None:
        await closeAll(self.protocols, self.counters, wait)


async def connectOne(
    protocol: Subscriber, port: int, timeout: float, failures: collections.Counter[str]
) -> bool:
    """
    Open C{protocol}'s connection and wait until it has subscribed: whether it did (if
    not, why is counted in C{failures} and the connection aborted).
    """
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.create_connection(lambda: protocol, "127.0.0.1", port), timeout)
        await asyncio.wait_for(protocol.opened, timeout)
    except (OSError, HandshakeFailed, TimeoutError) as e:
        failures[f"{type(e).__name__}: {e}"[:200]] += 1
        if protocol.transport is not None:
            protocol.transport.abort()
        return False
    return True


async def closeAll(protocols: Sequence[Subscriber], counters: Counters, wait: float) -> None:
    """Close every connection cleanly, and abort those still open after C{wait} seconds."""
    for protocol in protocols:
        protocol.close()
    deadline = time.monotonic() + wait
    while counters.open > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for protocol in protocols:
        if protocol.transport is not None:
            protocol.transport.abort()


def raiseFileLimit(wanted: int) -> tuple[int, int]:
    """Raise this process's open-file limit toward C{wanted}: C{(soft, hard)} after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def serve(
    pipe: Connection,
    port: int | list[int],
    channel: str,
    tokens: list[str],
    options: dict[str, Any],
) -> None:
    """
    The subscriber process's main: obey the parent's commands until C{stop}. With
    several ports (several server processes), the connections are dealt over them.
    """
    raiseFileLimit(len(tokens) + 256)
    runLoop(
        options["loop"],
        _serve(pipe, Subscribers(port, channel, options["deflate"]), tokens, options),
    )


async def _serve(
    pipe: Connection, subscribers: Subscribers, tokens: list[str], options: dict[str, Any]
) -> None:
    counters = subscribers.counters

    async def connect() -> dict[str, Any]:
        return await subscribers.connect(tokens, options["concurrency"], options["timeout"])

    async def progress() -> tuple[int, int, int]:
        return counters.received, counters.last, counters.open

    await obey(pipe, counters, subscribers.stop, connect=connect, progress=progress)


def runLoop(loop: str, main: Coroutine[Any, Any, None]) -> None:
    """Run C{main} on a new event loop: uvloop's, or asyncio's."""
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def obey(
    pipe: Connection,
    counters: Counters,
    stop: Callable[[float], Awaitable[None]],
    **commands: Callable[..., Awaitable[Any]],
) -> None:
    """
    A client process's loop: answer the parent's commands over C{pipe} until C{stop}.
    C{reset}, C{collect} and C{stop} are answered from C{counters}; any other command by
    the function of its name in C{commands}, with the command's arguments.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: queue.put_nowait(pipe.recv()))
    while True:
        command, *args = await queue.get()
        if command == "reset":
            counters.reset()
            pipe.send(True)
        elif command == "collect":
            pipe.send(counters.summary())
        elif command == "stop":
            await stop(args[0] if args else 2.0)
            pipe.send(counters.summary())
            loop.remove_reader(pipe.fileno())
            return
        elif command in commands:
            pipe.send(await commands[command](*args))
