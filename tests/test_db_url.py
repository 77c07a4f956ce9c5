"""
Tests for marketplace_ws.db.url: DATABASE_URL as libpq, Prisma and operators write it.
"""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg2.extensions import parse_dsn
from twisted.trial.unittest import SynchronousTestCase

from marketplace_ws.db.url import DatabaseURL, DatabaseURLError, parse_database_url


class ParseTests(SynchronousTestCase):
    def test_plain(self) -> None:
        url = parse_database_url("postgresql://alice:secret@db.example.com:5433/shop")
        self.assertEqual(
            (url.host, url.port, url.user, url.password, url.dbname),
            ("db.example.com", 5433, "alice", "secret", "shop"),
        )
        self.assertEqual(
            parse_dsn(url.dsn()),
            {
                "host": "db.example.com",
                "port": "5433",
                "user": "alice",
                "password": "secret",
                "dbname": "shop",
            },
        )
        self.assertEqual(url.options, {})
        self.assertEqual((url.schema, url.connection_limit, url.pgbouncer), (None, None, False))

    def test_postgres_scheme(self) -> None:
        url = parse_database_url("postgres://bob@localhost/app")
        self.assertEqual(
            (url.host, url.port, url.user, url.password, url.dbname),
            ("localhost", None, "bob", None, "app"),
        )
        self.assertEqual(
            parse_dsn(url.dsn()), {"host": "localhost", "user": "bob", "dbname": "app"}
        )

    def test_prisma(self) -> None:
        """
        Prisma's parameters are interpreted and kept away from libpq; libpq's stay.
        """
        url = parse_database_url(
            "postgresql://u:p%40ss@h:6543/db?schema=public&connection_limit=5&pgbouncer=true"
            "&sslmode=require&pool_timeout=10&socket_timeout=5&statement_cache_size=0"
            "&connect_timeout=7"
        )
        self.assertEqual((url.user, url.password, url.host, url.port), ("u", "p@ss", "h", 6543))
        self.assertEqual((url.schema, url.connection_limit, url.pgbouncer), ("public", 5, True))
        self.assertEqual(
            parse_dsn(url.dsn()),
            {
                "host": "h",
                "port": "6543",
                "dbname": "db",
                "user": "u",
                "password": "p@ss",
                "sslmode": "require",
                "connect_timeout": "7",
            },
        )
        self.assertEqual(url.ignored, ())

    def test_unknown_parameters_dropped(self) -> None:
        url = parse_database_url(
            "postgresql://h/db?foo=bar&application_name=shop&sslmode=verify-full"
            "&sslrootcert=/etc/ssl/root.crt&options=-c%20work_mem%3D64MB"
        )
        self.assertEqual(
            dict(url.options),
            {
                "application_name": "shop",
                "sslmode": "verify-full",
                "sslrootcert": "/etc/ssl/root.crt",
                "options": "-c work_mem=64MB",
            },
        )
        self.assertEqual(url.ignored, ("foo",))
        self.assertNotIn("foo", url.dsn())

    def test_node_postgres_no_verify(self) -> None:
        """node-postgres' sslmode=no-verify is libpq's require."""
        url = parse_database_url("postgresql://h/db?sslmode=no-verify")
        self.assertEqual(url.options["sslmode"], "require")

    def test_socket_query_host(self) -> None:
        """pgserver's URL: an empty password and the socket directory as ?host=."""
        url = parse_database_url("postgresql://postgres:@/postgres?host=/tmp/pg%20dir")
        self.assertEqual(
            (url.host, url.user, url.password, url.dbname),
            ("/tmp/pg dir", "postgres", "", "postgres"),
        )
        self.assertEqual(parse_dsn(url.dsn())["host"], "/tmp/pg dir")
        self.assertEqual(url.where(), "/tmp/pg dir/.s.PGSQL.5432")

    def test_socket_percent_encoded_host(self) -> None:
        url = parse_database_url("postgresql://%2Fvar%2Frun%2Fpostgresql:5433/app")
        self.assertEqual((url.host, url.port), ("/var/run/postgresql", 5433))
        self.assertEqual(url.where(), "/var/run/postgresql/.s.PGSQL.5433")

    def test_ipv6(self) -> None:
        url = parse_database_url("postgresql://u:pw@[::1]:5433/db")
        self.assertEqual((url.host, url.port), ("::1", 5433))
        self.assertEqual(parse_dsn(url.dsn())["host"], "::1")
        self.assertEqual(url.where(), "[::1]:5433")
        self.assertEqual(url.redacted(), "postgresql://u:***@[::1]:5433/db")

    def test_query_overrides(self) -> None:
        """libpq lets the query string set what the URL's parts set."""
        url = parse_database_url("postgresql://h/db?port=6000&user=u&password=pw&dbname=other")
        self.assertEqual((url.port, url.user, url.password, url.dbname), (6000, "u", "pw", "other"))
        self.assertNotIn("pw", url.redacted())

    def test_dsn_quoting(self) -> None:
        password = "it's a \\ secret="
        url = parse_database_url(f"postgresql://u:{quote(password, safe='')}@h/d b")
        self.assertEqual(parse_dsn(url.dsn())["password"], password)
        self.assertEqual(parse_dsn(url.dsn())["dbname"], "d b")

    def test_unencoded_slash_in_password(self) -> None:
        """The user info runs to the last @, so a raw / in the password still parses."""
        url = parse_database_url("postgresql://u:pa/ss@h/db")
        self.assertEqual((url.password, url.host, url.dbname), ("pa/ss", "h", "db"))

    def test_where(self) -> None:
        self.assertEqual(
            parse_database_url("postgresql://u:pw@127.0.0.1/db").where(), "127.0.0.1:5432"
        )
        self.assertEqual(
            parse_database_url("postgresql://db.internal:6432").where(), "db.internal:6432"
        )
        self.assertEqual(parse_database_url("postgresql:///db").where(), "localhost:5432")

    def test_redacted(self) -> None:
        url = parse_database_url(
            "postgresql://u:s3cret@h:6543/db?sslmode=require&schema=public&sslpassword=keypw&foo=1"
        )
        self.assertEqual(
            url.redacted(),
            "postgresql://u:***@h:6543/db?sslmode=require&sslpassword=***&schema=public",
        )
        self.assertEqual(parse_database_url("postgresql://h/db").redacted(), "postgresql://h/db")

    def test_repr_hides_secrets(self) -> None:
        url = parse_database_url("postgresql://u:s3cret@h/db?sslpassword=keypw")
        self.assertNotIn("s3cret", repr(url))
        self.assertNotIn("keypw", repr(url))

    def test_constructed(self) -> None:
        """DatabaseURL can be built directly, e.g. by the embedded-server code."""
        url = DatabaseURL(
            host="/tmp/s", user="postgres", dbname="postgres", options={"sslmode": "disable"}
        )
        self.assertEqual(
            parse_dsn(url.dsn()),
            {"host": "/tmp/s", "user": "postgres", "dbname": "postgres", "sslmode": "disable"},
        )


class ErrorTests(SynchronousTestCase):
    def assertRejected(self, text: str, *expected: str) -> str:
        with self.assertRaises(DatabaseURLError) as caught:
            parse_database_url(text)
        message = str(caught.exception)
        for part in expected:
            self.assertIn(part, message)
        self.assertNotIn("s3cret", message)
        return message

    def test_bad_scheme(self) -> None:
        self.assertRejected("mysql://u:s3cret@h/db", "postgresql://", "'mysql'")
        self.assertRejected("u:s3cret@h/db", "postgresql://")

    def test_bad_port(self) -> None:
        self.assertRejected("postgresql://u:s3cret@h:99999/db", "99999", "1-65535")
        self.assertRejected("postgresql://u:s3cret@h:0/db", "port 0")
        self.assertRejected("postgresql://u:s3cret@h:abc/db", "port is not a number")
        self.assertRejected("postgresql://u:s3cret@h/db?port=x", "port is not a number")

    def test_password_with_unencoded_question_mark(self) -> None:
        """Part of such a password lands where the port goes; it is not echoed."""
        self.assertRejected("postgresql://u:s3cret?x@h/db", "percent-encode")

    def test_bad_sslmode(self) -> None:
        self.assertRejected("postgresql://u:s3cret@h/db?sslmode=on", "sslmode='on'", "verify-full")

    def test_bad_connection_limit(self) -> None:
        self.assertRejected("postgresql://u:s3cret@h/db?connection_limit=0", "connection_limit")

    def test_several_hosts(self) -> None:
        self.assertRejected("postgresql://u:s3cret@h1,h2/db", "several hosts")

    def test_bad_ipv6(self) -> None:
        self.assertRejected("postgresql://u:s3cret@[::1/db", "']'")


passwords = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=40
)
ERROR_TEMPLATES = (
    "mysql://u:{}@h/db",
    "postgresql://u:{}@h:99999/db",
    "postgresql://u:{}@h:12ab/db",
    "postgresql://u:{}@h/db?sslmode=bogus",
    "postgresql://u:{}@h/db?connection_limit=-1",
)


class PasswordNeverShownTests(SynchronousTestCase):
    """
    Whatever the password, nothing meant for a log line shows it: what is shown is the
    same as for any other password.
    """

    @settings(derandomize=True, max_examples=200)
    @given(passwords)
    def test_parsed(self, password: str) -> None:
        template = "postgresql://user:{}@db.example.com:5433/app?sslmode=require"
        url = parse_database_url(template.format(quote(password, safe="")))
        other = parse_database_url(template.format("placeholder"))
        self.assertEqual(url.password, password)
        self.assertEqual(parse_dsn(url.dsn())["password"], password)
        for shown, baseline in [
            (url.redacted(), other.redacted()),
            (url.where(), other.where()),
            (repr(url), repr(other)),
        ]:
            self.assertEqual(shown, baseline)
            if password not in baseline:
                self.assertNotIn(password, shown)

    @settings(derandomize=True, max_examples=200)
    @given(passwords, st.sampled_from(ERROR_TEMPLATES))
    def test_errors(self, password: str, template: str) -> None:
        messages = []
        for candidate in (quote(password, safe=""), "placeholder"):
            with self.assertRaises(DatabaseURLError) as caught:
                parse_database_url(template.format(candidate))
            messages.append(str(caught.exception))
        self.assertEqual(messages[0], messages[1])
        if password not in messages[1]:
            self.assertNotIn(password, messages[0])
