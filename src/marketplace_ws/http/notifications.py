"""
C{POST /api/v1/notifications}: the Next.js backend tells users what happened. One row
per user is stored (the notification centre pages them with the C{notifications} op)
and each new one is pushed as C{notification.created} on C{user:<id>}.

With an C{idempotencyKey} (unique per user) a retried call stores and pushes nothing
again and answers the first call's ids with C{duplicate: true}.
"""

from __future__ import annotations

from typing import Any

from marketplace_ws.http._routes import Call, Route
from marketplace_ws.http._schema import ID

#: Users one call may notify.
MAX_USERS = 1000


async def notify(call: Call) -> dict[str, Any]:
    body = call.body
    created = await call.backend.notify(
        body["userIds"],
        body["type"],
        body["title"],
        body.get("body"),
        body.get("data"),
        body.get("idempotencyKey"),
    )
    return {"notifications": created}


ROUTES = (
    Route(
        method="POST",
        path="/notifications",
        operationId="notify",
        summary="Store and push a notification to users",
        description="Each user gets a notification.created event on user:<id> with the stored"
        " notification (id, type, title, body, data, createdAt).",
        tag="notifications",
        handler=notify,
        body={
            "type": "object",
            "required": ["userIds", "type", "title"],
            "additionalProperties": False,
            "properties": {
                "userIds": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_USERS,
                    "items": {"type": "string", "pattern": ID},
                },
                "type": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,100}$"},
                "title": {"type": "string", "minLength": 1, "maxLength": 1000},
                "body": {"type": ["string", "null"], "maxLength": 10000},
                "data": {"description": "Any JSON value, stored and pushed as it is."},
                "idempotencyKey": {"type": ["string", "null"], "minLength": 1, "maxLength": 255},
            },
        },
        bodyExample={
            "userIds": ["seller-42"],
            "type": "offer.received",
            "title": "New offer on your bike",
            "body": "125.00 EUR from buyer-7",
            "data": {"offerId": "of_9f2", "listingId": "lst_17"},
            "idempotencyKey": "offer:of_9f2",
        },
        response={
            "type": "object",
            "required": ["notifications"],
            "properties": {
                "notifications": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["userId", "id", "duplicate"],
                        "properties": {
                            "userId": {"type": "string"},
                            "id": {"type": "integer"},
                            "duplicate": {"type": "boolean"},
                        },
                    },
                }
            },
        },
        responseExample={
            "notifications": [{"userId": "seller-42", "id": 5120, "duplicate": False}]
        },
        errors=("unavailable",),
    ),
)
