"""
Notifications (SPEC §5): the Next.js backend tells users what happened ("your offer was
accepted"); each one is stored per user and pushed as C{notification.created} on
C{user:<id>}. The C{notifications} and C{notification.read} ops let a user page and mark
their own, and only their own: every query is keyed by the connection's user.

C{idempotencyKey} makes the backend's retries harmless: the key is unique per user, so
a repeated call stores and pushes nothing new and answers the original ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import gatherResults

from marketplace_ws import envelope
from marketplace_ws.channels import Channel
from marketplace_ws.db import Cursor, Database
from marketplace_ws.envelope import BAD_REQUEST, OpError, Request
from marketplace_ws.live import Live

if TYPE_CHECKING:
    from marketplace_ws.protocol import ClientProtocol, Handler

#: Ids one C{notification.read} may mark.
MAX_READ = 100

_COLUMNS = "id, user_id, type, title, body, data, read_at, created_at"


def _millis(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def _json(row: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": row[0],
        "userId": row[1],
        "type": row[2],
        "title": row[3],
        "body": row[4],
        "data": row[5],
        "readAt": _millis(row[6]),
        "createdAt": _millis(row[7]),
    }


class Notifications:
    def __init__(self, database: Database, live: Live) -> None:
        self._db = database
        self.live = live

    @property
    def ops(self) -> dict[str, Handler]:
        return {"notifications": self._list, "notification.read": self._read}

    async def create(
        self,
        userIds: Sequence[str],
        type: str,
        title: str,
        body: str | None,
        data: Any,
        idempotencyKey: str | None,
    ) -> list[dict[str, Any]]:
        """
        Store one notification per user and push it. Answers, per user in order,
        C{{"userId", "id", "duplicate"}}.

        A retry with the same C{idempotencyKey} stores nothing new but pushes the
        stored ones again, under the same broker idempotency keys: a push the first
        call could not make (Redis went down halfway) is made now, and one it made is
        not repeated.
        """
        users = list(dict.fromkeys(userIds))
        payload = json.dumps({} if data is None else data)

        async def work(cursor: Cursor) -> tuple[list[Any], list[Any]]:
            await cursor.execute(
                "INSERT INTO notifications (user_id, type, title, body, data, idempotency_key)"
                " SELECT u, %s, %s, %s, %s::jsonb, %s FROM unnest(%s::text[]) AS u"
                " ON CONFLICT (user_id, idempotency_key) DO NOTHING"
                f" RETURNING {_COLUMNS}",
                (type, title, body, payload, idempotencyKey, users),
            )
            created = list(cursor.fetchall())
            earlier: list[Any] = []
            if idempotencyKey is not None and len(created) < len(users):
                await cursor.execute(
                    f"SELECT {_COLUMNS} FROM notifications"
                    " WHERE idempotency_key = %s AND user_id = ANY(%s::text[])",
                    (idempotencyKey, users),
                )
                earlier = list(cursor.fetchall())
            return created, earlier

        created, earlier = await self._db.transaction("notification.create", work)
        # Each user's channel is its own: their pushes go out together, not one by one.
        await gatherResults(
            [
                self.live.publish(
                    Channel("user", row[1]),
                    "notification.created",
                    _json(row),
                    f"notification:{row[0]}",
                )
                for row in [*created, *earlier]
            ],
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure.raiseException())
        results = {row[1]: {"userId": row[1], "id": row[0], "duplicate": True} for row in earlier}
        for row in created:
            results[row[1]] = {"userId": row[1], "id": row[0], "duplicate": False}
        return [results[u] for u in users if u in results]

    async def _list(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        unreadOnly = envelope.field(request, "unreadOnly", bool, required=False, default=False)
        limit = envelope.pageLimit(request)
        before = envelope.field(request, "before", int, required=False, default=2**63 - 1)
        userId = connection.userId
        rows = await self._db.query(
            "notification.list",
            f"SELECT {_COLUMNS} FROM notifications"
            " WHERE user_id = %s AND id < %s AND (%s = false OR read_at IS NULL)"
            " ORDER BY id DESC LIMIT %s",
            (userId, before, unreadOnly, limit),
        )
        unread = await self._db.query(
            "notification.unread",
            "SELECT count(*) FROM (SELECT 1 FROM notifications"
            " WHERE user_id = %s AND read_at IS NULL LIMIT 100) u",
            (userId,),
        )
        return {
            "notifications": [_json(row) for row in rows],
            "unreadCount": unread[0][0],
            "before": rows[-1][0] if len(rows) == limit else None,
        }

    async def _read(self, connection: ClientProtocol, request: Request) -> dict[str, Any]:
        ids = request.params.get("ids")
        if (
            not isinstance(ids, list)
            or not 0 < len(ids) <= MAX_READ
            or not all(type(i) is int and 0 < i < 2**63 for i in ids)
        ):
            raise OpError(BAD_REQUEST, f"ids must be a list of 1 to {MAX_READ} notification ids")
        userId = connection.userId
        rows = await self._db.query(
            "notification.read",
            "UPDATE notifications SET read_at = now()"
            " WHERE user_id = %s AND id = ANY(%s::bigint[]) AND read_at IS NULL"
            " RETURNING id",
            (userId, ids),
        )
        marked = sorted(row[0] for row in rows)
        if marked:
            # The user's other tabs clear the same badges.
            await self.live.publish(Channel("user", userId), "notification.read", {"ids": marked})
        return {"read": marked}
