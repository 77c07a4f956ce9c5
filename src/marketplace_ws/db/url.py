"""
Parse ``DATABASE_URL`` into what libpq accepts.

The URL usually comes from a Next.js app's ``.env``, written for Prisma: it carries
parameters libpq rejects with "invalid connection option" (``schema``,
``connection_limit``, ``pgbouncer``, ...). They are interpreted here or dropped, and only
libpq's own keywords reach the connection string. The password never appears in an error
message, a ``repr``, :meth:`DatabaseURL.where` or :meth:`DatabaseURL.redacted`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from urllib.parse import quote, unquote

from attrs import field, frozen

__all__ = ["DatabaseURL", "DatabaseURLError", "parse_database_url"]

DEFAULT_PORT = 5432

# libpq's connection keywords (libpq 17, the one psycopg2-binary bundles). ``replication``
# is left out on purpose: a replication connection cannot run ordinary queries.
LIBPQ_KEYWORDS = frozenset(
    """
    host hostaddr port dbname user password passfile require_auth channel_binding
    connect_timeout client_encoding options application_name fallback_application_name
    keepalives keepalives_idle keepalives_interval keepalives_count tcp_user_timeout
    gssencmode sslmode requiressl sslnegotiation sslcompression sslcert sslkey sslpassword
    sslcertmode sslrootcert sslcrl sslcrldir sslsni requirepeer ssl_min_protocol_version
    ssl_max_protocol_version krbsrvname gsslib gssdelegation service target_session_attrs
    load_balance_hosts
    """.split()
)

# Prisma's own parameters, interpreted into fields or dropped without comment.
PRISMA_PARAMETERS = frozenset(
    """
    schema connection_limit pool_timeout pgbouncer socket_timeout statement_cache_size
    sslidentity sslaccept max_connection_lifetime max_idle_connection_lifetime
    """.split()
)

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# node-postgres spells "encrypt, do not verify" as ``no-verify``; libpq calls it ``require``.
_SSLMODE_ALIASES = {"no-verify": "require"}

# Values that are secrets even though they are not the password.
_SECRET_OPTIONS = frozenset({"password", "sslpassword"})

_SCHEMES = ("postgresql", "postgres")
_PERCENT_HINT = "percent-encode special characters in the user name and password (@ is %40)"


class DatabaseURLError(ValueError):
    """
    ``DATABASE_URL`` cannot be used. The message names the problem, never the password.
    """


def _frozen_mapping(options: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(options))


def _options_repr(options: Mapping[str, str]) -> str:
    return repr({k: "***" if k in _SECRET_OPTIONS else v for k, v in options.items()})


@frozen
class DatabaseURL:
    """
    A parsed ``DATABASE_URL``: what to connect to (``host`` ... ``options``, all for
    libpq) and Prisma's settings that concern this server (``schema``,
    ``connection_limit``, ``pgbouncer``). ``ignored`` names the unknown parameters that
    were dropped (not Prisma's), so start-up can warn about a likely typo.

    ``pgbouncer`` says the URL goes through PgBouncer's transaction pooling, where a
    session does not last: LISTEN (the outbox) and per-connection settings
    (``search_path``, ``statement_timeout``) do not hold. This server wants a direct URL
    (Prisma's ``directUrl``).
    """

    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    dbname: str | None = None
    options: Mapping[str, str] = field(
        factory=dict, converter=_frozen_mapping, repr=_options_repr, hash=False
    )
    schema: str | None = None
    connection_limit: int | None = None
    pgbouncer: bool = False
    ignored: tuple[str, ...] = ()

    @property
    def is_socket(self) -> bool:
        """True when ``host`` is a Unix-socket directory."""
        return self.host is not None and self.host.startswith("/")

    def dsn(self) -> str:
        """
        A libpq keyword/value connection string, every value quoted, for psycopg2.
        """
        pairs: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
        }
        pairs.update(self.options)
        return " ".join(f"{k}={_quote(str(v))}" for k, v in pairs.items() if v is not None)

    def where(self) -> str:
        """
        Where the server is, for error lines: ``host:port``, ``[::1]:5432``, or the
        socket's path as libpq names it (``/run/postgresql/.s.PGSQL.5432``). Without a
        host it says ``localhost``, though libpq then tries its default socket (or
        ``PGHOST``).
        """
        port = self.port or DEFAULT_PORT
        if self.host is None:
            return f"localhost:{port}"
        if self.is_socket:
            return f"{self.host.rstrip('/')}/.s.PGSQL.{port}"
        if ":" in self.host:
            return f"[{self.host}]:{port}"
        return f"{self.host}:{port}"

    def redacted(self) -> str:
        """
        The URL with the password (and ``sslpassword``) shown as ``***``, fit for logs.
        Dropped parameters are not shown.
        """
        userinfo = ""
        if self.user is not None or self.password is not None:
            userinfo = quote(self.user or "", safe="")
            if self.password is not None:
                userinfo += ":***"
            userinfo += "@"
        host = ""
        params = dict(self.options)
        if self.is_socket:
            params = {"host": self.host or "", **params}
        elif self.host is not None:
            host = f"[{self.host}]" if ":" in self.host else quote(self.host, safe="")
        if self.port is not None:
            host += f":{self.port}"
        if self.schema is not None:
            params["schema"] = self.schema
        if self.connection_limit is not None:
            params["connection_limit"] = str(self.connection_limit)
        if self.pgbouncer:
            params["pgbouncer"] = "true"
        query = "&".join(
            f"{k}={'***' if k in _SECRET_OPTIONS else quote(v, safe='/')}"
            for k, v in params.items()
        )
        path = "/" + quote(self.dbname, safe="") if self.dbname is not None else ""
        return f"postgresql://{userinfo}{host}{path}" + (f"?{query}" if query else "")


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _port(text: str) -> int:
    # Never echo a non-numeric value: an unencoded "/" or "@" in the password makes part of
    # it land here.
    if not text.isdigit():
        raise DatabaseURLError(f"DATABASE_URL: the port is not a number; {_PERCENT_HINT}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise DatabaseURLError(f"DATABASE_URL: port {port} is outside 1-65535")
    return port


def _positive_int(name: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DatabaseURLError(f"DATABASE_URL: {name}={text!r} is not a whole number of 1 or more")
    return int(text)


def _split_host_port(hostport: str) -> tuple[str | None, int | None]:
    if hostport.startswith("["):
        end = hostport.find("]")
        if end == -1:
            raise DatabaseURLError("DATABASE_URL: an IPv6 address is missing its closing ']'")
        host, rest = hostport[1:end], hostport[end + 1 :]
        if rest and not rest.startswith(":"):
            raise DatabaseURLError(
                f"DATABASE_URL: unexpected text after the IPv6 address; {_PERCENT_HINT}"
            )
        return host, _port(rest[1:]) if rest else None
    host, colon, port = hostport.partition(":")
    return unquote(host) or None, _port(port) if colon else None


def parse_database_url(url: str) -> DatabaseURL:
    """
    Parse a ``postgres://`` or ``postgresql://`` URL.

    Accepts percent-encoded user names and passwords, ``[::1]`` hosts, a socket directory
    as the host (percent-encoded) or as ``?host=/path``, and Prisma's parameters. Raises
    :class:`DatabaseURLError` naming the problem.
    """
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        shown = scheme if sep and len(scheme) <= 20 else "(none)"
        raise DatabaseURLError(
            f"DATABASE_URL must start with postgresql:// or postgres://, not scheme {shown!r}"
        )
    rest = rest.partition("#")[0]
    # The user info ends at the last "@" before the query string, so a password with an
    # unencoded "/" still parses (libpq itself would stop at the "/").
    before_query, _, query = rest.partition("?")
    userinfo, at, hostpath = before_query.rpartition("@")
    if not at:
        userinfo, hostpath = "", before_query
    hostport, slash, path = hostpath.partition("/")

    user = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user) or None
        password = unquote(raw_password) if colon else None
    host, port = _split_host_port(hostport)
    dbname = unquote(path) if slash and path else None

    options: dict[str, str] = {}
    ignored: list[str] = []
    schema: str | None = None
    connection_limit: int | None = None
    pgbouncer = False
    for item in filter(None, query.split("&")):
        raw_key, _, raw_value = item.partition("=")
        # libpq only percent-decodes: "+" stays "+".
        key, value = unquote(raw_key), unquote(raw_value)
        if key == "host":
            host = value or None
        elif key == "port":
            port = _port(value)
        elif key == "dbname":
            dbname = value or None
        elif key == "user":
            user = value or None
        elif key == "password":
            password = value
        elif key == "sslmode":
            value = _SSLMODE_ALIASES.get(value, value)
            if value not in SSLMODES:
                raise DatabaseURLError(
                    f"DATABASE_URL: sslmode={value[:40]!r} is not one of {', '.join(SSLMODES)}"
                )
            options[key] = value
        elif key == "connect_timeout":
            options[key] = str(_positive_int(key, value))
        elif key in LIBPQ_KEYWORDS:
            options[key] = value
        elif key == "schema":
            schema = value or None
        elif key == "connection_limit":
            connection_limit = _positive_int(key, value)
        elif key == "pgbouncer":
            pgbouncer = value.lower() in ("true", "1", "yes", "on")
        elif key not in PRISMA_PARAMETERS:
            # Prisma's other knobs (pool_timeout, socket_timeout, ...) mean nothing to
            # libpq and are dropped quietly; anything else may be a typo, so it is named.
            ignored.append(key)
    if host is not None and "," in host:
        raise DatabaseURLError("DATABASE_URL: several hosts in one URL are not supported")
    return DatabaseURL(
        host=host,
        port=port,
        user=user,
        password=password,
        dbname=dbname,
        options=options,
        schema=schema,
        connection_limit=connection_limit,
        pgbouncer=pgbouncer,
        ignored=tuple(ignored),
    )
