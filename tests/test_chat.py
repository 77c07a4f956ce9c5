"""
Chat and notifications end to end: the service in this process against real
PostgreSQL, real WebSocket clients over loopback.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail
from twisted.trial.unittest import TestCase

from marketplace_ws.chat import Chat
from marketplace_ws.client import Client, ServerError
from marketplace_ws.envelope import UNAVAILABLE, OpError
from marketplace_ws.notifications import Notifications
from marketplace_ws.service import MarketplaceService
from tests.test_live import drained, join, nextFrame
from tests.test_service import startService


def chatOf(service: MarketplaceService) -> Chat:
    assert service.chat is not None
    return service.chat


def notificationsOf(service: MarketplaceService) -> Notifications:
    assert service.notifications is not None
    return service.notifications


async def pair(service: MarketplaceService, listing: str = "l1") -> int:
    result = await chatOf(service).findOrCreate(listing, [("buyer", "buyer"), ("seller", "seller")])
    return int(result["id"])


async def send(client: Client, key: int, body: str, clientMsgId: str) -> dict[str, Any]:
    result: dict[str, Any] = await client.request(
        "message.send", conversationId=key, body=body, clientMsgId=clientMsgId
    )
    return result


class ConversationTests(TestCase):
    timeout = 30

    async def test_findOrCreate(self) -> None:
        """
        The same listing and participants find the same conversation, whatever their
        order; another listing or another buyer makes a new one.
        """
        service = await startService(self)
        chat = chatOf(service)
        first = await chat.findOrCreate("l1", [("b", "buyer"), ("s", "seller")])
        self.assertTrue(first["created"])
        again = await chat.findOrCreate("l1", [("s", "seller"), ("b", "buyer")])
        self.assertEqual((again["id"], again["created"]), (first["id"], False))
        other = await chat.findOrCreate("l2", [("b", "buyer"), ("s", "seller")])
        third = await chat.findOrCreate("l1", [("c", "buyer"), ("s", "seller")])
        self.assertEqual(len({first["id"], other["id"], third["id"]}), 3)


class SendTests(TestCase):
    timeout = 30

    async def test_sendDeliversAndAlerts(self) -> None:
        """
        A message reaches every tab subscribed to the conversation once; a
        participant with no tab on it gets a message.alert on their user channel.
        """
        service = await startService(self)
        key = await pair(service)
        buyer = await join(service, "buyer")
        await buyer.request("subscribe", channel=f"conversation:{key}")
        seller = await join(service, "seller")
        result = await send(buyer, key, "Is it still available?", "m-1")
        message = result["message"]
        self.assertFalse(result["duplicate"])
        self.assertEqual(
            (message["conversationId"], message["senderId"], message["body"], message["kind"]),
            (key, "buyer", "Is it still available?", "user"),
        )
        events = [f for f in await drained(buyer) if f["event"] == "message.created"]
        self.assertEqual([e["data"] for e in events], [message])
        alert = await nextFrame(seller)
        self.assertEqual(
            (alert["channel"], alert["event"], alert["data"]),
            (
                "user:seller",
                "message.alert",
                {
                    "conversationId": key,
                    "messageId": message["id"],
                    "senderId": "buyer",
                    "preview": "Is it still available?",
                },
            ),
        )
        await seller.request("subscribe", channel=f"conversation:{key}")
        await drained(buyer)
        await send(seller, key, "Yes", "s-1")
        self.assertEqual([f["event"] for f in await drained(seller)], ["message.created"])
        await buyer.close()
        await seller.close()

    async def test_retryIsIdempotent(self) -> None:
        """
        Sending again with the same clientMsgId (a retry after a lost reply) answers
        the stored message and delivers nothing twice.
        """
        service = await startService(self)
        key = await pair(service)
        seller = await join(service, "seller")
        await seller.request("subscribe", channel=f"conversation:{key}")
        buyer = await join(service, "buyer")
        first = await send(buyer, key, "hello", "retry-1")
        second = await send(buyer, key, "hello", "retry-1")
        self.assertEqual(second["message"], first["message"])
        self.assertTrue(second["duplicate"])
        created = [f for f in await drained(seller) if f["event"] == "message.created"]
        self.assertEqual(len(created), 1)
        history = await buyer.request("history", conversationId=key)
        self.assertEqual(len(history["messages"]), 1)
        other = await pair(service, "l2")
        with self.assertRaises(ServerError) as e:
            await send(buyer, other, "hello", "retry-1")
        self.assertEqual(e.exception.code, "conflict")
        await buyer.close()
        await seller.close()

    async def test_refusals(self) -> None:
        service = await startService(self, **{"chat-max-body": "10"})
        key = await pair(service)
        buyer = await join(service, "buyer")
        stranger = await join(service, "stranger")
        cases: list[tuple[Client, dict[str, Any], str]] = [
            (stranger, {"conversationId": key, "body": "hi", "clientMsgId": "a"}, "forbidden"),
            (buyer, {"conversationId": 999999, "body": "hi", "clientMsgId": "a"}, "not_found"),
            (buyer, {"conversationId": "x", "body": "hi", "clientMsgId": "a"}, "not_found"),
            (buyer, {"conversationId": key, "body": "   ", "clientMsgId": "a"}, "bad_request"),
            (buyer, {"conversationId": key, "body": "x" * 11, "clientMsgId": "a"}, "too_large"),
            (buyer, {"conversationId": key, "body": "hi"}, "bad_request"),
            (buyer, {"conversationId": key, "body": "hi", "clientMsgId": ""}, "bad_request"),
            (buyer, {"conversationId": key, "body": 5, "clientMsgId": "a"}, "bad_request"),
            (buyer, {"body": "hi", "clientMsgId": "a"}, "bad_request"),
        ]
        for client, params, code in cases:
            with self.assertRaises(ServerError, msg=str(params)) as e:
                await client.request("message.send", **params)
            self.assertEqual(e.exception.code, code, params)
        self.assertEqual(len((await buyer.request("history", conversationId=key))["messages"]), 0)
        await buyer.close()
        await stranger.close()

    async def test_unstorableText(self) -> None:
        """
        JSON lets a client send a NUL character or an unpaired surrogate; PostgreSQL
        cannot store either: bad_request, not internal, and the connection stays.
        """
        service = await startService(self)
        key = await pair(service)
        buyer = await join(service, "buyer")
        for body in ("a\x00b", "a\ud800b"):
            with self.assertRaises(ServerError) as e:
                await send(buyer, key, body, "bad-" + str(len(body)))
            self.assertEqual(e.exception.code, "bad_request")
            self.assertIn("NUL", e.exception.message)
        self.assertEqual((await send(buyer, key, "fine", "ok-1"))["duplicate"], False)
        await buyer.close()

    async def test_databaseDown(self) -> None:
        """
        While the database is unreachable, message.send answers unavailable and the
        connection stays.
        """
        service = await startService(self)
        key = await pair(service)
        buyer = await join(service, "buyer")
        assert service.database is not None
        await service.database.close()
        with self.assertRaises(ServerError) as e:
            await send(buyer, key, "hello", "down-1")
        self.assertEqual(e.exception.code, "unavailable")
        self.assertTrue((await buyer.request("ping"))["pong"])
        await buyer.close()

    async def test_systemMessage(self) -> None:
        service = await startService(self)
        key = await pair(service)
        buyer = await join(service, "buyer")
        await buyer.request("subscribe", channel=f"conversation:{key}")
        result = await chatOf(service).systemMessage(str(key), "Offer accepted")
        self.assertEqual(
            (result["message"]["kind"], result["message"]["senderId"]), ("system", None)
        )
        frame = await nextFrame(buyer)
        self.assertEqual(
            (frame["event"], frame["data"]["body"]), ("message.created", "Offer accepted")
        )
        await buyer.close()


class ReadTests(TestCase):
    timeout = 30

    async def test_readPositionMovesForwardOnly(self) -> None:
        service = await startService(self)
        key = await pair(service)
        buyer = await join(service, "buyer")
        seller = await join(service, "seller")
        await buyer.request("subscribe", channel=f"conversation:{key}")
        ids = [(await send(seller, key, f"m{n}", f"r{n}"))["message"]["id"] for n in range(3)]
        await drained(buyer)
        result = await buyer.request("message.read", conversationId=key, messageId=ids[1])
        self.assertEqual(
            result, {"conversationId": key, "lastReadMessageId": ids[1], "moved": True}
        )
        back = await buyer.request("message.read", conversationId=key, messageId=ids[0])
        self.assertEqual(back, {"conversationId": key, "lastReadMessageId": ids[1], "moved": False})
        await seller.request("subscribe", channel=f"conversation:{key}")
        await drained(seller)
        await buyer.request("message.read", conversationId=key, messageId=ids[2])
        read = [f for f in await drained(seller) if f["event"] == "message.read"]
        self.assertEqual(
            [f["data"] for f in read],
            [{"conversationId": key, "userId": "buyer", "messageId": ids[2]}],
        )
        other = await pair(service, "l2")
        otherId = (await send(seller, other, "x", "o1"))["message"]["id"]
        with self.assertRaises(ServerError) as e:
            await buyer.request("message.read", conversationId=key, messageId=otherId)
        self.assertEqual(e.exception.code, "not_found")
        await buyer.close()
        await seller.close()


class HistoryTests(TestCase):
    timeout = 30

    async def test_pagesStableUnderInserts(self) -> None:
        """
        Paging newest first with the before cursor sees every message once, even with
        messages arriving between pages.
        """
        service = await startService(self)
        key = await pair(service)
        buyer = await join(service, "buyer")
        sent = [(await send(buyer, key, f"m{n}", f"h{n}"))["message"]["id"] for n in range(7)]
        page = await buyer.request("history", conversationId=key, limit=3)
        seen = [m["id"] for m in page["messages"]]
        while page["before"] is not None:
            await send(buyer, key, "newer", f"late{len(seen)}")
            page = await buyer.request(
                "history", conversationId=key, limit=3, before=page["before"]
            )
            seen += [m["id"] for m in page["messages"]]
        self.assertEqual(seen, sorted(sent, reverse=True))
        stranger = await join(service, "stranger")
        with self.assertRaises(ServerError) as e:
            await stranger.request("history", conversationId=key)
        self.assertEqual(e.exception.code, "forbidden")
        for params in ({"limit": 0}, {"limit": 101}, {"before": "x"}):
            with self.assertRaises(ServerError):
                await buyer.request("history", conversationId=key, **params)
        await buyer.close()
        await stranger.close()


class InboxTests(TestCase):
    timeout = 60

    async def test_conversationsWithUnread(self) -> None:
        service = await startService(self)
        chat = chatOf(service)
        keys = []
        for n in range(3):
            created = await chat.findOrCreate(f"l{n}", [("buyer", "buyer"), (f"s{n}", "seller")])
            keys.append(created["id"])
        sellers = [await join(service, f"s{n}") for n in range(3)]
        buyer = await join(service, "buyer")
        await send(sellers[0], keys[0], "first", "a")
        await send(sellers[2], keys[2], "third", "b")
        await send(sellers[2], keys[2], "third again", "c")
        await send(buyer, keys[0], "reply", "d")
        page = await buyer.request("conversations", limit=2)
        items = page["conversations"]
        self.assertEqual([c["id"] for c in items], [keys[0], keys[2]])
        self.assertEqual(items[0]["lastMessage"]["body"], "reply")
        self.assertEqual(items[0]["unreadCount"], 0)
        self.assertEqual(items[1]["unreadCount"], 2)
        self.assertEqual(
            items[1]["participants"],
            [{"userId": "buyer", "role": "buyer"}, {"userId": "s2", "role": "seller"}],
        )
        rest = await buyer.request("conversations", limit=2, before=page["before"])
        self.assertEqual([c["id"] for c in rest["conversations"]], [keys[1]])
        self.assertIsNone(rest["conversations"][0]["lastMessage"])
        self.assertIsNone(rest["before"])
        for client in [buyer, *sellers]:
            await client.close()

    async def test_inboxQueryUsesIndexes(self) -> None:
        """
        On a few thousand rows the inbox query reads participants, conversations and
        messages through their indexes, never a sequential scan.
        """
        service = await startService(self)
        assert service.database is not None
        await service.database.query(
            "test.fill",
            "WITH c AS (INSERT INTO conversations (listing_id)"
            "  SELECT 'l' || g FROM generate_series(1, 2000) g RETURNING id)"
            " INSERT INTO participants (conversation_id, user_id, role)"
            " SELECT id, u, 'r' FROM c, (VALUES ('buyer'), ('s' || (random() * 500)::int)) v(u)"
            " ON CONFLICT DO NOTHING",
        )
        await service.database.query(
            "test.fill",
            "INSERT INTO messages (conversation_id, sender_id, body, client_msg_id)"
            " SELECT c.id, 'buyer', 'm', 'x' || c.id || '-' || g"
            " FROM conversations c, generate_series(1, 3) g",
        )
        await service.database.query(
            "test.fill",
            "UPDATE conversations c SET last_message_id ="
            " (SELECT max(id) FROM messages m WHERE m.conversation_id = c.id)",
        )
        await service.database.query("test.analyze", "ANALYZE")
        captured: list[str] = []
        conversations = chatOf(service).conversations
        original = service.database.query

        def explaining(name: str, sql: str, params: Any = ()) -> Any:
            if name == "conversation.list":
                captured.append(sql)
                sql = "EXPLAIN " + sql
            return original(name, sql, params)

        service.database.query = explaining  # type: ignore[method-assign]
        rows = await conversations.inbox("s7", 20, None)
        plan = "\n".join(row[0] for row in rows)
        self.assertEqual(len(captured), 1)
        self.assertNotIn("Seq Scan", plan, plan)
        self.assertIn("participants_user_idx", plan, plan)


class NotificationTests(TestCase):
    timeout = 30

    async def test_createPushListRead(self) -> None:
        service = await startService(self)
        notifications = notificationsOf(service)
        alice = await join(service, "alice")
        bob = await join(service, "bob")
        created = await notifications.create(
            ["alice", "bob"], "offer.accepted", "Offer accepted", "Pick up Friday", {"o": 1}, "k1"
        )
        self.assertEqual(
            [(c["userId"], c["duplicate"]) for c in created], [("alice", False), ("bob", False)]
        )
        pushed = await nextFrame(alice)
        self.assertEqual(
            (pushed["channel"], pushed["event"], pushed["data"]["title"], pushed["data"]["data"]),
            ("user:alice", "notification.created", "Offer accepted", {"o": 1}),
        )
        again = await notifications.create(
            ["alice"], "offer.accepted", "Offer accepted", None, None, "k1"
        )
        self.assertEqual(again, [{"userId": "alice", "id": created[0]["id"], "duplicate": True}])
        self.assertEqual(await drained(alice), [])
        await notifications.create(["alice"], "message", "Second", None, None, None)
        await drained(alice)
        listed = await alice.request("notifications", unreadOnly=True)
        self.assertEqual(
            [n["title"] for n in listed["notifications"]], ["Second", "Offer accepted"]
        )
        self.assertEqual(listed["unreadCount"], 2)
        bobsId = created[1]["id"]
        read = await alice.request("notification.read", ids=[created[0]["id"], bobsId])
        self.assertEqual(read, {"read": [created[0]["id"]]})
        self.assertEqual([f["event"] for f in await drained(alice)], ["notification.read"])
        listed = await alice.request("notifications", unreadOnly=True)
        self.assertEqual([n["title"] for n in listed["notifications"]], ["Second"])
        bobs = await bob.request("notifications")
        self.assertIsNone(bobs["notifications"][0]["readAt"])
        badParams: list[dict[str, Any]] = [{"ids": []}, {"ids": ["1"]}, {"ids": [0]}, {}]
        for params in badParams:
            with self.assertRaises(ServerError) as e:
                await alice.request("notification.read", **params)
            self.assertEqual(e.exception.code, "bad_request")
        await alice.close()
        await bob.close()

    async def test_retryPushesWhatFailed(self) -> None:
        """
        When a push fails after the rows are stored (Redis down halfway), the call
        fails; its retry with the same idempotency key pushes what was not pushed,
        and nothing twice.
        """
        service = await startService(self)
        notifications = notificationsOf(service)
        alice = await join(service, "alice")
        bob = await join(service, "bob")
        publish = service.live.publish

        def failingForBob(channel: Any, *args: Any) -> Any:
            if str(channel) == "user:bob":
                return fail(OpError(UNAVAILABLE, "the broker is down"))
            return publish(channel, *args)

        service.live.publish = failingForBob  # type: ignore[method-assign, assignment]
        with self.assertRaises(OpError):
            await notifications.create(["alice", "bob"], "t", "Sold", None, None, "k9")
        service.live.publish = publish  # type: ignore[method-assign]
        again = await notifications.create(["alice", "bob"], "t", "Sold", None, None, "k9")
        self.assertEqual([a["duplicate"] for a in again], [True, True])
        self.assertEqual([f["event"] for f in await drained(alice)], ["notification.created"])
        self.assertEqual([f["event"] for f in await drained(bob)], ["notification.created"])
        await alice.close()
        await bob.close()
