"""
The request body limit, enforced while the body arrives.

twisted.web reads a request's whole body (into memory, or a temporary file past
100 kB) before any resource sees it, and has no limit of its own: a resource that
checks the size afterwards has already paid for it. L{BodyLimitedRequest}, the site's
request factory (L{limitedRequestFactory}), refuses a body once it is known to be too
large: at once for a C{Content-Length} over the limit (without sending C{100
Continue}, so a client that asked first never sends the body), and as soon as a
chunked body passes it. From then on nothing more is kept.

The C{413} is written straight away, with C{Connection: close}. The connection is not
closed at once: a peer still sending its body would get a TCP reset, which can destroy
the answer before it reads it. The rest of the body is read and dropped until it ends
(then the connection closes) or for at most C{linger} seconds (then it is aborted).

Only HTTP/1.1 channels are answered early. Over HTTP/2 the body is still dropped past
the limit, and the API resource answers the 413 once the request is complete.

Form parsing is off for the whole site: no endpoint takes forms, and twisted.web would
parse a multipart body before any resource could refuse it.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, ClassVar, cast

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request

from marketplace_ws.envelope import TOO_LARGE
from marketplace_ws.http._cors import Cors
from marketplace_ws.http._errors import errorBody, tooLargeMessage

_log = Logger()

#: Seconds a refused request's connection may go on sending before it is aborted.
LINGER = 5.0


class BodyLimitedRequest(Request):
    """
    A request that keeps at most C{maxBody} bytes of body.

    @ivar bodyTooLarge: the body was over the limit and has been dropped (the API
        resource answers 413 for such a request if it ever sees one).
    """

    bodyTooLarge = False
    #: Set by L{limitedRequestFactory}; the default is HTTP_MAX_BODY's.
    maxBody: ClassVar[int] = 1_048_576
    cors: ClassVar[Cors] = Cors(())
    linger: ClassVar[float] = LINGER

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(channel, *args, **kwargs)
        self._received = 0
        #: The 413 has been written: the request is never processed.
        self._answered = False
        self._lingering: IDelayedCall | None = None

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.maxBody:
            # Removed before the channel looks for it: no "100 Continue".
            self.requestHeaders.removeHeader(b"expect")
            self._refuse()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.bodyTooLarge:
            return
        self._received += len(data)
        if self._received > self.maxBody:
            self._refuse()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._answered:
            # The whole body has been read and dropped: the client has the 413 and no
            # reset can take it away now.
            self._stopLingering()
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        self._stopLingering()
        super().connectionLost(reason)

    def _refuse(self) -> None:
        self.bodyTooLarge = True
        kept = self.content
        # twisted.web declares content as None: it is whatever gotLength made of it.
        self.content = BytesIO()  # type: ignore[assignment]
        if kept is not None:
            kept.close()
        channel = self.channel
        if not isinstance(channel, HTTPChannel) or channel.transport is None:
            return
        self._answered = True
        _log.info(
            "refused a request body over {maxBody} bytes (HTTP_MAX_BODY)", maxBody=self.maxBody
        )
        channel.transport.write(self._tooLarge())
        self._lingering = channel.callLater(self.linger, self._abort)

    def _tooLarge(self) -> bytes:
        body = json.dumps(
            errorBody(TOO_LARGE, tooLargeMessage(self.maxBody)), separators=(",", ":")
        ).encode("utf-8")
        headers = {
            b"Content-Type": b"application/json; charset=utf-8",
            b"Content-Length": b"%d" % len(body),
            b"Cache-Control": b"no-store",
            b"Connection": b"close",
            **self.cors.headers(self),
        }
        head = b"".join(_title(name) + b": " + value + b"\r\n" for name, value in headers.items())
        return b"HTTP/1.1 413 " + RESPONSES[413] + b"\r\n" + head + b"\r\n" + body

    def _abort(self) -> None:
        self._lingering = None
        transport = None if self.channel is None else self.channel.transport
        if transport is not None:
            getattr(transport, "abortConnection", transport.loseConnection)()

    def _stopLingering(self) -> None:
        if self._lingering is not None:
            if self._lingering.active():
                self._lingering.cancel()
            self._lingering = None


def _title(name: bytes) -> bytes:
    return b"-".join(word.capitalize() for word in name.split(b"-"))


def limitedRequestFactory(
    maxBody: int, corsOrigins: tuple[str, ...] = (), linger: float = LINGER
) -> type[BodyLimitedRequest]:
    """
    The request factory for the HTTP site (C{Site(root, requestFactory=...)}, or
    C{site.requestFactory = ...}), with the same C{maxBody} and C{corsOrigins} as
    L{marketplace_ws.http.api.apiResource}: the early 413 carries the CORS headers an
    allowed browser origin needs to read it.
    """
    settings = {"maxBody": maxBody, "cors": Cors(corsOrigins), "linger": linger}
    return cast(
        type[BodyLimitedRequest], type("BodyLimitedRequest", (BodyLimitedRequest,), settings)
    )
