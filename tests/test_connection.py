"""
The authenticated WebSocket connection end to end: the whole service in this process
on ephemeral ports against real PostgreSQL, with real clients over loopback -- the
Autobahn client of L{marketplace_ws.client}, or a raw TCP socket where a well-behaved
client cannot say what the test needs (a refused handshake's HTTP status, a client
that never finishes its handshake).

Each test asserts what a user would notice: close codes, error codes, HTTP statuses,
and that the connection stays open afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import time
import zlib
from collections.abc import Iterable
from typing import Any

import jwt
from autobahn.twisted.websocket import connectWS
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from marketplace_ws.auth import Identity, mintToken
from marketplace_ws.client import Client, ClientFactory, ClientProtocol, Closed, ServerError
from marketplace_ws.protocol import SUBPROTOCOL
from marketplace_ws.service import MarketplaceService
from tests.test_service import SECRET, startService, wsURL


def token(user: str = "u1", ttl: int = 600) -> str:
    return mintToken(SECRET, user, ttl=ttl)


def expiryOf(jwtToken: str) -> int:
    return int(jwt.decode(jwtToken, options={"verify_signature": False})["exp"])


def wsPort(service: MarketplaceService) -> int:
    return int(service.ports[0].getHost().port)  # type: ignore[attr-defined]


# An Autobahn client that also reports the open handshake ---------------------------


class OpeningProtocol(ClientProtocol):
    """The library's client protocol, also firing C{factory.opened} on open."""

    factory: TestClientFactory

    def onOpen(self) -> None:
        super().onOpen()
        if not self.factory.opened.called:
            self.factory.opened.callback(self)


class DeafProtocol(OpeningProtocol):
    """A client whose network went quiet: it never answers the server's pings."""

    def onPing(self, payload: bytes) -> None:
        pass


class TestClientFactory(ClientFactory):
    """
    L{ClientFactory} for connections that are not welcomed at once (first-frame auth,
    refusals), with the subprotocols and compression a test asks for.
    """

    protocol = OpeningProtocol

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(url, headers)
        self.opened: Deferred[OpeningProtocol] = Deferred()
        self.built: OpeningProtocol | None = None
        self.greeting: dict[str, Any] | None = None

    def received(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "welcome":
            self.greeting = frame
        super().received(frame)

    def buildProtocol(self, addr: Any) -> Any:
        built: Any = super().buildProtocol(addr)
        self.built = built
        return built

    def closed(self, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(Closed(code, reason))
        super().closed(code, reason)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        super().clientConnectionFailed(connector, reason)
        if not self.opened.called:
            self.opened.errback(reason)


def dial(
    testCase: TestCase,
    url: str,
    headers: dict[str, str] | None = None,
    *,
    protocols: Iterable[str] = (SUBPROTOCOL,),
    protocol: type[OpeningProtocol] = OpeningProtocol,
    deflate: bool = False,
) -> TestClientFactory:
    """
    Start connecting; the connection is cut in the test's clean-up if still open.
    """
    factory = TestClientFactory(url, headers)
    factory.protocols = list(protocols)
    factory.protocol = protocol
    if deflate:

        def accept(response: Any) -> PerMessageDeflateResponseAccept | None:
            if isinstance(response, PerMessageDeflateResponse):
                return PerMessageDeflateResponseAccept(response)
            return None

        factory.setProtocolOptions(
            perMessageCompressionOffers=[PerMessageDeflateOffer(accept_max_window_bits=True)],
            perMessageCompressionAccept=accept,
        )
    connectWS(factory)

    async def cut() -> None:
        # Awaited where a test cares; otherwise a refusal is no unhandled error.
        factory.welcome.addErrback(lambda f: None)
        factory.opened.addErrback(lambda f: None)
        built = factory.built
        if built is not None and built.transport is not None and factory.closedWith is None:
            built.transport.abortConnection()  # type: ignore[attr-defined]
            await factory.whenClosed()

    testCase.addCleanup(lambda: Deferred.fromCoroutine(cut()))
    return factory


async def welcomed(testCase: TestCase, url: str, **kwargs: Any) -> tuple[TestClientFactory, Client]:
    factory = dial(testCase, url, **kwargs)
    welcome = await factory.welcome
    return factory, Client(factory, welcome)


async def settle(requests: list[Deferred[Any]]) -> list[tuple[str, Any]]:
    """
    What became of each request: C{("ok", result)}, C{("error", code)} or
    C{("closed", code)}.
    """
    outcomes = await DeferredList(requests, consumeErrors=True)
    settled: list[tuple[str, Any]] = []
    for succeeded, value in outcomes:
        if succeeded:
            settled.append(("ok", value))
        elif isinstance(value, Failure) and value.check(ServerError):
            settled.append(("error", value.value.code))
        elif isinstance(value, Failure) and value.check(Closed):
            settled.append(("closed", value.value.code))
        else:
            raise AssertionError(f"unexpected outcome {value!r}")
    return settled


# A raw TCP client, for what a browser sees of the HTTP handshake ---------------------


class Peer(Protocol):
    """A TCP client that collects everything the server sends."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()
        self._head: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._wake()
        self.lost.callback(None)

    def _wake(self) -> None:
        waiters, self._head = self._head, []
        for waiter in waiters:
            waiter.callback(None)

    async def head(self) -> tuple[int, str]:
        """The HTTP status and the response head, once complete (or the connection lost)."""
        if b"\r\n\r\n" not in self.received and not self.lost.called:
            waiter: Deferred[None] = Deferred()
            self._head.append(waiter)
            await waiter
        head = self.received.partition(b"\r\n\r\n")[0].decode("latin-1")
        status = head.split(" ", 2)
        if len(status) < 2 or not status[1].isdigit():
            raise AssertionError(f"no HTTP status line in {self.received!r}")
        return int(status[1]), head


def upgradeRequest(headers: dict[str, str], *, path: str = "/", upgrade: bool = True) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    if upgrade:
        key = base64.b64encode(os.urandom(16)).decode()
        lines += [
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def rawConnect(testCase: TestCase, service: MarketplaceService) -> Peer:
    peer = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", wsPort(service)), Peer())

    async def cut() -> None:
        if not peer.lost.called:
            assert peer.transport is not None
            peer.transport.abortConnection()
            await peer.lost

    testCase.addCleanup(lambda: Deferred.fromCoroutine(cut()))
    return peer


async def handshake(
    testCase: TestCase,
    service: MarketplaceService,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> tuple[int, str, Peer]:
    """Send an HTTP request; the response's status and head, and the peer."""
    peer = await rawConnect(testCase, service)
    assert peer.transport is not None
    peer.transport.write(upgradeRequest(headers or {}, **kwargs))
    status, head = await peer.head()
    return status, head, peer


class TokenTransportTests(TestCase):
    """
    The four ways a token reaches the server, and what happens without one.
    """

    timeout = 30

    async def test_bearerHeader(self) -> None:
        service = await startService(self)
        jwtToken = token("buyer-1")
        _, client = await welcomed(
            self, wsURL(service), headers={"Authorization": f"Bearer {jwtToken}"}
        )
        welcome = client.welcome
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["userId"], "buyer-1")
        self.assertEqual(welcome["expiresAt"], expiryOf(jwtToken))
        self.assertLess(abs(welcome["serverTime"] - time.time() * 1000), 5000)
        self.assertIsInstance(welcome["connectionId"], str)
        self.assertEqual(len(service.factory.connections), 1)

    async def test_defaultCookie(self) -> None:
        service = await startService(self)
        _, client = await welcomed(
            self, wsURL(service), headers={"Cookie": f"mws_token={token('seller-2')}"}
        )
        self.assertEqual(client.welcome["userId"], "seller-2")

    async def test_cookieAmongOtherCookies(self) -> None:
        """
        Other cookies on the app's domain -- analytics cookies holding JSON, values
        with spaces, a cookie without a value -- do not hide the token's cookie.
        """
        service = await startService(self)
        jar = f'prefs={{"theme":"dark"}}; banner=dark mode; flag; mws_token={token("u7")}; _ga=1.2'
        _, client = await welcomed(self, wsURL(service), headers={"Cookie": jar})
        self.assertEqual(client.welcome["userId"], "u7")

    async def test_configuredCookieName(self) -> None:
        """
        With C{token-cookie} set, that cookie carries the token and the default name
        is just another cookie (so the connection waits for an C{auth} frame).
        """
        service = await startService(self, **{"token-cookie": "session", "auth-timeout": "0.3"})
        _, client = await welcomed(
            self, wsURL(service), headers={"Cookie": f"a=b; session={token('u3')}"}
        )
        self.assertEqual(client.welcome["userId"], "u3")
        ignored = dial(self, wsURL(service), headers={"Cookie": f"mws_token={token('u4')}"})
        await ignored.opened
        code, _ = await ignored.whenClosed()
        self.assertEqual(code, 4001)
        self.assertIsNone(ignored.greeting)

    async def test_queryToken(self) -> None:
        service = await startService(self)
        _, client = await welcomed(self, wsURL(service, f"?token={token('seller-9')}"))
        self.assertEqual(client.welcome["userId"], "seller-9")

    async def test_transportOrder(self) -> None:
        """Header before cookie before query (SPEC §4), when a client sends several."""
        service = await startService(self)
        url = wsURL(service, f"?token={token('from-query')}")
        cookie = {"Cookie": f"mws_token={token('from-cookie')}"}
        _, client = await welcomed(
            self, url, headers={"Authorization": f"Bearer {token('from-header')}", **cookie}
        )
        self.assertEqual(client.welcome["userId"], "from-header")
        _, client = await welcomed(self, url, headers=cookie)
        self.assertEqual(client.welcome["userId"], "from-cookie")

    async def test_firstFrameAuth(self) -> None:
        """
        Without a token the connection opens and waits; an C{auth} frame is answered
        with the welcome, and requests work from then on.
        """
        service = await startService(self, **{"auth-timeout": "5"})
        factory = dial(self, wsURL(service))
        connection = await factory.opened
        self.assertFalse(factory.welcome.called)
        connection.sendMessage(json.dumps({"type": "auth", "token": token("late-1")}).encode())
        welcome = await factory.welcome
        self.assertEqual(welcome["userId"], "late-1")
        client = Client(factory, welcome)
        self.assertTrue((await client.request("ping"))["pong"])

    async def test_authTimeout(self) -> None:
        service = await startService(self, **{"auth-timeout": "0.3"})
        factory = dial(self, wsURL(service))
        await factory.opened
        started = time.monotonic()
        code, _ = await factory.whenClosed()
        self.assertEqual(code, 4001)
        self.assertGreater(time.monotonic() - started, 0.2)
        self.assertIsNone(factory.greeting)

    async def test_nonAuthFirstFrame(self) -> None:
        service = await startService(self, **{"auth-timeout": "5"})
        factory = dial(self, wsURL(service))
        connection = await factory.opened
        connection.sendMessage(b'{"id":1,"type":"ping"}')
        code, _ = await factory.whenClosed()
        self.assertEqual(code, 4001)

    async def test_badTokenInFirstFrame(self) -> None:
        service = await startService(self, **{"auth-timeout": "5"})
        factory = dial(self, wsURL(service))
        connection = await factory.opened
        forged = mintToken("another-secret-entirely-32-bytes-long", "u1")
        connection.sendMessage(json.dumps({"type": "auth", "token": forged}).encode())
        code, _ = await factory.whenClosed()
        self.assertEqual(code, 4001)
        self.assertEqual(len(service.factory.connections), 0)

    async def test_badTokenAtHandshakeIs401(self) -> None:
        service = await startService(self)
        status, _, _ = await handshake(
            self, service, {"Authorization": f"Bearer {token('u1', ttl=-60)}"}
        )
        self.assertEqual(status, 401)

    async def test_requestAfterCloseFails(self) -> None:
        """
        A request on a connection that has closed fails with L{Closed} at once; it
        does not wait for a reply that can never come.
        """
        service = await startService(self)
        _, client = await welcomed(self, wsURL(service, f"?token={token()}"))
        code, _ = await client.close()
        self.assertEqual(code, 1000)
        # Every caller hears how it closed, not only the first to ask.
        self.assertEqual((await client.closed)[0], 1000)
        with self.assertRaises(Closed):
            await client.request("ping")


class RefreshTests(TestCase):
    """
    Token expiry on a live connection (SPEC §4): the notice, the refresh, the close.
    """

    timeout = 30
    settings = {"jwt-leeway": "0", "token-expiry-notice": "1.5"}

    async def test_noticeThenRefreshOutlivesOldToken(self) -> None:
        service = await startService(self, **self.settings)
        old = token("u1", ttl=2)
        _, client = await welcomed(self, wsURL(service, f"?token={old}"))
        notice = await client.frames.get()
        self.assertEqual(notice, {"type": "token.expiring", "expiresAt": expiryOf(old)})
        self.assertLess(time.time(), expiryOf(old))
        fresh = token("u1", ttl=600)
        result = await client.request("auth", token=fresh)
        self.assertEqual(result, {"expiresAt": expiryOf(fresh)})
        await deferLater(reactor, max(0.0, expiryOf(old) - time.time()) + 0.4)
        self.assertTrue((await client.request("ping"))["pong"])
        self.assertFalse(client.closed.called)

    async def test_refreshForAnotherUserIsForbidden(self) -> None:
        """
        A token for someone else is refused with C{forbidden}, a bad token with
        C{unauthorized}; neither closes the connection nor extends it.
        """
        service = await startService(self, **self.settings)
        old = token("u1", ttl=2)
        _, client = await welcomed(self, wsURL(service, f"?token={old}"))
        with self.assertRaises(ServerError) as raised:
            await client.request("auth", token=token("u2", ttl=600))
        self.assertEqual(raised.exception.code, "forbidden")
        with self.assertRaises(ServerError) as raised:
            await client.request("auth", token="not.a.jwt")
        self.assertEqual(raised.exception.code, "unauthorized")
        with self.assertRaises(ServerError) as raised:
            await client.request("auth")
        self.assertEqual(raised.exception.code, "bad_request")
        self.assertTrue((await client.request("ping"))["pong"])
        code, _ = await client.closed
        self.assertEqual(code, 4001)
        self.assertGreater(time.time(), expiryOf(old) - 0.1)

    async def test_expiryCloses4001(self) -> None:
        service = await startService(self, **self.settings)
        old = token("u1", ttl=2)
        _, client = await welcomed(self, wsURL(service, f"?token={old}"))
        self.assertEqual((await client.frames.get())["type"], "token.expiring")
        code, _ = await client.closed
        self.assertEqual(code, 4001)
        self.assertGreater(time.time(), expiryOf(old) - 0.1)
        self.assertEqual(len(service.factory.connections), 0)


class SubprotocolTests(TestCase):
    timeout = 30

    async def test_selectedWhenOffered(self) -> None:
        service = await startService(self)
        factory, _ = await welcomed(
            self, wsURL(service, f"?token={token()}"), protocols=["chat.v9", SUBPROTOCOL]
        )
        assert factory.connection is not None
        self.assertEqual(factory.connection.websocket_protocol_in_use, SUBPROTOCOL)

    async def test_onlyUnknownOfferedIsRefused(self) -> None:
        service = await startService(self)
        status, _, _ = await handshake(
            self,
            service,
            {"Authorization": f"Bearer {token()}", "Sec-WebSocket-Protocol": "chat.v9, mqtt"},
        )
        self.assertEqual(status, 400)
        factory = dial(self, wsURL(service, f"?token={token()}"), protocols=["chat.v9"])
        with self.assertRaises(Closed):
            await factory.welcome
        self.assertEqual(len(service.factory.connections), 0)

    async def test_noneOfferedIsAccepted(self) -> None:
        service = await startService(self)
        factory, client = await welcomed(self, wsURL(service, f"?token={token()}"), protocols=[])
        assert factory.connection is not None
        self.assertIsNone(factory.connection.websocket_protocol_in_use)
        self.assertTrue((await client.request("ping"))["pong"])


class OriginTests(TestCase):
    """
    C{allowed-origins}: browsers from elsewhere are refused at the handshake.
    """

    timeout = 30
    allowed = {"allowed-origins": "https://app.example.com"}

    async def test_allowedOrigin(self) -> None:
        """The scheme's default port may be written or left out, on either side."""
        service = await startService(self, **self.allowed)
        url = wsURL(service, f"?token={token()}")
        for origin in (
            "https://app.example.com",
            "https://app.example.com:443",
            "https://APP.example.com",
        ):
            await welcomed(self, url, headers={"Origin": origin})
        service = await startService(self, **{"allowed-origins": "https://app.example.com:443"})
        await welcomed(
            self, wsURL(service, f"?token={token()}"), headers={"Origin": "https://app.example.com"}
        )

    async def test_wildcardOrigin(self) -> None:
        service = await startService(self, **{"allowed-origins": "https://*.example.com:443"})
        await welcomed(
            self,
            wsURL(service, f"?token={token()}"),
            headers={"Origin": "https://shop.example.com"},
        )
        for origin in ("https://example.com.evil.io", "http://shop.example.com"):
            status, _, _ = await handshake(self, service, {"Origin": origin})
            self.assertEqual(status, 403, origin)

    async def test_otherOriginRefused(self) -> None:
        service = await startService(self, **self.allowed)
        for origin in (
            "https://evil.example.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.io",
        ):
            status, _, peer = await handshake(
                self, service, {"Origin": origin, "Authorization": f"Bearer {token()}"}
            )
            self.assertEqual(status, 403, origin)
            await peer.lost
        self.assertEqual(len(service.factory.connections), 0)

    async def test_nullOriginRefused(self) -> None:
        service = await startService(self, **self.allowed)
        status, _, _ = await handshake(
            self, service, {"Origin": "null", "Authorization": f"Bearer {token()}"}
        )
        self.assertEqual(status, 403)

    async def test_noOriginAccepted(self) -> None:
        """A client without Origin is not a browser; the allowlist cannot constrain it."""
        service = await startService(self, **self.allowed)
        status, _, _ = await handshake(self, service, {"Authorization": f"Bearer {token()}"})
        self.assertEqual(status, 101)
        await welcomed(self, wsURL(service, f"?token={token()}"))

    async def test_nothingRevealsAutobahn(self) -> None:
        """
        A plain GET gets no status page, and no response names the WebSocket library
        or its version (it tells an attacker which advisories apply).
        """
        service = await startService(self)
        status, _, peer = await handshake(self, service, upgrade=False)
        await peer.lost
        self.assertNotEqual(status, 200)
        self.assertNotIn(b"autobahn", peer.received.lower())
        status, head, _ = await handshake(self, service, {"Authorization": f"Bearer {token()}"})
        self.assertEqual(status, 101)
        self.assertNotIn("autobahn", head.lower())


class EnvelopeTests(TestCase):
    """
    Requests that are not well-formed get C{bad_request} and the connection lives on,
    up to C{bad-frame-limit} of them in a row.
    """

    timeout = 30

    async def connected(self, **settings: Any) -> Client:
        service = await startService(self, **settings)
        _, client = await welcomed(self, wsURL(service, f"?token={token()}"))
        return client

    async def assertStillOpen(self, client: Client) -> None:
        self.assertTrue((await client.request("ping"))["pong"])
        self.assertFalse(client.closed.called)

    async def test_ping(self) -> None:
        client = await self.connected()
        result = await client.request("ping")
        self.assertIs(result["pong"], True)
        self.assertLess(abs(result["serverTime"] - time.time() * 1000), 5000)

    async def test_unknownOp(self) -> None:
        client = await self.connected()
        client.sendRaw(b'{"id":"7","type":"no.such.op"}')
        reply = await client.frames.get()
        self.assertEqual(reply["id"], "7")
        self.assertEqual(reply["type"], "error")
        self.assertEqual(reply["error"]["code"], "bad_request")
        await self.assertStillOpen(client)

    async def test_malformedJSON(self) -> None:
        """Not JSON in UTF-8 -- including JSON in UTF-16, which is valid UTF-8 bytes."""
        client = await self.connected()
        utf16 = '{"id":1,"type":"ping"}'.encode("utf-16-le")
        for payload in (b"{not json", b"", b'{"id":1,"type":"ping"', "[\u00e9".encode(), utf16):
            client.sendRaw(payload)
            reply = await client.frames.get()
            self.assertEqual((reply["id"], reply["error"]["code"]), (None, "bad_request"), payload)
        await self.assertStillOpen(client)

    async def test_nonObjectJSON(self) -> None:
        client = await self.connected()
        for payload in (b"[1,2]", b'"ping"', b"42", b"null", b"true"):
            client.sendRaw(payload)
            reply = await client.frames.get()
            self.assertEqual(reply["error"]["code"], "bad_request", payload)
        await self.assertStillOpen(client)

    async def test_missingOrWrongType(self) -> None:
        """The request's id is echoed when it could be read."""
        client = await self.connected()
        for payload in (b'{"id":3}', b'{"id":3,"type":""}', b'{"id":3,"type":7}'):
            client.sendRaw(payload)
            reply = await client.frames.get()
            self.assertEqual((reply["id"], reply["error"]["code"]), (3, "bad_request"), payload)
        await self.assertStillOpen(client)

    async def test_idOfWrongType(self) -> None:
        client = await self.connected()
        for requestId in (True, 1.5, {"a": 1}, [1], "x" * 65, 2**53):
            client.sendRaw(json.dumps({"id": requestId, "type": "ping"}).encode())
            reply = await client.frames.get()
            self.assertEqual(
                (reply["id"], reply["error"]["code"]), (None, "bad_request"), requestId
            )
        await self.assertStillOpen(client)

    async def test_idIsEchoedExactly(self) -> None:
        """
        Any string id up to the limit comes back as sent, even one JSON can only
        carry escaped (a lone surrogate).
        """
        client = await self.connected()
        for requestId in ("\ud800", "x" * 64, "é✓", 0, -(2**53) + 1):
            client.sendRaw(json.dumps({"id": requestId, "type": "ping"}).encode())
            reply = await client.frames.get()
            self.assertEqual((reply["id"], reply["type"]), (requestId, "ok"))
        await self.assertStillOpen(client)

    async def test_badFrameLimit(self) -> None:
        """
        C{bad-frame-limit} malformed requests in a row close with 4000; a good
        request in between starts the count again.
        """
        client = await self.connected(**{"bad-frame-limit": "3"})
        for _ in range(2):
            client.sendRaw(b"{not json")
            self.assertEqual((await client.frames.get())["error"]["code"], "bad_request")
        self.assertTrue((await client.request("ping"))["pong"])
        for _ in range(2):
            client.sendRaw(b'{"type":"no.such.op"}')
            self.assertEqual((await client.frames.get())["error"]["code"], "bad_request")
        client.sendRaw(b"[]")
        code, _ = await client.closed
        self.assertEqual(code, 4000)

    async def test_binaryFrameCloses1003(self) -> None:
        client = await self.connected()
        client.sendRaw(b'{"type":"ping"}', isBinary=True)
        code, _ = await client.closed
        self.assertEqual(code, 1003)

    async def test_invalidUTF8Closes1007(self) -> None:
        service = await startService(self)
        factory, _ = await welcomed(self, wsURL(service, f"?token={token()}"))
        assert factory.connection is not None
        # A text frame whose payload is not UTF-8: what a buggy encoder sends.
        factory.connection.sendFrame(opcode=1, payload=b'{"type":"\xff\xfe"}')
        code, _ = await factory.whenClosed()
        self.assertEqual(code, 1007)


class LimitTests(TestCase):
    timeout = 30

    async def test_messageTooLarge(self) -> None:
        service = await startService(self, **{"max-message-size": "1024"})
        _, client = await welcomed(self, wsURL(service, f"?token={token()}"))
        self.assertTrue((await client.request("ping", pad="x" * 900))["pong"])
        client.sendRaw(json.dumps({"type": "ping", "pad": "x" * 2000}).encode())
        code, _ = await client.closed
        self.assertEqual(code, 1009)

    async def test_frameTooLarge(self) -> None:
        service = await startService(self, **{"max-frame-size": "1024"})
        _, client = await welcomed(self, wsURL(service, f"?token={token()}"))
        client.sendRaw(json.dumps({"type": "ping", "pad": "x" * 2000}).encode())
        code, _ = await client.closed
        self.assertEqual(code, 1009)

    async def test_deflateOffByDefault(self) -> None:
        """
        A browser always offers permessage-deflate; by default the server declines it
        (its zlib state would triple an idle connection's memory) and the connection
        works uncompressed.
        """
        service = await startService(self)
        factory, client = await welcomed(self, wsURL(service, f"?token={token()}"), deflate=True)
        assert factory.connection is not None
        self.assertEqual(factory.connection.websocket_extensions_in_use, [])
        self.assertTrue((await client.request("ping", pad="x" * 900))["pong"])

    async def test_compressedMessageInflatingPastLimit(self) -> None:
        """
        With permessage-deflate the limit applies to the inflated message: a small
        compressed frame that inflates past it closes with 1009 (GHSA-hxp9-w8x3-p566).
        """
        service = await startService(
            self, **{"max-message-size": "1024", "permessage-deflate": "true"}
        )
        factory, client = await welcomed(self, wsURL(service, f"?token={token()}"), deflate=True)
        assert factory.connection is not None
        self.assertEqual(len(factory.connection.websocket_extensions_in_use), 1)
        self.assertTrue((await client.request("ping", pad="x" * 900))["pong"])
        bomb = json.dumps({"type": "ping", "pad": "x" * 200_000}).encode()
        squeezed = zlib.compressobj(wbits=-11)
        self.assertLess(len(squeezed.compress(bomb) + squeezed.flush()), 1024)
        client.sendRaw(bomb)
        code, _ = await client.closed
        self.assertEqual(code, 1009)

    async def test_connectionsPerUser(self) -> None:
        """The newest connection beyond the limit closes with 4029; older ones stay."""
        service = await startService(self, **{"max-connections-per-user": "2"})
        url = wsURL(service, f"?token={token('u1')}")
        older = [(await welcomed(self, url))[1] for _ in range(2)]
        newest = dial(self, url)
        with self.assertRaises(Closed) as raised:
            await newest.welcome
        self.assertEqual(raised.exception.code, 4029)
        for client in older:
            self.assertTrue((await client.request("ping"))["pong"])
        await welcomed(self, wsURL(service, f"?token={token('u2')}"))
        # A slot freed is a slot to use again.
        await older[0].close()
        await welcomed(self, url)

    async def test_rateLimited(self) -> None:
        """Over the rate, C{rate_limited}; the connection stays open and recovers."""
        service = await startService(self, **{"rate-limits": "*=5/s:5"})
        _, client = await welcomed(self, wsURL(service, f"?token={token()}"))
        outcomes = await settle([client.request("ping") for _ in range(7)])
        self.assertEqual([kind for kind, _ in outcomes[:5]], ["ok"] * 5)
        self.assertEqual(outcomes[5:], [("error", "rate_limited")] * 2)
        await deferLater(reactor, 0.3)
        self.assertTrue((await client.request("ping"))["pong"])

    async def test_sustainedRateLimitCloses4029(self) -> None:
        """
        More than C{rate-limit-close-after} rate-limited requests close with 4029.
        """
        service = await startService(
            self, **{"rate-limits": "*=5/s:5", "rate-limit-close-after": "3"}
        )
        _, client = await welcomed(self, wsURL(service, f"?token={token()}"))
        outcomes = await settle([client.request("ping") for _ in range(12)])
        self.assertEqual([kind for kind, _ in outcomes[:5]], ["ok"] * 5)
        self.assertEqual(outcomes[5:8], [("error", "rate_limited")] * 3)
        self.assertEqual(outcomes[8:], [("closed", 4029)] * 4)

    async def test_openHandshakeTimeout(self) -> None:
        """A TCP client that never sends its handshake is dropped."""
        service = await startService(self, **{"open-handshake-timeout": "0.5"})
        started = time.monotonic()
        silent = await rawConnect(self, service)
        slow = await rawConnect(self, service)
        assert slow.transport is not None
        slow.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await silent.lost
        await slow.lost
        self.assertGreater(time.monotonic() - started, 0.45)
        self.assertLess(time.monotonic() - started, 5)

    async def test_autoPing(self) -> None:
        """A client that does not answer pings is dropped; one that does stays."""
        service = await startService(self, **{"ping-interval": "0.3", "ping-timeout": "0.3"})
        url = wsURL(service, f"?token={token()}")
        deaf, _ = await welcomed(self, url, protocol=DeafProtocol)
        _, polite = await welcomed(self, url)
        code, _ = await deaf.whenClosed()
        self.assertEqual(code, 1006)  # dropped without a close frame
        self.assertEqual(len(service.factory.connections), 1)
        await deferLater(reactor, 0.5)
        self.assertTrue((await polite.request("ping"))["pong"])


class RefusalCountTests(TestCase):
    timeout = 30

    async def test_refusalsAreCountedByReason(self) -> None:
        service = await startService(
            self,
            **{
                "allowed-origins": "https://app.example.com",
                "auth-timeout": "0.3",
                "max-connections-per-user": "1",
            },
        )
        refusals = service.factory.counters.refused
        for headers in (
            {"Origin": "https://evil.example.com"},
            {"Sec-WebSocket-Protocol": "chat.v9"},
            {"Authorization": f"Bearer {token(ttl=-60)}"},
            {"Authorization": "Bearer not.a.jwt"},
            {"Authorization": f"Bearer {mintToken('another-secret-entirely-32-bytes-long', 'u')}"},
        ):
            status, _, _ = await handshake(self, service, headers)
            self.assertIn(status, (400, 401, 403))
        # Turned away after the handshake: a bad auth frame, no auth frame at all, a
        # request before auth, and one connection too many.
        late = dial(self, wsURL(service))
        (await late.opened).sendMessage(json.dumps({"type": "auth", "token": "x.y.z"}).encode())
        silent = dial(self, wsURL(service))
        early = dial(self, wsURL(service))
        (await early.opened).sendMessage(b'{"type":"ping"}')
        url = wsURL(service, f"?token={token('u1')}")
        await welcomed(self, url)
        extra = dial(self, url)
        for factory in (late, silent, early, extra):
            await factory.whenClosed()
        self.assertEqual(
            refusals,
            {
                "origin": 1,
                "subprotocol": 1,
                "expired": 1,
                "malformed": 2,
                "bad_signature": 1,
                "auth_timeout": 1,
                "auth_required": 1,
                "too_many_connections": 1,
            },
        )


class SlowVerificationTests(TestCase):
    """
    Token verification may take a while (a JWKS fetch); a client that goes away in
    the meantime must not stay registered as an open connection.
    """

    timeout = 30

    def slowVerifier(self, service: MarketplaceService) -> list[Deferred[None]]:
        """Hold every verification until the test releases it."""
        real = service.factory.verifier
        held: list[Deferred[None]] = []

        async def verify(jwtToken: str) -> Identity:
            gate: Deferred[None] = Deferred()
            held.append(gate)
            await gate
            return await real.verify(jwtToken)

        service.factory.verifier = _Verifier(verify)
        return held

    async def test_clientGoneDuringHandshake(self) -> None:
        service = await startService(self)
        held = self.slowVerifier(service)
        peer = await rawConnect(self, service)
        assert peer.transport is not None
        peer.transport.write(upgradeRequest({"Authorization": f"Bearer {token()}"}))
        while not held:
            await deferLater(reactor, 0.01)
        peer.transport.abortConnection()  # type: ignore[attr-defined]
        await peer.lost
        await deferLater(reactor, 0.05)
        held[0].callback(None)
        await deferLater(reactor, 0.05)
        self.assertEqual(service.factory.connections, set())
        self.assertEqual(service.live.byUser, {})

    async def test_authTimeoutDuringFirstFrameVerification(self) -> None:
        service = await startService(self, **{"auth-timeout": "0.3"})
        held = self.slowVerifier(service)
        factory = dial(self, wsURL(service))
        (await factory.opened).sendMessage(json.dumps({"type": "auth", "token": token()}).encode())
        code, _ = await factory.whenClosed()
        self.assertEqual(code, 4001)
        held[0].callback(None)
        await deferLater(reactor, 0.05)
        self.assertEqual(service.factory.connections, set())
        self.assertEqual(service.live.byUser, {})
        self.assertIsNone(factory.greeting)


class _Verifier:
    def __init__(self, verify: Any) -> None:
        self._verify = verify

    def verify(self, jwtToken: str) -> Deferred[Identity]:
        return Deferred.fromCoroutine(self._verify(jwtToken))


class ShutdownBeforeAuthTests(TestCase):
    timeout = 30

    async def test_unauthenticatedClosedWith1001(self) -> None:
        """
        A connection still to send its auth frame is closed with 1001 at shutdown
        too, rather than left for the shutdown timeout to cut.
        """
        service = await startService(self)
        factory = dial(self, wsURL(service))
        await factory.opened
        started = reactor.seconds()
        await service.stopService()
        self.assertEqual((await factory.whenClosed())[0], 1001)
        self.assertLess(reactor.seconds() - started, 2)
