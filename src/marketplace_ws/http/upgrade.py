"""
One port for both listeners, for hosts that give a service a single public port and
health-check it there (Render, Railway): the HTTP site (C{/health}, C{/ready},
C{/metrics}, C{/api/v1/…}) and the WebSocket endpoint on the same socket.

A request with C{Upgrade: websocket} for a path outside the site's children (C{/},
C{/?token=…}, C{/ws}) is handed over, with its TCP connection, to the Autobahn factory,
which then owns the connection as if its own listener had accepted it: the same
handshake checks (Origin, subprotocol, the token's transports), limits, timeouts,
permessage-deflate and backpressure, and the shutdown's 1001. An upgrade under a child
(C{/api/v1/stats}) is an ordinary request to that child. Any other path is a JSON 404,
not Autobahn's 426 page.

A connection is taken from twisted.web the way Autobahn's C{WebSocketResource} takes
it, plus what that misses (L{_WebSocket.render}): the HTTP channel stays registered as
the transport's producer, bytes read past the request head are dropped, a transport
the channel paused stays paused, repeated headers are merged, the request is never
logged, and an HTTP/2 request gets Autobahn's HTML page naming its version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from marketplace_ws.envelope import BAD_REQUEST, INTERNAL, NOT_FOUND
from marketplace_ws.http._errors import errorBody
from marketplace_ws.http._json import respond
from marketplace_ws.protocol import MarketplaceFactory

_log = Logger()


def sharePort(site: Site, factory: MarketplaceFactory) -> Site:
    """
    Make C{site} (as L{marketplace_ws.http.site} builds it) serve C{factory}'s WebSocket
    clients too, for one listener on the shared port; C{site} is returned.
    """
    root = site.resource
    if not isinstance(root, Resource):
        raise TypeError(f"the site's root must be a Resource with children, not {root!r}")
    site.resource = WebSocketRoot(root.children, factory)
    # A connection that has not sent a complete request may be a browser still to send
    # its handshake: it gets the WebSocket listener's open-handshake timeout, as the
    # idle timeout (twisted.web's own is twelve hours). An idle keep-alive connection
    # of the API is closed after as long.
    site.timeOut = factory.limits.openHandshakeTimeout
    return site


def wantsWebSocket(request: Request) -> bool:
    """The request asks for C{Upgrade: websocket} (a token of the header, any case)."""
    for value in request.requestHeaders.getRawHeaders(b"upgrade", []):
        for token in value.split(b","):
            if token.strip().lower() == b"websocket":
                return True
    return False


class WebSocketRoot(Resource):
    """
    The shared port's root: C{children} as on the HTTP listener; any other path is the
    WebSocket endpoint for an upgrade request and a JSON 404 for anything else.
    """

    def __init__(self, children: Mapping[bytes, IResource], factory: MarketplaceFactory) -> None:
        super().__init__()
        for name, child in children.items():
            self.putChild(name, child)
        self._webSocket = _WebSocket(factory)

    def getChild(self, path: bytes, request: Request) -> IResource:
        if wantsWebSocket(request):
            return self._webSocket
        return _NOT_FOUND

    def render(self, request: Request) -> bytes:
        return _NOT_FOUND.render(request)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return respond(
            request,
            404,
            errorBody(
                NOT_FOUND,
                "there is nothing at this path: WebSocket clients send an Upgrade request, "
                "the HTTP API is under /api/v1",
            ),
        )


_NOT_FOUND = _NotFound()


class _WebSocket(Resource):
    """
    Hands an upgrade request's connection to the WebSocket factory.
    """

    isLeaf = True

    def __init__(self, factory: MarketplaceFactory) -> None:
        super().__init__()
        self._factory = factory

    def render(self, request: Request) -> bytes | int:
        channel = request.channel
        if not isinstance(channel, HTTPChannel) or channel.transport is None:
            # HTTP/2: a stream of a shared connection cannot be taken over, and no
            # WebSocket over HTTP/2 (RFC 8441) is offered, so browsers never ask for it.
            # No Upgrade header: it is forbidden in HTTP/2 responses.
            return respond(
                request,
                426,
                errorBody(BAD_REQUEST, "a WebSocket needs its own HTTP/1.1 connection"),
            )
        headers = request.requestHeaders
        if headers.hasHeader(b"transfer-encoding") or headers.getRawHeaders(
            b"content-length", [b"0"]
        ) != [b"0"]:
            # What follows a body was read into the channel's request buffer, not its
            # line buffer, and a handshake has no use for one.
            return respond(
                request, 400, errorBody(BAD_REQUEST, "a WebSocket handshake has no body")
            )
        transport: Any = channel.transport
        protocol = self._factory.buildProtocol(transport.getPeer())
        if protocol is None:
            return respond(request, 500, errorBody(INTERNAL, "internal error"))

        # The channel is the transport's producer: ClientProtocol.onOpen registers its
        # own, which raises while another is registered.
        transport.unregisterProducer()
        # Stopped for this request already; twisted.web would restart it when the
        # request finishes, which it now never does.
        channel.setTimeout(None)
        # Whatever arrived with the request head (the first frame, in one TCP write with
        # the handshake) is still in the channel's line buffer: it is the WebSocket's.
        pending = channel.clearLineBuffer()
        channel.requests.remove(request)
        channel.transport = None
        # Whoever delivers the bytes now delivers them to the WebSocket.
        if isinstance(transport, ProtocolWrapper):
            # TLS (TLSMemoryBIOFactory, which ssl: endpoints use too), the PROXY protocol.
            transport.wrappedProtocol = protocol
        elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
            # A connection that started TLS itself (startTLS).
            transport.protocol.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        protocol.makeConnection(transport)
        # The channel stops reading while a request is processed if the client sends
        # ahead, or while its answers wait to be sent; it would resume when the request
        # finished.
        transport.resumeProducing()
        _logOutcome(request, protocol)

        head = [b"%s %s %s\r\n" % (request.method, request.uri, request.clientproto)]
        for name, values in headers.getAllRawHeaders():
            # One line each, as the client sent them: Autobahn counts repeated headers
            # (a second Host is refused).
            head.extend(b"%s: %s\r\n" % (name, value) for value in values)
        head.append(b"\r\n")
        try:
            protocol.dataReceived(b"".join(head) + pending)
        except Exception:  # noqa: BLE001 - logged; the connection is dropped, as a listener would
            # Raised into twisted.web, it would answer a 500 through the channel, which
            # has no transport any more; the listener would have dropped the connection.
            _log.failure("the WebSocket handshake failed on the shared port")
            transport.abortConnection()
        return NOT_DONE_YET


def _logOutcome(request: Request, protocol: Any) -> None:
    """
    The access line of an upgrade request, as the site logs other requests, once the
    handshake is answered: 101, or the status it was refused with. twisted.web logs a
    request when it finishes, and this one never does.
    """
    site = request.site
    assert site is not None, "set by Request.process, which renders the resource"
    logged = False

    def log(status: int) -> None:
        nonlocal logged
        if not logged:
            logged = True
            request.setResponseCode(status)
            site.log(request)
            # Otherwise the request, and the channel it names, would be kept for as long
            # as the connection lasts.
            del protocol.failHandshake

    refuse = protocol.failHandshake

    def failHandshake(reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        log(code)
        refuse(reason, code, responseHeaders)

    # Every refusal of Autobahn's server handshake goes through failHandshake.
    protocol.failHandshake = failHandshake
    protocol.is_open.addCallback(lambda _: log(101))
