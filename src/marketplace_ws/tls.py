"""
TLS for both listeners from a PEM certificate chain and key, reloaded without a restart.

Twisted's C{ssl:} endpoint reads its files once, so a certificate renewed every 60 to
90 days would need a restart, and a restart drops every open WebSocket. Here the
listeners' TLS wrapper asks L{ServerTLS} for each new connection's OpenSSL connection,
made on whichever context is current. L{ServerTLS.reload} builds a new context from
the files and swaps it in only if it loads; connections already open keep the context
they were made on, so a reload drops nothing, and a broken file changes nothing.

What no client would accept is refused, at start-up (as L{TLSFileError}, which names
the setting) and on reload (logged; the old certificate stays): a missing or unreadable
file, no PEM certificate or key, an encrypted key, a key that is not the certificate's,
an expired or not yet valid certificate. TLS 1.2 is the oldest version offered.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from types import FrameType
from typing import Any

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

_log = Logger()

#: The settings' flags: L{TLSFileError.flag} is one of them.
CERT_FLAG = "tls-cert"
KEY_FLAG = "tls-key"

#: A certificate this close to its expiry is warned about, at start-up and on reload:
#: two weeks leaves time to notice that renewal has stopped (certbot renews at 30 days).
EXPIRY_WARNING = 14 * 24 * 60 * 60.0

#: The oldest protocol offered; TLS 1.0 and 1.1 are deprecated by RFC 8996.
MINIMUM_VERSION = TLSVersion.TLSv1_2


class TLSFileError(Exception):
    """
    A certificate or key file that cannot be served.

    @ivar flag: the setting's flag, L{CERT_FLAG} or L{KEY_FLAG}.
    @ivar path: the file.
    @ivar problem: what is wrong, never what the file holds.

    C{str()} is C{"PATH: PROBLEM"}: the caller adds the setting's name.
    """

    def __init__(self, flag: str, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.flag = flag
        self.path = path
        self.problem = problem

    @property
    def env(self) -> str:
        """The setting's environment variable (C{TLS_CERT}, C{TLS_KEY})."""
        return self.flag.upper().replace("-", "_")


@frozen
class Loaded:
    """
    One certificate ready to serve: its context, and what is logged about it.

    @ivar leaf: the server's certificate.
    @ivar chain: the certificates sent after it (intermediates), in file order.
    """

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    context: SSL.Context
    path: Path

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"

    @property
    def expires(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def names(self) -> list[str]:
        """The subject alternative names (what clients check), else the subject."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return [self.leaf.subject.rfc4514_string()]
        return [str(name.value) for name in san.value]


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSFileError(flag, path, f"cannot be read: {e.strerror or e}") from None


def _certificates(path: Path, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSFileError(
            CERT_FLAG, path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSFileError(CERT_FLAG, path, "has a PEM certificate that cannot be parsed") from None


def _privateKey(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSFileError(
            KEY_FLAG,
            path,
            "is encrypted with a passphrase: give it unencrypted (openssl pkey -in KEY "
            "-out KEY.plain) and protect it with file permissions",
        ) from None
    except ValueError:
        raise TLSFileError(
            KEY_FLAG, path, "holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from None


def _publicBytes(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load(certificate: Path, key: Path, now: float | None = None) -> Loaded:
    """
    Read the chain and the key and build a server context for them.

    @param certificate: PEM: the server's certificate first, then its intermediates.
    @param key: PEM: the certificate's private key, unencrypted (may be the same file).
    @param now: the time to check validity at (seconds since the epoch).
    @raise TLSFileError: for anything that would make every handshake fail.
    """
    chain = _certificates(certificate, _read(CERT_FLAG, certificate))
    privateKey = _privateKey(key, _read(KEY_FLAG, key))
    leaf = chain[0]
    public = _publicBytes(privateKey.public_key())
    if public != _publicBytes(leaf.public_key()):
        # The usual causes: the files of two different renewals, or a chain file that
        # starts with the intermediate.
        if any(public == _publicBytes(c.public_key()) for c in chain[1:]):
            raise TLSFileError(
                CERT_FLAG,
                certificate,
                "the server's certificate is not first: put it first, then its chain",
            )
        raise TLSFileError(
            KEY_FLAG, key, f"is not the private key of the first certificate in {certificate}"
        )
    at = time.time() if now is None else now
    if leaf.not_valid_after_utc.timestamp() <= at:
        raise TLSFileError(
            CERT_FLAG, certificate, f"the certificate expired on {_day(leaf.not_valid_after_utc)}"
        )
    if leaf.not_valid_before_utc.timestamp() > at:
        raise TLSFileError(
            CERT_FLAG,
            certificate,
            f"the certificate is not valid until {leaf.not_valid_before_utc.isoformat()}"
            " (is the clock right?)",
        )
    try:
        options = CertificateOptions(
            privateKey=PKey.from_cryptography_key(privateKey),  # type: ignore[arg-type]
            certificate=X509.from_cryptography(leaf),
            extraCertChain=[X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=MINIMUM_VERSION,
        )
        # Built now, not at the first handshake, so that its errors surface here.
        context = options.getContext()
    except TypeError:
        raise TLSFileError(
            KEY_FLAG, key, f"is a {type(privateKey).__name__}, which TLS cannot use: use RSA or EC"
        ) from None
    except SSL.Error as e:
        raise TLSFileError(CERT_FLAG, certificate, f"OpenSSL refuses it: {_reason(e)}") from None
    return Loaded(leaf, tuple(chain[1:]), context, certificate)


def _reason(error: SSL.Error) -> str:
    """OpenSSL's reasons, without the library and function names."""
    reasons = [str(entry[-1]) for entry in error.args[0] if entry] if error.args else []
    return "; ".join(reasons) or "unknown error"


def _day(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _orderProblem(loaded: Loaded) -> str | None:
    """
    Why the chain may not verify, or C{None}: each certificate should be issued by the
    one after it. Browsers that have not cached an intermediate refuse a chain that
    lacks it, while the operator's own browser may well accept it.
    """
    certificates = [loaded.leaf, *loaded.chain]
    for child, parent in pairwise(certificates):
        if child.issuer != parent.subject:
            return f"{child.subject.rfc4514_string()} is not issued by the certificate after it"
    last = certificates[-1]
    if not loaded.chain and last.issuer != last.subject:
        return (
            "no intermediate follows the certificate: unless its issuer is a root that "
            "clients trust, serve the full chain (certbot's fullchain.pem)"
        )
    return None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The listeners' TLS: every new connection is made on the current certificate.

    @ivar loaded: what is being served now.
    """

    def __init__(
        self,
        certificate: Path | str,
        key: Path | str,
        *,
        now: Callable[[], float] = time.time,
        expiryWarning: float = EXPIRY_WARNING,
    ) -> None:
        """
        Load the files; log what is served.

        @raise TLSFileError: when the files cannot be served.
        """
        self.certificate = Path(certificate)
        self.key = Path(key)
        self._now = now
        self._expiryWarning = expiryWarning
        self.loaded = load(self.certificate, self.key, now())
        self._report()

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self.loaded.context, None)

    def wrap(self, factory: IProtocolFactory) -> TLSMemoryBIOFactory:
        """C{factory}'s connections, over TLS with this certificate."""
        return TLSMemoryBIOFactory(self, False, factory)

    def reload(self) -> bool:
        """
        Serve the files' current certificate to new connections, if it can be served;
        otherwise keep the one in use and log why, in one line.

        @return: whether the new certificate is now served.
        """
        try:
            loaded = load(self.certificate, self.key, self._now())
        except TLSFileError as e:
            _log.error(
                "TLS reload failed, still serving certificate {serial} (expires {expires}):"
                " {setting}: {problem}",
                serial=self.loaded.serial,
                expires=_day(self.loaded.expires),
                setting=e.env,
                problem=str(e),
            )
            return False
        self.loaded = loaded
        self._report()
        return True

    def _report(self) -> None:
        loaded = self.loaded
        _log.info(
            "TLS certificate {serial} for {names} loaded from {path}, with {intermediates}"
            " intermediate(s); expires {expires}",
            serial=loaded.serial,
            names=", ".join(loaded.names),
            path=str(loaded.path),
            intermediates=len(loaded.chain),
            expires=_day(loaded.expires),
        )
        problem = _orderProblem(loaded)
        if problem is not None:
            _log.warn("TLS_CERT {path}: {problem}", path=str(loaded.path), problem=problem)
        left = loaded.expires.timestamp() - self._now()
        if left < self._expiryWarning:
            _log.warn(
                "TLS certificate {serial} expires {expires}, in {days:.1f} days: renew it, "
                "then reload (SIGHUP)",
                serial=loaded.serial,
                expires=_day(loaded.expires),
                days=left / 86400,
            )


def installReloadOnSIGHUP(reactor: Any, reload: Callable[[], object]) -> Callable[[], None]:
    """
    Call C{reload} in the reactor on every SIGHUP (C{systemctl reload}, C{kill -HUP}).

    Only for a process whose signals are ours, under C{twist}: Twisted handles SIGINT,
    SIGTERM and SIGCHLD and leaves SIGHUP alone, so nothing of its own is replaced.
    Call it from the main thread.

    @return: a function that puts the previous handler back.
    """
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:  # Windows
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        # A Python signal handler runs between any two bytecodes of the main thread,
        # possibly inside the reactor's own bookkeeping: callFromThread is the one
        # reactor call made safe for that (Twisted's SIGINT handler uses it too), and
        # it wakes the reactor.
        reactor.callFromThread(reload)

    previous = signal.signal(sighup, handler)

    def uninstall() -> None:
        signal.signal(sighup, previous if previous is not None else signal.SIG_DFL)

    return uninstall
