"""
C{twist marketplace-ws} as an operator runs it: a real subprocess, real sockets, real
PostgreSQL, a real WebSocket client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time

import treq
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import TestCase

from marketplace_ws.auth import mintToken
from marketplace_ws.client import Closed, connect
from marketplace_ws.db import parse_database_url
from tests import pg
from tests.serverprocess import ServerProcess, baseEnvironment, binary, runCommand, spawnServer

SECRET = "s" * 40
API_SECRET = "a" * 40
AUTHORIZATION: dict[str | bytes, str | bytes] = {"Authorization": f"Bearer {API_SECRET}"}


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerTestMixin:
    """Start servers whose ends are awaited by the test's cleanup."""

    def startServer(
        self, args: list[str], env: dict[str, str] | None = None, cwd: str | None = None
    ) -> ServerProcess:
        process = spawnServer(args, baseEnvironment(env), cwd=cwd)

        def stop() -> Deferred[int]:
            if not process.ended.called:
                process.signal(signal.SIGKILL)
            return process.ended

        self.addCleanup(stop)  # type: ignore[attr-defined]
        return process

    def databaseArgs(self) -> list[str]:
        schema = pg.fresh_schema(self)  # type: ignore[arg-type]
        return ["--database-url", pg.database_url(), "--database-schema", schema, "--migrate"]


class QuickStartTests(ServerTestMixin, TestCase):
    timeout = 60

    async def test_healthAndWelcome(self) -> None:
        """
        A started server answers C{/health} with JSON and greets a client whose token
        was minted by C{marketplace-ws token} with the same secret.
        """
        data = self.mktemp()
        env = {"JWT_SECRET": SECRET}
        server = self.startServer(
            ["--ws-port", "0", "--http-port", "0", "--data-dir", data, *self.databaseArgs()],
            env,
        )
        await server.ready
        response = await treq.get(f"http://127.0.0.1:{server.httpPort}/health", persistent=False)
        self.assertEqual(response.code, 200)
        body = json.loads(await response.content())
        self.assertEqual(body["status"], "ok")
        self.assertIn("version", body)
        self.assertGreaterEqual(body["uptime"], 0)

        code, out, err = await runCommand(
            [binary("marketplace-ws"), "token", "--sub", "u1"], baseEnvironment(env)
        )
        self.assertEqual(code, 0, err)
        token = out.decode().strip()
        client = await connect(f"ws://127.0.0.1:{server.wsPort}/?token={token}")
        self.assertEqual(client.welcome["userId"], "u1")
        self.assertEqual(client.welcome["type"], "welcome")
        self.assertTrue(client.welcome["connectionId"])
        await client.close()
        server.signal(signal.SIGTERM)
        self.assertEqual(await server.ended, 0)

    async def test_onePortServesBoth(self) -> None:
        """
        WS_PORT equal to HTTP_PORT (a platform with one public port): one listener
        answers /health and the API, and upgrades WebSockets.
        """
        port = freePort()
        server = self.startServer(
            [*self.databaseArgs()],
            {
                "JWT_SECRET": SECRET,
                "HTTP_API_SECRET": API_SECRET,
                "WS_PORT": str(port),
                "HTTP_PORT": str(port),
            },
        )
        await server.ready
        self.assertEqual(list(server.ports.values()), [port])
        response = await treq.get(f"http://127.0.0.1:{port}/health", persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        client = await connect(f"ws://127.0.0.1:{port}/", mintToken(SECRET, "u9", ttl=600))
        await client.request("subscribe", channel="listing:1")
        response = await treq.post(
            f"http://127.0.0.1:{port}/api/v1/publish",
            json={"channel": "listing:1", "event": "e", "data": 1},
            headers=AUTHORIZATION,
            persistent=False,
        )
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual((await client.frames.get())["data"], 1)
        await client.close()
        server.signal(signal.SIGTERM)
        self.assertEqual(await server.ended, 0)

    async def test_embeddedDevelopmentDefault(self) -> None:
        """
        With no C{DATABASE_URL} and no secrets, the server starts an embedded
        PostgreSQL in its data directory and generates secrets there, mode 0600,
        saying where; a token from C{marketplace-ws token} in the same directory works.
        """
        data = os.path.abspath(self.mktemp())
        server = self.startServer(["--ws-port", "0", "--http-port", "0", "--data-dir", data])
        await server.ready
        secrets = os.path.join(data, "secrets.json")
        self.assertEqual(stat.S_IMODE(os.stat(secrets).st_mode), 0o600)
        self.assertIn(secrets, server.logText())
        self.assertTrue(os.path.isdir(os.path.join(data, "postgres")))
        code, out, err = await runCommand(
            [binary("marketplace-ws"), "token", "--sub", "dev-user", "--data-dir", data],
            baseEnvironment(),
        )
        self.assertEqual(code, 0, err)
        client = await connect(f"ws://127.0.0.1:{server.wsPort}/", out.decode().strip())
        self.assertEqual(client.welcome["userId"], "dev-user")
        # The secret never reaches the log.
        with open(secrets) as f:
            for value in json.load(f).values():
                self.assertNotIn(value, server.stdout.decode())
        server.signal(signal.SIGTERM)
        self.assertEqual(await server.ended, 0)
        await client.closed


class ShutdownTests(ServerTestMixin, TestCase):
    timeout = 60

    async def _shutdown(self, sig: int) -> None:
        server = self.startServer(
            ["--ws-port", "0", "--http-port", "0", "--shutdown-timeout", "5", *self.databaseArgs()],
            {"JWT_SECRET": SECRET},
        )
        await server.ready
        clients = [
            await connect(f"ws://127.0.0.1:{server.wsPort}/", mintToken(SECRET, f"u{i}"))
            for i in range(3)
        ]
        started = time.monotonic()
        server.signal(sig)
        codes = [(await c.closed)[0] for c in clients]
        self.assertEqual(codes, [1001, 1001, 1001])
        self.assertEqual(await server.ended, 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("shutdown complete", server.logText())
        # No longer accepting.
        with self.assertRaises(ConnectionRefusedError):
            await connect(f"ws://127.0.0.1:{server.wsPort}/", mintToken(SECRET, "late"))

    async def test_sigterm(self) -> None:
        """SIGTERM closes every WebSocket with 1001 and exits 0."""
        await self._shutdown(signal.SIGTERM)

    async def test_sigint(self) -> None:
        """SIGINT (Ctrl-C) does the same."""
        await self._shutdown(signal.SIGINT)


class BadSettingTests(ServerTestMixin, TestCase):
    """
    Each bad setting stops start-up with one line on standard error that names the
    setting, and a non-zero exit status.
    """

    timeout = 60

    async def refused(
        self, args: list[str], env: dict[str, str] | None = None, status: int = 78
    ) -> str:
        """
        The one line a refused start printed. C{status}: 78 (EX_CONFIG) for a setting
        to fix, 69 (EX_UNAVAILABLE) for what a supervisor's restart may cure.
        """
        server = self.startServer(args, env)
        server.ready.addErrback(lambda _: None)
        code = await server.ended
        self.assertEqual(code, status)
        lines = [line for line in server.stderr.decode().splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, server.stderr.decode())
        self.assertTrue(lines[0].startswith("marketplace-ws: "), lines[0])
        return lines[0]

    async def test_wsPortInUse(self) -> None:
        with socket.socket() as busy:
            busy.bind(("0.0.0.0", 0))
            busy.listen()
            port = busy.getsockname()[1]
            line = await self.refused(
                ["--ws-port", str(port), "--http-port", "0", *self.databaseArgs()],
                {"JWT_SECRET": SECRET},
                status=69,
            )
        self.assertIn("WS_PORT", line)
        self.assertIn("in use", line)

    async def test_httpPortInUse(self) -> None:
        with socket.socket() as busy:
            busy.bind(("0.0.0.0", 0))
            busy.listen()
            port = busy.getsockname()[1]
            line = await self.refused(
                ["--ws-port", "0", *self.databaseArgs()],
                {"JWT_SECRET": SECRET, "HTTP_PORT": str(port)},
                status=69,
            )
        self.assertIn("HTTP_PORT", line)
        self.assertIn("in use", line)

    async def test_unreachableDatabase(self) -> None:
        """The line names host and port, never the password."""
        port = freePort()
        line = await self.refused(
            ["--ws-port", "0", "--http-port", "0"],
            {
                "JWT_SECRET": SECRET,
                "DATABASE_URL": f"postgresql://app:hunter2secret@127.0.0.1:{port}/app",
            },
            status=69,
        )
        self.assertIn("DATABASE_URL", line)
        self.assertIn(f"127.0.0.1:{port}", line)
        self.assertNotIn("hunter2secret", line)

    async def test_productionNeedsDatabase(self) -> None:
        line = await self.refused(
            ["--production"], {"JWT_SECRET": SECRET, "HTTP_API_SECRET": API_SECRET}
        )
        self.assertIn("DATABASE_URL", line)

    async def test_productionNeedsSecrets(self) -> None:
        line = await self.refused(
            ["--database-url", pg.database_url()],
            {"MARKETPLACE_WS_ENV": "production", "HTTP_API_SECRET": API_SECRET},
        )
        self.assertIn("JWT_SECRET", line)

    async def test_productionRefusesShortSecret(self) -> None:
        line = await self.refused(
            ["--production", "--database-url", pg.database_url()],
            {"JWT_SECRET": SECRET, "HTTP_API_SECRET": "short-secret-123"},
        )
        self.assertIn("HTTP_API_SECRET", line)
        self.assertIn("32", line)
        self.assertNotIn("short-secret-123", line)

    async def test_badPortValue(self) -> None:
        line = await self.refused([], {"WS_PORT": "eighty"})
        self.assertIn("WS_PORT", line)

    async def test_badEndpoint(self) -> None:
        line = await self.refused(["--http-endpoint", "tcp:notaport"])
        self.assertIn("HTTP_ENDPOINT", line)


class PrismaURLTests(ServerTestMixin, TestCase):
    timeout = 60

    async def test_prismaParametersDropped(self) -> None:
        """
        A Prisma C{DATABASE_URL} starts the server: its own parameters never reach
        libpq (which would refuse them), and C{connection_limit} caps the pool.
        """
        url = parse_database_url(pg.database_url())
        prisma = (
            f"postgresql://{url.user or 'postgres'}@{url.host or '127.0.0.1'}:{url.port or 5432}"
            f"/{url.dbname}?schema=public&connection_limit=2&pgbouncer=true&pool_timeout=10"
            "&sslmode=prefer"
        )
        schema = pg.fresh_schema(self)
        server = self.startServer(
            ["--ws-port", "0", "--http-port", "0", "--database-schema", schema, "--migrate"],
            {"JWT_SECRET": SECRET, "DATABASE_URL": prisma},
        )
        await server.ready
        server.signal(signal.SIGTERM)
        self.assertEqual(await server.ended, 0)


class PrismaSSLTests(ServerTestMixin, TestCase):
    timeout = 60

    async def test_sslmodeReachesLibpq(self) -> None:
        """
        With Prisma's parameters and C{sslmode=require}, the Prisma ones are dropped
        and C{sslmode} reaches libpq: against this test server, which has no TLS, the
        start is refused for exactly that reason, naming DATABASE_URL.
        """
        url = parse_database_url(pg.database_url())
        if url.host is None or url.host.startswith("/"):
            self.skipTest("the test server is on a Unix socket, where libpq ignores sslmode")
        prisma = (
            f"postgresql://{url.user or 'postgres'}:pw-not-logged@{url.host}:{url.port or 5432}"
            f"/{url.dbname}?schema=public&connection_limit=5&pgbouncer=true&sslmode=require"
        )
        server = self.startServer(
            ["--ws-port", "0", "--http-port", "0"], {"JWT_SECRET": SECRET, "DATABASE_URL": prisma}
        )
        server.ready.addErrback(lambda _: None)
        self.assertNotEqual(await server.ended, 0)
        line = server.stderr.decode().strip()
        self.assertIn("DATABASE_URL", line)
        self.assertIn("SSL", line)
        self.assertNotIn("pw-not-logged", line)
        self.assertNotIn("connection_limit", line)


class HelpTests(TestCase):
    timeout = 60

    async def test_twistListsPlugin(self) -> None:
        code, out, err = await runCommand([binary("twist"), "--help"], baseEnvironment())
        self.assertEqual(code, 0, err)
        self.assertIn(b"marketplace-ws", out)

    async def test_everySettingDocumented(self) -> None:
        """C{--help} names every setting's flag, environment variable and default."""
        from marketplace_ws.config import SETTINGS

        code, out, err = await runCommand(
            [binary("twist"), "marketplace-ws", "--help"], baseEnvironment()
        )
        self.assertEqual(code, 0, err)
        text = " ".join(out.decode().split())
        for setting in SETTINGS:
            self.assertIn(f"--{setting.flag}", text)
            self.assertIn(setting.env, text)
            if setting.default is not None and not setting.boolean:
                self.assertIn(f"default {setting.default!r}", text)


class SecretsInLogsTests(ServerTestMixin, TestCase):
    timeout = 60

    async def test_noTokenOrSecretInLogs(self) -> None:
        """
        A run that sees good, bad and expired tokens by every transport, refusals and a
        shutdown writes none of the tokens and none of the secrets to its output.
        """
        server = self.startServer(
            ["--ws-port", "0", "--http-port", "0", *self.databaseArgs()],
            {"JWT_SECRET": SECRET, "HTTP_API_SECRET": API_SECRET},
        )
        await server.ready
        url = f"ws://127.0.0.1:{server.wsPort}/"
        good = mintToken(SECRET, "u1")
        expired = mintToken(SECRET, "u2", ttl=-100)
        forged = mintToken("f" * 40, "u3")
        client = await connect(f"{url}?token={good}")
        await client.request("auth", token=good)
        await client.close()
        await (await connect(url, good)).close()
        for token in (expired, forged, "garbage-token-value"):
            with self.assertRaises(Closed):
                await connect(f"{url}?token={token}")
            with self.assertRaises(Closed):
                await connect(url, token)
        server.signal(signal.SIGTERM)
        self.assertEqual(await server.ended, 0)
        output = (server.stdout + server.stderr).decode()
        self.assertIn("refused", output)
        for secret in (good, expired, forged, "garbage-token-value", SECRET, API_SECRET):
            self.assertNotIn(secret, output)
