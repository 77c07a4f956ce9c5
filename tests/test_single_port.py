"""
One listener for the HTTP site and the WebSocket endpoint (L{sharePort}), as on Render
and Railway: the whole service in this process against real PostgreSQL, its shared
port listened on next to the service's own two, with real clients over loopback.

What the WebSocket listener guarantees is checked again through the shared port, since
the connection reaches Autobahn by another way (taken over from twisted.web).
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import treq
import trustme
from autobahn.twisted.websocket import connectWS
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from marketplace_ws.auth import Identity
from marketplace_ws.client import Client, ClientFactory, connect
from marketplace_ws.http import site
from marketplace_ws.http.health import Health
from marketplace_ws.http.upgrade import WebSocketRoot, sharePort, wantsWebSocket
from marketplace_ws.protocol import SUBPROTOCOL, ClientProtocol, MarketplaceFactory
from marketplace_ws.service import MarketplaceService
from marketplace_ws.tls import ServerTLS
from tests.test_connection import Peer, dial, token, upgradeRequest, welcomed
from tests.test_live import LISTING, nextFrame, publish
from tests.test_logs import Captured
from tests.test_service import SECRET, startService
from tests.test_tls import getHealth

AUTH: dict[str | bytes, str | bytes] = {"Authorization": f"Bearer {SECRET}"}
UPGRADE: dict[str | bytes, str | bytes] = {"Upgrade": "websocket"}


async def startShared(testCase: TestCase, **settings: Any) -> tuple[MarketplaceService, int]:
    """
    The service, and the port of a listener sharing HTTP and WebSocket, built as the
    service builds it when WS_PORT and HTTP_PORT are one port; it stops with the service.
    """
    service = await startService(testCase, **settings)
    shared = sharePort(service.site(), service.factory)
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(shared)
    service.ports.append(port)
    return service, int(port.getHost().port)


def url(port: int, path: str = "/") -> str:
    return f"http://127.0.0.1:{port}{path}"


def wsURL(port: int, query: str = "") -> str:
    return f"ws://127.0.0.1:{port}/{query}"


async def rawConnect(testCase: TestCase, port: int) -> Peer:
    peer = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Peer())

    async def cut() -> None:
        if not peer.lost.called:
            assert peer.transport is not None
            peer.transport.abortConnection()
            await peer.lost

    testCase.addCleanup(lambda: Deferred.fromCoroutine(cut()))
    return peer


def clientFrame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked frame, as a client sends it."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def serverFrames(data: bytes) -> list[tuple[int, bytes]]:
    """The complete frames the server sent after its 101: (opcode, payload)."""
    frames = []
    while len(data) >= 2:
        size, offset = data[1] & 0x7F, 2
        if size == 126:
            (size,), offset = struct.unpack("!H", data[2:4]), 4
        if len(data) < offset + size:
            break
        frames.append((data[0] & 0x0F, data[offset : offset + size]))
        data = data[offset + size :]
    return frames


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await deferLater(reactor, 0.01)


def afterHead(peer: Peer, head: int = 0) -> bytes:
    """What the server sent after its C{head + 1}th response head."""
    data = peer.received
    for _ in range(head + 1):
        data = data.partition(b"\r\n\r\n")[2]
    return data


class HTTPTests(TestCase):
    timeout = 30

    async def test_healthReadyMetrics(self) -> None:
        """What a platform's health check and Prometheus ask for, on the shared port."""
        _, port = await startShared(self)
        response = await treq.get(url(port, "/health"), persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type")[0][:16], b"application/json"
        )
        self.assertEqual(json.loads(await response.content())["status"], "ok")
        response = await treq.get(url(port, "/ready"), persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        response = await treq.get(url(port, "/metrics"), persistent=False)
        self.assertEqual(response.code, 200)
        self.assertIn(b"mws_connections", await response.content())

    async def test_plainGetIsJSON404(self) -> None:
        """
        No upgrade, no child: a JSON 404, not Autobahn's 426 status page (which names
        its version) nor twisted.web's HTML one.
        """
        _, port = await startShared(self)
        for path in ("/", "/?token=x", "/ws", "/nothing/here"):
            response = await treq.get(url(port, path), persistent=False)
            self.assertEqual(response.code, 404, path)
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"),
                [b"application/json; charset=utf-8"],
            )
            body = await response.content()
            self.assertEqual(json.loads(body)["error"]["code"], "not_found")
            self.assertNotIn(b"autobahn", body.lower())
            self.assertFalse(response.headers.hasHeader(b"server"))

    async def test_upgradeUnderTheAPIIsAnAPIRequest(self) -> None:
        """An Upgrade header on an API path is not taken over: the API answers it."""
        service, port = await startShared(self)
        peer = await rawConnect(self, port)
        assert peer.transport is not None
        peer.transport.write(
            upgradeRequest({"Authorization": f"Bearer {SECRET}"}, path="/api/v1/stats")
        )
        status, _ = await peer.head()
        self.assertEqual(status, 200)
        await until(lambda: b'"uptime"' in peer.received)
        self.assertEqual(len(service.factory.sockets), 0)
        response = await treq.get(url(port, "/api/v1/stats"), headers=UPGRADE, persistent=False)
        self.assertEqual(response.code, 401)
        self.assertEqual((await response.json())["error"]["code"], "unauthorized")

    async def test_upgradeWithBodyRefused(self) -> None:
        _, port = await startShared(self)
        peer = await rawConnect(self, port)
        assert peer.transport is not None
        request = upgradeRequest({"Authorization": f"Bearer {token()}", "Content-Length": "2"})
        peer.transport.write(request + b"{}")
        status, _ = await peer.head()
        self.assertEqual(status, 400)

    async def test_accessLines(self) -> None:
        """An upgrade request is logged like any request: once, with its status."""
        _, port = await startShared(self)
        captured = Captured(self)
        await welcomed(self, wsURL(port, f"?token={token()}"))
        peer = await rawConnect(self, port)
        assert peer.transport is not None
        peer.transport.write(upgradeRequest({"Authorization": "Bearer not.a.jwt"}, path="/ws"))
        status, _ = await peer.head()
        self.assertEqual(status, 401)
        response = await treq.get(url(port, "/health"), persistent=False)
        await response.content()
        lines = [e for e in captured.events if e.get("access")]
        self.assertEqual(
            [(e["method"], e["path"].partition("?")[0], e["status"]) for e in lines],
            [("GET", "/", 101), ("GET", "/ws", 401), ("GET", "/health", 200)],
        )


class WebSocketTests(TestCase):
    timeout = 30

    async def test_publishReachesSubscriber(self) -> None:
        """
        The Next.js backend's call and the browser's connection, on the one port.
        """
        _, port = await startShared(self)
        client = await connect(wsURL(port), token("buyer"))
        self.assertEqual(client.welcome["userId"], "buyer")
        await client.request("subscribe", channel="listing:9")
        response = await treq.post(
            url(port, "/api/v1/publish"),
            json={"channel": "listing:9", "event": "price.changed", "data": {"price": 90}},
            headers=AUTH,
            persistent=False,
        )
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["seq"], 1)
        frame = await nextFrame(client)
        self.assertEqual((frame["event"], frame["data"]), ("price.changed", {"price": 90}))
        await client.close()

    async def test_tokenTransports(self) -> None:
        """Query, header and cookie, as on the WebSocket listener."""
        _, port = await startShared(self)
        _, client = await welcomed(self, wsURL(port, f"?token={token('q')}"))
        self.assertEqual(client.welcome["userId"], "q")
        _, client = await welcomed(
            self, wsURL(port), headers={"Authorization": f"Bearer {token('h')}"}
        )
        self.assertEqual(client.welcome["userId"], "h")
        _, client = await welcomed(self, wsURL(port), headers={"Cookie": f"mws_token={token('c')}"})
        self.assertEqual(client.welcome["userId"], "c")

    async def test_firstFrameAuth(self) -> None:
        service, port = await startShared(self, **{"auth-timeout": "5"})
        factory = dial(self, wsURL(port))
        connection = await factory.opened
        self.assertFalse(factory.welcome.called)
        self.assertEqual(len(service.factory.sockets), 1)
        connection.sendMessage(json.dumps({"type": "auth", "token": token("late")}).encode())
        welcome = await factory.welcome
        self.assertEqual(welcome["userId"], "late")
        self.assertTrue((await Client(factory, welcome).request("ping"))["pong"])

    async def test_handshakeAndFramesInOneWrite(self) -> None:
        """
        Frames sent in the same TCP write as the handshake reach the connection:
        twisted.web has them in its buffer when the request is handed over.
        """
        _, port = await startShared(self, **{"auth-timeout": "5"})
        peer = await rawConnect(self, port)
        assert peer.transport is not None
        auth = json.dumps({"type": "auth", "token": token("eager")}).encode()
        ping = b'{"id":"p1","type":"ping"}'
        peer.transport.write(upgradeRequest({}) + clientFrame(auth) + clientFrame(ping))
        status, _ = await peer.head()
        self.assertEqual(status, 101)
        await until(lambda: len(serverFrames(afterHead(peer))) >= 2)
        welcome, reply = (json.loads(p) for _, p in serverFrames(afterHead(peer))[:2])
        self.assertEqual((welcome["type"], welcome["userId"]), ("welcome", "eager"))
        self.assertEqual((reply["id"], reply["type"]), ("p1", "ok"))

    async def test_pipelinedAfterHTTPRequest(self) -> None:
        """
        A keep-alive connection that asked for /health first, then the handshake and
        a frame, all in one write: each is answered in turn.
        """
        _, port = await startShared(self)
        peer = await rawConnect(self, port)
        assert peer.transport is not None
        health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        handshake = upgradeRequest({"Authorization": f"Bearer {token('kept')}"})
        peer.transport.write(health + handshake + clientFrame(b'{"id":1,"type":"ping"}'))
        await until(lambda: len(serverFrames(afterHead(peer, 1))) >= 2)
        self.assertTrue(peer.received.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"HTTP/1.1 101 ", peer.received)
        welcome, reply = (json.loads(p) for _, p in serverFrames(afterHead(peer, 1))[:2])
        self.assertEqual((welcome["userId"], reply["id"], reply["type"]), ("kept", 1, "ok"))

    async def test_originAndSubprotocol(self) -> None:
        _, port = await startShared(self, **{"allowed-origins": "https://app.example.com"})
        await welcomed(
            self, wsURL(port, f"?token={token()}"), headers={"Origin": "https://app.example.com"}
        )
        for headers, expected in (
            ({"Origin": "https://evil.example.com"}, 403),
            ({"Sec-WebSocket-Protocol": "chat.v9"}, 400),
            # A second Host, which Autobahn refuses: the handshake it reads has both.
            ({"Host": "evil.example.com"}, 400),
        ):
            peer = await rawConnect(self, port)
            assert peer.transport is not None
            peer.transport.write(upgradeRequest({"Authorization": f"Bearer {token()}", **headers}))
            status, head = await peer.head()
            self.assertEqual(status, expected)
            self.assertNotIn("autobahn", head.lower())
        factory, _ = await welcomed(
            self, wsURL(port, f"?token={token()}"), protocols=["chat.v9", SUBPROTOCOL]
        )
        assert factory.connection is not None
        self.assertEqual(factory.connection.websocket_protocol_in_use, SUBPROTOCOL)

    async def test_messageTooLarge(self) -> None:
        """
        The limit holds, for a plain message and for a deflated one that inflates
        past it (so permessage-deflate is negotiated on the shared port too).
        """
        _, port = await startShared(
            self, **{"max-message-size": "1024", "permessage-deflate": "true"}
        )
        _, client = await welcomed(self, wsURL(port, f"?token={token()}"))
        self.assertTrue((await client.request("ping", pad="x" * 900))["pong"])
        client.sendRaw(json.dumps({"type": "ping", "pad": "x" * 2000}).encode())
        self.assertEqual((await client.closed)[0], 1009)
        factory, client = await welcomed(self, wsURL(port, f"?token={token()}"), deflate=True)
        assert factory.connection is not None
        self.assertEqual(len(factory.connection.websocket_extensions_in_use), 1)
        bomb = json.dumps({"type": "ping", "pad": "x" * 200_000}).encode()
        squeezed = zlib.compressobj(wbits=-11)
        self.assertLess(len(squeezed.compress(bomb) + squeezed.flush()), 1024)
        client.sendRaw(bomb)
        self.assertEqual((await client.closed)[0], 1009)

    async def test_openHandshakeTimeout(self) -> None:
        """A client that never sends, or never finishes, its request is dropped."""
        _, port = await startShared(self, **{"open-handshake-timeout": "0.5"})
        started = time.monotonic()
        silent = await rawConnect(self, port)
        slow = await rawConnect(self, port)
        assert slow.transport is not None
        slow.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await silent.lost
        await slow.lost
        self.assertGreater(time.monotonic() - started, 0.45)
        self.assertLess(time.monotonic() - started, 5)

    async def test_takenOverConnectionOutlivesHTTPTimeout(self) -> None:
        """
        Once handed over, the connection is the WebSocket's: twisted.web's idle
        timeout, which is the open-handshake timeout on this port, does not cut it.
        """
        _, port = await startShared(self, **{"open-handshake-timeout": "0.3"})
        _, client = await welcomed(self, wsURL(port, f"?token={token()}"))
        await deferLater(reactor, 0.8)
        self.assertTrue((await client.request("ping"))["pong"])
        self.assertFalse(client.closed.called)

    async def test_slowConsumerClosed(self) -> None:
        """
        The connection's producer is registered on the taken-over transport: a client
        that stops reading is closed with 4008, a reading one keeps everything.
        """
        service, port = await startShared(self, **{"max-send-buffer": str(256 * 1024)})
        reader = await connect(wsURL(port), token("reader"))
        await reader.request("subscribe", channel="listing:7")
        stalled = await connect(wsURL(port), token("stalled"))
        await stalled.request("subscribe", channel="listing:7")
        connection = stalled._factory.connection
        assert connection is not None and connection.transport is not None
        connection.transport.pauseProducing()  # type: ignore[attr-defined]
        counters = service.factory.counters
        blob = "x" * 50_000
        sent = 0
        while counters.slow == 0 and sent < 2000:
            await publish(service, LISTING, {"n": sent, "blob": blob})
            await deferLater(reactor, 0, lambda: None)
            sent += 1
        self.assertEqual(counters.slow, 1)
        self.assertLess(sent, 2000)
        connection.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual((await stalled.closed)[0], 4008)
        for n in range(sent):
            self.assertEqual((await nextFrame(reader))["data"]["n"], n)
        await reader.close()

    async def test_shutdownCloses1001(self) -> None:
        service, port = await startShared(self, **{"auth-timeout": "5"})
        clients = [await connect(wsURL(port), token(f"u{i}")) for i in range(2)]
        waiting = dial(self, wsURL(port))
        await waiting.opened
        await service.stopService()
        self.assertEqual([(await c.closed)[0] for c in clients], [1001, 1001])
        self.assertEqual((await waiting.whenClosed())[0], 1001)
        with self.assertRaises(ConnectionRefusedError):
            await connect(wsURL(port), token("late"))


class TLSTests(TestCase):
    """
    The shared port behind TLS, both ways the service can add it: a TLS factory
    wrapping the site (L{ServerTLS}) and an C{ssl:} endpoint.
    """

    timeout = 30

    def setUp(self) -> None:
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("localhost")
        directory = self.mktemp()
        os.makedirs(directory)
        self.cert = os.path.join(directory, "cert.pem")
        self.key = os.path.join(directory, "key.pem")
        leaf.cert_chain_pems[0].write_to_path(self.cert)
        leaf.private_key_pem.write_to_path(self.key)
        self.root = Certificate.loadPEM(self.ca.cert_pem.bytes())

    async def check(self, port: int) -> None:
        self.assertEqual((await getHealth(port, self.root))["status"], "ok")
        factory = ClientFactory(
            f"wss://localhost:{port}/", {"Authorization": f"Bearer {token('secure')}"}
        )
        connectWS(factory, contextFactory=optionsForClientTLS("localhost", trustRoot=self.root))
        client = Client(factory, await factory.welcome)
        self.assertEqual(client.welcome["userId"], "secure")
        self.assertTrue((await client.request("ping"))["pong"])
        await client.close()

    async def test_wrappingFactory(self) -> None:
        service = await startService(self)
        shared = ServerTLS(self.cert, self.key).wrap(sharePort(service.site(), service.factory))
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(shared)
        service.ports.append(port)
        await self.check(port.getHost().port)

    async def test_sslEndpoint(self) -> None:
        service = await startService(self)
        shared = sharePort(service.site(), service.factory)
        description = f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
        port = await serverFromString(reactor, description).listen(shared)
        service.ports.append(port)
        await self.check(port.getHost().port)


class UnitTests(SynchronousTestCase):
    def request(self, **headers: str) -> Any:
        request = DummyRequest([b""])
        request.requestHeaders = Headers({k: [v] for k, v in headers.items()})
        return request

    def test_wantsWebSocket(self) -> None:
        for value, expected in (
            ("websocket", True),
            ("WebSocket", True),
            ("h2c, websocket", True),
            ("websocket2", False),
            ("h2c", False),
        ):
            self.assertEqual(wantsWebSocket(self.request(Upgrade=value)), expected, value)
        self.assertFalse(wantsWebSocket(self.request()))

    def test_http2Is426JSON(self) -> None:
        """
        A request that is not on an HTTP/1.1 channel (an HTTP/2 stream) cannot be
        taken over: 426 in JSON, without the Upgrade header HTTP/2 forbids.
        """
        verifier: Any = None
        root = WebSocketRoot({b"health": Resource()}, MarketplaceFactory(verifier, reactor=reactor))
        request = self.request(Upgrade="websocket")
        request.channel = DummyChannel()
        body = root.getChildWithDefault(b"", request).render(request)
        self.assertEqual(request.responseCode, 426)
        assert isinstance(body, bytes)
        self.assertEqual(json.loads(body)["error"]["code"], "bad_request")
        self.assertFalse(request.responseHeaders.hasHeader(b"upgrade"))


class _TrustingVerifier:
    """Every token is valid: its text is the user id."""

    def verify(self, jwtToken: str) -> Deferred[Identity]:
        return succeed(Identity(jwtToken, None))


class TakeoverTests(SynchronousTestCase):
    """
    The state a taken-over connection is left in, in memory: what twisted.web had set
    up for its HTTP channel is undone, as if the WebSocket listener had accepted it.
    """

    def test_transportHandedOver(self) -> None:
        httpClock, wsClock = Clock(), Clock()
        factory = MarketplaceFactory(_TrustingVerifier(), reactor=wsClock)
        shared = sharePort(site({b"health": Health(httpClock.seconds, lambda: 0)}, 4096), factory)
        shared.reactor = httpClock
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        http = shared.buildProtocol(peer)
        assert http is not None
        transport: Any = StringTransport(peerAddress=peer)
        transport.protocol = http  # as a TCP connection has it
        http.makeConnection(transport)
        self.assertIsInstance(transport.producer, HTTPChannel)
        # As twisted.web does while a client sends ahead of a request being answered.
        transport.pauseProducing()
        ping = clientFrame(b'{"id":1,"type":"ping"}')
        http.dataReceived(upgradeRequest({"Authorization": "Bearer alice"}) + ping)

        connection = transport.protocol
        self.assertIsInstance(connection, ClientProtocol)
        self.assertEqual(factory.sockets, {connection})
        # The connection's own producer (backpressure), in place of the channel.
        self.assertIsNotNone(transport.producer)
        self.assertNotIsInstance(transport.producer, HTTPChannel)
        self.assertEqual(transport.producerState, "producing")
        # No timer of twisted.web's is left to close the connection.
        self.assertEqual(httpClock.getDelayedCalls(), [])
        written = transport.value()
        self.assertTrue(written.startswith(b"HTTP/1.1 101 "))
        welcome, reply = (json.loads(p) for _, p in serverFrames(written.partition(b"\r\n\r\n")[2]))
        self.assertEqual((welcome["userId"], reply["id"], reply["type"]), ("alice", 1, "ok"))
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.sockets, set())
