"""
The envelope of SPEC §4: L{envelope.parseRequest} on anything at all, and the whole
server answering arbitrary frames over a real connection.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import provider

from marketplace_ws import envelope
from marketplace_ws.auth import mintToken
from marketplace_ws.envelope import OpError, Request
from tests.strategies import jsonScalars, jsonValues
from tests.test_service import SECRET, startService

#: The close codes of SPEC §4 (docs/protocol.rst), and 1002 for a protocol violation.
DOCUMENTED_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 4000, 4001, 4003, 4008, 4029}
)

# Strategies ---------------------------------------------------------------------------

#: Ids of every JSON type: text often holding lone surrogates (which JSON carries
#: escaped but UTF-8 cannot), the edges of the valid ones (64 characters, 2**53).
requestIds = st.one_of(
    st.lists(st.sampled_from(["a", "\ud800", "é", "\udfff", "✓"]), max_size=4).map("".join),
    st.sampled_from(["x" * 64, "x" * 65, 2**53 - 1, 2**53, -(2**53), True, 1.0]),
    jsonScalars,
    st.text(max_size=70),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), jsonScalars, max_size=2),
)

#: Request-shaped objects: a type (often a real op), usually an id, maybe parameters.
requests = st.builds(
    lambda extra, base, requestId: {**extra, **base, **requestId},
    st.dictionaries(st.text(max_size=6), jsonValues, max_size=3),
    st.fixed_dictionaries(
        {"type": st.one_of(st.sampled_from(["ping", "auth", "no.such.op", ""]), jsonScalars)},
        optional={"token": st.one_of(st.text(max_size=20), jsonScalars)},
    ),
    st.one_of(st.builds(lambda value: {"id": value}, requestIds), st.just({})),
)

jsonPayloads = st.one_of(requests, jsonValues).map(lambda value: json.dumps(value).encode())

#: What a client may put in a text frame: mostly JSON, sometimes any text, sometimes
#: bytes that are not even UTF-8.
payloads = st.one_of(
    requests.map(lambda value: json.dumps(value).encode()),
    jsonPayloads,
    jsonPayloads.map(lambda p: p.decode().encode("utf-16-le")),
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.binary(max_size=40),
)


def parsed(payload: bytes) -> Request | OpError:
    try:
        return envelope.parseRequest(payload)
    except OpError as e:
        return e


class ParseRequestTests(SynchronousTestCase):
    """
    Whatever a client sends, C{parseRequest} answers with a L{Request} or an
    L{OpError} carrying C{bad_request}, and the reply to it can be sent.
    """

    def assertWellFormed(self, payload: bytes) -> None:
        outcome = parsed(payload)
        if isinstance(outcome, OpError):
            self.assertEqual(outcome.code, envelope.BAD_REQUEST)
            requestId = outcome.requestId
            reply = envelope.error(requestId, outcome.code, outcome.message)
        else:
            self.assertIsInstance(outcome.type, str)
            self.assertTrue(outcome.type)
            self.assertNotIn("id", outcome.params)
            self.assertNotIn("type", outcome.params)
            requestId = outcome.id
            reply = envelope.ok(requestId, {"pong": True})
        self.assertTrue(
            requestId is None
            or (isinstance(requestId, str) and len(requestId) <= envelope.MAX_ID_LENGTH)
            or (type(requestId) is int and abs(requestId) < 2**53)
        )
        # The reply goes out as UTF-8 JSON text with the id as it came in.
        encoded = envelope.encode(reply)
        self.assertEqual(json.loads(encoded.decode("utf-8"))["id"], requestId)

    @given(st.binary())
    def test_anyBytes(self, payload: bytes) -> None:
        self.assertWellFormed(payload)

    @given(st.one_of(requests, jsonValues))
    def test_anyJSON(self, value: Any) -> None:
        for ensureASCII in (True, False):
            try:
                payload = json.dumps(value, ensure_ascii=ensureASCII).encode("utf-8")
            except UnicodeEncodeError:
                continue  # a lone surrogate unescaped is not UTF-8 text at all
            self.assertWellFormed(payload)

    @given(requestIds)
    def test_anyId(self, requestId: Any) -> None:
        self.assertWellFormed(json.dumps({"id": requestId, "type": "ping"}).encode())

    @given(requests)
    def test_requestsKeepTheirFields(self, value: dict[str, Any]) -> None:
        outcome = parsed(json.dumps(value).encode())
        if isinstance(outcome, Request):
            self.assertEqual(outcome.type, value["type"])
            self.assertEqual(outcome.id, value.get("id"))
            self.assertEqual(
                dict(outcome.params), {k: v for k, v in value.items() if k not in ("id", "type")}
            )

    # Regressions and edges, as plain examples.

    def assertBadRequest(self, payload: bytes, requestId: Any = None) -> None:
        outcome = parsed(payload)
        assert isinstance(outcome, OpError), outcome
        self.assertEqual((outcome.code, outcome.requestId), (envelope.BAD_REQUEST, requestId))

    def test_loneSurrogateIdIsEchoed(self) -> None:
        request = envelope.parseRequest(b'{"id":"\\ud800","type":"ping"}')
        self.assertEqual(request.id, "\ud800")
        encoded = envelope.encode(envelope.ok(request.id, {}))
        encoded.decode("utf-8")
        self.assertEqual(json.loads(encoded)["id"], "\ud800")

    def test_wrongIds(self) -> None:
        for requestId in ("true", "1.5", "[1]", '{"a":1}', '"' + "x" * 65 + '"', str(2**53)):
            self.assertBadRequest(b'{"type":"ping","id":' + requestId.encode() + b"}")

    def test_typeProblemsKeepTheId(self) -> None:
        for payload in (b'{"id":"a"}', b'{"id":"a","type":""}', b'{"id":"a","type":["ping"]}'):
            self.assertBadRequest(payload, "a")

    def test_notAnObject(self) -> None:
        for payload in (b"[]", b'"ping"', b"1", b"null", b""):
            self.assertBadRequest(payload)

    def test_deepNesting(self) -> None:
        self.assertBadRequest(b"[" * 100_000)
        self.assertBadRequest(b'{"type":"ping","a":' * 50_000)

    def test_onlyUTF8(self) -> None:
        """
        A text frame is UTF-8: JSON in UTF-16 (valid UTF-8 as bytes when it holds
        NULs) or with encoded surrogates is not a request.
        """
        text = '{"id":"1","type":"ping"}'
        for encoding in ("utf-16-le", "utf-16-be", "utf-32-le", "utf-16"):
            self.assertBadRequest(text.encode(encoding))
        self.assertBadRequest(b'{"type":"\xed\xa0\x80"}')
        self.assertBadRequest(b'\xef\xbb\xbf{"type":"ping"}')


class BlockingClient:
    """
    A WebSocket client on a plain blocking socket, for a Hypothesis test running in
    a thread while the server runs on the reactor.
    """

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: marketplace.v1\r\n"
                f"Authorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        opcode, welcome = self.receive()
        assert opcode == 1 and json.loads(welcome)["type"] == "welcome", welcome

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server dropped the connection without a close frame")
        self.buffer += chunk

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def send(self, payload: bytes, opcode: int = 1) -> None:
        size = len(payload)
        if size < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
        elif size < 2**16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self) -> tuple[int, bytes]:
        """The next data or close frame (answering pings on the way)."""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", self._read(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", self._read(8))
            assert not second & 0x80, "a server never masks its frames"
            payload = self._read(size)
            opcode = first & 0x0F
            if opcode == 9:
                self.send(payload, opcode=10)
            elif opcode != 10:
                return opcode, payload

    def close(self) -> None:
        try:
            self.send(struct.pack("!H", 1000), opcode=8)
        except OSError:
            pass
        self.sock.close()


class EndToEndTests(TestCase):
    """
    Arbitrary frames over a real connection to the whole server: every frame gets a
    well-formed reply, or the connection closes with a documented code, and nothing
    is logged as an error.
    """

    timeout = 120

    async def test_everyFrameIsAnswered(self) -> None:
        service = await startService(
            self, **{"rate-limits": "*=10000/s:10000", "bad-frame-limit": "3"}
        )
        port = service.ports[0].getHost().port  # type: ignore[attr-defined]
        errors: list[dict[str, Any]] = []

        @provider(ILogObserver)
        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get(
                "isError"
            ):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        users = iter(range(10**6))

        @settings(max_examples=30)
        @given(frames=st.lists(payloads, min_size=1, max_size=8))
        # Examples that once broke the server, or are easy to break it with.
        @example(frames=[b'{"id":"\\ud800","type":"ping"}', b'{"id":"a\\udfff","type":"x"}'])
        @example(frames=['{"id":"1","type":"ping"}'.encode("utf-16-le")])
        @example(frames=[b"{", b"[]", b'{"type":"ping"}', b"{", b"1", b'"', b"null"])
        @example(frames=[b'{"type":"ping","x":"\xff"}'])
        def exchange(frames: list[bytes]) -> None:
            client = BlockingClient(port, mintToken(SECRET, f"user-{next(users)}"))
            try:
                for payload in frames:
                    client.send(payload)
                    opcode, reply = client.receive()
                    if opcode == 8:
                        (code,) = struct.unpack("!H", reply[:2])
                        assert code in DOCUMENTED_CLOSE_CODES, (code, reply)
                        return
                    assert opcode == 1, opcode
                    self.checkReply(payload, json.loads(reply.decode("utf-8")))
            finally:
                client.close()

        await deferToThread(exchange)
        self.assertEqual(errors, [])

    def checkReply(self, payload: bytes, reply: dict[str, Any]) -> None:
        outcome = parsed(payload)
        expectedId = outcome.requestId if isinstance(outcome, OpError) else outcome.id
        assert reply.get("id") == expectedId, (payload, reply)
        if reply.get("type") == "ok":
            assert set(reply) == {"id", "type", "result"}, reply
            assert isinstance(outcome, Request) and outcome.type == "ping", (payload, reply)
        else:
            assert reply.get("type") == "error" and set(reply) == {"id", "type", "error"}, reply
            assert reply["error"]["code"] in envelope.ERROR_CODES, reply
            assert isinstance(reply["error"]["message"], str), reply
