"""
Redis for the tests.

``shared_url()``
    The Redis every test may use (``MARKETPLACE_WS_TEST_REDIS_URL``, default
    ``redis://127.0.0.1:6379/0``). If it cannot be reached: with ``CI=true`` the tests
    fail, saying how to start it; otherwise a private server is started for the run (see
    below) when the ``redis-server`` binary is there, and the tests are skipped when it
    is not. Never restart the shared server.

``fresh_prefix(testcase, url)``
    A key prefix of the test's own (``mws-test:<random>:``); every key under it is
    deleted in the test's clean-up.

``RedisServer``
    A ``redis-server`` of the test's own on a free port, without persistence, that the
    test may stop, start again (same port), pause (SIGSTOP: it accepts connections and
    answers nothing) and resume; optionally with ``--requirepass`` or TLS (a CA and a
    certificate for ``localhost`` made for it). Stopped in clean-up. Only the process it
    started is ever signalled.

``SyncRedis``
    A few lines of blocking RESP client, for set-up and for looking at what the broker
    left in Redis: test scaffolding, not the reactor's path.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest
from urllib.parse import unquote, urlsplit

from twisted.trial.unittest import SynchronousTestCase

ENV = "MARKETPLACE_WS_TEST_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
START_HINT = "redis-server --daemonize yes (or: service redis-server start)"

_state: dict[str, Any] = {}


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``)."""


class SyncRedis:
    """One blocking connection: ``call("SET", "k", "v")``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        password: str | None = None,
        username: str | None = None,
        db: int = 0,
        tls: ssl.SSLContext | None = None,
        timeout: float = 5.0,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.file = sock.makefile("rb")
        if password is not None:
            self.call("AUTH", *([username] if username else []), password)
        if db:
            self.call("SELECT", str(db))

    @classmethod
    def fromURL(cls, url: str) -> SyncRedis:
        parts = urlsplit(url)
        password = unquote(parts.password) if parts.password else None
        username = unquote(parts.username) if parts.username else None
        db = int(parts.path.strip("/") or 0)
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or 6379,
            password=password,
            username=username,
            db=db,
        )

    def call(self, *args: str | bytes | int) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(out))
        return self._reply()

    def _reply(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)[:-2]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise ValueError(f"unexpected reply {line!r}")

    def keys(self, pattern: str) -> list[str]:
        """Every key matching, by SCAN (never KEYS on a shared server)."""
        found: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = self.call("SCAN", cursor, "MATCH", pattern, "COUNT", "1000")
            found.extend(batch)
            if cursor == "0":
                return sorted(set(found))

    def close(self) -> None:
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


def _reachable(url: str) -> bool:
    try:
        client = SyncRedis.fromURL(url)
    except OSError:
        return False
    try:
        return bool(client.call("PING") == "PONG")
    except (OSError, RedisReplyError):
        return False
    finally:
        client.close()


def shared_url() -> str:
    """The URL of the Redis every test may share (see the module's doc)."""
    if "url" in _state:
        return str(_state["url"])
    url = os.environ.get(ENV, DEFAULT_URL)
    if not _reachable(url):
        if os.environ.get("CI") == "true":
            raise RuntimeError(
                f"Cannot reach the test Redis at {urlsplit(url).hostname}:"
                f"{urlsplit(url).port or 6379}. Start it with: {START_HINT} (or set {ENV})"
            )
        if shutil.which("redis-server") is None:
            raise SkipTest(f"no Redis: set {ENV}, or install redis-server")
        server = RedisServer()
        server.start()
        atexit.register(server.stop)
        url = server.url
    _state["url"] = url
    return url


def fresh_prefix(testcase: SynchronousTestCase, url: str | None = None) -> str:
    """A key prefix for one test; its keys are deleted in clean-up."""
    url = url or shared_url()
    prefix = f"mws-test:{os.urandom(6).hex()}:"

    def clean() -> None:
        client = SyncRedis.fromURL(url)
        try:
            keys = client.keys(prefix + "*")
            for i in range(0, len(keys), 500):
                client.call("DEL", *keys[i : i + 500])
        finally:
            client.close()

    testcase.addCleanup(clean)
    return prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TLSFiles:
    """A CA and a certificate it signed for ``localhost`` (not 127.0.0.1), in a directory."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        caKey = ec.generate_private_key(ec.SECP256R1())
        caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mws test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(caName)
            .issuer_name(caName)
            .public_key(caKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(caKey, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(caName)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(caKey, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        self.ca = directory / "ca.pem"
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        self.ca.write_bytes(ca.public_bytes(pem))
        self.cert.write_bytes(cert.public_bytes(pem))
        self.key.write_bytes(
            key.private_bytes(
                pem,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


class RedisServer:
    """A private ``redis-server`` (see the module's doc)."""

    def __init__(self, *, password: str | None = None, tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SkipTest("redis-server is not installed")
        self.binary = binary
        self.password = password
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="mws-test-redis-"))
        self.tls = TLSFiles(self.directory) if tls else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """A URL for it: with the password, and ``rediss://localhost`` for TLS."""
        credentials = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{credentials}localhost:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        args = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.cert),
                "--tls-key-file",
                str(self.tls.key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        return args

    def client(self) -> SyncRedis:
        return SyncRedis(
            "localhost" if self.tls else "127.0.0.1",
            self.port,
            password=self.password,
            tls=self.tls.context() if self.tls else None,
        )

    def start(self) -> None:
        assert self.process is None, "already running"
        self.process = subprocess.Popen(
            self.arguments(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read() if self.process.stderr else b""
                log = self.directory / "redis.log"
                text = log.read_text() if log.exists() else ""
                self.process = None
                raise RuntimeError(f"redis-server exited: {stderr.decode()}{text[-2000:]}")
            try:
                client = self.client()
                try:
                    if client.call("PING") == "PONG":
                        return
                finally:
                    client.close()
            except (OSError, RedisReplyError, ssl.SSLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer within 10s")
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr is not None:
            process.stderr.close()

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def private_server(testcase: SynchronousTestCase, **kwargs: Any) -> RedisServer:
    """A started L{RedisServer}, stopped and deleted in the test's clean-up."""
    server = RedisServer(**kwargs)
    testcase.addCleanup(server.cleanup)
    server.start()
    return server
