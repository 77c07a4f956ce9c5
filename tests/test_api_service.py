"""
The HTTP API of the running service, end to end: the Next.js backend's calls over real
HTTP, their effects seen by real WebSocket clients.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.trial.unittest import TestCase

from marketplace_ws.service import MarketplaceService
from tests.test_live import drained, join, nextFrame
from tests.test_service import SECRET, httpURL, startService

AUTH: dict[str | bytes, str | bytes] = {"Authorization": f"Bearer {SECRET}"}
WRONG: dict[str | bytes, str | bytes] = {"Authorization": "Bearer wrong"}


async def call(
    service: MarketplaceService, method: str, path: str, body: Any = None
) -> tuple[int, Any, Any]:
    response = await treq.request(
        method, httpURL(service, "/api/v1" + path), json=body, headers=AUTH, persistent=False
    )
    return response.code, await response.json(), response.headers


class ApiTests(TestCase):
    timeout = 30

    async def test_publishReachesSubscribers(self) -> None:
        service = await startService(self)
        buyer = await join(service, "buyer")
        await buyer.request("subscribe", channel="listing:9")
        code, body, headers = await call(
            service,
            "POST",
            "/publish",
            {"channel": "listing:9", "event": "price.changed", "data": {"price": 90}},
        )
        self.assertEqual(
            (code, body), (200, {"channel": "listing:9", "seq": 1, "duplicate": False})
        )
        self.assertFalse(headers.hasHeader(b"server"))
        frame = await nextFrame(buyer)
        self.assertEqual((frame["event"], frame["data"]), ("price.changed", {"price": 90}))
        code, body, _ = await call(
            service,
            "POST",
            "/publish/batch",
            {
                "events": [
                    {"channel": "listing:9", "event": "a", "data": 1, "idempotencyKey": "k"},
                    {"channel": "listing:9", "event": "a", "data": 1, "idempotencyKey": "k"},
                    {"channel": "user:buyer", "event": "b", "data": 2},
                ]
            },
        )
        self.assertEqual([r["duplicate"] for r in body["results"]], [False, True, False])
        self.assertEqual(
            [(f["channel"], f["event"]) for f in await drained(buyer)],
            [("listing:9", "a"), ("user:buyer", "b")],
        )
        await buyer.close()

    async def test_presenceAndDisconnect(self) -> None:
        service = await startService(self)
        tabs = [await join(service, "seller") for _ in range(2)]
        code, body, _ = await call(service, "GET", "/presence?userIds=seller,buyer")
        self.assertEqual(body, {"online": {"seller": True, "buyer": False}})
        await tabs[0].request("subscribe", channel="listing:3")
        code, body, _ = await call(service, "GET", "/channels/listing:3/presence")
        self.assertEqual(body["userIds"], [])  # presence is counted on conversations
        code, body, _ = await call(
            service, "POST", "/users/seller/disconnect", {"reason": "banned"}
        )
        self.assertEqual((code, body), (200, {"closed": 2}))
        for tab in tabs:
            self.assertEqual(await tab.closed, (4003, "banned"))
        code, body, _ = await call(service, "GET", "/stats")
        self.assertEqual(body["connections"], 0)
        self.assertEqual(body["framesIn"]["subscribe"], 1)

    async def test_conversationMessagesNotifications(self) -> None:
        service = await startService(self)
        seller = await join(service, "seller")
        code, created, _ = await call(
            service,
            "POST",
            "/conversations",
            {
                "listingId": "lst-1",
                "participants": [
                    {"userId": "buyer", "role": "buyer"},
                    {"userId": "seller", "role": "seller"},
                ],
            },
        )
        self.assertEqual((code, created["created"]), (200, True))
        key = created["id"]
        code, again, _ = await call(
            service,
            "POST",
            "/conversations",
            {
                "listingId": "lst-1",
                "participants": [
                    {"userId": "seller", "role": "seller"},
                    {"userId": "buyer", "role": "buyer"},
                ],
            },
        )
        self.assertEqual((again["id"], again["created"]), (key, False))
        code, twice, _ = await call(
            service,
            "POST",
            "/conversations",
            {
                "participants": [
                    {"userId": "seller", "role": "buyer"},
                    {"userId": "seller", "role": "seller"},
                ]
            },
        )
        self.assertEqual((code, twice["error"]["code"]), (400, "bad_request"))
        await seller.request("subscribe", channel=f"conversation:{key}")
        code, posted, _ = await call(
            service, "POST", f"/conversations/{key}/messages", {"body": "Offer accepted"}
        )
        self.assertEqual((code, posted["message"]["kind"]), (200, "system"))
        frame = await nextFrame(seller)
        self.assertEqual(
            (frame["event"], frame["data"]["body"]), ("message.created", "Offer accepted")
        )
        code, missing, _ = await call(
            service, "POST", "/conversations/999999/messages", {"body": "x"}
        )
        self.assertEqual((code, missing["error"]["code"]), (404, "not_found"))
        code, notified, _ = await call(
            service,
            "POST",
            "/notifications",
            {"userIds": ["seller"], "type": "order.paid", "title": "Paid", "idempotencyKey": "o1"},
        )
        self.assertEqual(notified["notifications"][0]["duplicate"], False)
        frame = await nextFrame(seller)
        self.assertEqual((frame["event"], frame["data"]["title"]), ("notification.created", "Paid"))
        await seller.close()

    async def test_unstorableText(self) -> None:
        """
        A NUL character (in text or in JSON data) or an unpaired surrogate cannot be
        stored: 400 bad_request, never a 500.
        """
        service = await startService(self)
        for body in (
            {"userIds": ["u1"], "type": "t", "title": "a\x00b"},
            {"userIds": ["u1"], "type": "t", "title": "a\ud800b"},
            {"userIds": ["u1"], "type": "t", "title": "ok", "data": {"x": "\x00"}},
        ):
            code, answer, _ = await call(service, "POST", "/notifications", body)
            self.assertEqual((code, answer["error"]["code"]), (400, "bad_request"), body)
        code, _, _ = await call(
            service, "POST", "/notifications", {"userIds": ["u1"], "type": "t", "title": "ok"}
        )
        self.assertEqual(code, 200)

    async def test_unauthorised(self) -> None:
        service = await startService(self)
        response = await treq.post(
            httpURL(service, "/api/v1/publish"),
            json={"channel": "listing:1", "event": "e", "data": 1},
            headers=WRONG,
            persistent=False,
        )
        self.assertEqual(response.code, 401)
        body = await response.text()
        self.assertNotIn(SECRET, body)


class OperationsEndpointTests(TestCase):
    timeout = 30

    async def get(
        self, service: MarketplaceService, path: str, token: str | None = None
    ) -> tuple[int, bytes]:
        headers: dict[str | bytes, str | bytes] = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        response = await treq.get(httpURL(service, path), headers=headers, persistent=False)
        return response.code, await response.content()

    async def test_metrics(self) -> None:
        service = await startService(self)
        client = await join(service, "u1")
        code, body = await self.get(service, "/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b"mws_connections 1.0", body)
        self.assertIn(b"process_resident_memory_bytes", body)
        await client.close()

    async def test_metricsToken(self) -> None:
        token = "metrics-token-of-some-length-0123456789"
        service = await startService(self, **{"metrics-token": token})
        self.assertEqual((await self.get(service, "/metrics"))[0], 401)
        self.assertEqual((await self.get(service, "/metrics", "wrong"))[0], 401)
        code, body = await self.get(service, "/metrics", token)
        self.assertEqual(code, 200)
        self.assertNotIn(token.encode(), body)

    async def test_ready(self) -> None:
        """
        Ready while the database answers; 503 naming it when it does not, and from the
        moment a shutdown begins.
        """
        service = await startService(self)
        code, body = await self.get(service, "/ready")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ready"}))
        assert service.database is not None
        await service.database.close()
        code, body = await self.get(service, "/ready")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["problems"], {"database": "unreachable"})
        service.stopping = True
        code, body = await self.get(service, "/ready")
        self.assertEqual(json.loads(body)["problems"]["process"], "shutting down")
        self.assertEqual((await self.get(service, "/health"))[0], 200)
