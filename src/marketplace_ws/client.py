"""
A Python client for marketplace-ws, on Autobahn: connect with a token, send requests
and get their replies by id, receive pushed frames.

The tests use it as a real client over real sockets; a Python backend can use it the
same way. C{python -m marketplace_ws.client URL} prints every frame it receives.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    connectWS,
)
from twisted.internet.defer import Deferred, DeferredQueue, fail, succeed

from marketplace_ws.protocol import SUBPROTOCOL


class ServerError(Exception):
    """The server answered a request with an C{error} frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Closed(Exception):
    """The connection closed before the server answered."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class ClientProtocol(WebSocketClientProtocol):
    factory: ClientFactory

    def onOpen(self) -> None:
        self.factory.connection = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        frame = json.loads(payload)
        self.factory.received(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closed(code, reason)


class ClientFactory(WebSocketClientFactory):
    protocol = ClientProtocol  # type: ignore[assignment]

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL], headers=headers or {})
        self.connection: ClientProtocol | None = None
        self.welcome: Deferred[dict[str, Any]] = Deferred()
        self.frames: DeferredQueue[dict[str, Any]] = DeferredQueue()
        self.pending: dict[str, Deferred[Any]] = {}
        #: C{(code, reason)} once the connection has closed.
        self.closedWith: tuple[int | None, str | None] | None = None
        self._closeWaiters: list[Deferred[tuple[int | None, str | None]]] = []
        self.onFrame: Callable[[dict[str, Any]], None] | None = None

    def received(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        requestId = frame.get("id")
        if kind == "welcome" and not self.welcome.called:
            self.welcome.callback(frame)
            return
        if requestId is not None and requestId in self.pending and kind in ("ok", "error"):
            waiter = self.pending.pop(requestId)
            if kind == "ok":
                waiter.callback(frame.get("result"))
            else:
                error = frame.get("error") or {}
                waiter.errback(ServerError(error.get("code", ""), error.get("message", "")))
            return
        if self.onFrame is not None:
            self.onFrame(frame)
        self.frames.put(frame)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.welcome.called:
            self.welcome.errback(reason)

    def whenClosed(self) -> Deferred[tuple[int | None, str | None]]:
        """
        Fires with C{(code, reason)} when the connection closes. Each call has a
        Deferred of its own: awaiting a Deferred consumes its result, and every
        caller should see the close code.
        """
        if self.closedWith is not None:
            return succeed(self.closedWith)
        waiter: Deferred[tuple[int | None, str | None]] = Deferred()
        self._closeWaiters.append(waiter)
        return waiter

    def closed(self, code: int | None, reason: str | None) -> None:
        if self.closedWith is not None:
            return
        self.closedWith = (code, reason)
        if not self.welcome.called:
            self.welcome.errback(Closed(code, reason))
        # Taken first: a waiter's callbacks may send the next request.
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            waiter.errback(Closed(code, reason))
        waiters, self._closeWaiters = self._closeWaiters, []
        for closeWaiter in waiters:
            closeWaiter.callback((code, reason))


class Client:
    """
    One open, welcomed connection.
    """

    def __init__(self, factory: ClientFactory, welcome: dict[str, Any]) -> None:
        self._factory = factory
        self.welcome = welcome
        self._ids = itertools.count(1)

    @property
    def frames(self) -> DeferredQueue[dict[str, Any]]:
        """Frames that are not replies: events and server notices, in order."""
        return self._factory.frames

    @property
    def closed(self) -> Deferred[tuple[int | None, str | None]]:
        """Fires with C{(code, reason)} when the connection closes (a new Deferred each time)."""
        return self._factory.whenClosed()

    def sendRaw(self, payload: bytes, isBinary: bool = False) -> None:
        assert self._factory.connection is not None
        self._factory.connection.sendMessage(payload, isBinary=isBinary)

    def request(self, kind: str, **params: Any) -> Deferred[Any]:
        """
        Send a request; the Deferred fires with its result or fails with ServerError,
        or with L{Closed} if the connection closes first (or has closed already).
        """
        connection = self._factory.connection
        if connection is None or connection.state != connection.STATE_OPEN:
            code, reason = self._factory.closedWith or (None, "the connection is closing")
            return fail(Closed(code, reason))
        requestId = str(next(self._ids))
        waiter: Deferred[Any] = Deferred()
        self._factory.pending[requestId] = waiter
        self.sendRaw(json.dumps({"id": requestId, "type": kind, **params}).encode())
        return waiter

    def close(self, code: int = 1000) -> Deferred[tuple[int | None, str | None]]:
        if self._factory.connection is not None:
            self._factory.connection.sendClose(code)
        return self.closed


async def connect(
    url: str, token: str | None = None, *, headers: dict[str, str] | None = None
) -> Client:
    """
    Connect and wait for the C{welcome} frame.

    @param token: sent as C{Authorization: Bearer}; leave it out when C{url} carries
        C{?token=}.
    @raise Closed: when the server refuses or closes the connection first.
    """
    allHeaders = dict(headers or {})
    if token is not None:
        allHeaders["Authorization"] = f"Bearer {token}"
    factory = ClientFactory(url, allHeaders)
    connectWS(factory)
    welcome = await factory.welcome
    return Client(factory, welcome)


def main() -> None:
    from twisted.internet.task import react

    if len(sys.argv) != 2 or urlsplit(sys.argv[1]).scheme not in ("ws", "wss"):
        sys.exit("usage: python -m marketplace_ws.client ws://host:port/?token=TOKEN")

    async def run(reactor: Any) -> None:
        client = await connect(sys.argv[1])
        print(json.dumps(client.welcome), flush=True)
        client._factory.onFrame = lambda frame: print(json.dumps(frame), flush=True)
        await client.closed

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
