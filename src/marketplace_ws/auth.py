"""
Token verification: who is on the other end of a connection.

The verifier answers with a Deferred because keys may have to be fetched (a JWKS URL)
without blocking the reactor; with a shared HMAC secret or a PEM public key the answer
is immediate. The accepted algorithms always come from configuration, never from the
token's header, and each algorithm family has its own key source: an HS* token is only
ever checked against the shared secret, an RS*/ES*/PS*/EdDSA token only against a
public key, so a public key can never be used as an HMAC secret (key confusion).

Every rejection is a L{TokenRejected} with a short stable C{reason} (see L{REASONS})
for counting and logging; neither the reason, the message nor any log event ever
contains the token or a secret.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, TypeAlias

import jwt
from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import Interface, implementer

_log = Logger()

#: Every reason a token can be rejected for: stable words for metrics and logs.
#: C{keys_unavailable} means "we could not check", not "the token is bad": callers
#: answer it with C{unavailable}, every other reason with C{unauthorized}.
REASONS: Final = frozenset(
    {
        "malformed",
        "bad_algorithm",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "bad_audience",
        "bad_issuer",
        "missing_claim",
        "unknown_kid",
        "keys_unavailable",
    }
)

#: The algorithms a verifier can be configured with ("none" is never one of them).
SUPPORTED_ALGORITHMS: Final = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "PS384",
    "PS512",
    "EdDSA",
)

#: Longer tokens are refused before any decoding: real ones are well under 2 KiB.
MAX_TOKEN_LENGTH: Final = 16 * 1024

#: The largest time claim accepted: every integer up to it is exact as a float.
MAX_NUMERIC_DATE: Final = 2**53

_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

PublicKeyType: TypeAlias = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
#: What a key source hands to PyJWT: the HMAC secret's bytes, or a loaded public key.
Key: TypeAlias = bytes | PublicKeyType


class TokenRejected(Exception):
    """
    The token is not acceptable. C{reason} is a short stable word from L{REASONS} for
    metrics and logs; C{message} is short human text. Neither contains the token.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"TokenRejected({self.reason!r}, {self.message!r})"


@frozen
class Identity:
    """The verified holder of a token."""

    userId: str
    expiresAt: int | None
    #: All the token's claims, for features that need more than the user id.
    claims: Mapping[str, Any] = field(factory=dict, eq=False, repr=False)


def isSymmetric(algorithm: str) -> bool:
    return algorithm.startswith("HS")


def _keyFits(key: PublicKeyType, algorithm: str) -> bool:
    """
    Whether C{key} can verify C{algorithm}: RSA for RS*/PS*, the matching curve for
    ES*, an Edwards key for EdDSA.
    """
    if algorithm[:2] in ("RS", "PS"):
        return isinstance(key, RSAPublicKey)
    if algorithm in _EC_CURVES:
        return isinstance(key, EllipticCurvePublicKey) and key.curve.name == _EC_CURVES[algorithm]
    if algorithm == "EdDSA":
        return isinstance(key, Ed25519PublicKey | Ed448PublicKey)
    return False


def _keyKind(key: PublicKeyType) -> str:
    if isinstance(key, RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return "Edwards-curve"


class IKeySource(Interface):
    """
    Where the keys for one family of algorithms come from.
    """

    def handles(algorithm: str) -> bool:
        """
        Whether tokens signed with C{algorithm} are checked against this source's keys.
        An HMAC source never handles an asymmetric algorithm and vice versa.
        """

    def keyFor(header: Mapping[str, Any]) -> Deferred[Key]:
        """
        The key for a token with this (unverified) header, whose C{alg} is already
        known to be configured and handled by this source. Fails with
        L{TokenRejected} (C{bad_algorithm}, C{unknown_kid}, C{keys_unavailable}).
        """


@implementer(IKeySource)
class StaticSecret:
    """
    The shared secret of HS256/384/512 tokens (C{JWT_SECRET}).
    """

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        if not raw:
            raise ValueError("JWT_SECRET is empty; set it to 32 or more random bytes")
        try:
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(raw)
        except jwt.InvalidKeyError:
            # PyJWT's own guard against key confusion: say so at start-up, not per token.
            raise ValueError(
                "JWT_SECRET looks like a PEM/SSH public key; put a public key in "
                "JWT_PUBLIC_KEY_FILE and use RS*/ES* algorithms instead"
            ) from None
        self._secret = raw

    def __repr__(self) -> str:
        return "<StaticSecret>"

    def handles(self, algorithm: str) -> bool:
        return isSymmetric(algorithm)

    def keyFor(self, header: Mapping[str, Any]) -> Deferred[Key]:
        if not self.handles(header.get("alg", "")):
            return fail(TokenRejected("bad_algorithm", "algorithm does not fit the secret"))
        return succeed(self._secret)


def loadPublicKey(pem: bytes) -> PublicKeyType:
    """
    Load a PEM public key (SubjectPublicKeyInfo or PKCS#1) or the key of a PEM
    certificate. Raises L{ValueError} with a one-line explanation otherwise.
    """
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = load_pem_public_key(pem)
    except ValueError:
        try:
            load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            pass
        else:
            raise ValueError(
                "JWT_PUBLIC_KEY_FILE holds a private key; give it the public key only "
                "(openssl pkey -in key.pem -pubout)"
            ) from None
        raise ValueError(
            "JWT_PUBLIC_KEY_FILE is not a PEM public key or certificate "
            "(expected -----BEGIN PUBLIC KEY-----)"
        ) from None
    if not isinstance(
        key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
    ):
        raise ValueError(
            f"JWT_PUBLIC_KEY_FILE holds a {type(key).__name__}, which no JWT algorithm uses"
        )
    return key


@implementer(IKeySource)
class PublicKey:
    """
    One public key from a PEM file (C{JWT_PUBLIC_KEY_FILE}), loaded once.
    """

    def __init__(self, pem: bytes | str) -> None:
        self.key: PublicKeyType = loadPublicKey(pem.encode() if isinstance(pem, str) else pem)

    def __repr__(self) -> str:
        return f"<PublicKey {_keyKind(self.key)}>"

    def handles(self, algorithm: str) -> bool:
        return not isSymmetric(algorithm) and _keyFits(self.key, algorithm)

    def keyFor(self, header: Mapping[str, Any]) -> Deferred[Key]:
        if not self.handles(header.get("alg", "")):
            return fail(TokenRejected("bad_algorithm", "algorithm does not fit the public key"))
        return succeed(self.key)


class _BoundedBody(Protocol):
    """
    Collect a response body of at most C{limit} bytes; cancelling the Deferred (the
    fetch timed out) drops the connection instead of waiting for a stalled server.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(lambda d: self._abort())

    def _abort(self) -> None:
        # The body's transport is a producer proxy: stopping it drops the connection.
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._abort()
            if not self.done.called:
                self.done.errback(ValueError(f"response is larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _defaultReactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _defaultHTTPClient(reactor: Any) -> Any:
    import treq.client
    from twisted.web.client import Agent, HTTPConnectionPool

    # A fetch every few minutes gains nothing from keeping connections open.
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


def parseJWKS(document: bytes) -> dict[str | None, list[tuple[PublicKeyType, str | None]]]:
    """
    The usable signing keys of a JWKS document, by C{kid}: each a loaded public key
    and the JWK's C{alg}, if it names one. Keys for encryption, symmetric keys, keys
    carrying private material and keys that do not parse are left out (and logged).
    Raises L{ValueError} if the document is not a JWKS at all.
    """
    data = json.loads(document)
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" list)')
    keys: dict[str | None, list[tuple[PublicKeyType, str | None]]] = {}
    for jwk in data["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid = jwk.get("kid")
        alg = jwk.get("alg")
        if (
            not isinstance(kid, str | None)
            or not isinstance(alg, str | None)
            or jwk.get("use", "sig") != "sig"
            or jwk.get("kty") == "oct"
            or (alg is not None and (alg not in SUPPORTED_ALGORITHMS or isSymmetric(alg)))
        ):
            continue
        if "d" in jwk:
            _log.warn("JWKS key {kid!r} carries private key material; ignored", kid=kid)
            continue
        try:
            key: Any = jwt.PyJWK(jwk).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError, NotImplementedError) as e:
            _log.warn("JWKS key {kid!r} cannot be used: {error}", kid=kid, error=str(e))
            continue
        if isinstance(
            key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
        ):
            keys.setdefault(kid, []).append((key, alg))
    return keys


@implementer(IKeySource)
class JWKS:
    """
    The keys published at a JWKS URL, fetched with treq, cached by C{kid}.

    The set is fetched when first needed, again when it is older than C{cacheSeconds},
    and again when a token names a C{kid} it does not hold (key rotation) -- but never
    more often than once per C{minRefreshInterval}, so a flood of tokens with made-up
    kids cannot hammer the JWKS server, and concurrent needs share one request. A
    fetch is bounded by C{timeout}; when it fails, keys already known keep being used
    and a token whose key cannot be found is rejected with C{keys_unavailable}.
    """

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        httpClient: Any = None,
        timeout: float = 5.0,
        cacheSeconds: float = 300.0,
        minRefreshInterval: float = 30.0,
        maxBytes: int = 1024 * 1024,
    ) -> None:
        self.url = url
        self._reactor = _defaultReactor() if reactor is None else reactor
        self._client = _defaultHTTPClient(self._reactor) if httpClient is None else httpClient
        self.timeout = timeout
        self.cacheSeconds = cacheSeconds
        self.minRefreshInterval = minRefreshInterval
        self.maxBytes = maxBytes
        self._keys: dict[str | None, list[tuple[PublicKeyType, str | None]]] | None = None
        self._fetchedAt: float | None = None
        self._attemptedAt: float | None = None
        self._lastFailed = False
        self._waiters: list[Deferred[bool]] | None = None

    def __repr__(self) -> str:
        return f"<JWKS {self.url}>"

    def handles(self, algorithm: str) -> bool:
        return algorithm in SUPPORTED_ALGORITHMS and not isSymmetric(algorithm)

    def keyFor(self, header: Mapping[str, Any]) -> Deferred[Key]:
        return Deferred.fromCoroutine(self._keyFor(header))

    async def _keyFor(self, header: Mapping[str, Any]) -> Key:
        alg = header.get("alg", "")
        kid = header.get("kid")
        if not self.handles(alg):
            raise TokenRejected("bad_algorithm", "algorithm does not fit the key set")
        now = self._reactor.seconds()
        fresh = self._fetchedAt is not None and now - self._fetchedAt < self.cacheSeconds
        key = self._lookup(kid, alg)
        if key is not None and fresh:
            return key
        if self._waiters is not None or self._mayFetch(now):
            await self.refresh()
            key = self._lookup(kid, alg)
        if key is not None:
            return key
        if self._lastFailed:
            raise TokenRejected("keys_unavailable", "signing keys are unavailable")
        if kid is None:
            raise TokenRejected("unknown_kid", "token names no key (kid) and none fits")
        raise TokenRejected("unknown_kid", "token names a key (kid) that is not published")

    def _mayFetch(self, now: float) -> bool:
        return self._attemptedAt is None or now - self._attemptedAt >= self.minRefreshInterval

    def _lookup(self, kid: str | None, alg: str) -> PublicKeyType | None:
        """
        The key for C{kid} and C{alg}; None if the set has no such kid (or, without a
        kid, not exactly one key for the algorithm).
        """
        if self._keys is None:
            return None
        if kid is None:
            candidates = [entry for entries in self._keys.values() for entry in entries]
            fitting = [k for k, a in candidates if a in (None, alg) and _keyFits(k, alg)]
            return fitting[0] if len(fitting) == 1 else None
        entries = self._keys.get(kid)
        if not entries:
            return None
        for k, a in entries:
            if a in (None, alg) and _keyFits(k, alg):
                return k
        raise TokenRejected("bad_algorithm", "algorithm does not fit the key named by kid")

    def refresh(self) -> Deferred[bool]:
        """
        Fetch the key set now (or join the fetch under way), for example to warm the
        cache at start-up. Fires with whether the fetch succeeded; never fails.
        """
        waiter: Deferred[bool] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        self._attemptedAt = self._reactor.seconds()
        Deferred.fromCoroutine(self._fetch()).addCallback(self._fetched)
        return waiter

    def _fetched(self, ok: bool) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            # A waiter may have been cancelled (its connection went away meanwhile).
            if not waiter.called:
                waiter.callback(ok)

    async def _fetch(self) -> bool:
        download = Deferred.fromCoroutine(self._download())
        download.addTimeout(self.timeout, self._reactor)
        try:
            keys = parseJWKS(await download)
        except Exception as e:  # noqa: BLE001 - any failure means "keys unavailable"
            self._lastFailed = True
            error = (
                f"no answer within {self.timeout:g} s"
                if isinstance(e, CancelledError | DeferredTimeout)
                else f"{type(e).__name__}: {e}"
            )
            _log.warn("JWKS fetch from {url} failed: {error}", url=self.url, error=error)
            return False
        self._keys = keys
        self._fetchedAt = self._reactor.seconds()
        self._lastFailed = False
        _log.info(
            "JWKS fetched from {url}: {count} signing keys",
            url=self.url,
            count=sum(len(v) for v in keys.values()),
        )
        return True

    async def _download(self) -> bytes:
        response: IResponse = await self._client.get(
            self.url,
            headers={"Accept": ["application/json"]},
            allow_redirects=False,
            unbuffered=True,
            reactor=self._reactor,
        )
        problem = None
        if response.code != 200:
            problem = f"HTTP status {response.code}"
        elif isinstance(response.length, int) and response.length > self.maxBytes:
            problem = f"response is larger than {self.maxBytes} bytes"
        if problem is not None:
            # Not read, so the connection would otherwise stay open: drop it.
            body = _BoundedBody(0)
            response.deliverBody(body)
            body.done.cancel()
            body.done.addErrback(lambda f: None)
            raise ValueError(problem)
        body = _BoundedBody(self.maxBytes)
        response.deliverBody(body)
        return await body.done


@frozen
class VerifierSettings:
    """
    The rules a token must satisfy beyond its signature.
    """

    #: Accepted algorithms, from configuration; a token's C{alg} must be one of them.
    algorithms: tuple[str, ...]
    #: Seconds of clock skew allowed on exp, nbf and iat.
    leeway: float = 0.0
    #: Required C{aud}; when None, a token that names an audience is refused.
    audience: str | None = None
    #: Required C{iss}, if any.
    issuer: str | None = None
    #: The claim holding the user id (C{sub} is required as well).
    userClaim: str = "sub"
    requireExp: bool = True

    def __attrs_post_init__(self) -> None:
        if not self.algorithms:
            raise ValueError("JWT_ALGORITHMS is empty; name at least one (e.g. HS256)")
        for alg in self.algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                raise ValueError(
                    f"JWT_ALGORITHMS: {alg!r} is not accepted "
                    f"(use {', '.join(SUPPORTED_ALGORITHMS)})"
                )
        if not (isinstance(self.leeway, int | float) and 0 <= self.leeway < math.inf):
            raise ValueError(f"JWT_LEEWAY must be 0 or more seconds, not {self.leeway!r}")
        if not self.userClaim:
            raise ValueError("JWT_USER_CLAIM is empty; name the claim holding the user id")


def _numericDate(claims: Mapping[str, Any], name: str) -> float | None:
    """
    A time claim: seconds since the epoch, as a JSON number no further out than
    L{MAX_NUMERIC_DATE} (bogus dates would overflow the timers set from them).
    """
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected("malformed", f"the {name} claim is not a number")
    if not abs(value) <= MAX_NUMERIC_DATE:  # also false for NaN
        raise TokenRejected("malformed", f"the {name} claim is out of range")
    return value


class TokenVerifier:
    """
    Verify tokens against configured algorithms, key sources and claim rules.
    """

    def __init__(
        self,
        sources: Sequence[IKeySource],
        settings: VerifierSettings,
        *,
        clock: IReactorTime | None = None,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        for alg in settings.algorithms:
            if isSymmetric(alg) and not any(s.handles(alg) for s in sources):
                raise ValueError(f"JWT_ALGORITHMS has {alg} but JWT_SECRET is not set")
        if not any(s.handles(a) for a in settings.algorithms for s in sources):
            raise ValueError(f"no key source fits JWT_ALGORITHMS={','.join(settings.algorithms)}")
        self.sources = tuple(sources)
        self.settings = settings
        self._clock: IReactorTime = _defaultReactor() if clock is None else clock
        self._observe = observe
        required = ["exp"] if settings.requireExp else []
        required.append("sub")
        if settings.userClaim != "sub":
            required.append(settings.userClaim)
        self._required = required

    def __repr__(self) -> str:
        return f"<TokenVerifier {','.join(self.settings.algorithms)} {list(self.sources)}>"

    def verify(self, token: str | bytes) -> Deferred[Identity]:
        """
        The identity a token proves, or a failure with L{TokenRejected}.
        """
        return Deferred.fromCoroutine(self._verify(token))

    async def _verify(self, token: str | bytes) -> Identity:
        try:
            return await self._check(token)
        except TokenRejected as e:
            # The reason only: the token is a credential and stays out of the logs.
            _log.info("token rejected: {reason}", reason=e.reason)
            if self._observe is not None:
                self._observe(e.reason)
            raise

    async def _check(self, token: str | bytes) -> Identity:
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise TokenRejected("malformed", "token is not ASCII") from None
        if not isinstance(token, str) or not token:
            raise TokenRejected("malformed", "token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("malformed", "token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("malformed", "token is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise TokenRejected("malformed", "token header names no algorithm")
        if "kid" in header and not isinstance(header["kid"], str):
            raise TokenRejected("malformed", "token header has a non-string kid")
        # Refused before any key work: the header is the attacker's, the list is ours.
        if alg not in self.settings.algorithms:
            raise TokenRejected("bad_algorithm", "token algorithm is not accepted")
        source = next((s for s in self.sources if s.handles(alg)), None)
        if source is None:
            raise TokenRejected("bad_algorithm", "no configured key fits the token algorithm")
        key = await source.keyFor(header)
        claims = self._decode(
            token, key, [a for a in self.settings.algorithms if source.handles(a)]
        )
        self._checkTimes(claims)
        user = claims.get(self.settings.userClaim)
        if not isinstance(user, str) or not user:
            raise TokenRejected(
                "missing_claim", f"token has no string {self.settings.userClaim!r} claim"
            )
        exp = claims.get("exp")
        return Identity(
            userId=user,
            expiresAt=int(exp) if exp is not None else None,
            claims=MappingProxyType(claims),
        )

    def _decode(self, token: str, key: Key, algorithms: list[str]) -> dict[str, Any]:
        """
        Signature, then (in PyJWT's order) required claims, iss, aud, sub's type.
        The time claims are checked by L{_checkTimes} against our clock instead.
        """
        s = self.settings
        try:
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=s.audience,
                issuer=s.issuer,
                options={
                    "require": self._required,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad_signature", "token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("bad_algorithm", "token algorithm is not accepted") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenRejected("missing_claim", f"token has no {e.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            message = (
                "token names an audience but JWT_AUDIENCE is not set"
                if s.audience is None
                else "token audience does not match"
            )
            raise TokenRejected("bad_audience", message) from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("bad_issuer", "token issuer does not match") from None
        except jwt.exceptions.InvalidSubjectError:
            raise TokenRejected("missing_claim", "token has no string 'sub' claim") from None
        except jwt.InvalidTokenError:
            raise TokenRejected("malformed", "token is malformed") from None

    def _checkTimes(self, claims: Mapping[str, Any]) -> None:
        now = self._clock.seconds()
        leeway = self.settings.leeway
        exp = _numericDate(claims, "exp")
        nbf = _numericDate(claims, "nbf")
        iat = _numericDate(claims, "iat")
        if exp is not None and exp <= now - leeway:
            raise TokenRejected("expired", "token has expired")
        if nbf is not None and nbf > now + leeway:
            raise TokenRejected("not_yet_valid", "token is not valid yet (nbf)")
        # PyJWT's own iat check reports this as nbf would; it gets its own reason here.
        if iat is not None and iat > now + leeway:
            raise TokenRejected("issued_in_future", "token was issued in the future (iat)")


class HMACVerifier(TokenVerifier):
    """
    Verify tokens signed with the shared C{JWT_SECRET} (HS256/384/512).
    """

    def __init__(
        self,
        secret: str | bytes,
        algorithms: Sequence[str] = ("HS256",),
        leeway: float = 0.0,
        userClaim: str = "sub",
        *,
        clock: IReactorTime | None = None,
        observe: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            [StaticSecret(secret)],
            VerifierSettings(tuple(algorithms), leeway=leeway, userClaim=userClaim),
            clock=clock,
            observe=observe,
        )


def verifierFromSettings(
    *,
    secret: str | None,
    publicKeyPEM: bytes | None,
    jwksURL: str | None,
    algorithms: Sequence[str],
    leeway: float = 0.0,
    audience: str | None = None,
    issuer: str | None = None,
    userClaim: str = "sub",
    reactor: Any = None,
    observe: Callable[[str], None] | None = None,
    httpClient: Any = None,
    jwksTimeout: float = 5.0,
) -> TokenVerifier:
    """
    A verifier for the configured key sources, or L{ValueError} with one line naming
    the inconsistent setting: each configured algorithm needs its kind of key, and
    each configured key needs an algorithm that uses it.
    """
    settings = VerifierSettings(
        tuple(algorithms), leeway=leeway, audience=audience, issuer=issuer, userClaim=userClaim
    )
    symmetric = [a for a in settings.algorithms if isSymmetric(a)]
    asymmetric = [a for a in settings.algorithms if not isSymmetric(a)]
    if secret is None and publicKeyPEM is None and jwksURL is None:
        raise ValueError("no token key configured: set JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWKS_URL")
    if publicKeyPEM is not None and jwksURL is not None:
        raise ValueError("set JWT_PUBLIC_KEY_FILE or JWKS_URL, not both")
    if symmetric and secret is None:
        raise ValueError(
            f"JWT_ALGORITHMS has {symmetric[0]}, which needs JWT_SECRET; a public key or "
            "JWKS only verifies RS*/ES*/PS*/EdDSA"
        )
    if asymmetric and publicKeyPEM is None and jwksURL is None:
        raise ValueError(
            f"JWT_ALGORITHMS has {asymmetric[0]}, which needs JWT_PUBLIC_KEY_FILE or JWKS_URL"
        )
    if not asymmetric and (publicKeyPEM is not None or jwksURL is not None):
        name = "JWT_PUBLIC_KEY_FILE" if publicKeyPEM is not None else "JWKS_URL"
        raise ValueError(
            f"{name} is set but JWT_ALGORITHMS has only HS algorithms; add RS256/ES256 "
            f"or unset {name}"
        )
    sources: list[IKeySource] = []
    if symmetric and secret is not None:
        sources.append(StaticSecret(secret))
    if publicKeyPEM is not None:
        source = PublicKey(publicKeyPEM)
        if not any(source.handles(a) for a in asymmetric):
            raise ValueError(
                f"JWT_PUBLIC_KEY_FILE holds an {_keyKind(source.key)} key, which none of "
                f"JWT_ALGORITHMS={','.join(settings.algorithms)} uses"
            )
        sources.append(source)
    if jwksURL is not None:
        sources.append(JWKS(jwksURL, reactor=reactor, httpClient=httpClient, timeout=jwksTimeout))
    return TokenVerifier(sources, settings, clock=reactor, observe=observe)


def mintToken(
    secret: str | bytes | Any,
    subject: str,
    *,
    ttl: int = 3600,
    algorithm: str = "HS256",
    extra: dict[str, object] | None = None,
    now: float | None = None,
    headers: dict[str, Any] | None = None,
) -> str:
    """
    Mint a token the way the Next.js app does, for development and tests. C{secret}
    is the HMAC secret, or a private key for RS*/ES*/PS*/EdDSA.
    """
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"sub": subject, "iat": issued, "exp": issued + ttl}
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm=algorithm, headers=headers)


def tokenFromQuery(params: Mapping[str, Sequence[str]]) -> str | None:
    values = params.get("token")
    return values[0] if values else None
