"""
Channels (SPEC §4): what a client may subscribe to, and who may.

A channel name is C{kind:id}. It is parsed once, at the edge, by L{parseChannel}; the
rest of the server handles L{Channel}s. Who may subscribe is decided by an L{Authorise}
function the C{subscribe} op calls before it asks the hub: C{user:<id>} is that user's
alone, C{listing:<id>} is open to any authenticated user, and C{conversation:<id>} to its
participants, which only the database knows. L{Authoriser} is that function, with the
database question passed in and its answers cached for a few seconds: a client that
reconnects and resubscribes to a dozen conversations should not cost a dozen queries
each time, and the cache is dropped for a conversation whose participants change.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal, TypeAlias, cast

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from marketplace_ws.envelope import BAD_REQUEST, OpError

Kind: TypeAlias = Literal["user", "conversation", "listing"]
KINDS: frozenset[str] = frozenset({"user", "conversation", "listing"})

#: What an id may hold: the characters of database keys, UUIDs, cuids, e-mail-like ids
#: and issuer-prefixed subjects (C{auth0|5f7c…}), nothing that needs escaping in logs,
#: Redis keys or URLs.
ID_PATTERN = re.compile(r"[A-Za-z0-9_\-.:@|]{1,128}")

#: The longest channel name: the longest kind, the colon and the longest id.
MAX_NAME_LENGTH = len("conversation") + 1 + 128


@frozen
class Channel:
    """
    A channel: C{str(channel)} is its name on the wire, in the broker and in logs.
    """

    kind: Kind
    id: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.id}"


def parseChannel(text: Any) -> Channel:
    """
    A channel from the name a client or the HTTP API sent.

    @raise OpError: C{bad_request} for anything that is not C{kind:id} with a known kind
        and an id of 1 to 128 characters of C{A-Z a-z 0-9 _ - . : @ |}. The name is not
        echoed in the message: it is the client's own input, of any length.
    """
    if not isinstance(text, str):
        raise OpError(BAD_REQUEST, "channel must be a string such as listing:42")
    kind, sep, ident = text.partition(":")
    if not sep or kind not in KINDS:
        raise OpError(
            BAD_REQUEST,
            "channel must be user:, conversation: or listing: followed by an id",
        )
    if len(text) > MAX_NAME_LENGTH or ID_PATTERN.fullmatch(ident) is None:
        raise OpError(
            BAD_REQUEST,
            "channel id must be 1 to 128 characters of letters, digits and _ - . : @ |",
        )
    return Channel(cast(Kind, kind), ident)


#: May this user subscribe to this channel? Fails with L{OpError} (C{not_found} for a
#: conversation that does not exist, C{unavailable} when the database is down); the op
#: answers C{forbidden} for C{False}.
Authorise: TypeAlias = Callable[[str, Channel], Deferred[bool]]

#: Is this user a participant of this conversation? C{(conversationId, userId)}, asked
#: of the database.
IsParticipant: TypeAlias = Callable[[str, str], Deferred[bool]]


class Authoriser:
    """
    The L{Authorise} function of SPEC §4, asking L{IsParticipant} about conversations and
    keeping each answer for C{ttl} seconds (at most C{maxEntries} of them).

    Call L{forget} whenever a conversation's participants change. Answers are cached
    both ways: a removed participant loses access at once through L{forget}, and a user
    probing conversations that are not theirs costs one query per C{ttl}. A lookup that
    fails is not cached.
    """

    def __init__(
        self,
        isParticipant: IsParticipant,
        clock: IReactorTime,
        ttl: float = 5.0,
        maxEntries: int = 10_000,
    ) -> None:
        self._isParticipant = isParticipant
        self._clock = clock
        self._ttl = ttl
        self._maxEntries = maxEntries
        # Insertion order is expiry order (one ttl for all), so expired entries are
        # always at the front and each call sweeps in amortised constant time.
        self._answers: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()
        self._byConversation: dict[str, set[str]] = {}
        # Bumped by every forget(): a lookup that was in flight across a change of
        # participants answers its caller but is not cached.
        self._changes = 0

    def __call__(self, userId: str, channel: Channel) -> Deferred[bool]:
        if channel.kind == "user":
            return succeed(channel.id == userId)
        if channel.kind == "listing":
            return succeed(True)
        return self._participant(channel.id, userId)

    def forget(self, conversationId: str) -> None:
        """
        Drop the cached answers about one conversation: its participants changed.
        """
        self._changes += 1
        for userId in self._byConversation.pop(conversationId, ()):
            self._answers.pop((conversationId, userId), None)

    def _participant(self, conversationId: str, userId: str) -> Deferred[bool]:
        now = self._clock.seconds()
        self._expire(now)
        key = (conversationId, userId)
        cached = self._answers.get(key)
        if cached is not None:
            return succeed(cached[0])
        changes = self._changes

        def answered(answer: bool) -> bool:
            if self._changes == changes and self._ttl > 0 and self._maxEntries > 0:
                self._remember(key, answer, self._clock.seconds() + self._ttl)
            return answer

        return self._isParticipant(conversationId, userId).addCallback(answered)

    def _remember(self, key: tuple[str, str], answer: bool, expires: float) -> None:
        self._answers.pop(key, None)
        self._answers[key] = (answer, expires)
        self._byConversation.setdefault(key[0], set()).add(key[1])
        while len(self._answers) > self._maxEntries:
            self._drop(next(iter(self._answers)))

    def _expire(self, now: float) -> None:
        while self._answers:
            key, (_, expires) = next(iter(self._answers.items()))
            if expires > now:
                break
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        del self._answers[key]
        users = self._byConversation.get(key[0])
        if users is not None:
            users.discard(key[1])
            if not users:
                del self._byConversation[key[0]]
