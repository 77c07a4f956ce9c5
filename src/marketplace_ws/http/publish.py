"""
C{POST /api/v1/publish} and C{/publish/batch}: the Next.js backend pushes an event to
a channel's subscribers (offer received, order paid, listing sold).

Both go through the hub like every other event, so an HTTP publish gets the channel's
next C{seq}, is kept in its history for reconnecting clients, and reaches every process
through the broker. An C{idempotencyKey} makes a retried request safe: within the
broker's window, the same key on the same channel answers the first publish's C{seq}
with C{duplicate: true} and publishes nothing.

A batch is validated whole before anything is published, so a typo in its last event
does not leave the first ones published; it is then published in order, one event at
a time, so events of one channel get increasing C{seq}s in the batch's order.
"""

from __future__ import annotations

from typing import Any

from marketplace_ws.broker import Published
from marketplace_ws.channels import parseChannel
from marketplace_ws.envelope import OpError
from marketplace_ws.http._routes import Call, Route
from marketplace_ws.http._schema import CHANNEL
from marketplace_ws.live import EVENT_NAME

#: Events in one batch: enough for a fan-out to a conversation's participants and a
#: listing's watchers, small enough that one request cannot hold the hub for long.
MAX_BATCH = 100

EVENT = f"^{EVENT_NAME.pattern}$"

_event: dict[str, Any] = {
    "type": "object",
    "required": ["channel", "event", "data"],
    "additionalProperties": False,
    "properties": {
        "channel": {
            "type": "string",
            "format": "channel",
            "pattern": CHANNEL,
            "description": "user:<id>, conversation:<id> or listing:<id>.",
        },
        "event": {
            "type": "string",
            "pattern": EVENT,
            "description": "The event's name, e.g. offer.received: 1 to 64 characters of"
            " A-Z a-z 0-9 _ . : -",
        },
        "data": {"description": "Any JSON value; subscribers receive it as it is."},
        "idempotencyKey": {
            "type": ["string", "null"],
            "minLength": 1,
            "maxLength": 128,
            "description": "Makes a retry safe: the same key on the same channel within the"
            " idempotency window publishes once and answers the first seq.",
        },
    },
}

_published: dict[str, Any] = {
    "type": "object",
    "required": ["channel", "seq", "duplicate"],
    "properties": {
        "channel": {"type": "string"},
        "seq": {
            "type": "integer",
            "minimum": 1,
            "description": "The event's place in its channel.",
        },
        "duplicate": {
            "type": "boolean",
            "description": "The idempotency key was seen: nothing was published again and"
            " seq is the first publish's.",
        },
    },
}

_exampleEvent = {
    "channel": "user:seller-42",
    "event": "offer.received",
    "data": {"offerId": "of_9f2", "listingId": "lst_17", "amount": 12500, "currency": "EUR"},
    "idempotencyKey": "offer:of_9f2:received",
}


def _answer(published: Published) -> dict[str, Any]:
    return {"channel": published.channel, "seq": published.seq, "duplicate": published.duplicate}


async def publish(call: Call) -> dict[str, Any]:
    body = call.body
    published = await call.backend.publish(
        parseChannel(body["channel"]), body["event"], body["data"], body.get("idempotencyKey")
    )
    return _answer(published)


async def publishBatch(call: Call) -> dict[str, Any]:
    events = call.body["events"]
    # Parsed before anything is published: all or nothing, as far as validation goes.
    channels = [parseChannel(event["channel"]) for event in events]
    results: list[dict[str, Any]] = []
    for index, (channel, event) in enumerate(zip(channels, events, strict=True)):
        try:
            published = await call.backend.publish(
                channel, event["event"], event["data"], event.get("idempotencyKey")
            )
        except OpError as e:
            raise OpError(e.code, _partial(index, e.message)) from None
        results.append(_answer(published))
    return {"results": results}


def _partial(index: int, message: str) -> str:
    if index == 0:
        return f"events[0]: {message}; nothing was published"
    return (
        f"events[{index}]: {message}; events[0] to events[{index - 1}] were published"
        " (retry the batch with idempotency keys to publish each event once)"
    )


ROUTES = (
    Route(
        method="POST",
        path="/publish",
        operationId="publish",
        summary="Publish one event to a channel",
        description="The event gets the channel's next seq, is kept in the channel's recent"
        " history and is pushed to every subscriber as"
        ' {"type":"event","channel","event","seq","data"}.',
        tag="publish",
        handler=publish,
        body=_event,
        bodyExample=_exampleEvent,
        response=_published,
        responseExample={"channel": "user:seller-42", "seq": 17, "duplicate": False},
        errors=("unavailable",),
    ),
    Route(
        method="POST",
        path="/publish/batch",
        operationId="publishBatch",
        summary=f"Publish up to {MAX_BATCH} events at once",
        description="Every event is validated before any is published; they are then"
        " published in order. Results are in the order of the events. Should publishing"
        " fail part-way, the error says which events were published: retry the whole"
        " batch with idempotency keys.",
        tag="publish",
        handler=publishBatch,
        body={
            "type": "object",
            "required": ["events"],
            "additionalProperties": False,
            "properties": {
                "events": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": _event}
            },
        },
        bodyExample={
            "events": [
                _exampleEvent,
                {
                    "channel": "listing:lst_17",
                    "event": "listing.price_changed",
                    "data": {"price": 11900, "currency": "EUR"},
                },
            ]
        },
        response={
            "type": "object",
            "required": ["results"],
            "properties": {"results": {"type": "array", "items": _published}},
        },
        responseExample={
            "results": [
                {"channel": "user:seller-42", "seq": 18, "duplicate": False},
                {"channel": "listing:lst_17", "seq": 4, "duplicate": False},
            ]
        },
        errors=("unavailable",),
    ),
)
