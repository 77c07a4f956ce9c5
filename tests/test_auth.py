"""
Token verification: algorithms from configuration only, the claim rules, the three key
sources (a JWKS served over real HTTP on loopback), and rejections that are counted and
logged without the token.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from functools import cache
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.api_jws import PyJWS
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from marketplace_ws.auth import (
    JWKS,
    REASONS,
    HMACVerifier,
    Identity,
    PublicKey,
    StaticSecret,
    TokenRejected,
    TokenVerifier,
    VerifierSettings,
    mintToken,
    tokenFromQuery,
    verifierFromSettings,
)

from .strategies import AUDIENCE, ISSUER, NOW, SECRET, ClaimCase, claimCases, garbageTokens

reactor: Any = _reactor


# Keys and tokens --------------------------------------------------------------------


@cache
def rsaKey(n: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ecKey(n: int = 0) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def publicPEM(key: Any) -> bytes:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forgeHS256(claims: dict[str, Any], key: bytes, header: dict[str, Any] | None = None) -> str:
    """
    An HS256 token signed with any bytes as the secret, by hand: PyJWT itself refuses
    to use a PEM public key as an HMAC secret, which is exactly what an attacker does.
    """
    head = b64(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def sign(claims: dict[str, Any], algorithm: str = "HS256", key: Any = SECRET) -> str:
    """
    A token with exactly these claims: PyJWT's C{jwt.encode} would refuse some of the
    ill-typed claims under test, so the payload is signed as it is.
    """
    return PyJWS().encode(json.dumps(claims).encode(), key, algorithm=algorithm)


def claimsAt(now: float = NOW, ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"sub": "user-1", "iat": int(now), "exp": int(now) + ttl}
    claims.update(extra)
    return claims


def clockAt(now: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def hmacVerifier(
    algorithms: tuple[str, ...] = ("HS256",), clock: Clock | None = None, **rules: Any
) -> TokenVerifier:
    return TokenVerifier(
        [StaticSecret(SECRET)],
        VerifierSettings(algorithms, **rules),
        clock=clock or clockAt(),
    )


class VerifyMixin:
    """Run a verifier whose answer is immediate (no key fetch) and look at it."""

    def accepted(self, verifier: TokenVerifier, token: str | bytes) -> Identity:
        result: Identity = self.successResultOf(verifier.verify(token))  # type: ignore[attr-defined]
        return result

    def rejected(self, verifier: TokenVerifier, token: str | bytes) -> str:
        failure = self.failureResultOf(  # type: ignore[attr-defined]
            verifier.verify(token), TokenRejected
        )
        reason: str = failure.value.reason
        self.assertIn(reason, REASONS)  # type: ignore[attr-defined]
        return reason


# The shared secret -------------------------------------------------------------------


class HMACTests(VerifyMixin, SynchronousTestCase):
    def test_acceptsConfiguredAlgorithms(self) -> None:
        verifier = hmacVerifier(("HS256", "HS384", "HS512"))
        for alg in ("HS256", "HS384", "HS512"):
            token = mintToken(SECRET, "user-1", algorithm=alg, now=NOW)
            identity = self.accepted(verifier, token)
            self.assertEqual((identity.userId, identity.expiresAt), ("user-1", NOW + 3600))
            self.assertEqual(identity.claims["iat"], NOW)

    def test_algorithmNotConfigured(self) -> None:
        verifier = hmacVerifier(("HS256",))
        token = mintToken(SECRET, "user-1", algorithm="HS512", now=NOW)
        self.assertEqual(self.rejected(verifier, token), "bad_algorithm")

    def test_algNone(self) -> None:
        """
        An unsigned token is refused whatever the spelling of "none" and whether or
        not it carries a signature.
        """
        verifier = hmacVerifier(("HS256", "HS384", "HS512"))
        unsigned = jwt.encode(claimsAt(), "", algorithm="none")
        self.assertEqual(self.rejected(verifier, unsigned), "bad_algorithm")
        for alg in ("none", "None", "NONE", ""):
            head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
            body = b64(json.dumps(claimsAt()).encode())
            for signature in ("", b64(b"x" * 32)):
                self.assertEqual(
                    self.rejected(verifier, f"{head}.{body}.{signature}"), "bad_algorithm"
                )

    def test_wrongSecret(self) -> None:
        token = mintToken("another-secret-" + "z" * 49, "user-1", now=NOW)
        self.assertEqual(self.rejected(hmacVerifier(), token), "bad_signature")

    def test_tamperedPayload(self) -> None:
        """A signed token whose payload is swapped for another user's is refused."""
        head, _, signature = mintToken(SECRET, "user-1", now=NOW).split(".")
        body = b64(json.dumps(claimsAt(sub="admin")).encode())
        self.assertEqual(
            self.rejected(hmacVerifier(), f"{head}.{body}.{signature}"), "bad_signature"
        )

    def test_tamperedSignature(self) -> None:
        token = mintToken(SECRET, "user-1", now=NOW)
        head, body, signature = token.split(".")
        raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
        raw[0] ^= 1
        self.assertEqual(
            self.rejected(hmacVerifier(), f"{head}.{body}.{b64(bytes(raw))}"), "bad_signature"
        )
        self.assertEqual(self.rejected(hmacVerifier(), f"{head}.{body}."), "bad_signature")

    def test_malformed(self) -> None:
        verifier = hmacVerifier()
        tokens: list[str | bytes] = [
            "",
            "abc",
            "a.b.c",
            "....",
            "e30.e30.",
            "\u00e9.x.y",
            b"\xff\xfe",
            "x" * 100_000,
        ]
        for token in tokens:
            self.assertEqual(self.rejected(verifier, token), "malformed")

    def test_headerWithoutAlgorithm(self) -> None:
        token = forgeHS256(claimsAt(), SECRET.encode(), header={"typ": "JWT"})
        self.assertEqual(self.rejected(hmacVerifier(), token), "malformed")

    def test_bytesToken(self) -> None:
        token = mintToken(SECRET, "user-1", now=NOW)
        self.assertEqual(self.accepted(hmacVerifier(), token.encode()).userId, "user-1")

    def test_compatibleConstructor(self) -> None:
        """The verifier the service builds today keeps working."""
        verifier = HMACVerifier(secret=SECRET, algorithms=("HS256", "HS512"), clock=clockAt())
        token = mintToken(SECRET, "user-1", algorithm="HS512", now=NOW)
        self.assertEqual(self.accepted(verifier, token), Identity("user-1", NOW + 3600))

    def test_tokenFromQuery(self) -> None:
        self.assertEqual(tokenFromQuery({"token": ["a", "b"]}), "a")
        self.assertIsNone(tokenFromQuery({"token": []}))
        self.assertIsNone(tokenFromQuery({}))


class ClaimTests(VerifyMixin, SynchronousTestCase):
    def token(self, **claims: Any) -> str:
        return sign(claims)

    def test_expired(self) -> None:
        token = self.token(**claimsAt(now=NOW - 3600, ttl=3590))  # expired 10 s ago
        self.assertEqual(self.rejected(hmacVerifier(), token), "expired")
        self.assertEqual(self.rejected(hmacVerifier(leeway=10), token), "expired")
        self.assertEqual(self.accepted(hmacVerifier(leeway=11), token).userId, "user-1")

    def test_expiresNow(self) -> None:
        """exp is the first moment the token is no longer valid."""
        self.assertEqual(self.rejected(hmacVerifier(), self.token(sub="u", exp=NOW)), "expired")
        self.accepted(hmacVerifier(), self.token(sub="u", exp=NOW + 1))

    def test_notYetValid(self) -> None:
        token = self.token(**claimsAt(nbf=NOW + 30))
        self.assertEqual(self.rejected(hmacVerifier(), token), "not_yet_valid")
        self.assertEqual(self.rejected(hmacVerifier(leeway=29), token), "not_yet_valid")
        self.accepted(hmacVerifier(leeway=30), token)
        self.accepted(hmacVerifier(), self.token(**claimsAt(nbf=NOW)))

    def test_issuedInFuture(self) -> None:
        token = self.token(sub="u", iat=NOW + 30, exp=NOW + 3600)
        self.assertEqual(self.rejected(hmacVerifier(), token), "issued_in_future")
        self.assertEqual(self.rejected(hmacVerifier(leeway=29.5), token), "issued_in_future")
        self.accepted(hmacVerifier(leeway=30), token)

    def test_clockMoves(self) -> None:
        """The verifier reads its clock per token, not once."""
        clock = clockAt()
        verifier = hmacVerifier(clock=clock)
        token = self.token(**claimsAt(ttl=60))
        self.accepted(verifier, token)
        clock.advance(60)
        self.assertEqual(self.rejected(verifier, token), "expired")

    def test_timeClaimsMustBeNumbers(self) -> None:
        verifier = hmacVerifier()
        for name in ("exp", "nbf", "iat"):
            values: list[Any] = ["1700000000", True, [], math.nan, math.inf, 10**400, 2**53 + 1]
            for value in values:
                token = self.token(**{**claimsAt(), name: value})
                self.assertEqual(self.rejected(verifier, token), "malformed", (name, value))
        identity = self.accepted(verifier, self.token(sub="u", exp=NOW + 0.5, iat=NOW - 0.5))
        self.assertEqual(identity.expiresAt, NOW)

    def test_expRequired(self) -> None:
        token = self.token(sub="user-1", iat=NOW)
        self.assertEqual(self.rejected(hmacVerifier(), token), "missing_claim")
        identity = self.accepted(hmacVerifier(requireExp=False), token)
        self.assertEqual((identity.userId, identity.expiresAt), ("user-1", None))

    def test_subRequired(self) -> None:
        verifier = hmacVerifier()
        self.assertEqual(self.rejected(verifier, self.token(exp=NOW + 60)), "missing_claim")
        for sub in (None, "", 42, ["user-1"], {"id": "user-1"}):
            token = self.token(sub=sub, exp=NOW + 60)
            self.assertEqual(self.rejected(verifier, token), "missing_claim", sub)

    def test_userClaim(self) -> None:
        verifier = hmacVerifier(userClaim="uid")
        identity = self.accepted(verifier, self.token(**claimsAt(uid="u-42")))
        self.assertEqual(identity.userId, "u-42")
        self.assertEqual(self.rejected(verifier, self.token(**claimsAt())), "missing_claim")
        for uid in (42, "", None):
            token = self.token(**claimsAt(uid=uid))
            self.assertEqual(self.rejected(verifier, token), "missing_claim")
        # sub is still required with another user claim.
        token = self.token(uid="u-42", exp=NOW + 60)
        self.assertEqual(self.rejected(verifier, token), "missing_claim")

    def test_audience(self) -> None:
        verifier = hmacVerifier(audience=AUDIENCE)
        self.accepted(verifier, self.token(**claimsAt(aud=AUDIENCE)))
        self.accepted(verifier, self.token(**claimsAt(aud=["other", AUDIENCE])))
        self.assertEqual(
            self.rejected(verifier, self.token(**claimsAt(aud="other"))), "bad_audience"
        )
        self.assertEqual(self.rejected(verifier, self.token(**claimsAt(aud=[1]))), "bad_audience")
        self.assertEqual(self.rejected(verifier, self.token(**claimsAt())), "missing_claim")

    def test_unexpectedAudience(self) -> None:
        """A token meant for some audience is not taken by a server that names none."""
        failure = self.failureResultOf(
            hmacVerifier().verify(self.token(**claimsAt(aud=AUDIENCE))), TokenRejected
        )
        self.assertEqual(failure.value.reason, "bad_audience")
        self.assertIn("JWT_AUDIENCE", failure.value.message)

    def test_issuer(self) -> None:
        verifier = hmacVerifier(issuer=ISSUER)
        self.accepted(verifier, self.token(**claimsAt(iss=ISSUER)))
        for iss in ("https://evil.example.com", 42, None, [ISSUER]):
            token = self.token(**claimsAt(iss=iss))
            self.assertEqual(self.rejected(verifier, token), "bad_issuer", iss)
        self.assertEqual(self.rejected(verifier, self.token(**claimsAt())), "missing_claim")
        # Without a configured issuer any iss is fine.
        self.accepted(hmacVerifier(), self.token(**claimsAt(iss="anyone")))


# Public keys ------------------------------------------------------------------------


class PublicKeyTests(VerifyMixin, SynchronousTestCase):
    def verifier(self, pem: bytes, algorithms: tuple[str, ...]) -> TokenVerifier:
        return TokenVerifier([PublicKey(pem)], VerifierSettings(algorithms), clock=clockAt())

    def test_rs256(self) -> None:
        verifier = self.verifier(publicPEM(rsaKey()), ("RS256", "ES256"))
        token = mintToken(rsaKey(), "user-1", algorithm="RS256", now=NOW)
        self.assertEqual(self.accepted(verifier, token).userId, "user-1")

    def test_ps256(self) -> None:
        verifier = self.verifier(publicPEM(rsaKey()), ("PS256",))
        token = mintToken(rsaKey(), "user-1", algorithm="PS256", now=NOW)
        self.assertEqual(self.accepted(verifier, token).userId, "user-1")

    def test_es256(self) -> None:
        verifier = self.verifier(publicPEM(ecKey()), ("RS256", "ES256"))
        token = mintToken(ecKey(), "user-1", algorithm="ES256", now=NOW)
        self.assertEqual(self.accepted(verifier, token).userId, "user-1")

    def test_eddsa(self) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        verifier = self.verifier(publicPEM(key), ("EdDSA",))
        token = mintToken(key, "user-1", algorithm="EdDSA", now=NOW)
        self.assertEqual(self.accepted(verifier, token).userId, "user-1")

    def test_algorithmMustFitKey(self) -> None:
        """With the default RS256,ES256 and an RSA key, an ES256 token is refused."""
        verifier = self.verifier(publicPEM(rsaKey()), ("RS256", "ES256"))
        token = mintToken(ecKey(), "user-1", algorithm="ES256", now=NOW)
        self.assertEqual(self.rejected(verifier, token), "bad_algorithm")

    def test_otherKey(self) -> None:
        verifier = self.verifier(publicPEM(rsaKey()), ("RS256",))
        token = mintToken(rsaKey(1), "user-1", algorithm="RS256", now=NOW)
        self.assertEqual(self.rejected(verifier, token), "bad_signature")

    def test_keyConfusion(self) -> None:
        """
        An HS256 token "signed" with the public key's PEM as the secret is refused,
        by a verifier with only the public key and by one with a secret as well.
        """
        pem = publicPEM(rsaKey())
        forged = forgeHS256(claimsAt(sub="admin"), pem)
        self.assertEqual(self.rejected(self.verifier(pem, ("RS256",)), forged), "bad_algorithm")
        both = verifierFromSettings(
            secret=SECRET,
            publicKeyPEM=pem,
            jwksURL=None,
            algorithms=("HS256", "RS256"),
            reactor=clockAt(),
        )
        self.assertEqual(self.rejected(both, forged), "bad_signature")
        # ... while each family still works with its own key.
        self.accepted(both, mintToken(SECRET, "u", now=NOW))
        self.accepted(both, mintToken(rsaKey(), "u", algorithm="RS256", now=NOW))
        # The public key source itself never hands its key out for an HS algorithm.
        source = PublicKey(pem)
        self.assertFalse(source.handles("HS256"))
        self.failureResultOf(source.keyFor({"alg": "HS256"}), TokenRejected)

    def test_certificate(self) -> None:
        key = rsaKey()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2040, 1, 1))
            .sign(key, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM)
        token = mintToken(key, "user-1", algorithm="RS256", now=NOW)
        self.accepted(self.verifier(pem, ("RS256",)), token)

    def test_badPEM(self) -> None:
        private = rsaKey().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with self.assertRaises(ValueError) as caught:
            PublicKey(private)
        self.assertIn("private key", str(caught.exception))
        with self.assertRaises(ValueError) as caught:
            PublicKey(b"not a key")
        self.assertIn("JWT_PUBLIC_KEY_FILE", str(caught.exception))

    def test_pemAsSecret(self) -> None:
        with self.assertRaises(ValueError) as caught:
            StaticSecret(publicPEM(rsaKey()))
        self.assertIn("JWT_SECRET", str(caught.exception))
        with self.assertRaises(ValueError):
            StaticSecret("")


class SettingsTests(SynchronousTestCase):
    def fails(self, **settings: Any) -> str:
        arguments: dict[str, Any] = {
            "secret": None,
            "publicKeyPEM": None,
            "jwksURL": None,
            "algorithms": ("HS256",),
        }
        arguments.update(settings)
        with self.assertRaises(ValueError) as caught:
            verifierFromSettings(reactor=clockAt(), **arguments)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        return message

    def test_noKey(self) -> None:
        self.assertIn("JWT_SECRET", self.fails())

    def test_hmacWithOnlyPEM(self) -> None:
        message = self.fails(publicKeyPEM=publicPEM(rsaKey()), algorithms=("HS256",))
        self.assertIn("HS256", message)
        self.assertIn("JWT_SECRET", message)
        message = self.fails(publicKeyPEM=publicPEM(rsaKey()), algorithms=("HS256", "RS256"))
        self.assertIn("JWT_SECRET", message)

    def test_asymmetricWithOnlySecret(self) -> None:
        message = self.fails(secret=SECRET, algorithms=("RS256",))
        self.assertIn("RS256", message)
        self.assertIn("JWT_PUBLIC_KEY_FILE", message)

    def test_unusedKey(self) -> None:
        self.assertIn(
            "JWT_PUBLIC_KEY_FILE",
            self.fails(secret=SECRET, publicKeyPEM=publicPEM(rsaKey()), algorithms=("HS256",)),
        )
        self.assertIn(
            "JWKS_URL",
            self.fails(secret=SECRET, jwksURL="https://x.example/jwks", algorithms=("HS256",)),
        )
        self.assertIn("RSA", self.fails(publicKeyPEM=publicPEM(rsaKey()), algorithms=("ES256",)))

    def test_pemAndJWKS(self) -> None:
        self.assertIn(
            "not both",
            self.fails(
                publicKeyPEM=publicPEM(rsaKey()),
                jwksURL="https://x.example/jwks",
                algorithms=("RS256",),
            ),
        )

    def test_algorithms(self) -> None:
        for algorithms in [(), ("none",), ("HS1",), ("hs256",)]:
            self.assertIn("JWT_ALGORITHMS", self.fails(secret=SECRET, algorithms=algorithms))

    def test_rules(self) -> None:
        self.assertIn("JWT_LEEWAY", self.fails(secret=SECRET, leeway=-1))
        self.assertIn("JWT_LEEWAY", self.fails(secret=SECRET, leeway=math.nan))
        self.assertIn("JWT_USER_CLAIM", self.fails(secret=SECRET, userClaim=""))

    def test_jwks(self) -> None:
        verifier = verifierFromSettings(
            secret=None,
            publicKeyPEM=None,
            jwksURL="https://keys.example.com/jwks.json",
            algorithms=("RS256", "ES256"),
            reactor=clockAt(),
            httpClient=object(),
        )
        [source] = verifier.sources
        self.assertIsInstance(source, JWKS)


# Counting and logging ----------------------------------------------------------------


@implementer(ILogObserver)
class EventList(list[LogEvent]):
    def __call__(self, event: LogEvent) -> None:
        self.append(event)


@contextmanager
def capturedLogs() -> Iterator[list[LogEvent]]:
    events = EventList()
    globalLogPublisher.addObserver(events)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events)


class RejectionLoggingTests(VerifyMixin, SynchronousTestCase):
    def test_countedAndLoggedWithoutToken(self) -> None:
        seen: list[str] = []
        verifier = TokenVerifier(
            [StaticSecret(SECRET)],
            VerifierSettings(("HS256",), audience=AUDIENCE),
            clock=clockAt(),
            observe=seen.append,
        )
        tokens = {
            "expired": mintToken(SECRET, "user-1", now=NOW - 7200, extra={"aud": AUDIENCE}),
            "bad_signature": mintToken(SECRET + "x", "user-1", now=NOW),
            "bad_audience": mintToken(SECRET, "user-1", now=NOW, extra={"aud": "x"}),
            "bad_algorithm": mintToken(SECRET, "user-1", now=NOW, algorithm="HS512"),
            "malformed": "not-a-jwt-" + SECRET,
        }
        good = mintToken(SECRET, "user-1", now=NOW, extra={"aud": AUDIENCE})
        with capturedLogs() as events:
            for reason, token in tokens.items():
                failure = self.failureResultOf(verifier.verify(token), TokenRejected)
                self.assertEqual(failure.value.reason, reason)
                for shown in (failure.value.message, str(failure.value), repr(failure.value)):
                    self.assertNotIn(token, shown)
                    self.assertNotIn(SECRET, shown)
                self.assertIsNone(failure.value.__cause__)
            self.accepted(verifier, good)
        self.assertEqual(seen, list(tokens))
        rejections = [e for e in events if e.get("reason") in REASONS]
        self.assertEqual([e["reason"] for e in rejections], list(tokens))
        for event in events:
            text = formatEvent(event)
            for secret in [*tokens.values(), good, SECRET]:
                self.assertNotIn(secret, text)
                self.assertNotIn(secret, repr(event))
        self.assertEqual(formatEvent(rejections[0]), "token rejected: expired")

    def test_reprsHideSecrets(self) -> None:
        verifier = hmacVerifier()
        self.assertNotIn(SECRET, repr(verifier))
        self.assertNotIn(SECRET, repr(StaticSecret(SECRET)))


# Properties -------------------------------------------------------------------------


def oracle(case: ClaimCase) -> tuple[str, str]:
    """
    What the rules say about a correctly signed token with these claims: C{("ok",
    userId)} or C{("reject", reason)}. Written from the documented order of checks:
    required claims, iss, aud, sub's type, time claims' types, exp, nbf, iat, user claim.
    """
    rules, claims = case.verifier, case.claims
    required = (["exp"] if rules.requireExp else []) + ["sub"]
    if rules.userClaim != "sub":
        required.append(rules.userClaim)
    for name in required:
        if claims.get(name) is None:
            return ("reject", "missing_claim")
    if rules.issuer is not None:
        if "iss" not in claims:
            return ("reject", "missing_claim")
        if claims["iss"] != rules.issuer:
            return ("reject", "bad_issuer")
    aud = claims.get("aud")
    if rules.audience is None:
        if aud:
            return ("reject", "bad_audience")
    else:
        if not aud:
            return ("reject", "missing_claim")
        names = [aud] if isinstance(aud, str) else aud
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or rules.audience not in names
        ):
            return ("reject", "bad_audience")
    if not isinstance(claims["sub"], str):
        return ("reject", "missing_claim")
    times = {}
    for name in ("exp", "nbf", "iat"):
        if name in claims:
            value = claims[name]
            if type(value) not in (int, float) or not abs(value) <= 2**53:
                return ("reject", "malformed")
            times[name] = Fraction(value)
    now, leeway = Fraction(NOW), Fraction(rules.leeway)
    if "exp" in times and not now - leeway < times["exp"]:
        return ("reject", "expired")
    if "nbf" in times and times["nbf"] - leeway > now:
        return ("reject", "not_yet_valid")
    if "iat" in times and times["iat"] - leeway > now:
        return ("reject", "issued_in_future")
    user = claims.get(rules.userClaim)
    if type(user) is not str or user == "":
        return ("reject", "missing_claim")
    return ("ok", user)


class PropertyTests(VerifyMixin, SynchronousTestCase):
    @given(claimCases())
    def test_claimsAgreeWithOracle(self, case: ClaimCase) -> None:
        rules = case.verifier
        verifier = TokenVerifier(
            [StaticSecret(SECRET)],
            VerifierSettings(
                ("HS256", "HS384", "HS512"),
                leeway=rules.leeway,
                audience=rules.audience,
                issuer=rules.issuer,
                userClaim=rules.userClaim,
                requireExp=rules.requireExp,
            ),
            clock=clockAt(NOW),
        )
        token = sign(case.claims, rules.algorithm)
        verdict, detail = oracle(case)
        result = verifier.verify(token)
        if verdict == "ok":
            identity = self.successResultOf(result)
            self.assertEqual(identity.userId, detail)
            exp = case.claims.get("exp")
            self.assertEqual(identity.expiresAt, None if exp is None else int(exp))
        else:
            self.assertEqual(self.failureResultOf(result, TokenRejected).value.reason, detail)

    @given(garbageTokens())
    def test_garbageIsRejected(self, token: str | bytes) -> None:
        verifier = TokenVerifier(
            [StaticSecret(SECRET)],
            VerifierSettings(("HS256", "HS384", "HS512")),
            clock=clockAt(),
        )
        reason = self.rejected(verifier, token)
        self.assertIn(reason, {"malformed", "bad_algorithm", "bad_signature"})

    @given(garbageTokens())
    def test_garbageAgainstPublicKey(self, token: str | bytes) -> None:
        verifier = TokenVerifier(
            [PublicKey(publicPEM(rsaKey()))], VerifierSettings(("RS256",)), clock=clockAt()
        )
        reason = self.rejected(verifier, token)
        self.assertIn(reason, {"malformed", "bad_algorithm", "bad_signature"})

    @given(st.text(min_size=1, max_size=40))
    def test_anyUserId(self, user: str) -> None:
        self.assertEqual(
            self.accepted(hmacVerifier(), mintToken(SECRET, user, now=NOW)).userId, user
        )


# JWKS over real HTTP -----------------------------------------------------------------


def jwk(key: Any, kid: str | None, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    if alg is not None:
        data["alg"] = alg
    data.update(extra)
    return data


class KeySetResource(Resource):
    """A JWKS endpoint that counts its requests and can fail or hang on demand."""

    isLeaf = True

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        super().__init__()
        self.keys = keys
        self.requests = 0
        self.mode = "ok"
        self.hanging: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.requests += 1
        if self.mode == "error":
            request.setResponseCode(500)
            return b"oops"
        if self.mode == "html":
            return b"<html>moved</html>"
        if self.mode in ("hang", "trickle"):
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: None)
            if self.mode == "trickle":
                request.setHeader(b"content-length", b"1000")
                request.write(b'{"keys": [')
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        document = json.dumps({"keys": self.keys}).encode()
        if self.mode == "chunked":  # no Content-Length to go by
            for start in range(0, len(document), 8192):
                request.write(document[start : start + 8192])
            request.finish()
            return NOT_DONE_YET
        return document


def rs256(kid: str | None, key: Any = None, **claims: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return mintToken(key or rsaKey(), "user-1", algorithm="RS256", headers=headers, extra=claims)


class TrackingSite(Site):
    """A Site that can wait until every connection it accepted is closed."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.open: set[Any] = set()
        self.closed: Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        assert protocol is not None
        self.open.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason: Any) -> None:
            self.open.discard(protocol)
            lost(reason)
            if not self.open and self.closed is not None:
                closed = self.closed
                self.closed = None
                closed.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def allClosed(self) -> Deferred[None]:
        if not self.open:
            return succeed(None)
        if self.closed is None:
            self.closed = Deferred()
        return self.closed


class JWKSTests(TestCase):
    def setUp(self) -> None:
        self.resource = KeySetResource([jwk(rsaKey(), "k1", "RS256"), jwk(ecKey(), "e1")])
        site = TrackingSite(self.resource)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        # The client side closes first; wait for the server side to see it.
        self.addCleanup(lambda: site.allClosed().addTimeout(2, reactor))
        self.url = f"http://127.0.0.1:{port.getHost().port}/.well-known/jwks.json"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.seen: list[str] = []

    def verifier(self, url: str | None = None, **options: Any) -> TokenVerifier:
        self.keys = JWKS(url or self.url, reactor=reactor, httpClient=self.client, **options)
        return TokenVerifier(
            [self.keys],
            VerifierSettings(("RS256", "ES256")),
            clock=reactor,
            observe=self.seen.append,
        )

    async def rejected(self, d: Deferred[Identity]) -> str:
        try:
            await d
        except TokenRejected as e:
            return e.reason
        self.fail("accepted")

    async def test_fetchAndCache(self) -> None:
        verifier = self.verifier()
        identity = await verifier.verify(rs256("k1"))
        self.assertEqual(identity.userId, "user-1")
        es = mintToken(ecKey(), "user-2", algorithm="ES256", headers={"kid": "e1"})
        self.assertEqual((await verifier.verify(es)).userId, "user-2")
        self.assertEqual(self.resource.requests, 1)

    async def test_concurrentVerifiesShareOneFetch(self) -> None:
        verifier = self.verifier()
        results = [verifier.verify(rs256("k1")) for _ in range(5)]
        results.append(verifier.verify(rs256("nope")))
        for d in results[:-1]:
            self.assertEqual((await d).userId, "user-1")
        self.assertEqual(await self.rejected(results[-1]), "unknown_kid")
        self.assertEqual(self.resource.requests, 1)

    async def test_unknownKidRefetchesOnce(self) -> None:
        verifier = self.verifier(minRefreshInterval=3600)
        await verifier.verify(rs256("k1"))
        self.assertEqual(await self.rejected(verifier.verify(rs256("nope"))), "unknown_kid")
        self.assertEqual(self.resource.requests, 1, "rate-limited: fetched just before")

    async def test_unknownKidRefetches(self) -> None:
        verifier = self.verifier(minRefreshInterval=0)
        await verifier.verify(rs256("k1"))
        self.assertEqual(await self.rejected(verifier.verify(rs256("nope"))), "unknown_kid")
        self.assertEqual(self.resource.requests, 2)

    async def test_rateLimited(self) -> None:
        """A flood of made-up kids costs the JWKS server one request per interval."""
        verifier = self.verifier(minRefreshInterval=0.3)
        await verifier.verify(rs256("k1"))
        await deferLater(reactor, 0.35, lambda: None)
        tokens = [rs256(f"x{n}") for n in range(20)]
        with capturedLogs() as events:
            for token in tokens:
                self.assertEqual(await self.rejected(verifier.verify(token)), "unknown_kid")
        self.assertEqual(len([e for e in events if e.get("reason") == "unknown_kid"]), 20)
        for event in events:
            for token in tokens:
                self.assertNotIn(token, formatEvent(event))
        self.assertEqual(self.resource.requests, 2)
        await deferLater(reactor, 0.35, lambda: None)
        self.assertEqual(await self.rejected(verifier.verify(rs256("y"))), "unknown_kid")
        self.assertEqual(self.resource.requests, 3)
        self.assertEqual(set(self.seen), {"unknown_kid"})

    async def test_rotation(self) -> None:
        # The new key and its token are made first: generating an RSA key on a busy
        # machine can take longer than the refresh interval under test.
        newKey = jwk(rsaKey(1), "k2", "RS256")
        token = rs256("k2", key=rsaKey(1))
        verifier = self.verifier(minRefreshInterval=0.2)
        await verifier.verify(rs256("k1"))
        self.resource.keys = [newKey, *self.resource.keys]
        # Within the interval the new key is not fetched yet ...
        self.assertEqual(await self.rejected(verifier.verify(token)), "unknown_kid")
        await deferLater(reactor, 0.25, lambda: None)
        # ... and afterwards it is, on demand.
        self.assertEqual((await verifier.verify(token)).userId, "user-1")
        self.assertEqual(self.resource.requests, 2)

    async def test_cacheExpires(self) -> None:
        verifier = self.verifier(cacheSeconds=0.2, minRefreshInterval=0)
        await verifier.verify(rs256("k1"))
        await verifier.verify(rs256("k1"))
        self.assertEqual(self.resource.requests, 1)
        await deferLater(reactor, 0.25, lambda: None)
        await verifier.verify(rs256("k1"))
        self.assertEqual(self.resource.requests, 2)

    async def test_staleKeysWhileServerFails(self) -> None:
        """An expired cache keeps serving its keys while the JWKS server is failing."""
        verifier = self.verifier(cacheSeconds=0.1, minRefreshInterval=0)
        await verifier.verify(rs256("k1"))
        self.resource.mode = "error"
        await deferLater(reactor, 0.15, lambda: None)
        await verifier.verify(rs256("k1"))
        self.assertEqual(self.resource.requests, 2)
        self.assertEqual(await self.rejected(verifier.verify(rs256("k9"))), "keys_unavailable")

    async def test_kidAndAlgorithm(self) -> None:
        """A kid names one key; a token cannot pick another algorithm for it."""
        verifier = self.verifier()
        es = mintToken(ecKey(), "user-1", algorithm="ES256", headers={"kid": "k1"})
        self.assertEqual(await self.rejected(verifier.verify(es)), "bad_algorithm")
        forged = rs256("k1", key=rsaKey(1))
        self.assertEqual(await self.rejected(verifier.verify(forged)), "bad_signature")
        hs = forgeHS256(claimsAt(), b"anything", header={"alg": "HS256", "kid": "k1"})
        self.assertEqual(await self.rejected(verifier.verify(hs)), "bad_algorithm")

    async def test_withoutKid(self) -> None:
        """
        A token without a kid is checked against the one key for its algorithm, if
        the set has exactly one.
        """
        verifier = self.verifier()
        self.assertEqual((await verifier.verify(rs256(None))).userId, "user-1")
        self.resource.keys = [jwk(rsaKey(), None), jwk(rsaKey(1), "k2")]
        verifier = self.verifier(minRefreshInterval=3600)
        self.assertEqual(await self.rejected(verifier.verify(rs256(None))), "unknown_kid")
        self.assertEqual((await verifier.verify(rs256("k2", key=rsaKey(1)))).userId, "user-1")

    async def test_unusableKeysSkipped(self) -> None:
        self.resource.keys = [
            {"kty": "oct", "kid": "k1", "k": b64(b"s" * 32)},
            jwk(rsaKey(1), "k1", "RS256", use="enc"),
            {"kty": "RSA", "kid": "k1", "n": "!!"},
            jwk(rsaKey(1), "k1", "RS256", d="private"),
            jwk(rsaKey(), "k1", "RS256"),
        ]
        verifier = self.verifier()
        self.assertEqual((await verifier.verify(rs256("k1"))).userId, "user-1")

    async def test_serverDown(self) -> None:
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        url = f"http://127.0.0.1:{port.getHost().port}/jwks.json"
        await port.stopListening()
        verifier = self.verifier(url)
        self.assertEqual(await self.rejected(verifier.verify(rs256("k1"))), "keys_unavailable")
        self.assertEqual(self.seen, ["keys_unavailable"])

    async def test_badAnswers(self) -> None:
        for mode in ("error", "html"):
            self.resource.mode = mode
            verifier = self.verifier()
            self.assertEqual(await self.rejected(verifier.verify(rs256("k1"))), "keys_unavailable")
        self.resource.keys = [jwk(rsaKey(), "k1")] * 2000  # over the size limit
        for mode in ("ok", "chunked"):
            self.resource.mode = mode
            verifier = self.verifier(maxBytes=100_000)
            self.assertEqual(await self.rejected(verifier.verify(rs256("k1"))), "keys_unavailable")
            verifier = self.verifier(maxBytes=10_000_000)
            self.assertEqual((await verifier.verify(rs256("k1"))).userId, "user-1")

    async def test_failedFetchRateLimited(self) -> None:
        self.resource.mode = "error"
        verifier = self.verifier(minRefreshInterval=3600)
        self.assertEqual(await self.rejected(verifier.verify(rs256("k1"))), "keys_unavailable")
        self.resource.mode = "ok"
        self.assertEqual(await self.rejected(verifier.verify(rs256("k1"))), "keys_unavailable")
        self.assertEqual(self.resource.requests, 1)
        self.assertTrue(await self.keys.refresh())
        self.assertEqual((await verifier.verify(rs256("k1"))).userId, "user-1")

    async def assertTimesOut(self, mode: str) -> None:
        self.resource.mode = mode
        verifier = self.verifier(timeout=0.5)
        started = time.monotonic()
        self.assertEqual(await self.rejected(verifier.verify(rs256("k1"))), "keys_unavailable")
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.45)
        self.assertLess(elapsed, 1.5)
        # The client gave up: the server sees its request's connection go.
        [request] = self.resource.hanging
        await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(request.channel is None or request._disconnected)

    async def test_slowServer(self) -> None:
        await self.assertTimesOut("hang")

    async def test_stalledBody(self) -> None:
        await self.assertTimesOut("trickle")

    async def test_reactorNotBlocked(self) -> None:
        """While a fetch hangs the reactor keeps running other work."""
        self.resource.mode = "hang"
        verifier = self.verifier(timeout=0.5)
        d = verifier.verify(rs256("k1"))
        ticks = 0

        def tick() -> None:
            nonlocal ticks
            ticks += 1

        for n in range(5):
            reactor.callLater(0.05 * n, tick)
        self.assertEqual(await self.rejected(d), "keys_unavailable")
        self.assertEqual(ticks, 5)

    async def test_cancelledVerify(self) -> None:
        """A verify abandoned mid-fetch (its connection went away) harms nobody."""
        verifier = self.verifier()
        first = verifier.verify(rs256("k1"))
        second = verifier.verify(rs256("k1"))
        first.cancel()
        self.failureResultOf(first)
        self.assertEqual((await second).userId, "user-1")
        self.assertEqual(self.resource.requests, 1)
