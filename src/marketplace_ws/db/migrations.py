"""
Schema migrations: the numbered plain-SQL files in ``db/sql/`` (``NNNN_name.sql``),
shipped as package data and recorded in ``<schema>.schema_migrations``.

Each file runs in its own transaction that first takes a transaction-level advisory lock
for the schema, so two processes started with ``--migrate`` never migrate at once: the
second waits, then finds the version recorded and skips it. A transaction-level lock (not
a session lock) also works through PgBouncer's transaction pooling. The files do not name
the schema: ``search_path`` points at it inside the transaction, so the schema's name is
a setting.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib.resources import files

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .pool import Cursor, Database, check_schema_name

__all__ = ["Migration", "migrate", "migrations", "pending"]

log = Logger()

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@frozen
class Migration:
    version: str
    name: str
    sql: str = field(repr=False)


@functools.cache
def migrations() -> tuple[Migration, ...]:
    """The migrations shipped in the package, in version order."""
    found = []
    for entry in (files(__package__) / "sql").iterdir():
        match = _FILE_NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(match[1], match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migration files share a version number: {versions}")
    return tuple(found)


def _lock_key(schema: str) -> int:
    """A stable 64-bit advisory-lock key per schema (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"marketplace_ws migrate {schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def pending(db: Database, schema: str = "marketplace_ws") -> Deferred[list[str]]:
    """The versions not yet applied to ``schema``."""
    check_schema_name(schema)

    async def versions() -> list[str]:
        return [m.version for m in await _pending(db, schema)]

    return Deferred.fromCoroutine(versions())


async def _pending(db: Database, schema: str) -> list[Migration]:
    table = f'"{schema}".schema_migrations'
    [(exists,)] = await db.query(
        "migrations.exists", "SELECT to_regclass(%s) IS NOT NULL", (table,)
    )
    applied: set[str] = set()
    if exists:
        applied = {
            v for (v,) in await db.query("migrations.applied", f"SELECT version FROM {table}")
        }
    return [m for m in migrations() if m.version not in applied]


def migrate(db: Database, schema: str = "marketplace_ws") -> Deferred[list[str]]:
    """
    Apply the pending migrations to ``schema`` (created if missing), each in its own
    transaction, and fire with the versions this call applied.
    """
    check_schema_name(schema)
    return Deferred.fromCoroutine(_migrate(db, schema))


async def _migrate(db: Database, schema: str) -> list[str]:
    applied = []
    for migration in await _pending(db, schema):
        apply = functools.partial(_apply, migration=migration, schema=schema)
        if await db.transaction("migrations.apply", apply):
            log.info(
                "Applied migration {version} ({name}) to schema {schema}",
                version=migration.version,
                name=migration.name,
                schema=schema,
            )
            applied.append(migration.version)
    return applied


async def _apply(cursor: Cursor, migration: Migration, schema: str) -> bool:
    """Apply one migration unless another process did first; True if applied here."""
    # No statement_timeout: waiting for the lock, or a slow index build, is expected.
    await cursor.execute(
        "SET LOCAL statement_timeout = 0; SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),)
    )
    # CREATE SCHEMA IF NOT EXISTS needs the CREATE privilege even when the schema exists.
    await cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
    if not cursor.fetchall():
        await cursor.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await cursor.execute(
        f'SET LOCAL search_path = "{schema}", public;'
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version text PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    await cursor.execute("SELECT 1 FROM schema_migrations WHERE version = %s", (migration.version,))
    if cursor.fetchall():
        return False
    await cursor.execute(migration.sql)
    await cursor.execute(
        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
        (migration.version, migration.name),
    )
    return True
