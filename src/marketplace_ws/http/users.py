"""
C{POST /api/v1/users/{id}/disconnect}: the Next.js backend ends a user's live sessions
when it logs them out everywhere, bans them or revokes their tokens.

Every WebSocket of the user, on every process, is closed with code 4003, which clients
treat as "do not reconnect with this token". The reason travels in the close frame,
whose reason may hold 123 bytes: it is limited to printable ASCII so that it always
fits.
"""

from __future__ import annotations

from typing import Any

from marketplace_ws.http._routes import Call, Parameter, Route
from marketplace_ws.http._schema import ID

DEFAULT_REASON = "disconnected by the server"


async def disconnect(call: Call) -> dict[str, Any]:
    reason = call.body.get("reason") or DEFAULT_REASON
    return {"closed": await call.backend.disconnect(call.params["id"], reason)}


ROUTES = (
    Route(
        method="POST",
        path="/users/{id}/disconnect",
        operationId="disconnectUser",
        summary="Close every WebSocket of a user (close code 4003)",
        description="The body may be left out. closed counts the connections closed on every"
        " process.",
        tag="users",
        handler=disconnect,
        pathParams=(
            Parameter(
                name="id",
                schema={"type": "string", "pattern": ID},
                description="The user's id (the JWT's sub). Percent-encode | as %7C.",
                example="buyer-7",
            ),
        ),
        body={
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "reason": {
                    "type": ["string", "null"],
                    "pattern": "^[ -~]{1,120}$",
                    "description": "Sent to the client in the close frame: 1 to 120 printable"
                    f" ASCII characters. Default: {DEFAULT_REASON!r}.",
                }
            },
        },
        bodyExample={"reason": "account suspended"},
        response={
            "type": "object",
            "required": ["closed"],
            "properties": {"closed": {"type": "integer", "minimum": 0}},
        },
        responseExample={"closed": 2},
        errors=("unavailable",),
    ),
)
