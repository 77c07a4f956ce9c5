"""
Chat (SPEC §4, §5): the C{message.send}, C{message.read}, C{history} and
C{conversations} ops, and the HTTP API's conversations and system messages.

A message is stored first and published second: once C{message.send} answers C{ok}
the message is durable, and C{message.created} has been handed to the broker for
C{conversation:<id>}. Every publish carries an idempotency key made of the message id,
so a client that retries after a lost reply (same C{clientMsgId}) gets the stored
message back and its subscribers do not get it twice, while a publish that failed the
first time is made good by the retry.

Participants who are not subscribed to the conversation anywhere (no tab has it open)
get a short C{message.alert} on their C{user:<id>} channel instead, for a badge or a
toast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from marketplace_ws import envelope
from marketplace_ws.channels import Authoriser, Channel
from marketplace_ws.conversations import Conversations, Message, Sent, databaseKey
from marketplace_ws.envelope import BAD_REQUEST, OpError, Request
from marketplace_ws.live import Live

if TYPE_CHECKING:
    from marketplace_ws.protocol import ClientProtocol, Handler

#: Characters of a message body shown in a C{message.alert}.
PREVIEW_LENGTH = 140
MAX_CLIENT_MSG_ID = 128


class Chat:
    """
    @ivar maxBody: the longest message body, in characters.
    """

    def __init__(
        self,
        conversations: Conversations,
        live: Live,
        authoriser: Authoriser,
        maxBody: int = 4000,
    ) -> None:
        self.conversations = conversations
        self.live = live
        self.authoriser = authoriser
        self.maxBody = maxBody

    @property
    def ops(self) -> dict[str, Handler]:
        return {
            "message.send": self._send,
            "message.read": self._read,
            "history": self._history,
            "conversations": self._list,
        }

    # The HTTP API's part

    async def findOrCreate(
        self, listingId: str | None, participants: list[tuple[str, str]]
    ) -> dict[str, Any]:
        if len({userId for userId, _ in participants}) != len(participants):
            raise OpError(BAD_REQUEST, "participants must be different users")
        key, created = await self.conversations.findOrCreate(listingId, participants)
        if created:
            self.authoriser.forget(str(key))
        return {
            "id": key,
            "created": created,
            "listingId": listingId,
            "participants": [{"userId": u, "role": r} for u, r in participants],
        }

    async def systemMessage(self, conversationId: str, body: str) -> dict[str, Any]:
        """A message from the marketplace itself ("offer accepted"), to everyone."""
        key = databaseKey(conversationId)
        self._checkBody(body)
        sent = await self.conversations.send(key, None, body, None)
        await self._deliver(sent)
        return {"message": sent.message.asJSON()}

    # Ops

    async def _send(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        key = _conversationKey(request)
        body = envelope.field(request, "body", str)
        clientMsgId = envelope.field(request, "clientMsgId", str)
        if not 0 < len(clientMsgId) <= MAX_CLIENT_MSG_ID:
            raise OpError(BAD_REQUEST, f"clientMsgId must be 1 to {MAX_CLIENT_MSG_ID} characters")
        self._checkBody(body)
        sent = await self.conversations.send(key, connection.userId, body, clientMsgId)
        await self._deliver(sent)
        return {"message": sent.message.asJSON(), "duplicate": sent.duplicate}

    async def _read(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        key = _conversationKey(request)
        messageId = databaseKey(envelope.field(request, "messageId", (int, str)), "message")
        userId = connection.userId
        position, moved = await self.conversations.markRead(key, userId, messageId)
        if moved:
            await self.live.publish(
                Channel("conversation", str(key)),
                "message.read",
                {"conversationId": key, "userId": userId, "messageId": position},
            )
        return {"conversationId": key, "lastReadMessageId": position, "moved": moved}

    async def _history(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        key = _conversationKey(request)
        before = request.params.get("before")
        if before is not None:
            before = databaseKey(before, "message")
        limit = envelope.pageLimit(request)
        messages = await self.conversations.history(key, connection.userId, before, limit)
        return {
            "messages": [m.asJSON() for m in messages],
            # Pass as before for the next (older) page; null when this was the last.
            "before": messages[-1].id if len(messages) == limit else None,
        }

    async def _list(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        limit = envelope.pageLimit(request)
        cursor = request.params.get("before")
        before = None
        if cursor is not None:
            before = _parseCursor(cursor)
        rows = await self.conversations.inbox(connection.userId, limit, before)
        items = []
        for row in rows:
            (key, listingId, createdAt, lastId, sender, kind, body, clientMsgId, sentAt,
             lastRead, unread, participants) = row  # fmt: skip
            last = None
            if lastId is not None:
                last = Message(
                    lastId, key, sender, kind, body, clientMsgId, int(sentAt.timestamp() * 1000)
                ).asJSON()
            items.append(
                {
                    "id": key,
                    "listingId": listingId,
                    "createdAt": int(createdAt.timestamp() * 1000),
                    "participants": participants,
                    "lastMessage": last,
                    "lastReadMessageId": lastRead,
                    "unreadCount": unread,
                }
            )
        nextCursor = None
        if len(rows) == limit:
            tail = rows[-1]
            nextCursor = f"{tail[3] or 0}.{tail[0]}"
        return {"conversations": items, "before": nextCursor}

    # Delivery

    async def _deliver(self, sent: Sent) -> None:
        """
        Publish C{message.created}, and alert the participants with no tab on the
        conversation. Idempotency keys made of the message id make a retry harmless.
        """
        message = sent.message
        channel = Channel("conversation", str(message.conversationId))
        await self.live.publish(
            channel, "message.created", message.asJSON(), f"message:{message.id}"
        )
        present = set(await self.live.members(channel))
        alert = {
            "conversationId": message.conversationId,
            "messageId": message.id,
            "senderId": message.senderId,
            "preview": message.body[:PREVIEW_LENGTH],
        }
        for userId in sent.participants:
            if userId != message.senderId and userId not in present:
                await self.live.publish(
                    Channel("user", userId), "message.alert", alert, f"alert:{message.id}"
                )

    def _checkBody(self, body: str) -> None:
        if not body.strip():
            raise OpError(BAD_REQUEST, "body must not be empty")
        if len(body) > self.maxBody:
            raise OpError(
                envelope.TOO_LARGE, f"body is {len(body)} characters; at most {self.maxBody}"
            )


def _conversationKey(request: Request) -> int:
    return databaseKey(envelope.field(request, "conversationId", (int, str)))


def _parseCursor(cursor: Any) -> tuple[int, int]:
    if isinstance(cursor, str):
        head, dot, tail = cursor.partition(".")
        if dot and head.isdigit() and tail.isdigit() and len(cursor) <= 40:
            return int(head), int(tail)
    raise OpError(BAD_REQUEST, "before must be the cursor a previous page answered")
