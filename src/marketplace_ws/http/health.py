"""
C{GET /health}: liveness for load balancers and container health checks.

It stays cheap and unauthenticated: it answers from memory and touches neither the
database nor Redis, so a slow dependency never makes an orchestrator kill a process
that is still serving its open connections.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.resource import Resource
from twisted.web.server import Request

from marketplace_ws import __version__
from marketplace_ws.http._json import respond


class Health(Resource):
    isLeaf = True

    def __init__(self, clock: Callable[[], float], connections: Callable[[], int]) -> None:
        super().__init__()
        self._clock = clock
        self.started = clock()
        self._connections = connections

    def render_GET(self, request: Request) -> bytes:
        return respond(
            request,
            200,
            {
                "status": "ok",
                "version": __version__,
                "uptime": round(self._clock() - self.started, 3),
                "connections": self._connections(),
            },
        )

    render_HEAD = render_GET
