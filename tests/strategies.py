"""
Hypothesis strategies shared by the test modules, and the test profiles.

Profiles: C{ci} (the default, and what tox sets through C{HYPOTHESIS_PROFILE}) runs the
same modest set of examples every time, so a CI failure is reproducible; C{dev}
explores with fresh randomness and more examples. A failing example found with C{dev}
becomes a plain regression test.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Tokens and claims -------------------------------------------------------------------

#: The fixed "now" of claim properties (a verifier under test runs on a Clock set to it).
NOW = 1_700_000_000
AUDIENCE = "marketplace-ws"
ISSUER = "https://app.example.com"
#: The HMAC secret of generated tokens: 64 bytes, so HS512 has a full-size key.
SECRET = "hypothesis-secret-" + "k" * 46


class _Absent:
    """A claim left out of the token (unlike one present with the value null)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


@attrs.frozen
class VerifierCase:
    """The verifier settings of one example (see L{verifierCases})."""

    algorithm: str
    leeway: float
    audience: str | None
    issuer: str | None
    userClaim: str
    requireExp: bool


@attrs.frozen
class ClaimCase:
    """One example: verifier settings and the claims of a token signed for them."""

    verifier: VerifierCase
    claims: dict[str, Any]


verifierCases = st.builds(
    VerifierCase,
    algorithm=st.sampled_from(["HS256", "HS384", "HS512"]),
    leeway=st.sampled_from([0, 0.5, 10, 60]),
    audience=st.sampled_from([None, AUDIENCE]),
    issuer=st.sampled_from([None, ISSUER]),
    userClaim=st.sampled_from(["sub", "uid"]),
    requireExp=st.booleans(),
)

#: Values that are not NumericDates: wrong JSON types, and floats JSON can still carry.
notNumbers: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["1700000000", True, False, None, [], {}]),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)

#: JSON values of any type, for claims whose type is under test.
jsonScalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.text(max_size=8))


def timeClaims(leeway: float) -> st.SearchStrategy[Any]:
    """
    A time claim: absent, an offset from L{NOW} (often right at the leeway's edges,
    where off-by-one errors live), or not a number at all.
    """
    edges = [-leeway - 1, -leeway, -leeway + 0.25, -1, 0, 1, leeway - 0.25, leeway, leeway + 1]
    offsets = st.one_of(
        st.sampled_from(edges),
        st.integers(-(10**6), 10**6),
        st.floats(-1e6, 1e6, allow_nan=False),
    )
    return st.one_of(
        st.just(ABSENT),
        offsets.map(lambda o: NOW + o),
        st.just(NOW).map(lambda n: n * 10**300),  # far in the future, still an int
        notNumbers,
    )


userIds = st.text(min_size=1, max_size=12)

subjects = st.one_of(
    st.just(ABSENT), userIds, st.just(""), st.integers(), st.none(), st.lists(userIds, max_size=1)
)

audiences = st.one_of(
    st.just(ABSENT),
    st.just(AUDIENCE),
    st.just("someone-else"),
    st.lists(st.sampled_from([AUDIENCE, "someone-else"]), max_size=3),
    st.sampled_from(["", 0, 7, None, [1], {"a": 1}]),
)

issuers = st.one_of(
    st.just(ABSENT), st.just(ISSUER), st.just("https://evil.example.com"), jsonScalars
)


@st.composite
def claimCases(draw: st.DrawFn) -> ClaimCase:
    """
    Arbitrary combinations of exp/nbf/iat (relative to L{NOW}), sub, a custom user
    claim, aud and iss, with the verifier settings they are checked against.
    """
    verifier = draw(verifierCases)
    drawn = {
        "exp": draw(timeClaims(verifier.leeway)),
        "nbf": draw(timeClaims(verifier.leeway)),
        "iat": draw(timeClaims(verifier.leeway)),
        "sub": draw(subjects),
        "uid": draw(st.one_of(st.just(ABSENT), userIds, jsonScalars)),
        "aud": draw(audiences),
        "iss": draw(issuers),
    }
    extra = draw(st.dictionaries(st.sampled_from(["name", "role", "jti"]), st.text(max_size=5)))
    claims = {name: value for name, value in drawn.items() if value is not ABSENT}
    claims.update(extra)
    return ClaimCase(verifier, claims)


# Garbage ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segment(value: Any) -> str:
    return b64(json.dumps(value).encode())


#: JSON values for headers and payloads that are not what a JWT holds.
jsonValues = st.recursive(
    jsonScalars | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)

headers = st.fixed_dictionaries(
    {
        "alg": st.one_of(
            st.sampled_from(["HS256", "HS384", "HS512", "RS256", "ES256", "none", "None", ""]),
            jsonScalars,
        )
    },
    optional={
        "typ": st.sampled_from(["JWT", "at+jwt"]),
        "kid": jsonScalars,
        "crit": st.sampled_from([["b64"], ["exp"], "b64", []]),
        "b64": st.booleans(),
        "jku": st.just("https://evil.example.com/jwks.json"),
    },
)


@st.composite
def garbageTokens(draw: st.DrawFn) -> str | bytes:
    """
    Anything a client could send instead of a good token: arbitrary text and bytes,
    dotted base64 segments, and well-formed JWTs with odd headers and bad signatures.
    """
    signature = draw(st.one_of(st.binary(max_size=80).map(b64), st.text(max_size=20)))
    return draw(
        st.one_of(
            st.text(),
            st.binary(),
            st.lists(st.binary(max_size=40).map(b64), min_size=1, max_size=5).map(".".join),
            st.tuples(headers, jsonValues).map(
                lambda hp: f"{_segment(hp[0])}.{_segment(hp[1])}.{signature}"
            ),
            st.tuples(headers, st.dictionaries(st.text(max_size=4), jsonValues)).map(
                lambda hp: f"{_segment(hp[0])}.{_segment(hp[1])}.{signature}"
            ),
        )
    )
