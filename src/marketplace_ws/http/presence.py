"""
C{GET /api/v1/presence} and C{/channels/{channel}/presence}: who is online, as every
process of the deployment sees it (the broker keeps presence, shared through Redis when
there is more than one process).

The Next.js backend asks before it decides how to notify (a push notification or an
e-mail for a user who is offline) and to render "online" badges server-side.
"""

from __future__ import annotations

from typing import Any

from marketplace_ws.channels import parseChannel
from marketplace_ws.http._routes import Call, Parameter, Route
from marketplace_ws.http._schema import CHANNEL, ID

#: Users in one presence question: a page of conversations or search results.
MAX_USERS = 500


async def online(call: Call) -> dict[str, Any]:
    # Repeated ids are asked about once; the answer keeps the order they were given in.
    userIds = list(dict.fromkeys(call.params["userIds"]))
    answer = await call.backend.online(userIds)
    return {"online": {userId: bool(answer.get(userId, False)) for userId in userIds}}


async def members(call: Call) -> dict[str, Any]:
    channel = parseChannel(call.params["channel"])
    return {"channel": str(channel), "userIds": list(await call.backend.members(channel))}


ROUTES = (
    Route(
        method="GET",
        path="/presence",
        operationId="presence",
        summary="Which of these users are online",
        description="A user is online while any of their WebSocket connections is open, on any"
        " process.",
        tag="presence",
        handler=online,
        query=(
            Parameter(
                name="userIds",
                schema={
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_USERS,
                    "items": {"type": "string", "pattern": ID},
                },
                description=f"1 to {MAX_USERS} user ids, comma-separated (the parameter may"
                " also be repeated: ?userIds=a&userIds=b).",
                example=["buyer-7", "seller-42"],
            ),
        ),
        response={
            "type": "object",
            "required": ["online"],
            "properties": {
                "online": {
                    "type": "object",
                    "description": "Every user asked about, true when online.",
                    "additionalProperties": {"type": "boolean"},
                }
            },
        },
        responseExample={"online": {"buyer-7": True, "seller-42": False}},
    ),
    Route(
        method="GET",
        path="/channels/{channel}/presence",
        operationId="channelPresence",
        summary="Who is subscribed to a channel now",
        description="The users with at least one connection subscribed to the channel, on any"
        " process, sorted. Percent-encode what a path segment cannot hold (| as %7C).",
        tag="presence",
        handler=members,
        pathParams=(
            Parameter(
                name="channel",
                schema={"type": "string", "format": "channel", "pattern": CHANNEL},
                description="user:<id>, conversation:<id> or listing:<id>.",
                example="conversation:cv_81",
            ),
        ),
        response={
            "type": "object",
            "required": ["channel", "userIds"],
            "properties": {
                "channel": {"type": "string"},
                "userIds": {"type": "array", "items": {"type": "string"}},
            },
        },
        responseExample={"channel": "conversation:cv_81", "userIds": ["buyer-7", "seller-42"]},
    ),
)
