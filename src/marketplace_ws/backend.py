"""
What the HTTP API calls (L{marketplace_ws.http.api.Backend}): the server's parts behind
one object, so the API's routes depend on this narrow surface and not on how the
service wires hub, chat and notifications together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail

from marketplace_ws.broker import Published
from marketplace_ws.channels import Channel
from marketplace_ws.chat import Chat
from marketplace_ws.envelope import UNAVAILABLE, OpError
from marketplace_ws.live import Live
from marketplace_ws.notifications import Notifications


def _noDatabase() -> OpError:
    return OpError(UNAVAILABLE, "this server runs without a database (conformance mode)")


@frozen
class ServerBackend:
    live: Live
    chat: Chat | None
    notifications: Notifications | None
    #: This process's counters and gauges, as C{/api/v1/stats} shows them.
    snapshot: Callable[[], dict[str, Any]]

    def publish(
        self, channel: Channel, event: str, data: Any, idempotencyKey: str | None
    ) -> Deferred[Published]:
        return self.live.publish(channel, event, data, idempotencyKey)

    def online(self, userIds: Sequence[str]) -> Deferred[dict[str, bool]]:
        return self.live.online(userIds)

    def members(self, channel: Channel) -> Deferred[list[str]]:
        return self.live.members(channel)

    def disconnect(self, userId: str, reason: str) -> Deferred[int]:
        return self.live.disconnect(userId, reason)

    def stats(self) -> dict[str, Any]:
        return self.snapshot()

    def findOrCreateConversation(
        self, listingId: str | None, participants: list[tuple[str, str]]
    ) -> Deferred[dict[str, Any]]:
        if self.chat is None:
            return fail(_noDatabase())
        return Deferred.fromCoroutine(self.chat.findOrCreate(listingId, participants))

    def systemMessage(self, conversationId: str, body: str) -> Deferred[dict[str, Any]]:
        if self.chat is None:
            return fail(_noDatabase())
        return Deferred.fromCoroutine(self.chat.systemMessage(conversationId, body))

    def notify(
        self,
        userIds: list[str],
        type: str,
        title: str,
        body: str | None,
        data: Any,
        idempotencyKey: str | None,
    ) -> Deferred[list[dict[str, Any]]]:
        if self.notifications is None:
            return fail(_noDatabase())
        return Deferred.fromCoroutine(
            self.notifications.create(userIds, type, title, body, data, idempotencyKey)
        )
