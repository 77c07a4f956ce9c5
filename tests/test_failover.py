"""
A PostgreSQL restart in the middle of a run, on a server of the test's own: the whole
service comes back by itself, answers unavailable meanwhile, loses nothing it
acknowledged, and publishes the outbox rows committed around the outage.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg2
import treq
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from marketplace_ws.client import ServerError
from tests import pg
from tests.test_api_service import AUTH
from tests.test_db_pool import eventually
from tests.test_live import join, nextFrame
from tests.test_service import httpURL, startService


def insertOutbox(url: str, schema: str, channel: str, data: dict[str, Any]) -> None:
    """What the Next.js app does, in its own transaction, on its own connection."""
    connection = psycopg2.connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(
                f'INSERT INTO "{schema}".outbox (channel, event, data) VALUES (%s, %s, %s)',
                (channel, "order.paid", json.dumps(data)),
            )
    finally:
        connection.close()


class RestartTests(TestCase):
    timeout = 120

    async def test_postgresRestart(self) -> None:
        server = await pg.private_server(self)
        schema = "mws_failover"
        service = await startService(
            self,
            **{
                "database-url": server.url,
                "database-schema": schema,
                "outbox-sweep-interval": "0.5",
            },
        )
        chat = service.chat
        assert chat is not None
        key = (await chat.findOrCreate("l1", [("buyer", "buyer"), ("seller", "seller")]))["id"]
        buyer = await join(service, "buyer")
        await buyer.request("subscribe", channel=f"conversation:{key}")
        sent = await buyer.request(
            "message.send", conversationId=key, body="before", clientMsgId="m1"
        )
        self.assertEqual((await nextFrame(buyer))["data"]["id"], sent["message"]["id"])

        await server.stop()
        with self.assertRaises(ServerError) as e:
            await buyer.request("message.send", conversationId=key, body="down", clientMsgId="m2")
        self.assertEqual(e.exception.code, "unavailable")
        response = await treq.post(
            httpURL(service, "/api/v1/conversations"),
            json={"participants": [{"userId": "a", "role": "x"}, {"userId": "b", "role": "y"}]},
            headers=AUTH,
            persistent=False,
        )
        self.assertEqual(response.code, 503)
        self.assertEqual((await response.json())["error"]["code"], "unavailable")
        # The WebSocket itself is unaffected: pings and listings need no database.
        self.assertTrue((await buyer.request("ping"))["pong"])

        await server.start()
        # Committed by the app right after the restart, before this server's LISTEN is
        # back: published by the reconnection drain or the sweep.
        await deferToThread(insertOutbox, server.url, schema, "user:buyer", {"order": 1})
        frame = await nextFrame(buyer, timeout=30)
        self.assertEqual(
            (frame["channel"], frame["event"], frame["data"]["order"]),
            ("user:buyer", "order.paid", 1),
        )
        retried = await eventually(
            lambda: buyer.request(
                "message.send", conversationId=key, body="down", clientMsgId="m2"
            ),
            timeout=30,
        )
        self.assertFalse(retried["duplicate"])
        history = await buyer.request("history", conversationId=key)
        self.assertEqual([m["body"] for m in history["messages"]], ["down", "before"])
        # And LISTEN is back: a new row is published without waiting for a sweep.
        assert service.outbox is not None
        self.assertTrue(await eventually(lambda: _true(service.outbox.listening), timeout=30))
        await deferToThread(insertOutbox, server.url, schema, "user:buyer", {"order": 2})
        frames = [await nextFrame(buyer, timeout=10) for _ in range(2)]
        orders = [f["data"].get("order") for f in frames if f["event"] == "order.paid"]
        self.assertEqual(orders, [2])
        await buyer.close()


async def _true(value: bool) -> bool:
    if not value:
        raise AssertionError("not yet")
    return value
