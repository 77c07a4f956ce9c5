"""
The HTTP side: health checks for load balancers, and (under C{/api/v1}) the API the
Next.js backend calls. One resource per area; L{site} assembles the tree.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Site

from marketplace_ws.http.health import Health


def site(health: Health) -> Site:
    root = Resource()
    root.putChild(b"health", health)
    result = Site(root)
    # A traceback in a response tells an attacker more than it tells the caller.
    result.displayTracebacks = False
    return result
