"""
Channels end to end: the whole service in this process on ephemeral ports against real
PostgreSQL, with real WebSocket clients over loopback. Events are published the way the
HTTP API and the chat ops publish them, through the service's L{Live}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from marketplace_ws.auth import mintToken
from marketplace_ws.channels import Channel, parseChannel
from marketplace_ws.client import Client, ServerError, connect
from marketplace_ws.envelope import OpError
from marketplace_ws.service import MarketplaceService
from tests.test_service import SECRET, startService, wsURL

LISTING = Channel("listing", "7")


async def join(service: MarketplaceService, user: str) -> Client:
    return await connect(wsURL(service), mintToken(SECRET, user, ttl=600))


async def publish(
    service: MarketplaceService, channel: Channel | str, data: Any, event: str = "e"
) -> int:
    if isinstance(channel, str):
        channel = parseChannel(channel)
    return (await service.live.publish(channel, event, data)).seq


async def nextFrame(client: Client, timeout: float = 5.0) -> dict[str, Any]:
    d: Deferred[dict[str, Any]] = client.frames.get()
    d.addTimeout(timeout, reactor)
    return await d


async def drained(client: Client) -> list[dict[str, Any]]:
    """
    Every push frame the client has received so far: a ping's reply comes after
    everything the server sent before it.
    """
    await client.request("ping")
    frames = []
    while client.frames.pending:
        frames.append(await client.frames.get())
    return frames


async def conversation(service: MarketplaceService, *users: str) -> int:
    """A conversation in the database with these participants; its id."""
    assert service.database is not None

    async def create(cursor: Any) -> int:
        await cursor.execute("INSERT INTO conversations DEFAULT VALUES RETURNING id")
        (key,) = cursor.fetchone()
        for user in users:
            await cursor.execute(
                "INSERT INTO participants (conversation_id, user_id, role) VALUES (%s, %s, %s)",
                (key, user, "buyer"),
            )
        return int(key)

    return await service.database.transaction("test.conversation", create)


class SubscribeTests(TestCase):
    timeout = 30

    async def test_userChannelAtWelcome(self) -> None:
        """
        The welcome comes with the user already subscribed to user:<id>: an event
        published on it right after arrives, with its seq.
        """
        service = await startService(self)
        alice = await join(service, "alice")
        self.assertEqual(alice.welcome["userSeq"], 0)
        seq = await publish(service, "user:alice", {"hello": 1}, "notification.created")
        await publish(service, "user:bob", {"not": "yours"})
        self.assertEqual(
            await nextFrame(alice),
            {
                "type": "event",
                "channel": "user:alice",
                "event": "notification.created",
                "seq": seq,
                "data": {"hello": 1},
            },
        )
        self.assertEqual(await drained(alice), [])
        await alice.close()

    async def test_listingLiveThenUnsubscribe(self) -> None:
        service = await startService(self)
        await publish(service, LISTING, {"n": 0})
        alice = await join(service, "alice")
        result = await alice.request("subscribe", channel="listing:7")
        self.assertEqual(
            result, {"channel": "listing:7", "seq": 1, "recovered": None, "replayed": 0}
        )
        await publish(service, LISTING, {"n": 1})
        frame = await nextFrame(alice)
        self.assertEqual((frame["seq"], frame["data"]), (2, {"n": 1}))
        self.assertEqual(
            await alice.request("unsubscribe", channel="listing:7"), {"channel": "listing:7"}
        )
        await publish(service, LISTING, {"n": 2})
        self.assertEqual(await drained(alice), [])
        with self.assertRaises(ServerError) as e:
            await alice.request("unsubscribe", channel="listing:7")
        self.assertEqual(e.exception.code, "not_found")
        await alice.close()

    async def test_refusals(self) -> None:
        """
        Each wrong subscribe gets its own error code, and the connection stays open.
        """
        service = await startService(self)
        key = await conversation(service, "bob", "carol")
        alice = await join(service, "alice")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"channel": "user:bob"}, "forbidden"),
            ({"channel": f"conversation:{key}"}, "forbidden"),
            ({"channel": "conversation:999999"}, "not_found"),
            ({"channel": "conversation:abc"}, "not_found"),
            ({"channel": "room:1"}, "bad_request"),
            ({"channel": "listing:" + "x" * 200}, "bad_request"),
            ({"channel": 7}, "bad_request"),
            ({}, "bad_request"),
            ({"channel": "listing:1", "since": -1}, "bad_request"),
            ({"channel": "listing:1", "since": "3"}, "bad_request"),
            ({"channel": "listing:1", "since": True}, "bad_request"),
        ]
        for params, code in cases:
            with self.assertRaises(ServerError, msg=str(params)) as e:
                await alice.request("subscribe", **params)
            self.assertEqual(e.exception.code, code, params)
        self.assertEqual((await alice.request("ping"))["pong"], True)
        await alice.close()

    async def test_participant(self) -> None:
        """
        A participant subscribes to their conversation, and hears who else is there.
        """
        service = await startService(self)
        key = await conversation(service, "alice", "bob")
        bob = await join(service, "bob")
        await bob.request("subscribe", channel=f"conversation:{key}")
        alice = await join(service, "alice")
        result = await alice.request("subscribe", channel=f"conversation:{key}")
        self.assertEqual(result["present"], ["alice", "bob"])
        await publish(service, f"conversation:{key}", {"body": "hi"}, "message.created")
        for client in (alice, bob):
            frames = [f for f in await drained(client) if f["event"] == "message.created"]
            self.assertEqual([f["data"] for f in frames], [{"body": "hi"}])
        await alice.close()
        await bob.close()

    async def test_subscriptionLimit(self) -> None:
        """
        The user channel counts toward the cap; past it subscribe is forbidden, and
        unsubscribing frees a place.
        """
        service = await startService(self, **{"max-subscriptions": "2"})
        alice = await join(service, "alice")
        await alice.request("subscribe", channel="listing:1")
        with self.assertRaises(ServerError) as e:
            await alice.request("subscribe", channel="listing:2")
        self.assertEqual(e.exception.code, "forbidden")
        self.assertIn("limit", e.exception.message)
        await alice.request("unsubscribe", channel="listing:1")
        await alice.request("subscribe", channel="listing:2")
        await alice.close()

    async def test_eventNameChecked(self) -> None:
        """
        Whoever publishes (the API, chat, the outbox), an event's name is 1 to 64
        characters of letters, digits and _ . : -; anything else is bad_request and
        nothing is published.
        """
        service = await startService(self)
        for name in ("", "x" * 65, "has space", "new\nline"):
            with self.assertRaises(OpError) as e:
                await service.live.publish(LISTING, name, {})
            self.assertEqual(e.exception.code, "bad_request")
        self.assertEqual(await publish(service, LISTING, {}, "listing.sold"), 1)

    async def test_databaseDown(self) -> None:
        """
        While the database cannot answer whether a user takes part in a conversation,
        subscribe answers unavailable; listings still work.
        """
        service = await startService(self)
        alice = await join(service, "alice")
        assert service.database is not None
        await service.database.close()
        with self.assertRaises(ServerError) as e:
            await alice.request("subscribe", channel="conversation:1")
        self.assertEqual(e.exception.code, "unavailable")
        await alice.request("subscribe", channel="listing:1")
        await alice.close()


class RecoveryTests(TestCase):
    timeout = 30

    async def test_recoverAfterReconnect(self) -> None:
        """
        A client that reconnects with the last seq it saw gets what it missed, in
        order, then live events, each once.
        """
        service = await startService(self)
        alice = await join(service, "alice")
        await alice.request("subscribe", channel="listing:7")
        for n in range(3):
            await publish(service, LISTING, {"n": n})
        seen = [f["seq"] for f in await drained(alice)]
        self.assertEqual(seen, [1, 2, 3])
        await alice.close()
        for n in range(3, 6):
            await publish(service, LISTING, {"n": n})
        again = await join(service, "alice")
        result = await again.request("subscribe", channel="listing:7", since=seen[-1])
        self.assertEqual(
            result, {"channel": "listing:7", "seq": 6, "recovered": True, "replayed": 3}
        )
        await publish(service, LISTING, {"n": 6})
        frames = await drained(again)
        self.assertEqual([f["seq"] for f in frames], [4, 5, 6, 7])
        self.assertEqual([f["data"]["n"] for f in frames], [3, 4, 5, 6])
        await again.close()

    async def test_historyTooShort(self) -> None:
        """
        When the history no longer reaches back to since, the reply says
        recovered: false and where the channel is, and nothing is replayed.
        """
        service = await startService(self, **{"history-size": "2"})
        alice = await join(service, "alice")
        for n in range(5):
            await publish(service, LISTING, {"n": n})
        result = await alice.request("subscribe", channel="listing:7", since=1)
        self.assertEqual(
            result, {"channel": "listing:7", "seq": 5, "recovered": False, "replayed": 0}
        )
        self.assertEqual(await drained(alice), [])
        await alice.close()

    async def test_userChannelRecovery(self) -> None:
        """
        The user channel, subscribed at welcome, recovers like any other: subscribe
        again with since.
        """
        service = await startService(self)
        alice = await join(service, "alice")
        await publish(service, "user:alice", {"n": 1})
        last = (await nextFrame(alice))["seq"]
        await alice.close()
        await publish(service, "user:alice", {"n": 2})
        again = await join(service, "alice")
        self.assertEqual(again.welcome["userSeq"], 2)
        result = await again.request("subscribe", channel="user:alice", since=last)
        self.assertEqual((result["recovered"], result["replayed"]), (True, 1))
        self.assertEqual([f["data"] for f in await drained(again)], [{"n": 2}])
        await again.close()


class PresenceTests(TestCase):
    timeout = 30

    async def test_joinLeaveAcrossTabs(self) -> None:
        """
        Bob sees Alice join when her first tab subscribes, nothing for her second tab
        or for closing one of them, and a leave when the last one goes.
        """
        service = await startService(self)
        key = await conversation(service, "alice", "bob")
        channel = f"conversation:{key}"
        bob = await join(service, "bob")
        await bob.request("subscribe", channel=channel)
        tab1 = await join(service, "alice")
        await tab1.request("subscribe", channel=channel)
        tab2 = await join(service, "alice")
        await tab2.request("subscribe", channel=channel)
        self.assertEqual(
            await drained(bob),
            [
                {
                    "type": "event",
                    "channel": channel,
                    "event": "presence.join",
                    "seq": None,
                    "data": {"userId": "alice"},
                }
            ],
        )
        self.assertEqual(await drained(tab1), [])
        self.assertEqual(
            await bob.request("presence", userIds=["alice", "bob", "zed"]),
            {"online": {"alice": True, "bob": True, "zed": False}},
        )
        await tab1.close()
        self.assertEqual(await drained(bob), [])
        await tab2.request("unsubscribe", channel=channel)
        frames = await drained(bob)
        self.assertEqual(
            [(f["event"], f["data"]) for f in frames], [("presence.leave", {"userId": "alice"})]
        )
        await tab2.close()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(
            await bob.request("presence", userIds=["alice"]), {"online": {"alice": False}}
        )
        await bob.close()

    async def test_closeLeaves(self) -> None:
        service = await startService(self)
        key = await conversation(service, "alice", "bob")
        channel = f"conversation:{key}"
        bob = await join(service, "bob")
        await bob.request("subscribe", channel=channel)
        alice = await join(service, "alice")
        await alice.request("subscribe", channel=channel)
        self.assertEqual((await nextFrame(bob))["event"], "presence.join")
        await alice.close()
        frame = await nextFrame(bob)
        self.assertEqual((frame["event"], frame["data"]), ("presence.leave", {"userId": "alice"}))
        self.assertEqual(await service.live.members(parseChannel(channel)), ["bob"])
        await bob.close()

    async def test_badPresenceRequests(self) -> None:
        service = await startService(self)
        alice = await join(service, "alice")
        for params in ({}, {"userIds": "alice"}, {"userIds": [1]}, {"userIds": ["u"] * 101}):
            with self.assertRaises(ServerError) as e:
                await alice.request("presence", **params)
            self.assertEqual(e.exception.code, "bad_request")
        await alice.close()


class TypingTests(TestCase):
    timeout = 30

    async def test_relayedToOthersOnly(self) -> None:
        """
        Typing reaches the other participants, not the typist's own tabs, carries no
        seq, and is not kept: a later recovery does not replay it.
        """
        service = await startService(self)
        key = await conversation(service, "alice", "bob")
        channel = f"conversation:{key}"
        bob = await join(service, "bob")
        await bob.request("subscribe", channel=channel)
        alice = await join(service, "alice")
        await alice.request("subscribe", channel=channel)
        aliceTab = await join(service, "alice")
        await aliceTab.request("subscribe", channel=channel)
        await drained(bob)
        self.assertEqual(
            await alice.request("typing", conversationId=key, active=True), {"active": True}
        )
        frames = await drained(bob)
        self.assertEqual(
            frames,
            [
                {
                    "type": "event",
                    "channel": channel,
                    "event": "typing",
                    "seq": None,
                    "data": {
                        "conversationId": str(key),
                        "userId": "alice",
                        "active": True,
                        "expiresIn": 6.0,
                    },
                }
            ],
        )
        await alice.request("typing", conversationId=str(key), active=False)
        self.assertEqual([f["data"]["active"] for f in await drained(bob)], [False])
        self.assertEqual(await drained(aliceTab), [])
        result = await bob.request("subscribe", channel=channel, since=0)
        self.assertEqual(result["replayed"], 0)
        for client in (alice, aliceTab, bob):
            await client.close()

    async def test_expiresByItself(self) -> None:
        """
        A typing indicator the client never turns off ends after the typing timeout,
        and at once when its connection closes.
        """
        service = await startService(self, **{"typing-timeout": "0.3"})
        key = await conversation(service, "alice", "bob")
        bob = await join(service, "bob")
        await bob.request("subscribe", channel=f"conversation:{key}")
        alice = await join(service, "alice")
        await alice.request("typing", conversationId=key, active=True)
        self.assertTrue((await nextFrame(bob))["data"]["active"])
        stopped = await nextFrame(bob, timeout=2)
        self.assertEqual((stopped["event"], stopped["data"]["active"]), ("typing", False))
        await alice.request("typing", conversationId=key, active=True)
        self.assertTrue((await nextFrame(bob))["data"]["active"])
        await alice.close()
        stopped = await nextFrame(bob, timeout=0.25)
        self.assertFalse(stopped["data"]["active"])
        await bob.close()

    async def test_refused(self) -> None:
        service = await startService(self)
        key = await conversation(service, "bob", "carol")
        alice = await join(service, "alice")
        cases: list[tuple[dict[str, Any], str]] = [
            ({"conversationId": key, "active": True}, "forbidden"),
            ({"conversationId": 999999, "active": True}, "not_found"),
            ({"conversationId": key}, "bad_request"),
            ({"conversationId": key, "active": "yes"}, "bad_request"),
            ({"conversationId": [1], "active": True}, "bad_request"),
        ]
        for params, code in cases:
            with self.assertRaises(ServerError, msg=str(params)) as e:
                await alice.request("typing", **params)
            self.assertEqual(e.exception.code, code, params)
        await alice.close()


class DisconnectTests(TestCase):
    timeout = 30

    async def test_disconnectUser(self) -> None:
        """
        Every connection of the user is closed with 4003; others stay.
        """
        service = await startService(self)
        tabs = [await join(service, "alice") for _ in range(2)]
        bob = await join(service, "bob")
        self.assertEqual(await service.live.disconnect("alice", "banned"), 2)
        for tab in tabs:
            self.assertEqual(await tab.closed, (4003, "banned"))
        self.assertEqual((await bob.request("ping"))["pong"], True)
        self.assertEqual(await service.live.disconnect("nobody", "x"), 0)
        await bob.close()


class SlowConsumerTests(TestCase):
    timeout = 60

    async def publishUntil(
        self, service: MarketplaceService, stop: Any, most: int, size: int = 50_000
    ) -> int:
        """Publish events of about C{size} bytes, one per reactor turn."""
        blob = "x" * size
        for n in range(most):
            if stop():
                return n
            await publish(service, LISTING, {"n": n, "blob": blob})
            await deferLater(reactor, 0, lambda: None)
        return most

    async def test_slowConsumerClosed(self) -> None:
        """
        A client that stops reading is closed once its unsent events pass the bound,
        and counted; a reading client on the same channel keeps everything.
        """
        service = await startService(self, **{"max-send-buffer": str(256 * 1024)})
        reader = await join(service, "reader")
        await reader.request("subscribe", channel="listing:7")
        stalled = await join(service, "stalled")
        await stalled.request("subscribe", channel="listing:7")
        connection = stalled._factory.connection
        assert connection is not None and connection.transport is not None
        connection.transport.pauseProducing()  # type: ignore[attr-defined]
        factory = service.factory
        sent = await self.publishUntil(service, lambda: factory.counters.slow > 0, 2000)
        self.assertEqual(factory.counters.slow, 1)
        self.assertLess(sent, 2000)
        self.assertEqual(
            {c.userId for c in factory.connections if c.state == c.STATE_OPEN}, {"reader"}
        )
        connection.transport.resumeProducing()  # type: ignore[attr-defined]
        await stalled.closed
        self.assertNotIn("stalled", service.live.byUser)
        received = 0
        while received < sent:
            frame = await nextFrame(reader)
            self.assertEqual(frame["data"]["n"], received)
            received += 1
        await reader.close()

    async def test_steadyReaderKept(self) -> None:
        """
        Several times the bound, spread over time, reaches a client that reads.
        """
        service = await startService(self, **{"max-send-buffer": str(256 * 1024)})
        reader = await join(service, "reader")
        await reader.request("subscribe", channel="listing:7")
        total = 100  # about 5 MB, twenty times the bound
        await self.publishUntil(service, lambda: False, total)
        for n in range(total):
            self.assertEqual((await nextFrame(reader))["data"]["n"], n)
        self.assertEqual(service.factory.counters.slow, 0)
        await reader.close()
