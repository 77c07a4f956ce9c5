"""
The HTTP side: health checks for load balancers and orchestrators, metrics for
Prometheus, and (under C{/api/v1}) the API the Next.js backend calls. One resource per
area; L{site} assembles the tree.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from marketplace_ws.http.body import limitedRequestFactory


class _Site(Site):
    """
    A site that does not name itself: twisted.web's C{Server: TwistedWeb/<version>}
    header tells an attacker which release to look up.
    """

    def getResourceFor(self, request: Request) -> Resource:
        request.responseHeaders.removeHeader(b"server")
        return super().getResourceFor(request)


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
