"""
What the database says about conversations: who takes part in which.

Conversation ids are the database's: positive integers, written as digits in channel
names (C{conversation:42}). Anything else names no conversation.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail

from marketplace_ws.db import Database
from marketplace_ws.envelope import NOT_FOUND, OpError

#: The largest bigint: a longer id cannot be a conversation's.
_MAX_ID = 2**63 - 1


def conversationKey(conversationId: str) -> int:
    """
    The database key of a conversation named in a request.

    @raise OpError: C{not_found} when it cannot be one.
    """
    if conversationId.isascii() and conversationId.isdigit():
        key = int(conversationId)
        if 0 < key <= _MAX_ID:
            return key
    raise OpError(NOT_FOUND, f"conversation {conversationId} does not exist")


class Participants:
    """
    The L{marketplace_ws.channels.IsParticipant} question, asked of the database in
    one indexed query (the primary keys of both tables).
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    def __call__(self, conversationId: str, userId: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._ask(conversationId, userId))

    async def _ask(self, conversationId: str, userId: str) -> bool:
        key = conversationKey(conversationId)
        rows = await self._database.query(
            "conversation.participant",
            "SELECT EXISTS (SELECT 1 FROM conversations WHERE id = %s),"
            " EXISTS (SELECT 1 FROM participants WHERE conversation_id = %s AND user_id = %s)",
            (key, key, userId),
        )
        exists, participant = rows[0]
        if not exists:
            raise OpError(NOT_FOUND, f"conversation {conversationId} does not exist")
        return bool(participant)


def noConversations(conversationId: str, userId: str) -> Deferred[bool]:
    """
    The participant check without a database (conformance mode, protocol tests): no
    conversation exists.
    """
    return fail(OpError(NOT_FOUND, f"conversation {conversationId} does not exist"))
