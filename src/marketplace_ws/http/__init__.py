"""
The HTTP side: health checks for load balancers and orchestrators, metrics for
Prometheus, and (under C{/api/v1}) the API the Next.js backend calls. One resource per
area; L{site} assembles the tree.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from marketplace_ws.http.body import limitedRequestFactory

_log = Logger()


class _Site(Site):
    """
    A site that does not name itself (twisted.web's C{Server: TwistedWeb/<version>}
    header tells an attacker which release to look up), and logs one structured access
    line per request through twisted.logger, where the redactor and the JSON or text
    format apply, instead of Apache's combined format.
    """

    def getResourceFor(self, request: Request) -> Resource:
        request.responseHeaders.removeHeader(b"server")
        request.started = self.reactor.seconds()  # type: ignore[attr-defined]
        return super().getResourceFor(request)

    def log(self, request: http.Request) -> None:
        started = getattr(request, "started", None)
        _log.info(
            "{method} {path} {status} {size} bytes {millis} ms {peer}",
            method=request.method.decode("ascii", "replace"),
            # Query strings may carry tokens: the redactor scrubs them, and the path is
            # the client's input, so it is cut short.
            path=request.uri.decode("utf-8", "replace")[:200],
            status=request.code,
            size=request.sentLength,
            millis=None if started is None else round((self.reactor.seconds() - started) * 1000, 1),
            peer=getattr(request.getClientAddress(), "host", "-"),
            access=True,
        )


def site(
    children: Mapping[bytes, Resource], maxBody: int, corsOrigins: tuple[str, ...] = ()
) -> Site:
    """
    The HTTP site: C{children} at the root (C{health}, C{api}, …), every request body
    limited to C{maxBody} bytes while it arrives.
    """
    root = Resource()
    for name, child in children.items():
        root.putChild(name, child)
    result = _Site(root, requestFactory=limitedRequestFactory(maxBody, corsOrigins))
    # A traceback in a response tells an attacker more than it tells the caller.
    result.displayTracebacks = False
    return result
