"""
Bearer secrets on the HTTP side (C{HTTP_API_SECRET} for the API, C{METRICS_TOKEN} for
C{/metrics}): one header, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.web.server import Request


class Bearer:
    """
    Checks C{Authorization: Bearer <secret>}. The secret is kept and compared as a
    digest: C{compare_digest} takes time independent of the contents but not of the
    lengths, and a digest's length tells nothing.
    """

    def __init__(self, secret: str) -> None:
        self._digest = _digest(secret.encode("utf-8"))

    @staticmethod
    def token(request: Request) -> bytes | None:
        """The bearer token sent, or C{None} when there is not exactly one."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        # One header, "Bearer <token>"; two are a confused proxy, not a credential.
        if len(values) != 1:
            return None
        scheme, _, token = values[0].strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return None
        return token

    def matches(self, token: bytes) -> bool:
        return hmac.compare_digest(_digest(token), self._digest)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()
