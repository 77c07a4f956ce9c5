"""
C{marketplace-ws}: the operator's commands besides running the server.

- C{marketplace-ws token --sub USER}: mint a development token signed with the same
  secret the server uses (C{JWT_SECRET}, or the generated development secret).
- C{marketplace-ws migrate}: apply pending database migrations and exit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.python import usage

from marketplace_ws.auth import mintToken
from marketplace_ws.config import (
    BY_FLAG,
    ConfigError,
    databaseFromOptions,
    optionsTables,
    raw,
    settingsFor,
)

_DATABASE = settingsFor(("database-url", "database-schema", "data-dir", "production"))


class TokenOptions(usage.Options):
    synopsis = "--sub USER [--ttl SECONDS]"
    optParameters = [
        ["sub", None, None, "User id to put in the token's sub claim (required)."],
        ["ttl", None, 3600, "Seconds until the token expires.", int],
        ["algorithm", None, "HS256", "HS256, HS384 or HS512."],
    ] + optionsTables(settingsFor(("jwt-secret", "data-dir")))[0]

    def postOptions(self) -> None:
        if not self["sub"]:
            raise usage.UsageError("--sub is required")


class MigrateOptions(usage.Options):
    synopsis = "[--database-url URL] [--database-schema NAME]"
    optParameters, optFlags = optionsTables(_DATABASE)


class Options(usage.Options):
    synopsis = "marketplace-ws COMMAND [options]"
    subCommands = [
        ["token", None, TokenOptions, "Mint a development JWT for a user."],
        ["migrate", None, MigrateOptions, "Apply pending database migrations."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


def token(options: TokenOptions) -> None:
    from marketplace_ws.devdefaults import devSecrets

    secret = raw(BY_FLAG["jwt-secret"], options, os.environ)
    if secret is None:
        dataDir = Path(raw(BY_FLAG["data-dir"], options, os.environ) or ".marketplace-ws")
        secret = devSecrets(dataDir).jwtSecret
    print(mintToken(secret, options["sub"], ttl=options["ttl"], algorithm=options["algorithm"]))


def migrateCommand(options: MigrateOptions) -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from marketplace_ws.db import Database, DatabaseUnreachable, migrate, parse_database_url
    from marketplace_ws.devdefaults import startEmbeddedPostgres

    try:
        url, schema = databaseFromOptions(options, os.environ)
    except ConfigError as e:
        sys.exit(f"marketplace-ws: {e}")
    embedded = None
    if url is None:
        dataDir = Path(raw(BY_FLAG["data-dir"], options, os.environ) or ".marketplace-ws")
        uri, embedded = startEmbeddedPostgres(dataDir)
        url = parse_database_url(uri)

    async def run(reactor: Any) -> None:
        db = Database(url, size=1, schema=schema, reactor=reactor)
        try:
            await db.start()
        except DatabaseUnreachable as e:
            sys.exit(f"marketplace-ws: DATABASE_URL (--database-url): {e}")
        try:
            applied = await migrate(db, schema)
        finally:
            await db.close()
        if applied:
            print(f"applied {', '.join(applied)} to schema {schema}")
        else:
            print(f"schema {schema} is up to date")

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    finally:
        if embedded is not None:
            embedded.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else list(argv))
    except usage.UsageError as e:
        sys.exit(f"marketplace-ws: {e}\n\n{options}")
    if options.subCommand == "token":
        token(options.subOptions)
    elif options.subCommand == "migrate":
        migrateCommand(options.subOptions)


if __name__ == "__main__":
    main()
