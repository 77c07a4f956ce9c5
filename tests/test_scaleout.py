"""
Many processes, one marketplace: three real C{twist marketplace-ws} processes sharing
one PostgreSQL and a Redis of the test's own, driven over real sockets the way a load
balancer spreads browsers and the Next.js backend's calls across them.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from marketplace_ws.auth import mintToken
from marketplace_ws.client import Client, Closed, connect
from tests import pg, redisserver
from tests.serverprocess import ServerProcess
from tests.test_twist import ServerTestMixin

SECRET = "scale-out-test-secret-of-32-bytes-or-more"
AUTH: dict[str | bytes, str | bytes] = {"Authorization": f"Bearer {SECRET}"}


async def nextFrame(client: Client, timeout: float = 10.0) -> dict[str, Any]:
    d: Deferred[dict[str, Any]] = client.frames.get()
    d.addTimeout(timeout, reactor)
    return await d


async def drained(client: Client) -> list[dict[str, Any]]:
    await client.request("ping")
    frames = []
    while client.frames.pending:
        frames.append(await client.frames.get())
    return frames


class ScaleOutTestCase(ServerTestMixin, TestCase):
    timeout = 120

    async def cluster(
        self, count: int = 3, settings: dict[str, str] | None = None
    ) -> tuple[list[ServerProcess], redisserver.RedisServer]:
        redis = redisserver.private_server(self)
        schema = pg.fresh_schema(self)
        args = ["--ws-port", "0", "--http-port", "0", "--database-url", pg.database_url()]
        args += ["--database-schema", schema, "--redis-url", redis.url]
        for name, value in (settings or {}).items():
            args += [f"--{name}", value]
        env = {"JWT_SECRET": SECRET, "HTTP_API_SECRET": SECRET}
        # One migrates first: the others would wait on its advisory lock anyway.
        first = self.startServer([*args, "--migrate"], env)
        await first.ready
        rest = [self.startServer(args, env) for _ in range(count - 1)]
        await gatherResults([p.ready for p in rest])
        return [first, *rest], redis

    async def join(self, process: ServerProcess, user: str) -> Client:
        client = await connect(
            f"ws://127.0.0.1:{process.wsPort}/", mintToken(SECRET, user, ttl=600)
        )
        self.addCleanup(lambda: client.close())
        return client

    async def api(
        self, process: ServerProcess, method: str, path: str, body: Any = None
    ) -> tuple[int, Any]:
        response = await treq.request(
            method,
            f"http://127.0.0.1:{process.httpPort}/api/v1{path}",
            json=body,
            headers=AUTH,
            persistent=False,
        )
        return response.code, json.loads(await response.content())


class FanOutTests(ScaleOutTestCase):
    async def test_publishOnAReachesBAndCOnceInOrder(self) -> None:
        (a, b, c), _ = await self.cluster()
        onB = await self.join(b, "u-b")
        onC = await self.join(c, "u-c")
        for client in (onB, onC):
            await client.request("subscribe", channel="listing:1")
        for n in range(20):
            code, body = await self.api(
                a, "POST", "/publish", {"channel": "listing:1", "event": "bid", "data": {"n": n}}
            )
            self.assertEqual((code, body["seq"]), (200, n + 1))
        for client in (onB, onC):
            frames = [await nextFrame(client) for _ in range(20)]
            self.assertEqual([f["seq"] for f in frames], list(range(1, 21)))
            self.assertEqual([f["data"]["n"] for f in frames], list(range(20)))
            self.assertEqual(await drained(client), [])

    async def test_reconnectToAnotherProcessRecovers(self) -> None:
        (a, b, c), _ = await self.cluster()
        first = await self.join(b, "u1")
        await first.request("subscribe", channel="listing:2")
        for n in range(3):
            await self.api(a, "POST", "/publish", {"channel": "listing:2", "event": "e", "data": n})
        seen = [(await nextFrame(first))["seq"] for _ in range(3)]
        await first.close()
        for n in range(3, 6):
            await self.api(a, "POST", "/publish", {"channel": "listing:2", "event": "e", "data": n})
        again = await self.join(c, "u1")
        result = await again.request("subscribe", channel="listing:2", since=seen[-1])
        self.assertEqual((result["recovered"], result["replayed"], result["seq"]), (True, 3, 6))
        self.assertEqual([f["data"] for f in await drained(again)], [3, 4, 5])


class PresenceTests(ScaleOutTestCase):
    async def test_presenceAcrossProcesses(self) -> None:
        (a, b, c), _ = await self.cluster()
        _, created = await self.api(
            a,
            "POST",
            "/conversations",
            {
                "participants": [
                    {"userId": "alice", "role": "buyer"},
                    {"userId": "bob", "role": "seller"},
                ]
            },
        )
        channel = f"conversation:{created['id']}"
        bob = await self.join(b, "bob")
        await bob.request("subscribe", channel=channel)
        tab1 = await self.join(a, "alice")
        await tab1.request("subscribe", channel=channel)
        tab2 = await self.join(c, "alice")
        result = await tab2.request("subscribe", channel=channel)
        self.assertEqual(result["present"], ["alice", "bob"])
        joins = [f for f in await drained(bob) if f["event"] == "presence.join"]
        self.assertEqual([f["data"] for f in joins], [{"userId": "alice"}])
        self.assertEqual(
            await bob.request("presence", userIds=["alice", "carol"]),
            {"online": {"alice": True, "carol": False}},
        )
        _, body = await self.api(c, "GET", f"/channels/{channel}/presence")
        self.assertEqual(body["userIds"], ["alice", "bob"])
        await tab1.close()
        self.assertEqual([f for f in await drained(bob) if f["event"] == "presence.leave"], [])
        await tab2.close()
        leave = await nextFrame(bob)
        self.assertEqual((leave["event"], leave["data"]), ("presence.leave", {"userId": "alice"}))

    async def test_disconnectAndConnectionLimitAnywhere(self) -> None:
        (a, b, c), _ = await self.cluster(settings={"max-connections-per-user": "2"})
        onB = await self.join(b, "carol")
        onC = await self.join(c, "carol")
        with self.assertRaises(Closed) as refused:
            await self.join(a, "carol")  # the third, on a third process
        self.assertEqual(refused.exception.code, 4029)
        code, body = await self.api(a, "POST", "/users/carol/disconnect", {"reason": "banned"})
        self.assertEqual((code, body), (200, {"closed": 2}))
        for client in (onB, onC):
            self.assertEqual(await client.closed, (4003, "banned"))


class RedisRestartTests(ScaleOutTestCase):
    async def test_redisRestartSurvived(self) -> None:
        """
        While Redis is down publishes answer 503 and /ready says why; after it is back
        live events reach the subscriber on another process again, without it
        reconnecting, once each.
        """
        (a, b), redis = await self.cluster(count=2)
        client = await self.join(b, "dave")
        await client.request("subscribe", channel="listing:9")
        await self.api(a, "POST", "/publish", {"channel": "listing:9", "event": "e", "data": 1})
        self.assertEqual((await nextFrame(client))["seq"], 1)

        await deferToThread(redis.stop)
        code, body = await self.api(
            a, "POST", "/publish", {"channel": "listing:9", "event": "e", "data": 2}
        )
        self.assertEqual((code, body["error"]["code"]), (503, "unavailable"))
        response = await treq.get(f"http://127.0.0.1:{a.httpPort}/ready", persistent=False)
        self.assertEqual(response.code, 503)
        self.assertEqual((await response.json())["problems"]["redis"], "unreachable")

        await deferToThread(redis.start)
        deadline = reactor.seconds() + 30
        while True:
            code, body = await self.api(
                a, "POST", "/publish", {"channel": "listing:9", "event": "e", "data": 3}
            )
            if code == 200 or reactor.seconds() > deadline:
                break
            await deferLaterSeconds(0.5)
        self.assertEqual(code, 200)
        frames: list[dict[str, Any]] = []
        while not any(f.get("type") == "event" and f["data"] == 3 for f in frames):
            frames.append(await nextFrame(client, timeout=30))
        frames += await drained(client)
        # Redis lost its data: depending on whether A's first publish after the restart
        # came before B re-read the history, B either replays it (the history covers
        # where the client is) or tells the client to resync. Never a gap, never twice.
        listing = [f for f in frames if f["channel"] == "listing:9"]
        events = [f["data"] for f in listing if f["type"] == "event"]
        self.assertEqual(events, [3])
        for frame in listing:
            if frame["type"] == "resync":
                self.assertFalse(frame["recovered"])
        self.assertTrue((await client.request("ping"))["pong"])


def deferLaterSeconds(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
