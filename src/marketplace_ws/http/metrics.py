"""
C{GET /metrics}: Prometheus text (L{marketplace_ws.metrics}), optionally behind a bearer
token (C{METRICS_TOKEN}) when the port is reachable from where it should not be.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST
from twisted.web.resource import Resource
from twisted.web.server import Request

from marketplace_ws.envelope import UNAUTHORIZED
from marketplace_ws.http._bearer import Bearer
from marketplace_ws.http._errors import errorBody
from marketplace_ws.http._json import respond


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], bytes], token: str | None) -> None:
        super().__init__()
        self._render = render
        self._bearer = None if token is None else Bearer(token)

    def render_GET(self, request: Request) -> bytes:
        if self._bearer is not None:
            token = Bearer.token(request)
            if token is None or not self._bearer.matches(token):
                request.setHeader(b"www-authenticate", b'Bearer realm="metrics"')
                return respond(
                    request,
                    401,
                    errorBody(UNAUTHORIZED, "send Authorization: Bearer <METRICS_TOKEN>"),
                )
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return self._render()
