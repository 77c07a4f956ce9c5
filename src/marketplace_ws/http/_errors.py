"""
Errors of the HTTP API: the WebSocket protocol's one vocabulary of codes (SPEC §4),
each with its HTTP status, so a Next.js caller handles an C{unavailable} from either
side the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from marketplace_ws.envelope import (
    BAD_REQUEST,
    CONFLICT,
    FORBIDDEN,
    INTERNAL,
    NOT_FOUND,
    RATE_LIMITED,
    TOO_LARGE,
    UNAUTHORIZED,
    UNAVAILABLE,
)

#: The status each code is answered with. Two statuses say more than their code:
#: 405 (wrong method) and 415 (not JSON) carry C{bad_request}.
STATUS: Mapping[str, int] = {
    BAD_REQUEST: 400,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    CONFLICT: 409,
    TOO_LARGE: 413,
    RATE_LIMITED: 429,
    INTERNAL: 500,
    UNAVAILABLE: 503,
}


class ApiError(Exception):
    """
    A refusal the caller should hear about, with a status other than its code's when
    HTTP has a more precise one, and headers the status calls for (C{Allow},
    C{WWW-Authenticate}).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = STATUS[code] if status is None else status
        self.headers: Mapping[bytes, bytes] = headers or {}


def errorBody(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def tooLargeMessage(maxBody: int) -> str:
    return f"the body is larger than {maxBody} bytes (HTTP_MAX_BODY)"
