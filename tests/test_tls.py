"""
TLS on both listeners, with a throw-away PKI (C{trustme}): a root, an intermediate and
a server certificate for C{localhost}. Every client trusts the root only and checks the
hostname, as a browser does, so a client that connects proves the intermediate was
served.

Most tests put the listeners together themselves (the Autobahn factory and an HTTP site,
each wrapped by L{ServerTLS}); the last two classes go through the settings and
C{twist marketplace-ws}.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import treq
import trustme
from autobahn.twisted.websocket import connectWS
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from zope.interface import implementer

from marketplace_ws.auth import mintToken, verifierFromSettings
from marketplace_ws.client import Client, ClientFactory
from marketplace_ws.config import ConfigError, configFromOptions
from marketplace_ws.http import site
from marketplace_ws.http.health import Health
from marketplace_ws.protocol import MarketplaceFactory
from marketplace_ws.service import MarketplaceService
from marketplace_ws.tls import CERT_FLAG, KEY_FLAG, ServerTLS, TLSFileError, installReloadOnSIGHUP
from tests.test_twist import ServerTestMixin

SECRET = "tls-test-secret-of-at-least-32-bytes!"


# A throw-away PKI ------------------------------------------------------------------


class PKI:
    """
    A root, an intermediate, and the server's files in a directory of the test's:
    C{fullchain.pem} (certificate, then intermediate) and C{privkey.pem}, as certbot
    names them.
    """

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.root = trustme.CA()
        self.intermediate = self.root.create_child_ca()
        directory = Path(testCase.mktemp())
        directory.mkdir(parents=True)
        self.cert = directory / "fullchain.pem"
        self.key = directory / "privkey.pem"

    @property
    def trustRoot(self) -> Certificate:
        return Certificate.loadPEM(self.root.cert_pem.bytes())

    def issue(
        self,
        *names: str,
        chain: bool = True,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> trustme.LeafCert:
        """Issue a server certificate (a new key, a new serial) and write the files."""
        leaf = self.intermediate.issue_cert(
            *(names or ("localhost",)), not_before=not_before, not_after=not_after
        )
        pems = leaf.cert_chain_pems if chain else leaf.cert_chain_pems[:1]
        self.cert.write_bytes(b"".join(pem.bytes() for pem in pems))
        self.key.write_bytes(leaf.private_key_pem.bytes())
        return leaf


def serialOf(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


@contextmanager
def tlsLogs() -> Iterator[list[LogEvent]]:
    """The log events of L{marketplace_ws.tls} while the block runs."""
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "marketplace_ws.tls":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observe)


def text(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


# Listeners and clients --------------------------------------------------------------


class Listeners:
    """The WebSocket factory and an HTTP site with C{/health}, both behind C{tls}."""

    def __init__(self, testCase: TestCase, tls: ServerTLS) -> None:
        verifier = verifierFromSettings(
            secret=SECRET, publicKeyPEM=None, jwksURL=None, algorithms=["HS256"], reactor=reactor
        )
        self.factory = factory = MarketplaceFactory(verifier, reactor=reactor)
        health = Health(reactor.seconds, lambda: len(factory.connections))
        # What the service's listeners get: the factory and the site, wrapped.
        wrapped: list[Any] = [tls.wrap(factory), tls.wrap(site({b"health": health}, 4096))]
        self.ports: list[IListeningPort] = [
            reactor.listenTCP(0, each, interface="127.0.0.1") for each in wrapped
        ]
        testCase.addCleanup(self.stop)

    async def stop(self) -> None:
        for port in self.ports:
            await maybeDeferred(port.stopListening)
        self.factory.abortAll()

    @property
    def wsPort(self) -> int:
        return int(self.ports[0].getHost().port)  # type: ignore[attr-defined]

    @property
    def httpPort(self) -> int:
        return int(self.ports[1].getHost().port)  # type: ignore[attr-defined]


async def connectWSS(
    port: int, root: Certificate, user: str = "u1", hostname: str = "localhost"
) -> tuple[Client, ClientFactory]:
    """A welcomed wss:// connection from a client that trusts C{root} only."""
    factory = ClientFactory(
        f"wss://{hostname}:{port}/", {"Authorization": f"Bearer {mintToken(SECRET, user)}"}
    )
    connectWS(factory, contextFactory=optionsForClientTLS(hostname, trustRoot=root))
    welcome = await factory.welcome
    return Client(factory, welcome), factory


def peerSerial(factory: ClientFactory) -> int:
    assert factory.connection is not None
    transport: Any = factory.connection.transport
    return int(transport.getPeerCertificate().get_serial_number())


async def getHealth(port: int, root: Certificate) -> dict[str, Any]:
    """GET https://localhost:PORT/health as a browser would: the root only, the hostname checked."""
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=root))
    response = await treq.get(f"https://localhost:{port}/health", agent=agent)
    assert response.code == 200, response.code
    body: dict[str, Any] = json.loads(await response.content())
    return body


@implementer(IHandshakeListener)
class Handshake(Protocol):
    """A TLS client that only shakes hands: C{done} fires with the TLS transport."""

    def __init__(self) -> None:
        self.done: Deferred[Any] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.done.callback(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)
        self.lost.callback(None)


async def handshake(port: int, hostname: str, root: Certificate) -> tuple[int, str]:
    """
    The served certificate's serial and the protocol version, for a client that
    trusts C{root} and checks C{hostname}; the failure of the handshake otherwise.
    """
    endpoint = wrapClientTLS(
        optionsForClientTLS(hostname, trustRoot=root),
        TCP4ClientEndpoint(reactor, "127.0.0.1", port),
    )
    protocol = Handshake()
    await connectProtocol(endpoint, protocol)
    try:
        transport = await protocol.done
    except BaseException:
        await protocol.lost
        raise
    serial = int(transport.getPeerCertificate().get_serial_number())
    version = str(transport.getHandle().get_protocol_version_name())
    transport.loseConnection()
    await protocol.lost
    return serial, version


class Raw(Protocol):
    """Sends C{greeting} and collects every byte until the server closes."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.received = b""
        self.lost: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received[:1] == b"\x16" and len(self.received) >= 11:
            # A ServerHello has come: enough to know the version was accepted.
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(self.received)


def clientHello(version: int) -> bytes:
    """
    A minimal ClientHello offering at most C{version} (0x0302 is TLS 1.1), with ECDHE
    suites that TLS 1.1 and 1.2 share: what an old client sends. Built by hand, so the
    test does not depend on the local OpenSSL still being willing to speak TLS 1.1.
    """

    def extension(kind: int, body: bytes) -> bytes:
        return struct.pack("!HH", kind, len(body)) + body

    suites = [0xC009, 0xC00A, 0xC013, 0xC014, 0x002F, 0x0035]
    extensions = (
        extension(0x000A, struct.pack("!HH", 2, 0x0017))  # supported groups: P-256
        + extension(0x000B, b"\x01\x00")  # point formats: uncompressed
        # Signature algorithms (ignored by TLS 1.1): ECDSA and RSA with SHA-256.
        + extension(0x000D, struct.pack("!HHHH", 6, 0x0403, 0x0804, 0x0401))
    )
    body = (
        struct.pack("!H", version)
        + secrets.token_bytes(32)
        + b"\x00"  # no session id
        + struct.pack("!H", 2 * len(suites))
        + b"".join(struct.pack("!H", s) for s in suites)
        + b"\x01\x00"  # compression: none
        + struct.pack("!H", len(extensions))
        + extensions
    )
    handshakeMessage = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshakeMessage)) + handshakeMessage


async def sendRaw(port: int, greeting: bytes) -> bytes:
    protocol = Raw(greeting)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return await protocol.lost


async def waitFor(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("timed out waiting")


# The tests --------------------------------------------------------------------------


class ServingTests(TestCase):
    timeout = 30

    async def test_wssAndHttpsServeTheChain(self) -> None:
        """
        A client that trusts only the root and checks the hostname is welcomed over
        wss:// and gets /health over https://: the intermediate was served with the
        server's certificate.
        """
        pki = PKI(self)
        leaf = pki.issue()
        with tlsLogs() as events:
            tls = ServerTLS(pki.cert, pki.key)
        listeners = Listeners(self, tls)
        client, factory = await connectWSS(listeners.wsPort, pki.trustRoot)
        self.assertEqual(client.welcome["type"], "welcome")
        self.assertEqual(client.welcome["userId"], "u1")
        self.assertEqual(peerSerial(factory), serialOf(leaf))
        self.assertIsInstance(await client.request("ping"), dict)
        body = await getHealth(listeners.httpPort, pki.trustRoot)
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["connections"], 1)
        await client.close()
        logged = text(events)
        self.assertIn(f"{serialOf(leaf):x}", logged)
        self.assertIn("localhost", logged)
        self.assertIn("1 intermediate", logged)
        self.assertEqual([e for e in events if e["log_level"].name != "info"], [], logged)

    async def test_withoutTheChainBrowsersRefuse(self) -> None:
        """
        The same client refuses a server that sends its certificate alone (the
        intermediate is unknown to it), which is why the chain must be served; the
        server warns about it at start-up.
        """
        pki = PKI(self)
        pki.issue(chain=False)
        with tlsLogs() as events:
            tls = ServerTLS(pki.cert, pki.key)
        self.assertIn("no intermediate follows the certificate", text(events))
        listeners = Listeners(self, tls)
        with self.assertRaises(SSL.Error) as raised:
            await handshake(listeners.wsPort, "localhost", pki.trustRoot)
        self.assertIn("certificate verify failed", str(raised.exception))

    async def test_wrongHostnameRefused(self) -> None:
        """A client expecting another host name refuses the certificate."""
        pki = PKI(self)
        pki.issue("localhost")
        listeners = Listeners(self, ServerTLS(pki.cert, pki.key))
        with self.assertRaises(VerificationError):
            await handshake(listeners.wsPort, "ws.example.com", pki.trustRoot)
        with self.assertRaises(VerificationError):
            await handshake(listeners.httpPort, "ws.example.com", pki.trustRoot)

    async def test_tls12IsTheMinimum(self) -> None:
        """
        A client that offers at most TLS 1.1 gets a protocol_version alert; the same
        hello offering TLS 1.2 gets a TLS 1.2 ServerHello; a current client gets 1.3.
        """
        pki = PKI(self)
        pki.issue()
        tls = ServerTLS(pki.cert, pki.key)
        # OpenSSL's default security level refuses TLS 1.1 by itself today; the
        # context refuses it whatever the level (set_options(0) reads the options).
        options = tls.loaded.context.set_options(0)
        for old in (SSL.OP_NO_SSLv3, SSL.OP_NO_TLSv1, SSL.OP_NO_TLSv1_1):
            self.assertTrue(options & old)
        listeners = Listeners(self, tls)
        for port in (listeners.wsPort, listeners.httpPort):
            refused = await sendRaw(port, clientHello(0x0302))
            # Alert record: level fatal (2), description protocol_version (70).
            self.assertEqual(refused[:1], b"\x15", refused[:16].hex())
            self.assertEqual(refused[5:7], b"\x02\x46", refused[:16].hex())
            accepted = await sendRaw(port, clientHello(0x0303))
            # Handshake record, ServerHello (2), server_version 3.3.
            self.assertEqual(accepted[:1], b"\x16", accepted[:16].hex())
            self.assertEqual(accepted[5:6], b"\x02")
            self.assertEqual(accepted[9:11], b"\x03\x03")
            _, version = await handshake(port, "localhost", pki.trustRoot)
            self.assertEqual(version, "TLSv1.3")


class ReloadTests(TestCase):
    timeout = 30

    async def test_reloadKeepsOpenConnections(self) -> None:
        """
        After the files are replaced and reloaded, a connection opened before goes on
        working on the old certificate; new connections, WebSocket and HTTP, get the
        new one.
        """
        pki = PKI(self)
        old = pki.issue()
        tls = ServerTLS(pki.cert, pki.key)
        listeners = Listeners(self, tls)
        client, factory = await connectWSS(listeners.wsPort, pki.trustRoot)
        new = pki.issue()
        self.assertNotEqual(serialOf(new), serialOf(old))
        with tlsLogs() as events:
            self.assertTrue(tls.reload())
        self.assertIn(f"{serialOf(new):x}", text(events))
        self.assertIsInstance(await client.request("ping"), dict)
        self.assertEqual(peerSerial(factory), serialOf(old))
        second, secondFactory = await connectWSS(listeners.wsPort, pki.trustRoot, "u2")
        self.assertEqual(peerSerial(secondFactory), serialOf(new))
        serial, _ = await handshake(listeners.httpPort, "localhost", pki.trustRoot)
        self.assertEqual(serial, serialOf(new))
        self.assertEqual((await getHealth(listeners.httpPort, pki.trustRoot))["connections"], 2)
        self.assertIsInstance(await client.request("ping"), dict)
        await client.close()
        await second.close()

    async def test_brokenFilesKeepTheCertificate(self) -> None:
        """
        A reload that cannot load the files (a key from another renewal, a truncated
        chain, a missing key) keeps serving the old certificate and logs one line
        naming the setting and the file, without any of the key.
        """
        pki = PKI(self)
        old = pki.issue()
        tls = ServerTLS(pki.cert, pki.key)
        listeners = Listeners(self, tls)
        client, factory = await connectWSS(listeners.wsPort, pki.trustRoot)
        other = pki.intermediate.issue_cert("localhost")
        goodChain = pki.cert.read_bytes()

        def otherKey() -> None:
            pki.key.write_bytes(other.private_key_pem.bytes())

        def truncatedChain() -> None:
            pki.cert.write_bytes(goodChain[: len(goodChain) // 3])

        def missingKey() -> None:
            pki.key.unlink()

        for breakFiles, setting, path in (
            (otherKey, "TLS_KEY", pki.key),
            (truncatedChain, "TLS_CERT", pki.cert),
            (missingKey, "TLS_KEY", pki.key),
        ):
            pki.issue()
            # The serial of the certificate just written: the one a reload must not serve.
            written = x509.load_pem_x509_certificate(pki.cert.read_bytes()).serial_number
            breakFiles()
            with tlsLogs() as events:
                self.assertFalse(tls.reload())
            self.assertEqual(len(events), 1, text(events))
            line = text(events)
            self.assertIn(setting, line)
            self.assertIn(str(path), line)
            self.assertIn(f"still serving certificate {serialOf(old):x}", line)
            self.assertNotIn(f"{written:x}", line)
            for leaf in (old, other):
                keyBody = leaf.private_key_pem.bytes().decode().splitlines()[1]
                self.assertNotIn(keyBody, line)
            serial, _ = await handshake(listeners.wsPort, "localhost", pki.trustRoot)
            self.assertEqual(serial, serialOf(old))
        self.assertIsInstance(await client.request("ping"), dict)
        self.assertEqual(peerSerial(factory), serialOf(old))
        await client.close()

    async def test_sighupReloadsInTheReactor(self) -> None:
        """
        SIGHUP calls the reload function in the reactor thread; uninstalling puts the
        previous handler back.
        """
        previous = signal.getsignal(signal.SIGHUP)
        called: Deferred[bool] = Deferred()
        uninstall = installReloadOnSIGHUP(
            reactor, lambda: called.callback(threadable.isInIOThread())
        )
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        self.assertIsNot(signal.getsignal(signal.SIGHUP), previous)
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertTrue(await called)
        uninstall()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)


class LoadingTests(SynchronousTestCase):
    """What start-up refuses, naming the setting and the file."""

    def refused(self, pki: PKI) -> TLSFileError:
        with tlsLogs() as events:
            error = self.assertRaises(TLSFileError, ServerTLS, pki.cert, pki.key)
        self.assertEqual(events, [])
        self.assertIn(str(error.path), str(error))
        self.assertNotIn("PRIVATE KEY-----\n", str(error))
        return error

    def test_missingFiles(self) -> None:
        pki = PKI(self)
        error = self.refused(pki)
        self.assertEqual((error.flag, error.env, error.path), (CERT_FLAG, "TLS_CERT", pki.cert))
        self.assertIn("cannot be read", error.problem)
        pki.issue()
        pki.key.unlink()
        error = self.refused(pki)
        self.assertEqual((error.flag, error.env, error.path), (KEY_FLAG, "TLS_KEY", pki.key))

    def test_notPEM(self) -> None:
        pki = PKI(self)
        leaf = pki.issue()
        der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER
        )
        pki.cert.write_bytes(der)
        error = self.refused(pki)
        self.assertEqual(error.flag, CERT_FLAG)
        self.assertIn("no PEM certificate", error.problem)
        pki.issue()
        pki.key.write_bytes(pki.cert.read_bytes())
        error = self.refused(pki)
        self.assertEqual(error.flag, KEY_FLAG)
        self.assertIn("no PEM private key", error.problem)

    def test_encryptedKey(self) -> None:
        pki = PKI(self)
        pki.issue()
        key = serialization.load_pem_private_key(pki.key.read_bytes(), None)
        pki.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        error = self.refused(pki)
        self.assertEqual(error.flag, KEY_FLAG)
        self.assertIn("encrypted", error.problem)

    def test_keyMismatch(self) -> None:
        pki = PKI(self)
        pki.issue()
        pki.key.write_bytes(pki.intermediate.issue_cert("localhost").private_key_pem.bytes())
        error = self.refused(pki)
        self.assertEqual(error.flag, KEY_FLAG)
        self.assertIn(f"not the private key of the first certificate in {pki.cert}", error.problem)

    def test_chainOutOfOrder(self) -> None:
        """The intermediate first and the server's certificate second: said as such."""
        pki = PKI(self)
        leaf = pki.issue()
        pki.cert.write_bytes(b"".join(pem.bytes() for pem in reversed(leaf.cert_chain_pems)))
        error = self.refused(pki)
        self.assertEqual(error.flag, CERT_FLAG)
        self.assertIn("the server's certificate is not first", error.problem)

    def test_expired(self) -> None:
        pki = PKI(self)
        now = datetime.now(UTC)
        pki.issue(not_before=now - timedelta(days=90), not_after=now - timedelta(days=1))
        error = self.refused(pki)
        self.assertEqual(error.flag, CERT_FLAG)
        self.assertIn("expired on", error.problem)

    def test_combinedFile(self) -> None:
        """One file with the key and the chain (HAProxy's form) serves as both."""
        pki = PKI(self)
        leaf = pki.issue()
        pki.cert.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
        tls = ServerTLS(pki.cert, pki.cert)
        self.assertEqual(tls.loaded.leaf.serial_number, serialOf(leaf))
        self.assertEqual(len(tls.loaded.chain), 1)

    def test_expiryWarning(self) -> None:
        """
        A certificate that expires within 14 days is served with a warning, at start-up
        and on reload; one further off is not warned about.
        """
        pki = PKI(self)
        now = datetime.now(UTC)
        pki.issue(not_before=now - timedelta(days=80), not_after=now + timedelta(days=5))
        with tlsLogs() as events:
            tls = ServerTLS(pki.cert, pki.key)
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 1, text(events))
        self.assertIn("renew it", formatEvent(warnings[0]))
        self.assertIn("in 5.0 days", formatEvent(warnings[0]))
        pki.issue(not_after=now + timedelta(days=90))
        with tlsLogs() as events:
            tls.reload()
        self.assertEqual([e for e in events if e["log_level"].name == "warn"], [])
        pki.issue(not_after=now + timedelta(days=13))
        with tlsLogs() as events:
            tls.reload()
        self.assertEqual(len([e for e in events if e["log_level"].name == "warn"]), 1)


# Through the settings (these need the service's wiring) -----------------------------


class SettingsTests(SynchronousTestCase):
    """C{TLS_CERT} and C{TLS_KEY} as the configuration and the service read them."""

    def options(self, pki: PKI, **more: str) -> dict[str, Any]:
        return {
            "ws-port": "0",
            "http-port": "0",
            "conformance": True,
            "jwt-secret": SECRET,
            "http-api-secret": SECRET,
            "tls-cert": str(pki.cert),
            "tls-key": str(pki.key),
            **more,
        }

    def test_environment(self) -> None:
        pki = PKI(self)
        config = configFromOptions({}, {"TLS_CERT": str(pki.cert), "TLS_KEY": str(pki.key)})
        assert config.tls is not None
        self.assertEqual((config.tls.certificate, config.tls.key), (pki.cert, pki.key))
        self.assertIsNone(configFromOptions({}, {}).tls)

    def test_bothRequired(self) -> None:
        pki = PKI(self)
        error = self.assertRaises(ConfigError, configFromOptions, {"tls-cert": str(pki.cert)}, {})
        self.assertTrue(str(error).startswith("TLS_KEY (--tls-key): "), str(error))
        error = self.assertRaises(ConfigError, configFromOptions, {"tls-key": str(pki.key)}, {})
        self.assertTrue(str(error).startswith("TLS_CERT (--tls-cert): "), str(error))

    def test_notWithAnSSLEndpoint(self) -> None:
        """An ssl: endpoint already has TLS: with TLS_CERT it would be TLS twice."""
        pki = PKI(self)
        pki.issue()
        options = self.options(pki)
        del options["ws-port"]
        options["ws-endpoint"] = f"ssl:0:privateKey={pki.key}:certKey={pki.cert}"
        error = self.assertRaises(ConfigError, configFromOptions, options, {})
        self.assertTrue(str(error).startswith("WS_ENDPOINT (--ws-endpoint): "), str(error))

    def test_unusableFileStopsStartUp(self) -> None:
        """A key that is not the certificate's stops start-up with one line naming TLS_KEY."""
        pki = PKI(self)
        pki.issue()
        pki.key.write_bytes(pki.intermediate.issue_cert("localhost").private_key_pem.bytes())
        config = configFromOptions(self.options(pki), {})
        error = self.assertRaises(ConfigError, MarketplaceService, config, reactor=reactor)
        self.assertEqual(
            str(error),
            f"TLS_KEY (--tls-key): {pki.key}: is not the private key of the first "
            f"certificate in {pki.cert}",
        )


class TwistTests(ServerTestMixin, TestCase):
    timeout = 60

    async def test_sighupReloadsWithoutDroppingConnections(self) -> None:
        """
        C{twist marketplace-ws} with C{TLS_CERT}/C{TLS_KEY} serves wss:// and https://;
        after the files are renewed, SIGHUP makes new connections get the new
        certificate while the open one carries on; a SIGHUP with a broken key changes
        nothing; SIGTERM still stops it cleanly.
        """
        pki = PKI(self)
        old = pki.issue()
        args = ["--ws-port", "0", "--http-port", "0", "--data-dir", self.mktemp()]
        env = {
            "JWT_SECRET": SECRET,
            "TLS_CERT": str(pki.cert.resolve()),
            "TLS_KEY": str(pki.key.resolve()),
        }
        server = self.startServer([*args, *self.databaseArgs()], env)
        await server.ready
        client, factory = await connectWSS(server.wsPort, pki.trustRoot)
        self.assertEqual(peerSerial(factory), serialOf(old))
        self.assertEqual((await getHealth(server.httpPort, pki.trustRoot))["status"], "ok")

        new = pki.issue()
        server.signal(signal.SIGHUP)
        await waitFor(lambda: any(e.get("serial") == f"{serialOf(new):x}" for e in server.events))
        self.assertIsInstance(await client.request("ping"), dict)
        self.assertEqual(peerSerial(factory), serialOf(old))
        second, secondFactory = await connectWSS(server.wsPort, pki.trustRoot, "u2")
        self.assertEqual(peerSerial(secondFactory), serialOf(new))
        serial, _ = await handshake(server.httpPort, "localhost", pki.trustRoot)
        self.assertEqual(serial, serialOf(new))

        pki.key.write_bytes(b"not a key")
        server.signal(signal.SIGHUP)
        await waitFor(lambda: "TLS reload failed" in server.logText())
        serial, _ = await handshake(server.wsPort, "localhost", pki.trustRoot)
        self.assertEqual(serial, serialOf(new))
        self.assertIsInstance(await second.request("ping"), dict)

        server.signal(signal.SIGTERM)
        self.assertEqual(await server.ended, 0)
        self.assertEqual((await client.closed)[0], 1001)
        self.assertEqual((await second.closed)[0], 1001)
