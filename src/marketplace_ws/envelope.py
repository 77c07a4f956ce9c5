"""
The JSON envelope of SPEC §4: what a request frame must look like, and the two reply
shapes.

Parsing happens once, here, at the edge: the rest of the server handles only
well-formed L{Request}s and signals failure by raising L{OpError} with a code from the
one vocabulary clients are written against.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from attrs import frozen

from marketplace_ws.db import DatabaseUnavailable, UnstorableValue

#: Error codes a client may see, with what it should do about each (docs/protocol.rst).
BAD_REQUEST = "bad_request"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
TOO_LARGE = "too_large"
RATE_LIMITED = "rate_limited"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"

ERROR_CODES = frozenset(
    {
        BAD_REQUEST,
        UNAUTHORIZED,
        FORBIDDEN,
        NOT_FOUND,
        CONFLICT,
        TOO_LARGE,
        RATE_LIMITED,
        UNAVAILABLE,
        INTERNAL,
    }
)

#: A request id longer than this is refused: it is echoed back, so it must not become
#: a way to make the server send large frames.
MAX_ID_LENGTH = 64

RequestId = str | int | None


class OpError(Exception):
    """
    A request failed in a way the client should hear about.
    """

    def __init__(self, code: str, message: str, requestId: RequestId = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.requestId = requestId


def explain(error: BaseException) -> OpError | None:
    """
    What a client is told about an exception an op or an API call raised: an
    L{OpError} as it is; a database outage as C{unavailable} (nothing was done, so the
    same request may be retried later); text the database cannot store as
    C{bad_request}; C{None} for anything else, a bug, which the
    caller logs and answers C{internal}.
    """
    if isinstance(error, OpError):
        return error
    if isinstance(error, DatabaseUnavailable):
        return OpError(UNAVAILABLE, "the database is unavailable; retry shortly")
    if isinstance(error, UnstorableValue):
        return OpError(BAD_REQUEST, str(error))
    return None


@frozen
class Request:
    """
    A well-formed request: its id (echoed in the reply), its op and its parameters
    (every other member of the object).
    """

    id: RequestId
    type: str
    params: Mapping[str, Any]


def _requestId(value: Any) -> RequestId:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise OpError(BAD_REQUEST, "id must be a string or an integer")
    if isinstance(value, str) and len(value) > MAX_ID_LENGTH:
        raise OpError(BAD_REQUEST, f"id is longer than {MAX_ID_LENGTH} characters")
    if isinstance(value, int) and not -(2**53) < value < 2**53:
        raise OpError(BAD_REQUEST, "id is not a safe integer")
    return value


def parseRequest(payload: bytes | str) -> Request:
    """
    Parse one text frame.

    @raise OpError: C{bad_request}, carrying the request's id when it could be read.
    """
    try:
        # Decoded here, strictly: json.loads would take bytes for UTF-16 or UTF-32 when
        # they hold NULs (valid UTF-8, so a text frame may), and let surrogates through.
        value = json.loads(payload.decode("utf-8") if isinstance(payload, bytes) else payload)
    except (ValueError, RecursionError):
        raise OpError(BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(value, dict):
        raise OpError(BAD_REQUEST, "frame must be a JSON object")
    requestId = _requestId(value.get("id"))
    kind = value.get("type")
    if not isinstance(kind, str) or not kind:
        raise OpError(BAD_REQUEST, "type must be a non-empty string", requestId)
    params = {k: v for k, v in value.items() if k not in ("id", "type")}
    return Request(id=requestId, type=kind, params=params)


def ok(requestId: RequestId, result: Any) -> dict[str, Any]:
    return {"id": requestId, "type": "ok", "result": result}


def error(requestId: RequestId, code: str, message: str) -> dict[str, Any]:
    return {"id": requestId, "type": "error", "error": {"code": code, "message": message}}


def encode(frame: Mapping[str, Any]) -> bytes:
    """Serialise a frame the one way every frame is sent."""
    try:
        return json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (JSON lets a client send "\ud800" in an id or a field)
        # cannot be UTF-8: escaped, it goes back exactly as the client sent it.
        return json.dumps(frame, separators=(",", ":")).encode("ascii")


def field(
    request: Request,
    name: str,
    kind: type | tuple[type, ...],
    *,
    required: bool = True,
    default: Any = None,
) -> Any:
    """
    One parameter of a request, checked for type; handlers use it so every op reports
    a wrong or missing field the same way.
    """
    if name not in request.params or request.params[name] is None:
        if required:
            raise OpError(BAD_REQUEST, f"{name} is required", request.id)
        return default
    value = request.params[name]
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise OpError(BAD_REQUEST, f"{name} has the wrong type", request.id)
    if not isinstance(value, kind):
        raise OpError(BAD_REQUEST, f"{name} has the wrong type", request.id)
    return value


#: Page sizes of the ops that page (history, conversations, notifications).
DEFAULT_PAGE = 50
MAX_PAGE = 100


def pageLimit(request: Request) -> int:
    """The C{limit} of a paging op: 1 to L{MAX_PAGE}, L{DEFAULT_PAGE} when left out."""
    limit = field(request, "limit", int, required=False, default=DEFAULT_PAGE)
    if not 1 <= limit <= MAX_PAGE:
        raise OpError(BAD_REQUEST, f"limit must be 1 to {MAX_PAGE}", request.id)
    return int(limit)
