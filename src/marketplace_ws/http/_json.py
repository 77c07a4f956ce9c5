"""
JSON responses, written the same way by every resource.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


def respond(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
