"""
The database layer: ``DATABASE_URL`` parsing, the txpostgres pool, and migrations.
"""

from .migrations import migrate, pending
from .pool import (
    Cursor,
    Database,
    DatabaseUnavailable,
    DatabaseUnreachable,
    Listener,
    UnstorableValue,
    check_schema_name,
)
from .url import DatabaseURL, DatabaseURLError, parse_database_url

__all__ = [
    "Cursor",
    "Database",
    "DatabaseURL",
    "DatabaseURLError",
    "DatabaseUnavailable",
    "DatabaseUnreachable",
    "Listener",
    "UnstorableValue",
    "check_schema_name",
    "migrate",
    "parse_database_url",
    "pending",
]
