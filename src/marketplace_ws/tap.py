"""
C{twist marketplace-ws}: the command-line options and the service they make.

Flags come from the settings table in L{marketplace_ws.config}, so C{--help} shows
every setting with its environment variable and default.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from attrs import evolve
from twisted.logger import Logger
from twisted.python import usage

from marketplace_ws.config import Config, ConfigError, configFromOptions, optionsTables
from marketplace_ws.db import DatabaseURLError, parse_database_url
from marketplace_ws.devdefaults import EmbeddedUnavailable, devSecrets, startEmbeddedPostgres
from marketplace_ws.redact import installRedaction
from marketplace_ws.service import EX_CONFIG, MarketplaceService

_log = Logger()


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the marketplace-ws real-time server: authenticated WebSockets for browsers "
        "and an HTTP API for the Next.js backend. Every option can also be set with the "
        "environment variable shown; a flag wins over the environment."
    )
    optParameters, optFlags = optionsTables()


def refuse(line: str) -> NoReturn:
    """Stop start-up with one line naming what to fix."""
    sys.stderr.write(f"marketplace-ws: {line}\n")
    raise SystemExit(EX_CONFIG)


def makeService(options: Options | dict[str, Any]) -> MarketplaceService:
    from twisted.internet import reactor

    installRedaction()
    try:
        return serviceFor(configFromOptions(options), reactor, ownsProcess=True)
    except ConfigError as e:
        refuse(str(e))


def serviceFor(config: Config, reactor: Any, ownsProcess: bool = False) -> MarketplaceService:
    """
    Fill in what development mode supplies, then build the service.
    """
    return MarketplaceService(
        *developmentDefaults(config), reactor=reactor, ownsProcess=ownsProcess
    )


def developmentDefaults(config: Config) -> tuple[Config, Any]:
    """
    The config with generated secrets and the embedded database's URL filled in where
    they were missing, and the embedded server (or C{None}).
    """
    jwt, apiSecret = config.jwt, config.httpApiSecret
    if (jwt.secret is None and jwt.usesSecret) or apiSecret is None:
        generated = devSecrets(config.dataDir)
        if jwt.secret is None and jwt.usesSecret:
            jwt = evolve(jwt, secret=generated.jwtSecret)
        apiSecret = apiSecret or generated.httpApiSecret
        _log.warn(
            "development secrets {how} {path} (never use them in production)",
            how="generated into" if generated.created else "read from",
            path=str(generated.path.resolve()),
        )
    config = evolve(config, jwt=jwt, httpApiSecret=apiSecret)
    if config.databaseURL is not None or config.conformance:
        return config, None
    try:
        url, embedded = startEmbeddedPostgres(config.dataDir)
    except EmbeddedUnavailable as e:
        refuse(f"DATABASE_URL (--database-url): {e}")
    _log.warn("using the embedded PostgreSQL in {path}", path=str(config.dataDir / "postgres"))
    try:
        databaseURL = parse_database_url(url)
    except DatabaseURLError as e:
        refuse(f"DATABASE_URL (--database-url): the embedded server gave a bad URL: {e}")
    return evolve(config, databaseURL=databaseURL), embedded
