"""
C{POST /api/v1/conversations} and C{POST /api/v1/conversations/{id}/messages}: the
Next.js backend opens the conversation between a buyer and a seller about a listing
(when the buyer presses "contact seller"), and posts system messages in it ("offer
accepted", "order paid").

Opening is find-or-create: the same listing and the same set of users always answer
the same conversation, so the backend need not remember ids, and two clicks at once
make one conversation.
"""

from __future__ import annotations

from typing import Any

from marketplace_ws.http._routes import Call, Parameter, Route
from marketplace_ws.http._schema import ID

#: Users in one conversation: a buyer, a seller, and room for support staff.
MAX_PARTICIPANTS = 10

_message: dict[str, Any] = {
    "type": "object",
    "required": ["id", "conversationId", "kind", "body", "createdAt"],
    "properties": {
        "id": {"type": "integer"},
        "conversationId": {"type": "integer"},
        "senderId": {"type": ["string", "null"], "description": "null for system messages."},
        "kind": {"type": "string", "enum": ["user", "system"]},
        "body": {"type": "string"},
        "clientMsgId": {"type": ["string", "null"]},
        "createdAt": {"type": "integer", "description": "Milliseconds since the epoch."},
    },
}


async def findOrCreate(call: Call) -> dict[str, Any]:
    body = call.body
    participants = [(p["userId"], p["role"]) for p in body["participants"]]
    return await call.backend.findOrCreateConversation(body.get("listingId"), participants)


async def systemMessage(call: Call) -> dict[str, Any]:
    return await call.backend.systemMessage(call.params["id"], call.body["body"])


ROUTES = (
    Route(
        method="POST",
        path="/conversations",
        operationId="findOrCreateConversation",
        summary="Find or create the conversation about a listing between these users",
        description="The same listingId and the same set of userIds always answer the same"
        " conversation (created: false after the first call). Participants may subscribe to"
        " conversation:<id> and send messages in it.",
        tag="conversations",
        handler=findOrCreate,
        body={
            "type": "object",
            "required": ["participants"],
            "additionalProperties": False,
            "properties": {
                "listingId": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
                "participants": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": MAX_PARTICIPANTS,
                    "items": {
                        "type": "object",
                        "required": ["userId", "role"],
                        "additionalProperties": False,
                        "properties": {
                            "userId": {"type": "string", "pattern": ID},
                            "role": {
                                "type": "string",
                                "pattern": "^[a-z_]{1,32}$",
                                "description": "buyer, seller, support…",
                            },
                        },
                    },
                },
            },
        },
        bodyExample={
            "listingId": "lst_17",
            "participants": [
                {"userId": "buyer-7", "role": "buyer"},
                {"userId": "seller-42", "role": "seller"},
            ],
        },
        response={
            "type": "object",
            "required": ["id", "created", "participants"],
            "properties": {
                "id": {"type": "integer"},
                "created": {"type": "boolean"},
                "listingId": {"type": ["string", "null"]},
                "participants": {"type": "array"},
            },
        },
        responseExample={
            "id": 12,
            "created": True,
            "listingId": "lst_17",
            "participants": [
                {"userId": "buyer-7", "role": "buyer"},
                {"userId": "seller-42", "role": "seller"},
            ],
        },
        errors=("unavailable",),
    ),
    Route(
        method="POST",
        path="/conversations/{id}/messages",
        operationId="postSystemMessage",
        summary="Post a system message in a conversation",
        description="Stored with kind system and no sender, pushed as message.created on"
        " conversation:<id>, and as message.alert to participants with no tab on it.",
        tag="conversations",
        handler=systemMessage,
        pathParams=(
            Parameter(
                name="id",
                schema={"type": "string", "pattern": "^[0-9]{1,19}$"},
                description="The conversation's id.",
                example="12",
            ),
        ),
        body={
            "type": "object",
            "required": ["body"],
            "additionalProperties": False,
            "properties": {"body": {"type": "string", "minLength": 1, "maxLength": 65536}},
        },
        bodyExample={"body": "Offer of 125.00 EUR accepted"},
        response={"type": "object", "required": ["message"], "properties": {"message": _message}},
        responseExample={
            "message": {
                "id": 981,
                "conversationId": 12,
                "senderId": None,
                "kind": "system",
                "body": "Offer of 125.00 EUR accepted",
                "clientMsgId": None,
                "createdAt": 1795643400123,
            }
        },
        errors=("not_found", "too_large", "unavailable"),
    ),
)
