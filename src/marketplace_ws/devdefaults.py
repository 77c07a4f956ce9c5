"""
What development mode supplies when a setting is missing: secrets generated once into
the data directory, and an embedded PostgreSQL from the C{pgserver} package.

Production never reaches this module: L{marketplace_ws.config} refuses missing secrets
and a missing C{DATABASE_URL} there. Both helpers run before the reactor starts (file
writes and C{pg_ctl start}), so they may block.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

from attrs import frozen

SECRETS_FILE = "secrets.json"


@frozen
class DevSecrets:
    path: Path
    created: bool
    jwtSecret: str
    httpApiSecret: str


def devSecrets(dataDir: Path) -> DevSecrets:
    """
    Read the development secrets, generating them on first use.

    The file is created with mode 0600 atomically (C{O_EXCL}), so two processes
    starting at once agree on one pair of secrets, and it is never group- or
    world-readable, even for an instant.
    """
    dataDir.mkdir(parents=True, exist_ok=True)
    path = dataDir / SECRETS_FILE
    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        values = {
            "JWT_SECRET": secrets.token_urlsafe(48),
            "HTTP_API_SECRET": secrets.token_urlsafe(48),
        }
        with os.fdopen(fd, "w") as f:
            json.dump(values, f, indent=2)
            f.write("\n")
        created = True
    loaded: dict[str, Any] = json.loads(path.read_text())
    return DevSecrets(
        path=path,
        created=created,
        jwtSecret=str(loaded["JWT_SECRET"]),
        httpApiSecret=str(loaded["HTTP_API_SECRET"]),
    )


class EmbeddedUnavailable(Exception):
    """The C{embedded} extra is not installed, or its server failed to start."""


def startEmbeddedPostgres(dataDir: Path) -> tuple[str, Any]:
    """
    Start (or join) the embedded PostgreSQL in C{dataDir/postgres}.

    @return: its URL and the server object, whose C{cleanup()} stops it.
    """
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): noise
            # on the first line an operator reads.
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError:
        raise EmbeddedUnavailable(
            "is not set and the embedded PostgreSQL is not installed: "
            "pip install 'marketplace-ws[embedded]', or set DATABASE_URL"
        ) from None
    pgdata = (dataDir / "postgres").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as e:  # noqa: BLE001 - pgserver raises plain exceptions
        raise EmbeddedUnavailable(
            f"is not set and the embedded PostgreSQL in {pgdata} failed to start: {e}"
        ) from None
    return str(server.get_uri()), server
