"""
CORS for the HTTP API: browsers on the configured origins (an admin dashboard, say)
may call it; every other origin gets no CORS header at all, so the browser keeps the
answer from the page.

The API is called with a bearer secret, never with cookies: credentials are not
allowed, and a wildcard is never answered.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from marketplace_ws.protocol import normaliseOrigin

#: What a preflight allows besides the methods: the two headers API calls carry.
ALLOW_HEADERS = b"authorization, content-type"

#: How long a browser may cache a preflight answer (seconds).
MAX_AGE = b"600"


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        normalised = (normaliseOrigin(origin) for origin in origins)
        # An entry without a host ("null", a typo) would match nothing a browser sends
        # as an origin; better to match nothing than an opaque origin.
        self._origins = frozenset(o for o in normalised if not o.endswith("://"))

    @property
    def enabled(self) -> bool:
        return bool(self._origins)

    def allowedOrigin(self, request: IRequest) -> bytes | None:
        """
        The request's C{Origin} as it was sent, when it is allowed; the browser
        compares C{Access-Control-Allow-Origin} with its own serialisation byte for
        byte, so the answer echoes it rather than the normalised form.
        """
        values = request.requestHeaders.getRawHeaders(b"origin")
        if not self._origins or not values or len(values) != 1:
            return None
        try:
            origin = values[0].decode("ascii")
        except UnicodeDecodeError:
            return None
        if origin.strip().lower() == "null":
            return None
        return values[0] if normaliseOrigin(origin) in self._origins else None

    def headers(self, request: IRequest) -> dict[bytes, bytes]:
        """The CORS headers of an actual (not preflight) response."""
        if not self._origins:
            return {}
        # The answer depends on Origin even when it refuses it: a cache must not hand
        # one origin's answer to another.
        headers = {b"vary": b"Origin"}
        origin = self.allowedOrigin(request)
        if origin is not None:
            headers[b"access-control-allow-origin"] = origin
        return headers

    def preflight(self, request: IRequest, methods: bytes) -> dict[bytes, bytes]:
        """The headers of an answer to a preflight C{OPTIONS}."""
        headers = self.headers(request)
        if b"access-control-allow-origin" in headers:
            headers[b"access-control-allow-methods"] = methods
            headers[b"access-control-allow-headers"] = ALLOW_HEADERS
            headers[b"access-control-max-age"] = MAX_AGE
        return headers
