"""
The whole service in this process, on ephemeral ports, against real PostgreSQL, with a
real WebSocket client over loopback.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from marketplace_ws.auth import mintToken
from marketplace_ws.client import Client, Closed, ServerError, connect
from marketplace_ws.config import ConfigError, configFromOptions
from marketplace_ws.service import MarketplaceService
from marketplace_ws.tap import serviceFor
from tests import pg

SECRET = "in-process-test-secret-of-32-bytes!!"


async def startService(testCase: TestCase, **settings: Any) -> MarketplaceService:
    """
    Start a service on ephemeral ports in a fresh schema; its stop is a cleanup.
    """
    options: dict[str, Any] = {
        "ws-port": "0",
        "http-port": "0",
        "database-url": pg.database_url(),
        "database-schema": pg.fresh_schema(testCase),
        "jwt-secret": SECRET,
        "http-api-secret": SECRET,
        "migrate": True,
        "shutdown-timeout": "5",
    }
    options.update(settings)
    service = serviceFor(configFromOptions(options, {}), reactor)
    service.startService()
    testCase.addCleanup(lambda: service.running and service.stopService())
    await service.ready
    return service


def wsURL(service: MarketplaceService, query: str = "") -> str:
    return f"ws://127.0.0.1:{service.ports[0].getHost().port}/{query}"  # type: ignore[attr-defined]


def httpURL(service: MarketplaceService, path: str) -> str:
    return f"http://127.0.0.1:{service.ports[1].getHost().port}{path}"  # type: ignore[attr-defined]


class ConnectionTests(TestCase):
    timeout = 30

    async def test_welcomeWithBearerHeader(self) -> None:
        service = await startService(self)
        client = await connect(wsURL(service), mintToken(SECRET, "buyer-1", ttl=600))
        welcome = client.welcome
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["userId"], "buyer-1")
        self.assertIsInstance(welcome["expiresAt"], int)
        self.assertIsInstance(welcome["serverTime"], int)
        await client.close()

    async def test_welcomeWithQueryToken(self) -> None:
        service = await startService(self)
        token = mintToken(SECRET, "seller-9")
        client = await connect(wsURL(service, f"?token={token}"))
        self.assertEqual(client.welcome["userId"], "seller-9")
        await client.close()

    async def test_refusals(self) -> None:
        """
        A missing token, a token signed with another secret, and an expired token are
        refused at the handshake; nothing is greeted.
        """
        service = await startService(self)
        for token in (
            None,
            mintToken("another-secret-entirely-32-bytes-long", "u1"),
            mintToken(SECRET, "u1", ttl=-60),
            "not.a.jwt",
        ):
            with self.assertRaises(Closed):
                await connect(wsURL(service), token)
        self.assertEqual(len(service.factory.connections), 0)

    async def test_pingAndBadRequests(self) -> None:
        """
        C{ping} answers with server time; an unknown op and malformed JSON answer
        C{bad_request} and the connection stays open.
        """
        service = await startService(self)
        client: Client = await connect(wsURL(service), mintToken(SECRET, "u1"))
        result = await client.request("ping")
        self.assertIsInstance(result["serverTime"], int)
        with self.assertRaises(ServerError) as raised:
            await client.request("no.such.op")
        self.assertEqual(raised.exception.code, "bad_request")
        client.sendRaw(b"{not json")
        frame = await client.frames.get()
        self.assertEqual(frame["error"]["code"], "bad_request")
        self.assertIsInstance(await client.request("ping"), dict)
        await client.close()

    async def test_binaryFrameCloses1003(self) -> None:
        service = await startService(self)
        client = await connect(wsURL(service), mintToken(SECRET, "u1"))
        client.sendRaw(b"\x00\x01", isBinary=True)
        code, _ = await client.closed
        self.assertEqual(code, 1003)

    async def test_health(self) -> None:
        service = await startService(self)
        response = await treq.get(httpURL(service, "/health"), persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type")[0][:16], b"application/json"
        )
        body = json.loads(await response.content())
        self.assertEqual(body["status"], "ok")


class ShutdownTests(TestCase):
    timeout = 30

    async def test_closesWith1001AndFinishesDatabaseWork(self) -> None:
        """
        Stopping closes every WebSocket with 1001, lets a query already running
        finish with its result, and stops listening.
        """
        service = await startService(self)
        clients = [await connect(wsURL(service), mintToken(SECRET, f"u{i}")) for i in range(3)]
        assert service.database is not None
        inFlight = service.database.query("test.sleep", "SELECT pg_sleep(0.3), 42")
        url = wsURL(service)
        await service.stopService()
        self.assertEqual([(await c.closed)[0] for c in clients], [1001, 1001, 1001])
        rows = await inFlight
        self.assertEqual(rows[0][1], 42)
        with self.assertRaises(ConnectionRefusedError):
            await connect(url, mintToken(SECRET, "late"))

    async def test_unmigratedSchemaRefused(self) -> None:
        """
        Without --migrate, a schema that lacks migrations stops start-up with the
        command that fixes it, rather than failing every request later.
        """
        options: dict[str, Any] = {
            "ws-port": "0",
            "http-port": "0",
            "database-url": pg.database_url(),
            "database-schema": pg.fresh_schema(self),
            "jwt-secret": SECRET,
        }
        service = serviceFor(configFromOptions(options, {}), reactor)
        service.startService()
        with self.assertRaises(ConfigError) as raised:
            await service.ready
        message = str(raised.exception)
        self.assertTrue(message.startswith("MARKETPLACE_WS_MIGRATE (--migrate)"), message)
        self.assertIn("0001", message)
        self.assertIn("marketplace-ws migrate", message)
        await service.stopService()

    async def test_fatalStartIsReported(self) -> None:
        """In-process, a start-up failure fails C{ready} with the setting's name."""
        options: dict[str, Any] = {
            "ws-port": "0",
            "http-port": "0",
            "database-url": "postgresql://nobody:pw@127.0.0.1:1/none",
            "jwt-secret": SECRET,
        }
        service = serviceFor(configFromOptions(options, {}), reactor)
        service.startService()
        with self.assertRaises(Exception) as raised:
            await service.ready
        self.assertIn("DATABASE_URL", str(raised.exception))
        self.assertNotIn("pw@", str(raised.exception))
        await service.stopService()
