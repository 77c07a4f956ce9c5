"""
Settings: flag over environment over default, and one clear line for each bad value.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from marketplace_ws.config import MIN_SECRET_BYTES, SETTINGS, ConfigError, configFromOptions
from marketplace_ws.devdefaults import devSecrets
from marketplace_ws.tap import Options

GOOD_SECRET = "x" * MIN_SECRET_BYTES


def config(options: dict[str, Any] | None = None, **env: str) -> Any:
    return configFromOptions(options or {}, env)


class PrecedenceTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        c = config()
        self.assertEqual(c.wsEndpoint, "tcp:8080")
        self.assertEqual(c.httpEndpoint, "tcp:8081")
        self.assertIsNone(c.databaseURL)
        self.assertTrue(c.migrate, "the embedded database is always migrated")
        self.assertFalse(c.production)
        self.assertEqual(c.shutdownTimeout, 10)
        self.assertEqual(c.databaseSchema, "marketplace_ws")

    def test_environment(self) -> None:
        c = config(WS_PORT="9000", HTTP_PORT="9001", SHUTDOWN_TIMEOUT="3")
        self.assertEqual((c.wsEndpoint, c.httpEndpoint), ("tcp:9000", "tcp:9001"))
        self.assertEqual(c.shutdownTimeout, 3)

    def test_flagWins(self) -> None:
        c = config({"ws-port": "7000"}, WS_PORT="9000", WS_ENDPOINT="tcp:9100")
        self.assertEqual(c.wsEndpoint, "tcp:7000")
        self.assertEqual(c.wsSource, "WS_PORT (--ws-port)")

    def test_endpointString(self) -> None:
        c = config(WS_ENDPOINT="tcp:8443:interface=127.0.0.1")
        self.assertEqual(c.wsEndpoint, "tcp:8443:interface=127.0.0.1")
        self.assertEqual(c.wsSource, "WS_ENDPOINT (--ws-endpoint)")

    def test_parsedOptions(self) -> None:
        """The real Options class feeds the same function."""
        options = Options()
        options.parseOptions(
            [
                "--ws-port",
                "1234",
                "--production",
                "--database-url",
                "postgresql://u@h/db",
                "--jwt-secret",
                GOOD_SECRET,
                "--http-api-secret",
                GOOD_SECRET,
            ]
        )
        c = configFromOptions(options, {})
        self.assertEqual(c.wsEndpoint, "tcp:1234")
        self.assertTrue(c.production)

    def test_prismaConnectionLimitCapsPool(self) -> None:
        c = config(
            DATABASE_URL="postgresql://u:p@h:5432/db?schema=public&connection_limit=2",
            DATABASE_POOL_SIZE="8",
        )
        self.assertEqual(c.databasePoolSize, 2)

    def test_secretsNotInRepr(self) -> None:
        c = config(JWT_SECRET=GOOD_SECRET, HTTP_API_SECRET="y" * 40)
        self.assertNotIn(GOOD_SECRET, repr(c))
        self.assertNotIn("y" * 40, repr(c))


class ErrorTests(SynchronousTestCase):
    def assertRefused(self, setting: str, options: dict[str, Any] | None = None, **env: str) -> str:
        with self.assertRaises(ConfigError) as raised:
            config(options, **env)
        message = str(raised.exception)
        self.assertTrue(message.startswith(setting), message)
        self.assertNotIn("\n", message)
        return message

    def test_badPort(self) -> None:
        self.assertRefused("WS_PORT", WS_PORT="http")
        self.assertRefused("HTTP_PORT", HTTP_PORT="70000")

    def test_portAndEndpointFlags(self) -> None:
        self.assertRefused("WS_ENDPOINT", {"ws-port": "1", "ws-endpoint": "tcp:2"})

    def test_badEndpoint(self) -> None:
        self.assertRefused("HTTP_ENDPOINT", HTTP_ENDPOINT="carrier-pigeon:80")

    def test_productionRequirements(self) -> None:
        url = "postgresql://u:p@h/db"
        self.assertRefused(
            "DATABASE_URL",
            MARKETPLACE_WS_ENV="production",
            JWT_SECRET=GOOD_SECRET,
            HTTP_API_SECRET=GOOD_SECRET,
        )
        self.assertRefused(
            "JWT_SECRET",
            MARKETPLACE_WS_ENV="production",
            DATABASE_URL=url,
            HTTP_API_SECRET=GOOD_SECRET,
        )
        self.assertRefused(
            "HTTP_API_SECRET",
            MARKETPLACE_WS_ENV="production",
            DATABASE_URL=url,
            JWT_SECRET=GOOD_SECRET,
        )
        message = self.assertRefused(
            "JWT_SECRET",
            MARKETPLACE_WS_ENV="production",
            DATABASE_URL=url,
            JWT_SECRET="tooshort",
            HTTP_API_SECRET=GOOD_SECRET,
        )
        self.assertNotIn("tooshort", message)
        ok = config(
            MARKETPLACE_WS_ENV="production",
            DATABASE_URL=url,
            JWT_SECRET=GOOD_SECRET,
            HTTP_API_SECRET=GOOD_SECRET,
        )
        self.assertTrue(ok.production)

    def test_badEnvironmentName(self) -> None:
        self.assertRefused("MARKETPLACE_WS_ENV", MARKETPLACE_WS_ENV="staging-ish")

    def test_badDatabaseURL(self) -> None:
        message = self.assertRefused("DATABASE_URL", DATABASE_URL="mysql://u:topsecret@h/db")
        self.assertNotIn("topsecret", message)

    def test_badRedisURL(self) -> None:
        for url in (
            "http://u:topsecret@h:6379",
            "redis://:topsecret@h:port/0",
            "redis://:topsecret@h/zero",
            "redis:///0",
        ):
            message = self.assertRefused("REDIS_URL", REDIS_URL=url)
            self.assertNotIn("topsecret", message)

    def test_redisURL(self) -> None:
        url = "rediss://default:topsecret@cache.internal:6380/2"
        c = config(REDIS_URL=url)
        self.assertEqual(c.redisURL, url)
        self.assertNotIn("topsecret", repr(c))
        self.assertIsNone(config().redisURL)

    def test_badSchema(self) -> None:
        self.assertRefused("DATABASE_SCHEMA", DATABASE_SCHEMA='x"; drop table y')

    def test_badAlgorithm(self) -> None:
        self.assertRefused("JWT_ALGORITHMS", JWT_ALGORITHMS="none")

    def test_badNumbers(self) -> None:
        self.assertRefused("SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT="soon")
        self.assertRefused("DATABASE_POOL_SIZE", DATABASE_POOL_SIZE="0")

    @given(
        st.sampled_from([s for s in SETTINGS if not s.boolean]), st.text(min_size=1, max_size=30)
    )
    def test_anyValueAnswersCleanly(self, setting: Any, value: str) -> None:
        """Whatever is put in any variable, the answer is a Config or a ConfigError."""
        try:
            config(None, **{setting.env: value})
        except ConfigError as e:
            self.assertNotIn("\n", str(e))


class DevSecretsTests(SynchronousTestCase):
    def test_generatedOnceMode0600(self) -> None:
        from pathlib import Path

        data = Path(self.mktemp())
        first = devSecrets(data)
        self.assertTrue(first.created)
        self.assertEqual(stat.S_IMODE(os.stat(first.path).st_mode), 0o600)
        self.assertGreaterEqual(len(first.jwtSecret), MIN_SECRET_BYTES)
        second = devSecrets(data)
        self.assertFalse(second.created)
        self.assertEqual(second.jwtSecret, first.jwtSecret)
        self.assertEqual(second.httpApiSecret, first.httpApiSecret)


class DocumentationTests(SynchronousTestCase):
    def test_everySettingDocumented(self) -> None:
        """
        Every environment variable is in README.rst's table or in docs/protocol.rst,
        where an operator looks for it.
        """
        top = Path(__file__).parent.parent
        text = (top / "README.rst").read_text() + (top / "docs" / "protocol.rst").read_text()
        self.assertEqual([s.env for s in SETTINGS if s.env not in text], [])
