"""
What the database holds about conversations: who takes part, their messages, and how
far each participant has read.

Every function here is one indexed query or one short transaction, named for metrics.
Conversation ids are the database's: positive integers, written as digits in channel
names (C{conversation:42}); anything else names no conversation. Messages are paged by
id, newest first: an id cursor is stable while messages are added, where an offset
would skip or repeat some.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail

from marketplace_ws.db import Cursor, Database
from marketplace_ws.envelope import CONFLICT, FORBIDDEN, NOT_FOUND, OpError

#: The largest bigint: a longer id cannot be a conversation's or a message's.
_MAX_ID = 2**63 - 1

#: Unread messages are counted up to this many (a badge shows "99+").
UNREAD_CAP = 100


def databaseKey(text: str | int, what: str = "conversation") -> int:
    """
    The database key a request names.

    @raise OpError: C{not_found} when it cannot be one.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if isinstance(text, str) and text.isascii() and text.isdigit():
        key = int(text)
        if 0 < key <= _MAX_ID:
            return key
    raise OpError(NOT_FOUND, f"{what} {text} does not exist")


def noConversations(conversationId: str, userId: str) -> Deferred[bool]:
    """
    The participant check without a database (conformance mode, protocol tests): no
    conversation exists.
    """
    return fail(OpError(NOT_FOUND, f"conversation {conversationId} does not exist"))


def _millis(when: datetime) -> int:
    return int(when.timestamp() * 1000)


@frozen
class Message:
    """A stored message, as events and replies carry it."""

    id: int
    conversationId: int
    senderId: str | None
    kind: str
    body: str
    clientMsgId: str | None
    createdAt: int

    def asJSON(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "conversationId": self.conversationId,
            "senderId": self.senderId,
            "kind": self.kind,
            "body": self.body,
            "clientMsgId": self.clientMsgId,
            "createdAt": self.createdAt,
        }


_MESSAGE_COLUMNS = "id, conversation_id, sender_id, kind, body, client_msg_id, created_at"


#: message.send in one statement (see Conversations.send). The sender must be a
#: participant (a system message, with no sender, needs only the conversation); the
#: data-modifying parts run only when the insert happened.
_SEND = f"""
WITH conversation AS (
    SELECT id FROM conversations WHERE id = %(conversation)s
), member AS (
    SELECT 1 FROM conversation
    WHERE %(sender)s::text IS NULL OR EXISTS (
        SELECT 1 FROM participants
        WHERE conversation_id = %(conversation)s AND user_id = %(sender)s
    )
), inserted AS (
    INSERT INTO messages (conversation_id, sender_id, kind, body, client_msg_id)
    SELECT %(conversation)s, %(sender)s, %(kind)s, %(body)s, %(clientMsgId)s
    WHERE EXISTS (SELECT 1 FROM member)
    ON CONFLICT DO NOTHING
    RETURNING {_MESSAGE_COLUMNS}
), latest AS (
    UPDATE conversations c SET last_message_id = i.id, updated_at = now()
    FROM inserted i
    WHERE c.id = i.conversation_id AND (c.last_message_id IS NULL OR c.last_message_id < i.id)
), read AS (
    UPDATE participants p SET last_read_message_id = i.id
    FROM inserted i
    WHERE p.conversation_id = i.conversation_id AND p.user_id = i.sender_id
      AND (p.last_read_message_id IS NULL OR p.last_read_message_id < i.id)
)
SELECT
    EXISTS (SELECT 1 FROM conversation),
    EXISTS (SELECT 1 FROM member),
    (SELECT array_agg(user_id ORDER BY user_id) FROM participants
     WHERE conversation_id = %(conversation)s),
    i.id, i.conversation_id, i.sender_id, i.kind, i.body, i.client_msg_id, i.created_at
FROM (SELECT 1) one LEFT JOIN inserted i ON true
"""


def _message(row: Sequence[Any]) -> Message:
    return Message(row[0], row[1], row[2], row[3], row[4], row[5], _millis(row[6]))


@frozen
class Sent:
    """
    What C{message.send} did: the message, the conversation's participants, and
    whether it was stored by an earlier attempt with the same C{clientMsgId}.
    """

    message: Message
    participants: tuple[str, ...]
    duplicate: bool


class Conversations:
    """
    The chat tables, through one L{Database}.
    """

    def __init__(self, database: Database) -> None:
        self._db = database

    # Participants

    def isParticipant(self, conversationId: str, userId: str) -> Deferred[bool]:
        """
        The L{marketplace_ws.channels.IsParticipant} question, in one query on the
        primary keys of both tables.
        """
        return Deferred.fromCoroutine(self._isParticipant(conversationId, userId))

    async def _isParticipant(self, conversationId: str, userId: str) -> bool:
        key = databaseKey(conversationId)
        rows = await self._db.query(
            "conversation.participant",
            "SELECT EXISTS (SELECT 1 FROM conversations WHERE id = %s),"
            " EXISTS (SELECT 1 FROM participants WHERE conversation_id = %s AND user_id = %s)",
            (key, key, userId),
        )
        exists, participant = rows[0]
        if not exists:
            raise OpError(NOT_FOUND, f"conversation {conversationId} does not exist")
        return bool(participant)

    async def participants(self, key: int) -> tuple[str, ...]:
        rows = await self._db.query(
            "conversation.participants",
            "SELECT user_id FROM participants WHERE conversation_id = %s ORDER BY user_id",
            (key,),
        )
        return tuple(row[0] for row in rows)

    async def _check(self, cursor: Cursor, key: int, userId: str) -> None:
        """Inside a transaction: C{not_found} or C{forbidden} unless a participant."""
        await cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM participants WHERE conversation_id = %s"
            " AND user_id = %s), EXISTS (SELECT 1 FROM conversations WHERE id = %s)",
            (key, userId, key),
        )
        participant, exists = cursor.fetchone()
        if not exists:
            raise OpError(NOT_FOUND, f"conversation {key} does not exist")
        if not participant:
            raise OpError(FORBIDDEN, f"not a participant of conversation {key}")

    # Conversations

    def findOrCreate(
        self, listingId: str | None, participants: Sequence[tuple[str, str]]
    ) -> Deferred[tuple[int, bool]]:
        """
        The conversation about C{listingId} with exactly these C{(userId, role)}
        participants, created if there is none: C{(id, created)}. Two concurrent
        calls for the same set agree on one conversation (an advisory lock on the set
        serialises them).
        """

        async def work(cursor: Cursor) -> tuple[int, bool]:
            users = sorted({userId for userId, _ in participants})
            await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_lockKey(listingId, users),))
            await cursor.execute(
                "SELECT c.id FROM conversations c"
                " WHERE c.listing_id IS NOT DISTINCT FROM %s"
                " AND (SELECT array_agg(p.user_id ORDER BY p.user_id) FROM participants p"
                "      WHERE p.conversation_id = c.id) = %s::text[]"
                " ORDER BY c.id LIMIT 1",
                (listingId, users),
            )
            found = cursor.fetchone()
            if found is not None:
                return int(found[0]), False
            await cursor.execute(
                "INSERT INTO conversations (listing_id) VALUES (%s) RETURNING id", (listingId,)
            )
            (key,) = cursor.fetchone()
            for userId, role in participants:
                await cursor.execute(
                    "INSERT INTO participants (conversation_id, user_id, role)"
                    " VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                    (key, userId, role),
                )
            return int(key), True

        return self._db.transaction("conversation.find_or_create", work)

    def inbox(self, userId: str, limit: int, before: tuple[int, int] | None) -> Deferred[Any]:
        """
        The user's conversations, most recent message first, each with its last
        message, participants and unread count: one query that starts from the
        user's rows of C{participants_user_idx} and reaches everything else by
        primary key or C{messages_conversation_idx}.
        """
        return self._db.query(
            "conversation.list",
            "SELECT c.id, c.listing_id, c.created_at, c.last_message_id,"
            "  m.sender_id, m.kind, m.body, m.client_msg_id, m.created_at,"
            "  p.last_read_message_id,"
            "  (SELECT count(*) FROM (SELECT 1 FROM messages u"
            "     WHERE u.conversation_id = c.id"
            "       AND u.id > coalesce(p.last_read_message_id, 0)"
            "       AND u.sender_id IS DISTINCT FROM p.user_id"
            "     LIMIT %(cap)s) unread),"
            "  (SELECT json_agg(json_build_object('userId', o.user_id, 'role', o.role)"
            "                   ORDER BY o.user_id)"
            "     FROM participants o WHERE o.conversation_id = c.id)"
            " FROM participants p"
            " JOIN conversations c ON c.id = p.conversation_id"
            " LEFT JOIN messages m ON m.id = c.last_message_id"
            " WHERE p.user_id = %(user)s"
            "   AND (%(hasBefore)s = false"
            "        OR (coalesce(c.last_message_id, 0), c.id) < (%(beforeMessage)s, %(beforeId)s))"
            " ORDER BY coalesce(c.last_message_id, 0) DESC, c.id DESC"
            " LIMIT %(limit)s",
            {
                "cap": UNREAD_CAP,
                "user": userId,
                "hasBefore": before is not None,
                "beforeMessage": before[0] if before else 0,
                "beforeId": before[1] if before else 0,
                "limit": limit,
            },
        )

    # Messages

    def send(
        self, key: int, senderId: str | None, body: str, clientMsgId: str | None
    ) -> Deferred[Sent]:
        """
        Store a message (a system message when C{senderId} is C{None}) and make it the
        conversation's last; the sender has read it. Sending again with the same
        C{(senderId, clientMsgId)} answers the stored message as a duplicate.

        One statement, so one round trip and its own transaction: the membership
        check, the insert, both position updates and the participants it goes to.
        (As BEGIN, five statements and COMMIT it was seven round trips, and the
        database's share of a message's cost.)

        @raise OpError: C{not_found}, C{forbidden} (not a participant), C{conflict}
            (the C{clientMsgId} was used for another conversation).
        """
        return Deferred.fromCoroutine(self._send(key, senderId, body, clientMsgId))

    async def _send(
        self, key: int, senderId: str | None, body: str, clientMsgId: str | None
    ) -> Sent:
        rows = await self._db.query(
            "message.send",
            _SEND,
            {
                "conversation": key,
                "sender": senderId,
                "kind": "user" if senderId else "system",
                "body": body,
                "clientMsgId": clientMsgId,
            },
        )
        exists, member, users, *inserted = rows[0]
        if not exists:
            raise OpError(NOT_FOUND, f"conversation {key} does not exist")
        if not member:
            raise OpError(FORBIDDEN, f"not a participant of conversation {key}")
        if inserted[0] is not None:
            return Sent(_message(inserted), tuple(users or ()), False)
        # The (sender, clientMsgId) pair was stored before: a retry.
        found = await self._db.query(
            "message.send.duplicate",
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE sender_id = %s AND client_msg_id = %s",
            (senderId, clientMsgId),
        )
        if not found:  # pragma: no cover - the conflicting row is there
            raise OpError(CONFLICT, "message conflicts with another; retry")
        if found[0][1] != key:
            raise OpError(CONFLICT, "clientMsgId was already used in another conversation")
        return Sent(_message(found[0]), tuple(users or ()), True)

    def markRead(self, key: int, userId: str, messageId: int) -> Deferred[tuple[int, bool]]:
        """
        Move the user's read position forward to C{messageId}: C{(position, moved)}.
        A position never moves back.
        """

        async def work(cursor: Cursor) -> tuple[int, bool]:
            await self._check(cursor, key, userId)
            await cursor.execute(
                "SELECT 1 FROM messages WHERE id = %s AND conversation_id = %s",
                (messageId, key),
            )
            if cursor.fetchone() is None:
                raise OpError(NOT_FOUND, f"message {messageId} is not in conversation {key}")
            await cursor.execute(
                "UPDATE participants SET last_read_message_id = %s"
                " WHERE conversation_id = %s AND user_id = %s"
                "   AND (last_read_message_id IS NULL OR last_read_message_id < %s)"
                " RETURNING last_read_message_id",
                (messageId, key, userId, messageId),
            )
            if cursor.fetchone() is not None:
                return messageId, True
            await cursor.execute(
                "SELECT last_read_message_id FROM participants"
                " WHERE conversation_id = %s AND user_id = %s",
                (key, userId),
            )
            return int(cursor.fetchone()[0]), False

        return self._db.transaction("message.read", work)

    def history(
        self, key: int, userId: str, before: int | None, limit: int
    ) -> Deferred[list[Message]]:
        """
        A page of the conversation's messages older than C{before}, newest first.
        """

        async def work(cursor: Cursor) -> list[Message]:
            await self._check(cursor, key, userId)
            await cursor.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                " WHERE conversation_id = %s AND id < %s ORDER BY id DESC LIMIT %s",
                (key, before if before is not None else _MAX_ID, limit),
            )
            return [_message(row) for row in cursor.fetchall()]

        return self._db.transaction("message.history", work)


def _lockKey(listingId: str | None, users: Sequence[str]) -> int:
    text = "\x00".join([listingId or "", *users])
    digest = hashlib.blake2b(f"marketplace_ws conversation {text}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)
