"""
C{GET /ready}: readiness for load balancers and orchestrators. 200 while this process
can do its whole job; 503 while the database or Redis is unreachable, and from the
moment a shutdown begins, so traffic drains to other processes before the WebSockets
are closed. Unlike C{/health}, a failing C{/ready} must not get the process killed:
it recovers by itself when the dependency comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.web.resource import Resource
from twisted.web.server import Request

from marketplace_ws.http._json import respond

#: A named check: C{None} when fine, else what is wrong (no secrets, no URLs).
Check = Callable[[], str | None]


class Ready(Resource):
    isLeaf = True

    def __init__(self, checks: Mapping[str, Check]) -> None:
        super().__init__()
        self._checks = checks

    def render_GET(self, request: Request) -> bytes:
        problems = {name: problem for name, check in self._checks.items() if (problem := check())}
        if problems:
            return respond(request, 503, {"status": "unavailable", "problems": problems})
        return respond(request, 200, {"status": "ready"})

    render_HEAD = render_GET
