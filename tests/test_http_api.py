"""
The HTTP API of SPEC §5 over real HTTP: the C{/api/v1} resource on a listening port,
behind the body-limiting request factory the service uses, called with treq (or a raw
socket where a well-behaved client cannot say what the test needs: a body that never
ends, a client that leaves before its answer).

The backend is the real hub on the in-process broker; what only a WebSocket server
knows (who is connected, how many connections a disconnect closed) is recorded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import quote

from attrs import frozen
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

import tests.strategies  # noqa: F401 - the hypothesis profiles
from marketplace_ws.broker import Published
from marketplace_ws.broker.memory import MemoryBroker
from marketplace_ws.channels import KINDS, Channel, parseChannel
from marketplace_ws.envelope import UNAVAILABLE, OpError
from marketplace_ws.http import openapi
from marketplace_ws.http._routes import Parameter, Route
from marketplace_ws.http._schema import CHANNEL, SchemaError, check, validate
from marketplace_ws.http.api import ROUTES, apiResource
from marketplace_ws.http.body import limitedRequestFactory
from marketplace_ws.hub import Hub

SECRET = "http-api-test-secret-of-32-bytes!!"
WRONG = "http-api-test-secret-of-32-bytes!?"
MAX_BODY = 4096
ORIGIN = "https://admin.example.com"

_NOTHING: Any = object()

# Typed as Any: twisted's stubs type listenTCP's factory too narrowly for a Site.
reactor: Any = _reactor


# The backend ---------------------------------------------------------------------------


class Listener:
    """A hub subscriber that keeps the frames it is sent."""

    def __init__(self, connectionId: str = "c1", userId: str = "u1") -> None:
        self.connectionId = connectionId
        self.userId = userId
        self.frames: list[dict[str, Any]] = []

    def deliver(self, frame: bytes, prepared: Any) -> None:
        self.frames.append(json.loads(frame))


class RecordingBackend:
    """
    The API's L{marketplace_ws.http.api.Backend} on a real hub and in-process broker.
    Connections are what a test says they are; C{breakAt} fails the publish with that
    index (0 is the first) with C{breakWith}; C{hold} keeps publishes pending until the
    test fires them.
    """

    def __init__(self) -> None:
        self.broker = MemoryBroker(reactor)
        self.hub = Hub(self.broker)
        self.connections: dict[str, int] = {}
        self.disconnected: list[tuple[str, str]] = []
        self.asked: list[list[str]] = []
        self.publishes = 0
        self.breakAt: int | None = None
        self.breakWith: Exception = OpError(UNAVAILABLE, "the broker is down")
        self.hold = False
        self.held: list[tuple[Deferred[Published], Deferred[Published]]] = []
        self.called: Deferred[None] = Deferred()
        self.statsFailure: Exception | None = None

    def publish(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None
    ) -> Deferred[Published]:
        index, self.publishes = self.publishes, self.publishes + 1
        if not self.called.called:
            self.called.callback(None)
        if index == self.breakAt:
            return fail(self.breakWith)
        published = self.hub.publish(channel, event, data, idempotencyKey)
        if self.hold:
            pending: Deferred[Published] = Deferred()
            self.held.append((pending, published))
            return pending
        return published

    def release(self) -> None:
        for pending, published in self.held:
            published.chainDeferred(pending)
        self.held = []

    def online(self, userIds: Any) -> Deferred[dict[str, bool]]:
        self.asked.append(list(userIds))
        return self.broker.online(userIds)

    def members(self, channel: Channel) -> Deferred[list[str]]:
        return self.broker.members(str(channel))

    def disconnect(self, userId: str, reason: str) -> Deferred[int]:
        self.disconnected.append((userId, reason))
        return succeed(self.connections.pop(userId, 0))

    def stats(self) -> dict[str, Any]:
        if self.statsFailure is not None:
            raise self.statsFailure
        return {"connections": sum(self.connections.values()), "published": self.publishes}

    # The chat and notification routes: their own end-to-end tests are in test_chat.

    def findOrCreateConversation(
        self, listingId: str | None, participants: list[tuple[str, str]]
    ) -> Deferred[dict[str, Any]]:
        self.asked.append([u for u, _ in participants])
        return succeed(
            {
                "id": 1,
                "created": True,
                "listingId": listingId,
                "participants": [{"userId": u, "role": r} for u, r in participants],
            }
        )

    def systemMessage(self, conversationId: str, body: str) -> Deferred[dict[str, Any]]:
        message = {
            "id": 1,
            "conversationId": int(conversationId),
            "senderId": None,
            "kind": "system",
            "body": body,
            "clientMsgId": None,
            "createdAt": 0,
        }
        return succeed({"message": message})

    def notify(
        self,
        userIds: list[str],
        type: str,
        title: str,
        body: str | None,
        data: Any,
        idempotencyKey: str | None,
    ) -> Deferred[list[dict[str, Any]]]:
        self.asked.append(list(userIds))
        return succeed(
            [{"userId": u, "id": n, "duplicate": False} for n, u in enumerate(userIds, 1)]
        )


# The server and its clients --------------------------------------------------------------


class TrackingSite(Site):
    """A Site that can wait until every connection it accepted is closed."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: set[Any] = set()
        self.closed: Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason: Any) -> None:
            self.open.discard(protocol)
            lost(reason)
            if not self.open and self.closed is not None:
                closed, self.closed = self.closed, None
                closed.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def allClosed(self) -> Deferred[None]:
        if not self.open:
            return succeed(None)
        if self.closed is None:
            self.closed = Deferred()
        return self.closed


@frozen
class Answer:
    status: int
    headers: Headers
    body: Any
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else ", ".join(values)

    @property
    def code(self) -> str:
        return str(self.body["error"]["code"])

    @property
    def message(self) -> str:
        return str(self.body["error"]["message"])


class Server:
    """
    The API resource mounted at C{/api} of a site on an ephemeral port, as the service
    mounts it; its listener and connections are closed by the test's cleanups.
    """

    def __init__(
        self,
        testCase: TestCase,
        backend: RecordingBackend | None = None,
        *,
        secret: str | None = SECRET,
        maxBody: int = MAX_BODY,
        corsOrigins: tuple[str, ...] = (ORIGIN,),
        limited: bool = True,
        linger: float = 5.0,
    ) -> None:
        self.backend = backend or RecordingBackend()
        root = Resource()
        root.putChild(b"api", apiResource(self.backend, secret, maxBody, corsOrigins))
        self.site = TrackingSite(root)
        if limited:
            # As the service's site is built: the body limit applies while it arrives.
            self.site.requestFactory = limitedRequestFactory(maxBody, corsOrigins, linger)
        self.site.displayTracebacks = False
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        testCase.addCleanup(self.port.stopListening)
        # The client side closes first; wait for the server side to see it.
        testCase.addCleanup(lambda: self.site.allClosed().addTimeout(5, reactor))
        self.portNumber = cast(IPv4Address, self.port.getHost()).port
        self.url = f"http://127.0.0.1:{self.portNumber}/api/v1"
        pool = HTTPConnectionPool(reactor, persistent=False)
        testCase.addCleanup(pool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        #: Every answer, for the test that the secret is never in one.
        self.answers: list[Answer] = []

    async def call(
        self,
        method: str,
        path: str,
        body: Any = _NOTHING,
        *,
        data: bytes | IBodyProducer | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = SECRET,
        prefix: str | None = None,
    ) -> Answer:
        sent: dict[bytes | str, bytes | str] = {}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not _NOTHING:
            data = json.dumps(body).encode("utf-8")
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        url = (self.url if prefix is None else f"http://127.0.0.1:{self.portNumber}{prefix}") + path
        response = await self.client.request(method, url, headers=sent, data=data)
        raw = await response.content()
        parsed = None
        if raw:
            assert response.headers.getRawHeaders("content-type") == [
                "application/json; charset=utf-8"
            ], (response.code, raw)
            assert response.headers.getRawHeaders("cache-control") == ["no-store"]
            parsed = json.loads(raw)
            if response.code >= 400:
                # Every error has the one shape the document promises.
                validate(openapi.ERROR, parsed, "error")
        answer = Answer(response.code, response.headers, parsed, raw)
        self.answers.append(answer)
        return answer

    async def raw(self) -> RawClient:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.portNumber)
        client = await connectProtocol(endpoint, RawClient())
        return client


def responseComplete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(sep) and length is not None and len(body) >= int(length.group(1))


class RawClient(Protocol):
    """A TCP client that says exactly what it is told to, and keeps what it hears."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self._waiting: list[tuple[Callable[[bytes], bool], Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiting = self._waiting, []
        for done, d in waiting:
            if done(self.received):
                d.callback(self.received)
            else:
                self._waiting.append((done, d))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)

    def until(self, done: Callable[[bytes], bool]) -> Deferred[bytes]:
        if done(self.received):
            return succeed(self.received)
        d: Deferred[bytes] = Deferred()
        self._waiting.append((done, d))
        return d.addTimeout(5, reactor)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> Deferred[None]:
        if not self.closed.called and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        return self.closed


@implementer(IBodyProducer)
class ChunkedBody:
    """A body of unknown length, so the client sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for chunk in self.chunks:
            consumer.write(chunk)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(ILogObserver)
class EventList(list[LogEvent]):
    def __call__(self, event: LogEvent) -> None:
        self.append(event)


@contextmanager
def capturedLogs() -> Iterator[list[LogEvent]]:
    events = EventList()
    globalLogPublisher.addObserver(events)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events)


def logText(events: list[LogEvent]) -> str:
    lines = []
    for event in events:
        lines.append(formatEvent(event))
        lines.append(repr(event))
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())
    return "\n".join(lines)


EVENT = {"channel": "user:seller-42", "event": "offer.received", "data": {"offerId": "of_1"}}


# Authentication --------------------------------------------------------------------------


class AuthTests(TestCase):
    timeout = 30

    async def test_missingToken(self) -> None:
        server = Server(self)
        answer = await server.call("GET", "/stats", token=None)
        self.assertEqual((answer.status, answer.code), (401, "unauthorized"))
        self.assertEqual(answer.header("www-authenticate"), 'Bearer realm="marketplace-ws"')
        self.assertIn("HTTP_API_SECRET", answer.message)
        self.assertEqual(server.backend.publishes, 0)

    async def test_wrongToken(self) -> None:
        server = Server(self)
        answer = await server.call("POST", "/publish", EVENT, token=WRONG)
        self.assertEqual((answer.status, answer.code), (401, "unauthorized"))
        self.assertEqual(
            answer.header("www-authenticate"),
            'Bearer realm="marketplace-ws", error="invalid_token"',
        )
        self.assertEqual(server.backend.publishes, 0)

    async def test_malformedAuthorization(self) -> None:
        """
        Another scheme, an empty token, a prefix of the secret, and the secret twice
        (two headers) are all refused.
        """
        server = Server(self)
        for value in (
            f"Basic {SECRET}",
            "Bearer",
            "Bearer ",
            f"Bearer {SECRET[:-1]}",
            f"Bearer {SECRET}x",
            SECRET,
        ):
            answer = await server.call(
                "GET", "/stats", token=None, headers={"Authorization": value}
            )
            self.assertEqual(answer.status, 401, value)
        response = await server.client.get(
            server.url + "/stats",
            headers=Headers({"Authorization": [f"Bearer {SECRET}", f"Bearer {SECRET}"]}),
        )
        await response.content()
        self.assertEqual(response.code, 401)

    async def test_rightToken(self) -> None:
        server = Server(self)
        answer = await server.call("GET", "/stats")
        self.assertEqual(answer.status, 200)
        lower = await server.call(
            "GET", "/stats", token=None, headers={"Authorization": f"bearer  {SECRET}"}
        )
        self.assertEqual(lower.status, 200)

    async def test_secretNeverShown(self) -> None:
        """
        Neither the secret nor a wrong token the caller sent appears in an answer or a
        log line, whatever the outcome: success, refusal, or a failure in the backend.
        """
        server = Server(self)
        with capturedLogs() as events:
            await server.call("GET", "/stats")
            await server.call("GET", "/stats", token=WRONG)
            await server.call("POST", "/publish", EVENT)
            await server.call("POST", "/publish", {"channel": SECRET}, token=SECRET)
            server.backend.statsFailure = RuntimeError("stats broke")
            await server.call("GET", "/stats")
            await server.call("GET", f"/users/{quote(WRONG)}/disconnect", token=WRONG)
            await server.call("POST", "/publish", data=b"x" * (MAX_BODY + 1), token=WRONG)
        self.flushLoggedErrors(RuntimeError)
        text = logText(events)
        self.assertIn("stats broke", text)
        self.assertNotIn(SECRET, text)
        for answer in server.answers:
            shown = answer.raw.decode("utf-8") + repr(list(answer.headers.getAllRawHeaders()))
            self.assertNotIn(SECRET, shown)
            self.assertNotIn(WRONG, shown)

    async def test_disabledWithoutSecret(self) -> None:
        """
        Without HTTP_API_SECRET the API is off (503 naming the setting), whatever the
        caller sends; its description is still served.
        """
        server = Server(self, secret=None)
        for token in (None, SECRET, ""):
            answer = await server.call("POST", "/publish", EVENT, token=token)
            self.assertEqual((answer.status, answer.code), (503, "unavailable"))
            self.assertIn("HTTP_API_SECRET", answer.message)
        self.assertEqual(server.backend.publishes, 0)
        self.assertEqual((await server.call("GET", "/openapi.json", token=None)).status, 200)


# Refusals ---------------------------------------------------------------------------------


class RefusalTests(TestCase):
    timeout = 30

    async def assertRefused(
        self, answer: Answer, status: int, code: str, fragment: str = ""
    ) -> None:
        self.assertEqual((answer.status, answer.code), (status, code), answer.body)
        self.assertIn(fragment, answer.message)

    async def test_badJSON(self) -> None:
        server = Server(self)
        cases = [
            (b"{", "not valid JSON"),
            (b"", "empty"),
            (b"   ", "empty"),
            (b'{"channel": NaN}', "not valid JSON"),
            (b'{"data": Infinity}', "not valid JSON"),
            (b"\xff\xfe{}", "not UTF-8"),
            (b"[]", "body must be a JSON object"),
            (b'"publish"', "body must be a JSON object"),
            (b"null", "body must be a JSON object"),
            (b"[" * 100_000, "not valid JSON"),
        ]
        for data, fragment in cases:
            answer = await server.call(
                "POST",
                "/publish",
                data=data[:MAX_BODY],
                headers={"Content-Type": "application/json"},
            )
            await self.assertRefused(answer, 400, "bad_request", fragment)
        self.assertEqual(server.backend.publishes, 0)

    async def test_wrongFields(self) -> None:
        server = Server(self)
        cases: list[tuple[dict[str, Any], str]] = [
            ({"event": "e", "data": 1}, "channel is required"),
            ({"channel": "listing:1", "data": 1}, "event is required"),
            ({"channel": "listing:1", "event": "e"}, "data is required"),
            ({**EVENT, "channel": 42}, "channel must be a string"),
            ({**EVENT, "event": ["e"]}, "event must be a string"),
            ({**EVENT, "idempotencyKey": 7}, "idempotencyKey must be a string or null"),
            ({**EVENT, "idempotencyKey": ""}, "idempotencyKey must be 1 to 128 characters"),
            ({**EVENT, "idempotencyKey": "k" * 129}, "idempotencyKey must be 1 to 128"),
            ({**EVENT, "idempotency_key": "k"}, "idempotency_key is not a known field"),
            ({**EVENT, "event": ""}, "event must match"),
            ({**EVENT, "event": "e" * 65}, "event must match"),
            ({**EVENT, "event": "offer received"}, "event must match"),
            ({**EVENT, "event": "offer/received"}, "event must match"),
            ({**EVENT, "event": "offer.received\n"}, "event must match"),
        ]
        for body, fragment in cases:
            await self.assertRefused(
                await server.call("POST", "/publish", body), 400, "bad_request", fragment
            )
        self.assertEqual(server.backend.publishes, 0)
        for event in ("a", "e" * 64, "offer.received", "Order:Paid-2_x"):
            answer = await server.call("POST", "/publish", {**EVENT, "event": event})
            self.assertEqual(answer.status, 200, event)
        answer = await server.call("POST", "/publish", {**EVENT, "idempotencyKey": "k" * 128})
        self.assertEqual(answer.status, 200)

    async def test_unknownChannelKind(self) -> None:
        server = Server(self)
        for channel in ("room:1", "listing", "listing:", "User:1", "listing:a b", "x" * 200):
            answer = await server.call("POST", "/publish", {**EVENT, "channel": channel})
            await self.assertRefused(answer, 400, "bad_request", "channel must be user:<id>")
            answer = await server.call("GET", f"/channels/{quote(channel, safe='')}/presence")
            await self.assertRefused(answer, 400, "bad_request", "channel must be user:<id>")
        self.assertEqual(server.backend.publishes, 0)

    async def test_wrongContentType(self) -> None:
        """
        A body must say it is JSON (any case, UTF-8 if a charset is given): 415, code
        bad_request.
        """
        server = Server(self)
        data = json.dumps(EVENT).encode("utf-8")
        for contentType in (
            None,
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/json; charset=latin-1",
            "application/jsonp",
        ):
            headers: dict[str, str] = {} if contentType is None else {"Content-Type": contentType}
            answer = await server.call("POST", "/publish", data=data, headers=headers)
            await self.assertRefused(answer, 415, "bad_request", "application/json")
        self.assertEqual(server.backend.publishes, 0)
        for contentType in ("application/json; charset=UTF-8", "Application/JSON"):
            answer = await server.call(
                "POST", "/publish", data=data, headers={"Content-Type": contentType}
            )
            self.assertEqual(answer.status, 200, contentType)

    async def test_methodNotAllowed(self) -> None:
        server = Server(self)
        for method, path, allow in (
            ("GET", "/publish", "POST, OPTIONS"),
            ("PUT", "/publish/batch", "POST, OPTIONS"),
            ("DELETE", "/stats", "GET, OPTIONS"),
            ("POST", "/presence", "GET, OPTIONS"),
            ("GET", "/users/u1/disconnect", "POST, OPTIONS"),
        ):
            answer = await server.call(method, path, token=None)
            await self.assertRefused(answer, 405, "bad_request", "takes")
            self.assertEqual(answer.header("allow"), allow)

    async def test_unknownRoute(self) -> None:
        server = Server(self)
        for path in (
            "/nope",
            "/publish/",
            "/publish/batch/x",
            "//publish",
            "",
            "/channels/listing:1",
            "/users//disconnect",
        ):
            answer = await server.call("GET", path)
            await self.assertRefused(answer, 404, "not_found", "openapi.json")
        for prefix in ("/api", "/api/", "/api/v2/publish", "/api/v1x/stats"):
            answer = await server.call("POST", "", EVENT, prefix=prefix)
            await self.assertRefused(answer, 404, "not_found")
        self.assertEqual(server.backend.publishes, 0)

    async def test_oversizeByContentLength(self) -> None:
        server = Server(self)
        data = b" " * (MAX_BODY - len(json.dumps(EVENT))) + json.dumps(EVENT).encode()
        self.assertEqual(len(data), MAX_BODY)
        asJSON = {"Content-Type": "application/json"}
        self.assertEqual(
            (await server.call("POST", "/publish", data=data, headers=asJSON)).status, 200
        )
        answer = await server.call("POST", "/publish", data=data + b" ", headers=asJSON)
        await self.assertRefused(answer, 413, "too_large", f"{MAX_BODY} bytes (HTTP_MAX_BODY)")
        self.assertEqual(server.backend.publishes, 1)

    async def test_oversizeChunked(self) -> None:
        server = Server(self)
        body = json.dumps(EVENT).encode()
        fits = ChunkedBody([body[:10], body[10:], b" " * (MAX_BODY - len(body))])
        asJSON = {"Content-Type": "application/json"}
        self.assertEqual(
            (await server.call("POST", "/publish", data=fits, headers=asJSON)).status, 200
        )
        tooMuch = ChunkedBody([body, b" " * 1000] + [b" " * 1000] * 10)
        answer = await server.call("POST", "/publish", data=tooMuch, headers=asJSON)
        await self.assertRefused(answer, 413, "too_large")
        self.assertEqual(server.backend.publishes, 1)

    async def test_oversizeAnsweredBeforeTheBody(self) -> None:
        """
        A declared length over the limit is answered at once, without "100 Continue":
        the client never has to send the body.
        """
        server = Server(self)
        client = await server.raw()
        self.addCleanup(client.close)
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
        )
        received = await client.until(responseComplete)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        self.assertNotIn(b"100 Continue", received)
        self.assertIn(b"\r\nConnection: close\r\n", received)
        self.assertIn(b'"code":"too_large"', received)
        self.assertEqual(server.backend.publishes, 0)

    async def test_oversizeChunkedAnsweredEarly(self) -> None:
        """
        A chunked body is answered as soon as it passes the limit, long before it ends.
        """
        server = Server(self)
        client = await server.raw()
        self.addCleanup(client.close)
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 1024
        for _ in range(MAX_BODY // len(chunk) + 1):
            client.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        received = await client.until(responseComplete)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "), received)
        # The rest of the body is read and dropped, and still accepted meanwhile.
        client.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.assertFalse(client.closed.called)
        client.send(b"0\r\n\r\n")
        await client.closed.addTimeout(2, reactor)

    async def test_refusedConnectionClosedAfterTheBody(self) -> None:
        """
        After the 413 the connection stays open until the body ends (so the client is
        not reset before it reads the answer), then it is closed, not kept alive.
        """
        server = Server(self)
        client = await server.raw()
        self.addCleanup(client.close)
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 10)
        )
        received = await client.until(responseComplete)
        self.assertTrue(received.startswith(b"HTTP/1.1 413 "))
        client.send(b" " * (MAX_BODY + 10))
        # Well before the linger of 5 seconds.
        await client.closed.addTimeout(2, reactor)

    async def test_lingerBounded(self) -> None:
        """A client that never finishes its refused body is cut off after the linger."""
        server = Server(self, linger=0.2)
        client = await server.raw()
        self.addCleanup(client.close)
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b" " * 10
        )
        await client.until(responseComplete)
        await client.closed.addTimeout(2, reactor)

    async def test_plainSite(self) -> None:
        """
        On a site without the limiting request factory the resource still refuses a
        body over the limit, by Content-Length or by what arrived, with the same 413.
        """
        server = Server(self, limited=False)
        asJSON = {"Content-Type": "application/json"}
        data = json.dumps(EVENT).encode() + b" " * MAX_BODY
        answer = await server.call("POST", "/publish", data=data, headers=asJSON)
        await self.assertRefused(answer, 413, "too_large")
        answer = await server.call("POST", "/publish", data=ChunkedBody([data]), headers=asJSON)
        await self.assertRefused(answer, 413, "too_large")
        self.assertEqual(server.backend.publishes, 0)
        self.assertEqual((await server.call("POST", "/publish", EVENT)).status, 200)

    async def test_backendRefusal(self) -> None:
        """An OpError from the backend is answered with its code and status."""
        server = Server(self)
        server.backend.breakAt = 0
        answer = await server.call("POST", "/publish", EVENT)
        await self.assertRefused(answer, 503, "unavailable", "the broker is down")

    async def test_backendFailure(self) -> None:
        """Any other exception is a logged 500, with nothing of it in the answer."""
        server = Server(self)
        server.backend.breakAt = 0
        server.backend.breakWith = RuntimeError("secret internals")
        answer = await server.call("POST", "/publish", EVENT)
        await self.assertRefused(answer, 500, "internal", "logged")
        self.assertNotIn(b"secret internals", answer.raw)
        self.assertNotIn(b"Traceback", answer.raw)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        server.backend.statsFailure = ValueError("also broken")
        answer = await server.call("GET", "/stats")
        await self.assertRefused(answer, 500, "internal")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    async def test_clientGoesAway(self) -> None:
        """
        A caller that leaves before its answer gets nothing written (no error about a
        finished request); the publish it asked for still happens.
        """
        server = Server(self)
        server.backend.hold = True
        client = await server.raw()
        body = json.dumps(EVENT).encode()
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
            % (SECRET.encode(), len(body), body)
        )
        await server.backend.called.addTimeout(5, reactor)
        with capturedLogs() as events:
            await client.close()
            await server.site.allClosed().addTimeout(5, reactor)
            server.backend.release()
            await deferLater(reactor, 0.01, lambda: None)
        self.assertIn("went away", logText(events))
        self.assertEqual(client.received, b"")
        self.assertEqual(await server.backend.broker.currentSeq("user:seller-42"), 1)
        self.assertEqual(self.flushLoggedErrors(), [])


# The endpoints ----------------------------------------------------------------------------


class PublishTests(TestCase):
    timeout = 30

    async def test_publish(self) -> None:
        """A published event reaches the hub's subscribers with the seq answered."""
        server = Server(self)
        listener = Listener()
        await server.backend.hub.subscribe(listener, parseChannel("user:seller-42"))
        first = await server.call("POST", "/publish", EVENT)
        self.assertEqual(first.body, {"channel": "user:seller-42", "seq": 1, "duplicate": False})
        second = await server.call("POST", "/publish", {**EVENT, "data": None})
        self.assertEqual(second.body["seq"], 2)
        pushed = {"type": "event", "channel": "user:seller-42", "event": "offer.received"}
        self.assertEqual(
            listener.frames,
            [{**pushed, "seq": 1, "data": {"offerId": "of_1"}}, {**pushed, "seq": 2, "data": None}],
        )

    async def test_idempotentPublish(self) -> None:
        """A retry with the same key is answered with the first seq and not published."""
        server = Server(self)
        listener = Listener()
        await server.backend.hub.subscribe(listener, parseChannel("user:seller-42"))
        keyed = {**EVENT, "idempotencyKey": "offer:of_1"}
        first = await server.call("POST", "/publish", keyed)
        again = await server.call("POST", "/publish", keyed)
        self.assertEqual(first.body, {"channel": "user:seller-42", "seq": 1, "duplicate": False})
        self.assertEqual(again.body, {"channel": "user:seller-42", "seq": 1, "duplicate": True})
        self.assertEqual([f["seq"] for f in listener.frames], [1])
        unkeyed = await server.call("POST", "/publish", {**keyed, "idempotencyKey": None})
        self.assertEqual(unkeyed.body["seq"], 2)

    async def test_batch(self) -> None:
        server = Server(self)
        events = [
            {**EVENT, "idempotencyKey": "k1"},
            {"channel": "listing:lst_17", "event": "listing.sold", "data": {}},
            {**EVENT, "data": 2},
            {**EVENT, "idempotencyKey": "k1"},
        ]
        answer = await server.call("POST", "/publish/batch", {"events": events})
        self.assertEqual(
            answer.body["results"],
            [
                {"channel": "user:seller-42", "seq": 1, "duplicate": False},
                {"channel": "listing:lst_17", "seq": 1, "duplicate": False},
                {"channel": "user:seller-42", "seq": 2, "duplicate": False},
                {"channel": "user:seller-42", "seq": 1, "duplicate": True},
            ],
        )

    async def test_batchValidatedWhole(self) -> None:
        """One bad event refuses the batch before any event is published."""
        server = Server(self)
        events = [EVENT, EVENT, {**EVENT, "event": "bad name"}]
        answer = await server.call("POST", "/publish/batch", {"events": events})
        self.assertEqual(answer.status, 400)
        self.assertIn("events[2].event must match", answer.message)
        events = [EVENT, {**EVENT, "channel": "room:1"}]
        answer = await server.call("POST", "/publish/batch", {"events": events})
        self.assertIn("events[1].channel must be user:<id>", answer.message)
        self.assertEqual(server.backend.publishes, 0)
        self.assertEqual(await server.backend.broker.currentSeq("user:seller-42"), 0)

    async def test_batchLimits(self) -> None:
        server = Server(self, maxBody=1_000_000)
        for events in ([], [EVENT] * 101):
            answer = await server.call("POST", "/publish/batch", {"events": events})
            self.assertEqual(answer.status, 400)
            self.assertIn("events must hold 1 to 100 items", answer.message)
        for body in ({}, {"events": EVENT}, {"events": [EVENT], "more": 1}):
            self.assertEqual((await server.call("POST", "/publish/batch", body)).status, 400)
        answer = await server.call("POST", "/publish/batch", {"events": [EVENT] * 100})
        self.assertEqual(answer.body["results"][-1]["seq"], 100)

    async def test_batchPartFailed(self) -> None:
        """A failure part-way says which events were published."""
        server = Server(self)
        server.backend.breakAt = 2
        answer = await server.call("POST", "/publish/batch", {"events": [EVENT] * 4})
        self.assertEqual((answer.status, answer.code), (503, "unavailable"))
        self.assertIn("events[2]: the broker is down", answer.message)
        self.assertIn("events[0] to events[1] were published", answer.message)
        self.assertEqual(await server.backend.broker.currentSeq("user:seller-42"), 2)


class PresenceTests(TestCase):
    timeout = 30

    async def test_online(self) -> None:
        server = Server(self)
        await server.backend.broker.addPresence("buyer-7", "c1")
        answer = await server.call("GET", "/presence?userIds=buyer-7,seller-42")
        self.assertEqual(answer.body, {"online": {"buyer-7": True, "seller-42": False}})
        repeated = await server.call(
            "GET", "/presence?userIds=seller-42&userIds=buyer-7,%20auth0%7Cx&userIds=buyer-7"
        )
        self.assertEqual(
            repeated.body, {"online": {"seller-42": False, "buyer-7": True, "auth0|x": False}}
        )
        self.assertEqual(server.backend.asked[-1], ["seller-42", "buyer-7", "auth0|x"])

    async def test_onlineRefusals(self) -> None:
        server = Server(self)
        many = ",".join(f"u{i}" for i in range(501))
        for query, fragment in (
            ("", "userIds is required"),
            ("?userids=a", "userIds is required"),
            ("?userIds=", "userIds must hold 1 to 500 items"),
            (f"?userIds={many}", "userIds must hold 1 to 500 items"),
            ("?userIds=a,b%20c", "userIds[1] must match"),
            ("?userIds=%FF", "the query is not UTF-8"),
        ):
            answer = await server.call("GET", "/presence" + query)
            self.assertEqual((answer.status, answer.code), (400, "bad_request"), query)
            self.assertIn(fragment, answer.message)
        self.assertEqual(server.backend.asked, [])
        fits = ",".join(f"u{i}" for i in range(500))
        self.assertEqual(
            len((await server.call("GET", f"/presence?userIds={fits}")).body["online"]), 500
        )

    async def test_channelPresence(self) -> None:
        server = Server(self)
        broker = server.backend.broker
        await broker.join("conversation:cv_81", "seller-42", "c1")
        await broker.join("conversation:cv_81", "buyer-7", "c2")
        await broker.join("conversation:cv_81", "buyer-7", "c3")
        answer = await server.call("GET", "/channels/conversation:cv_81/presence")
        self.assertEqual(
            answer.body, {"channel": "conversation:cv_81", "userIds": ["buyer-7", "seller-42"]}
        )
        encoded = await server.call("GET", "/channels/conversation%3Acv_81/presence")
        self.assertEqual(encoded.body, answer.body)
        empty = await server.call("GET", "/channels/listing:auth0%7C9/presence")
        self.assertEqual(empty.body, {"channel": "listing:auth0|9", "userIds": []})


class UserAndStatsTests(TestCase):
    timeout = 30

    async def test_disconnect(self) -> None:
        server = Server(self)
        server.backend.connections = {"buyer-7": 2}
        answer = await server.call("POST", "/users/buyer-7/disconnect", {"reason": "banned"})
        self.assertEqual(answer.body, {"closed": 2})
        again = await server.call("POST", "/users/buyer-7/disconnect", {})
        self.assertEqual(again.body, {"closed": 0})
        self.assertEqual(
            server.backend.disconnected,
            [("buyer-7", "banned"), ("buyer-7", "disconnected by the server")],
        )

    async def test_disconnectWithoutBody(self) -> None:
        """The body is optional: a bare POST, with no Content-Type, is a whole call."""
        server = Server(self)
        server.backend.connections = {"auth0|5f7c": 1}
        answer = await server.call("POST", "/users/auth0%7C5f7c/disconnect")
        self.assertEqual(answer.body, {"closed": 1})
        self.assertEqual(
            server.backend.disconnected, [("auth0|5f7c", "disconnected by the server")]
        )

    async def test_disconnectRefusals(self) -> None:
        server = Server(self)
        for path, body, fragment in (
            ("/users/a%20b/disconnect", {}, "id must match"),
            (f"/users/{'u' * 129}/disconnect", {}, "id must match"),
            ("/users/u1/disconnect", {"reason": "é"}, "reason must match"),
            ("/users/u1/disconnect", {"reason": "r" * 121}, "reason must match"),
            ("/users/u1/disconnect", {"reason": ""}, "reason must match"),
            ("/users/u1/disconnect", {"why": "x"}, "why is not a known field"),
            ("/users/u1/disconnect", [], "body must be a JSON object"),
        ):
            answer = await server.call("POST", path, body)
            self.assertEqual((answer.status, answer.code), (400, "bad_request"), path)
            self.assertIn(fragment, answer.message)
        self.assertEqual(server.backend.disconnected, [])

    async def test_stats(self) -> None:
        server = Server(self)
        server.backend.connections = {"u1": 3}
        await server.call("POST", "/publish", EVENT)
        answer = await server.call("GET", "/stats")
        self.assertEqual(answer.body, {"connections": 3, "published": 1})


# CORS ---------------------------------------------------------------------------------


class CorsTests(TestCase):
    timeout = 30

    async def test_allowedOrigin(self) -> None:
        """
        An allowed origin, however it is spelled, is answered with itself as sent, on
        successes and errors alike.
        """
        server = Server(self)
        for origin in (ORIGIN, "https://ADMIN.example.com:443"):
            answer = await server.call("GET", "/stats", headers={"Origin": origin})
            self.assertEqual(answer.status, 200)
            self.assertEqual(answer.header("access-control-allow-origin"), origin)
            self.assertEqual(answer.header("vary"), "Origin")
            refused = await server.call("GET", "/stats", token=None, headers={"Origin": origin})
            self.assertEqual(refused.status, 401)
            self.assertEqual(refused.header("access-control-allow-origin"), origin)

    async def test_refusedOrigin(self) -> None:
        server = Server(self)
        for origin in ("https://evil.example.com", "http://admin.example.com", "null", ""):
            answer = await server.call("GET", "/stats", headers={"Origin": origin})
            self.assertEqual(answer.status, 200)
            self.assertEqual(corsHeaders(answer), [], origin)
            preflight = await server.call(
                "OPTIONS",
                "/publish",
                token=None,
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            self.assertEqual(preflight.status, 204)
            self.assertEqual(corsHeaders(preflight), [], origin)
            self.assertEqual(preflight.header("allow"), "POST, OPTIONS")

    async def test_noOriginsConfigured(self) -> None:
        server = Server(self, corsOrigins=())
        answer = await server.call("GET", "/stats", headers={"Origin": ORIGIN})
        self.assertEqual(corsHeaders(answer), [])
        self.assertIsNone(answer.header("vary"))

    async def test_preflight(self) -> None:
        """A preflight needs no secret and allows the route's methods and headers."""
        server = Server(self)
        answer = await server.call(
            "OPTIONS",
            "/publish",
            token=None,
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer.raw, b"")
        self.assertEqual(answer.header("access-control-allow-origin"), ORIGIN)
        self.assertEqual(answer.header("access-control-allow-methods"), "POST")
        self.assertEqual(
            answer.header("access-control-allow-headers"), "authorization, content-type"
        )
        self.assertEqual(answer.header("access-control-max-age"), "600")
        self.assertEqual(answer.header("vary"), "Origin")
        self.assertIsNone(answer.header("access-control-allow-credentials"))
        self.assertEqual(server.backend.publishes, 0)
        missing = await server.call("OPTIONS", "/nope", token=None, headers={"Origin": ORIGIN})
        self.assertEqual(missing.status, 404)

    async def test_earlyRefusalReadable(self) -> None:
        """The early 413 carries CORS headers, so an allowed page can read it."""
        server = Server(self)
        client = await server.raw()
        self.addCleanup(client.close)
        client.send(
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nOrigin: %s\r\n"
            b"Content-Length: 100000000\r\n\r\n" % ORIGIN.encode()
        )
        received = await client.until(responseComplete)
        self.assertIn(b"\r\naccess-control-allow-origin: " + ORIGIN.encode(), received.lower())


def corsHeaders(answer: Answer) -> list[bytes]:
    return [
        name
        for name, _ in answer.headers.getAllRawHeaders()
        if name.lower().startswith(b"access-control-")
    ]


# The OpenAPI document -----------------------------------------------------------------------


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def concrete(path: str, operation: dict[str, Any]) -> str:
    """A path of the document with its parameters' examples filled in."""
    query = []
    for parameter in operation.get("parameters", ()):
        example = parameter["example"]
        if parameter["in"] == "path":
            path = path.replace("{" + parameter["name"] + "}", quote(example, safe=""))
        else:
            text = ",".join(example) if isinstance(example, list) else example
            query.append(f"{parameter['name']}={quote(text, safe=',')}")
    return path + ("?" + "&".join(query) if query else "")


class OpenAPITests(TestCase):
    timeout = 30

    async def document(self, server: Server) -> dict[str, Any]:
        answer = await server.call("GET", "/openapi.json", token=None)
        self.assertEqual(answer.status, 200)
        return cast(dict[str, Any], answer.body)

    async def test_servedWithoutAuth(self) -> None:
        server = Server(self)
        document = await self.document(server)
        self.assertEqual(document["openapi"], "3.1.0")
        self.assertEqual(document["servers"], [{"url": "/api/v1"}])
        self.assertIn("without authentication", document["info"]["description"])
        self.assertIn(f"{MAX_BODY} bytes", document["info"]["description"])
        self.assertEqual(document["paths"]["/openapi.json"]["get"]["security"], [])
        self.assertNotIn("security", document["paths"]["/publish"]["post"])

    async def test_listsExactlyTheServedRoutes(self) -> None:
        """
        Every operation in the document is served (never 404 or 405), every other
        method on its paths is 405 with an Allow listing the document's, and the table
        the server dispatches on holds nothing the document leaves out.
        """
        server = Server(self)
        document = await self.document(server)
        listed = {
            (method.upper(), path)
            for path, operations in document["paths"].items()
            for method in operations
        }
        served = {(route.method, route.path) for route in ROUTES} | {("GET", "/openapi.json")}
        self.assertEqual(listed, served)
        for path, operations in document["paths"].items():
            for method in METHODS:
                operation = operations.get(method.lower())
                url = concrete(path, operation or next(iter(operations.values())))
                example = (operation or {}).get("requestBody", {}).get("content", {})
                body = example.get("application/json", {}).get("example", _NOTHING)
                answer = await server.call(method, url, body)
                if operation is None:
                    self.assertEqual(answer.status, 405, (method, path))
                    allowed = sorted(m.upper() for m in operations)
                    self.assertEqual(answer.header("allow"), ", ".join([*allowed, "OPTIONS"]))
                else:
                    self.assertEqual(answer.status, 200, (method, path, answer.body))

    async def test_examplesValidate(self) -> None:
        """
        Every example in the document fits its schema, and the server answers each
        operation's example request with an answer that fits the document too.
        """
        server = Server(self)
        document = await self.document(server)
        server.backend.connections = {"buyer-7": 1}
        validate(document["components"]["schemas"]["Error"], openapi.ERROR_EXAMPLE, "error")
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                where = f"{method} {path}"
                for parameter in operation.get("parameters", ()):
                    validate(parameter["schema"], parameter["example"], where)
                content = operation.get("requestBody", {}).get("content", {})
                body = _NOTHING
                if content:
                    media = content["application/json"]
                    validate(media["schema"], media["example"], where)
                    body = media["example"]
                ok = operation["responses"]["200"]["content"]["application/json"]
                validate(ok["schema"], ok["example"], where)
                answer = await server.call(method.upper(), concrete(path, operation), body)
                self.assertEqual(answer.status, 200, (where, answer.body))
                validate(ok["schema"], answer.body, where)
                for status, response in operation["responses"].items():
                    if status != "200":
                        name = response["$ref"].rsplit("/", 1)[1]
                        self.assertIn(name, document["components"]["responses"])

    async def test_errorsDocumented(self) -> None:
        """The statuses the server answers for a route are in its document entry."""
        server = Server(self)
        document = await self.document(server)
        publish = document["paths"]["/publish"]["post"]["responses"]
        self.assertEqual(sorted(publish), ["200", "400", "401", "405", "413", "415", "500", "503"])
        spec = document["paths"]["/openapi.json"]["get"]["responses"]
        self.assertEqual(sorted(spec), ["200", "405", "500"])


class SchemaTests(SynchronousTestCase):
    def test_onlyEnforcedKeywords(self) -> None:
        """A schema cannot say what the validator would not check."""
        for schema in (
            {"type": "string", "format": "email"},
            {"type": "string", "pattern": "[a-z]+"},
            {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}},
            {"type": "array", "uniqueItems": True},
        ):
            self.assertRaises(ValueError, check, schema)
        for route in ROUTES:
            self.assertIsInstance(route, Route)
        self.assertRaises(ValueError, Parameter, name="x", schema={"oneOf": []}, description="x")

    def test_validatorTypes(self) -> None:
        self.assertRaises(SchemaError, validate, {"type": "integer"}, True, "n")
        self.assertRaises(SchemaError, validate, {"type": "integer"}, 1.5, "n")
        validate({"type": "number"}, 1, "n")
        self.assertRaises(SchemaError, validate, {"type": "number"}, False, "n")
        self.assertRaises(SchemaError, validate, {"enum": ["a"]}, "b", "n")
        self.assertRaises(SchemaError, validate, {"maximum": 3}, 4, "n")
        validate({"additionalProperties": {"type": "boolean"}}, {"a": True}, "o")
        self.assertRaises(
            SchemaError, validate, {"additionalProperties": {"type": "boolean"}}, {"a": 1}, "o"
        )

    @given(
        st.one_of(
            st.text(max_size=150),
            st.builds(
                lambda kind, ident: f"{kind}:{ident}",
                st.sampled_from([*sorted(KINDS), "room", "User", ""]),
                st.text(alphabet="aZ09_-.:@|/ é\n", max_size=140),
            ),
        )
    )
    def test_channelPatternIsTheParser(self, name: str) -> None:
        """The channel pattern the document shows accepts exactly what parseChannel does."""
        try:
            parseChannel(name)
        except OpError:
            parsed = False
        else:
            parsed = True
        self.assertEqual(re.fullmatch(CHANNEL, name) is not None, parsed, name)
