"""
L{marketplace_ws.client.ReconnectingClient}: the backoff schedule and the close-code
rules on Twisted's fake reactor, subscription recovery against the documented protocol
with a scripted server, and reconnecting end to end against the real service on a
real port.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from marketplace_ws import protocol
from marketplace_ws.channels import Channel
from marketplace_ws.client import (
    Action,
    Backoff,
    ClientFactory,
    Closed,
    ReconnectingClient,
    ServerError,
    State,
    closeAction,
    handshakeStatus,
)
from marketplace_ws.service import MarketplaceService
from tests.test_connection import expiryOf, token, wsPort
from tests.test_service import startService, wsURL


def sequence(*values: float) -> Callable[[], float]:
    """A deterministic C{random}: these values, in turn."""
    it: Iterator[float] = iter(values)
    return lambda: next(it)


# The backoff and the close codes -------------------------------------------------------


class BackoffTests(SynchronousTestCase):
    def test_fullJitterSchedule(self) -> None:
        """
        Retry M{n} waits C{random() * min(cap, base * factor ** n)}: 0.5 s, doubling,
        capped at 30 s by default.
        """
        backoff = Backoff()
        self.assertEqual([backoff.ceiling(n) for n in range(8)], [0.5, 1, 2, 4, 8, 16, 30, 30])
        random = sequence(0.9, 0.1, 0.5, 0.99, 0.0, 0.7, 0.3, 0.6)
        delays = [backoff.delay(n, random) for n in range(8)]
        expected = [0.45, 0.1, 1.0, 3.96, 0.0, 11.2, 9.0, 18.0]
        for got, want in zip(delays, expected, strict=True):
            self.assertAlmostEqual(got, want)

    def test_configurable(self) -> None:
        backoff = Backoff(base=1.0, factor=3.0, cap=10.0)
        self.assertEqual([backoff.ceiling(n) for n in range(4)], [1, 3, 9, 10])

    def test_manyAttemptsStayAtTheCap(self) -> None:
        """A client retrying for days does not overflow the exponent."""
        self.assertEqual(Backoff().ceiling(10_000), 30.0)
        self.assertEqual(Backoff(factor=10).ceiling(10_000), 30.0)

    def test_limitedWaitsLonger(self) -> None:
        """After 4029 the wait is L{Backoff.limited} plus the jittered delay."""
        backoff = Backoff(limited=5.0)
        self.assertEqual(backoff.after(Action.LIMITED, 0, lambda: 0.0), 5.0)
        self.assertEqual(backoff.after(Action.LIMITED, 1, lambda: 0.5), 5.5)
        self.assertEqual(backoff.after(Action.RETRY, 1, lambda: 0.5), 0.5)

    def test_invalid(self) -> None:
        for kwargs, named in (
            ({"base": 0.0}, "Backoff.base"),
            ({"factor": 0.5}, "Backoff.factor"),
            ({"cap": 0.1, "base": 1.0}, "Backoff.cap"),
            ({"limited": -1.0}, "Backoff.limited"),
        ):
            with self.assertRaises(ValueError) as raised:
                Backoff(**kwargs)
            self.assertIn(named, str(raised.exception))


class CloseActionTests(SynchronousTestCase):
    def test_closeCodes(self) -> None:
        expected = {
            1000: Action.RETRY,  # from the server: we still want a connection
            1001: Action.RETRY,
            1002: Action.FAULT,
            1003: Action.FAULT,
            1006: Action.RETRY,
            1007: Action.FAULT,
            1008: Action.FAULT,
            1009: Action.FAULT,
            1011: Action.RETRY,
            1012: Action.RETRY,
            4000: Action.FAULT,
            4001: Action.REAUTH,
            4003: Action.STOP,
            4008: Action.RETRY,
            4029: Action.LIMITED,
            4999: Action.RETRY,
        }
        self.assertEqual({code: closeAction(code) for code in expected}, expected)
        self.assertEqual(closeAction(None, "Connection was refused by other side"), Action.RETRY)

    def test_refusedHandshake(self) -> None:
        """The HTTP status of a refused handshake, as Autobahn reports it, decides."""

        def refused(status: int, text: str) -> str:
            return (
                'connection was closed uncleanly ("WebSocket connection upgrade failed'
                f' [{status}]: {text}")'
            )

        self.assertEqual(handshakeStatus(refused(401, "Unauthorized")), 401)
        self.assertIsNone(handshakeStatus("peer dropped the TCP connection"))
        self.assertEqual(closeAction(1006, refused(401, "Unauthorized")), Action.REAUTH)
        self.assertEqual(closeAction(1006, refused(403, "Forbidden")), Action.FAULT)
        self.assertEqual(closeAction(1006, refused(400, "Bad Request")), Action.FAULT)
        self.assertEqual(closeAction(1006, refused(429, "Too Many")), Action.LIMITED)
        self.assertEqual(closeAction(1006, refused(503, "Unavailable")), Action.RETRY)


# The reconnect loop on a fake reactor ----------------------------------------------------


class FakeConnection:
    """
    Stands in for the client's Autobahn protocol once open: records what the client
    sends; a close is answered at once.
    """

    STATE_OPEN = 3

    def __init__(self, factory: ClientFactory) -> None:
        self.factory = factory
        self.state = self.STATE_OPEN
        self.sent: list[dict[str, Any]] = []

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        self.sent.append(json.loads(payload))

    def sendClose(self, code: int | None = None, reason: str | None = None) -> None:
        self.state = 0
        self.factory.closed(code, reason)

    def requests(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.sent if frame.get("type") == kind]


class Harness:
    """
    A L{ReconnectingClient} on a C{MemoryReactorClock}, with the server's side played
    by the test: refuse an attempt, welcome it, push frames, answer requests, close.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.tokens: list[str] = []
        self.states: list[State] = []
        self.frames: list[dict[str, Any]] = []
        self.unrecovered: list[str] = []
        self.lost: list[tuple[str, str]] = []
        options: dict[str, Any] = {
            "reactor": self.reactor,
            "random": lambda: 0.5,
            "ping": None,
            "onState": self.states.append,
            "onFrame": self.frames.append,
            "onRecoveryFailed": self.unrecovered.append,
            "onSubscriptionLost": lambda channel, error: self.lost.append((channel, error.code)),
        }
        options.update(kwargs)
        self.client = ReconnectingClient("ws://127.0.0.1:9/", self.getToken, **options)
        self.connection: FakeConnection | None = None

    def getToken(self) -> str:
        self.tokens.append(f"token-{len(self.tokens) + 1}")
        return self.tokens[-1]

    @property
    def attempts(self) -> int:
        return len(self.reactor.tcpClients)

    @property
    def factory(self) -> ClientFactory:
        return cast(ClientFactory, self.reactor.tcpClients[-1][2])

    def waits(self) -> list[float | None]:
        return [state.delay for state in self.states if state.phase == "waiting"]

    def refuse(self) -> None:
        self.factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    def welcome(self, userId: str = "u1", userSeq: int | None = 0) -> FakeConnection:
        factory = self.factory
        connection = self.connection = FakeConnection(factory)
        factory.connection = cast(Any, connection)
        welcome: dict[str, Any] = {"type": "welcome", "connectionId": f"c{self.attempts}"}
        welcome["userId"] = userId
        if userSeq is not None:
            welcome["userSeq"] = userSeq
        factory.received(welcome)
        return connection

    def close(self, code: int | None, reason: str | None = None) -> None:
        self.factory.closed(code, reason)

    def push(self, channel: str, seq: int | None, event: str = "e") -> None:
        self.factory.received(
            {"type": "event", "channel": channel, "event": event, "seq": seq, "data": {}}
        )

    def answer(self, request: dict[str, Any], result: Any) -> None:
        self.factory.received({"id": request["id"], "type": "ok", "result": result})

    def refuseRequest(self, request: dict[str, Any], code: str) -> None:
        self.factory.received(
            {"id": request["id"], "type": "error", "error": {"code": code, "message": "no"}}
        )

    def answerSubscribe(
        self, request: dict[str, Any], seq: int, recovered: bool | None, replayed: int = 0
    ) -> None:
        result = {
            "channel": request["channel"],
            "seq": seq,
            "recovered": recovered,
            "replayed": replayed,
        }
        self.answer(request, result)

    def seqs(self, channel: str | None = None) -> list[Any]:
        return [
            frame["seq"]
            for frame in self.frames
            if frame.get("type") == "event" and channel in (None, frame["channel"])
        ]


class ScheduleTests(SynchronousTestCase):
    """
    When the loop reconnects, with a deterministic C{random} and a fake clock.
    """

    def test_refusedAttemptsFollowTheBackoff(self) -> None:
        """
        Each refused attempt waits the next jittered delay; nothing is tried before
        it has passed, and a fresh token is fetched for every attempt.
        """
        random = sequence(0.9, 0.1, 0.5, 0.99, 0.0, 0.7, 0.3, 0.6)
        harness = Harness(random=random)
        harness.client.start()
        expected = [0.45, 0.1, 1.0, 3.96, 0.0, 11.2, 9.0, 18.0]
        for n, delay in enumerate(expected):
            self.assertEqual(harness.attempts, n + 1)
            harness.refuse()
            (waiting,) = [s for s in harness.states if s.phase == "waiting"][n:]
            self.assertAlmostEqual(waiting.delay or 0.0, delay)
            self.assertEqual(waiting.attempt, n + 1)
            if delay > 0.01:
                harness.reactor.advance(delay - 0.01)
                self.assertEqual(harness.attempts, n + 1)
            harness.reactor.advance(0.01)
        self.assertEqual(harness.attempts, len(expected) + 1)
        self.assertEqual(len(harness.tokens), len(expected) + 1)
        self.assertEqual(harness.states[-1].phase, "connecting")

    def test_resetAfterAStableConnection(self) -> None:
        """
        A connection that stayed up C{stableAfter} seconds resets the backoff; one
        dropped sooner does not.
        """
        harness = Harness(random=lambda: 1.0)
        harness.client.start()
        for _ in range(3):
            harness.refuse()
            harness.reactor.advance(30)
        self.assertEqual(harness.waits(), [0.5, 1.0, 2.0])
        harness.welcome()
        harness.reactor.advance(9)
        harness.close(1006, "dropped")
        self.assertEqual(harness.waits()[-1], 4.0)
        harness.reactor.advance(4)
        harness.welcome()
        harness.reactor.advance(10)
        harness.close(1001, "server shutting down")
        self.assertEqual(harness.waits()[-1], 0.5)
        self.assertEqual(harness.states[-1].code, 1001)
        self.assertEqual(harness.states[-1].action, Action.RETRY)

    def test_4001ReconnectsAtOnceOnlyOnce(self) -> None:
        """
        An expired token reconnects at once with a fresh one; a second 4001 in a row
        (or a handshake refused with 401) backs off.
        """
        harness = Harness()
        harness.client.start()
        harness.welcome()
        harness.reactor.advance(60)
        harness.close(4001, "token expired")
        self.assertEqual(harness.waits(), [0.0])
        self.assertEqual(harness.tokens, ["token-1", "token-2"])
        self.assertEqual(harness.attempts, 2)
        harness.close(1006, 'upgrade failed [401]: Unauthorized")')
        self.assertEqual(harness.waits(), [0.0, 0.25])
        self.assertEqual(harness.attempts, 2)
        harness.reactor.advance(0.25)
        harness.welcome()
        harness.reactor.advance(10)
        harness.close(4001, "token expired")
        self.assertEqual(harness.waits()[-1], 0.0)

    def test_4003Stops(self) -> None:
        harness = Harness()
        stopped = harness.client.whenStopped()
        harness.client.start()
        harness.welcome()
        harness.close(4003, "disconnected by the app")
        final = self.successResultOf(stopped)
        self.assertEqual((final.phase, final.code, final.action), ("closed", 4003, Action.STOP))
        harness.reactor.advance(3600)
        self.assertEqual(harness.attempts, 1)
        self.assertEqual(harness.waits(), [])
        failure = self.failureResultOf(harness.client.request("ping"), Closed)
        self.assertEqual(failure.value.code, 4003)

    def test_4029WaitsSeconds(self) -> None:
        harness = Harness(random=lambda: 0.0)
        harness.client.start()
        harness.close(4029, "too many connections for this user")
        self.assertEqual(harness.waits(), [5.0])
        self.assertEqual(harness.states[-1].action, Action.LIMITED)

    def test_faultIsRetriedAndReported(self) -> None:
        harness = Harness()
        harness.client.start()
        harness.welcome()
        harness.close(1009, "message too big")
        self.assertEqual(harness.states[-1].action, Action.FAULT)
        self.assertEqual(harness.waits(), [0.25])
        harness.reactor.advance(0.25)
        self.assertEqual(harness.attempts, 2)

    def test_ownCloseStops(self) -> None:
        """C{close()} closes with 1000 and nothing reconnects."""
        harness = Harness()
        harness.client.start()
        connection = harness.welcome()
        final = self.successResultOf(harness.client.close())
        self.assertEqual((final.phase, final.code), ("closed", 1000))
        self.assertEqual(connection.state, 0)
        harness.reactor.advance(3600)
        self.assertEqual(harness.attempts, 1)

    def test_closeWhileWaiting(self) -> None:
        harness = Harness()
        harness.client.start()
        harness.refuse()
        self.successResultOf(harness.client.close())
        harness.reactor.advance(3600)
        self.assertEqual(harness.attempts, 1)
        self.assertEqual(harness.states[-1].phase, "closed")
        self.failureResultOf(harness.client.whenOpen(), Closed)

    def test_closeWhileConnecting(self) -> None:
        harness = Harness()
        harness.client.start()
        self.assertEqual(harness.states[-1].phase, "connecting")
        connector = harness.reactor.connectors[-1]
        stopped = harness.client.close()
        self.assertTrue(connector._disconnected)
        harness.refuse()  # what a disconnected connector reports
        self.successResultOf(stopped)
        harness.reactor.advance(3600)
        self.assertEqual(harness.attempts, 1)

    def test_requestsFailFastWhileDisconnected(self) -> None:
        """
        Nothing is queued across a reconnect: requests fail with L{Closed} at once,
        carrying the close that cut the connection.
        """
        harness = Harness()
        harness.client.start()
        self.failureResultOf(harness.client.request("ping"), Closed)
        connection = harness.welcome()
        pinged = harness.client.request("ping")
        harness.answer(connection.requests("ping")[0], {"pong": True})
        self.assertEqual(self.successResultOf(pinged), {"pong": True})
        inFlight = harness.client.request("ping")
        harness.close(1006, "dropped")
        self.assertEqual(self.failureResultOf(inFlight, Closed).value.code, 1006)
        for attempt in (
            harness.client.request("ping"),
            harness.client.subscribe("listing:1"),
        ):
            self.assertEqual(self.failureResultOf(attempt, Closed).value.code, 1006)
        self.assertEqual(harness.client.channels, frozenset())

    def test_states(self) -> None:
        harness = Harness()
        opened = harness.client.whenOpen()
        harness.client.start()
        self.assertNoResult(opened)
        harness.welcome()
        self.assertEqual(self.successResultOf(opened)["userId"], "u1")
        harness.close(1001, "server shutting down")
        harness.reactor.advance(1)
        self.assertEqual(
            [(s.phase, s.code) for s in harness.states],
            [("connecting", None), ("open", None), ("waiting", 1001), ("connecting", 1001)],
        )

    def test_asyncAndFailingTokenProvider(self) -> None:
        """
        C{getToken} may return a Deferred (or a coroutine); when it fails, the
        attempt counts as failed and is retried after the backoff.
        """
        reactor = MemoryReactorClock()
        answers: list[Deferred[str]] = []

        def getToken() -> Deferred[str]:
            answers.append(Deferred())
            return answers[-1]

        client = ReconnectingClient(
            "ws://127.0.0.1:9/", getToken, reactor=reactor, random=lambda: 0.5, ping=None
        )
        client.start()
        self.assertEqual(len(reactor.tcpClients), 0)
        answers[0].errback(RuntimeError("session expired"))
        self.assertEqual(client.state.phase, "waiting")
        self.assertIn("getToken failed", client.state.reason or "")
        reactor.advance(0.25)
        answers[1].callback("fresh")
        self.assertEqual(len(reactor.tcpClients), 1)
        factory = cast(ClientFactory, reactor.tcpClients[0][2])
        self.assertEqual(factory.headers["Authorization"], "Bearer fresh")
        stopped = client.close()
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.successResultOf(stopped)


# Subscriptions and recovery against the documented protocol -----------------------------


class RecoveryProtocolTests(SynchronousTestCase):
    """
    What the client sends and passes on around a reconnect, with the server's part
    scripted from docs/protocol.rst and SPEC §4: the welcome's C{userSeq}, C{subscribe
    {channel, since}} answered with C{{channel, seq, recovered, replayed}}, the
    replayed events before the reply.
    """

    def connected(self, **kwargs: Any) -> tuple[Harness, FakeConnection]:
        harness = Harness(**kwargs)
        harness.client.start()
        connection = harness.welcome(userSeq=3)
        # The first welcome tells where the user's channel starts; nothing to recover.
        self.assertEqual(connection.requests("subscribe"), [])
        self.assertEqual(harness.client.lastSeq("user:u1"), 3)
        return harness, connection

    def reconnect(self, harness: Harness, userSeq: int | None) -> dict[str, dict[str, Any]]:
        """Drop, reconnect, and return the new connection's subscribes by channel."""
        harness.close(1006, "dropped")
        harness.reactor.advance(30)
        connection = harness.welcome(userSeq=userSeq)
        return {frame["channel"]: frame for frame in connection.requests("subscribe")}

    def subscribed(self, harness: Harness, channel: str, seq: int) -> None:
        assert harness.connection is not None
        subscribing = harness.client.subscribe(channel)
        request = harness.connection.requests("subscribe")[-1]
        self.assertEqual(request, {"id": request["id"], "type": "subscribe", "channel": channel})
        harness.answerSubscribe(request, seq, None)
        self.assertEqual(self.successResultOf(subscribing)["seq"], seq)
        self.assertEqual(harness.client.channels, frozenset({channel}))

    def test_resubscribeWithSinceAndReplayInOrder(self) -> None:
        harness, _ = self.connected()
        self.subscribed(harness, "listing:42", 5)
        harness.push("listing:42", 6)
        harness.push("listing:42", None, "typing")  # ephemeral: passed on, not tracked
        harness.push("user:u1", 4)
        self.assertEqual(harness.client.lastSeq("listing:42"), 6)
        self.assertEqual(harness.client.lastSeq("user:u1"), 4)

        requests = self.reconnect(harness, userSeq=6)
        self.assertEqual(requests["listing:42"]["since"], 6)
        self.assertEqual(requests["user:u1"]["since"], 4)
        for seq in (7, 8):
            harness.push("listing:42", seq)
        harness.answerSubscribe(requests["listing:42"], 8, True, 2)
        harness.push("listing:42", 9)
        self.assertEqual(harness.seqs("listing:42"), [6, None, 7, 8, 9])
        self.assertEqual(harness.unrecovered, [])
        self.assertEqual(harness.client.lastSeq("listing:42"), 9)

    def test_userChannelReplayFollowsLiveEvents(self) -> None:
        """
        The server subscribes the user's channel before the welcome, so events
        published after it may arrive before the replay of those missed before it:
        the client holds the channel's events until the reply and passes them on in
        seq order.
        """
        harness, _ = self.connected()
        harness.push("user:u1", 4)
        requests = self.reconnect(harness, userSeq=7)
        self.assertEqual(requests["user:u1"]["since"], 4)
        harness.push("user:u1", 8)  # live, after the new welcome
        for seq in (5, 6, 7):
            harness.push("user:u1", seq)  # replayed
        harness.answerSubscribe(requests["user:u1"], 8, True, 3)
        self.assertEqual(harness.seqs("user:u1"), [4, 5, 6, 7, 8])
        self.assertEqual(harness.client.lastSeq("user:u1"), 8)

    def test_userChannelNothingMissed(self) -> None:
        """A welcome whose C{userSeq} is where the client stopped needs no request."""
        harness, _ = self.connected()
        harness.push("user:u1", 4)
        self.assertEqual(self.reconnect(harness, userSeq=4), {})
        harness.push("user:u1", 5)
        self.assertEqual(harness.seqs("user:u1"), [4, 5])

    def test_userChannelRestarted(self) -> None:
        """
        A C{userSeq} below where the client stopped (the server lost its history):
        the server answers C{recovered: false} and the application is told.
        """
        harness, _ = self.connected()
        harness.push("user:u1", 40)
        requests = self.reconnect(harness, userSeq=2)
        self.assertEqual(requests["user:u1"]["since"], 40)
        harness.answerSubscribe(requests["user:u1"], 2, False)
        self.assertEqual(harness.unrecovered, ["user:u1"])
        self.assertEqual(harness.client.lastSeq("user:u1"), 2)

    def test_userChannelRecoveryRefused(self) -> None:
        """
        The user's channel stays subscribed by the server even when the subscribe
        with since fails: what arrived is passed on and the application is told a
        gap may remain.
        """
        harness, _ = self.connected()
        harness.push("user:u1", 4)
        requests = self.reconnect(harness, userSeq=8)
        harness.push("user:u1", 9)
        harness.refuseRequest(requests["user:u1"], "unavailable")
        self.assertEqual(harness.seqs("user:u1"), [4, 9])
        self.assertEqual(harness.unrecovered, ["user:u1"])
        self.assertEqual(harness.client.lastSeq("user:u1"), 9)

    def test_welcomeWithoutUserSeq(self) -> None:
        """
        Without C{userSeq} the client asks with since when it has one, and otherwise
        tracks the user's channel from its first event.
        """
        harness = Harness()
        harness.client.start()
        self.assertEqual(harness.welcome(userSeq=None).requests("subscribe"), [])
        harness.push("user:u1", 4)
        requests = self.reconnect(harness, userSeq=None)
        self.assertEqual(requests["user:u1"]["since"], 4)

    def test_anotherUser(self) -> None:
        """A token for another user starts that user's channel afresh."""
        harness, _ = self.connected()
        harness.push("user:u1", 4)
        harness.close(1006, "dropped")
        harness.reactor.advance(30)
        self.assertEqual(harness.welcome("u2", userSeq=9).requests("subscribe"), [])
        self.assertIsNone(harness.client.lastSeq("user:u1"))
        self.assertEqual(harness.client.lastSeq("user:u2"), 9)

    def test_recoveryFailedTellsTheApplication(self) -> None:
        """
        C{recovered: false}: the application is told before the events after the gap
        are passed on, and recovery continues from the server's C{seq}.
        """
        order: list[Any] = []
        harness, _ = self.connected(
            onRecoveryFailed=lambda channel: order.append(("recovery failed", channel)),
            onFrame=lambda frame: order.append(frame.get("seq")),
        )
        self.subscribed(harness, "conversation:c1", 10)
        harness.push("conversation:c1", 11)
        requests = self.reconnect(harness, userSeq=3)
        self.assertEqual(set(requests), {"conversation:c1"})
        self.assertEqual(requests["conversation:c1"]["since"], 11)
        harness.push("conversation:c1", 501)
        harness.answerSubscribe(requests["conversation:c1"], 501, False)
        self.assertEqual(order, [11, ("recovery failed", "conversation:c1"), 501])
        self.assertEqual(harness.client.lastSeq("conversation:c1"), 501)

    def test_resyncOnALiveConnection(self) -> None:
        """
        A resync frame (the server lost events it cannot replay) tells the application
        and moves the channel's position to the server's seq, so a later reconnect
        asks from there.
        """
        order: list[Any] = []
        harness, _ = self.connected(
            onRecoveryFailed=lambda channel: order.append(("recovery failed", channel)),
            onFrame=lambda frame: order.append((frame["type"], frame.get("seq"))),
        )
        self.subscribed(harness, "listing:7", 4)
        harness.factory.received(
            {"type": "resync", "channel": "listing:7", "seq": 1, "recovered": False}
        )
        harness.push("listing:7", 2)
        self.assertEqual(order, [("recovery failed", "listing:7"), ("resync", 1), ("event", 2)])
        self.assertEqual(harness.client.lastSeq("listing:7"), 2)
        requests = self.reconnect(harness, userSeq=3)
        self.assertEqual(requests["listing:7"]["since"], 2)

    def test_dropDuringResubscribeKeepsSince(self) -> None:
        """
        Events replayed on a connection that drops before the reply are not passed
        on: the next connection asks again from the same C{since}, so none is lost
        and none comes twice.
        """
        harness, _ = self.connected()
        self.subscribed(harness, "listing:1", 2)
        self.reconnect(harness, userSeq=3)
        harness.push("listing:1", 3)
        requests = self.reconnect(harness, userSeq=3)
        self.assertEqual(requests["listing:1"]["since"], 2)
        harness.push("listing:1", 3)
        harness.answerSubscribe(requests["listing:1"], 3, True, 1)
        self.assertEqual(harness.seqs("listing:1"), [3])

    def test_forbiddenResubscribeForgetsTheChannel(self) -> None:
        harness, _ = self.connected()
        self.subscribed(harness, "conversation:c9", 1)
        requests = self.reconnect(harness, userSeq=3)
        harness.refuseRequest(requests["conversation:c9"], "forbidden")
        self.assertEqual(harness.lost, [("conversation:c9", "forbidden")])
        self.assertEqual(harness.client.channels, frozenset())
        self.assertEqual(self.reconnect(harness, userSeq=3), {})

    def test_transientResubscribeIsRetried(self) -> None:
        harness, _ = self.connected()
        self.subscribed(harness, "listing:7", 4)
        requests = self.reconnect(harness, userSeq=3)
        assert harness.connection is not None
        harness.refuseRequest(requests["listing:7"], "unavailable")
        before = len(harness.connection.requests("subscribe"))
        harness.reactor.advance(0.25)
        retry = harness.connection.requests("subscribe")[before:]
        self.assertEqual([(r["channel"], r["since"]) for r in retry], [("listing:7", 4)])
        self.assertEqual(harness.client.channels, frozenset({"listing:7"}))

    def test_firstSubscribeRefused(self) -> None:
        """A refused first subscribe fails its caller and is not remembered."""
        harness, connection = self.connected()
        subscribing = harness.client.subscribe("conversation:not-mine")
        harness.refuseRequest(connection.requests("subscribe")[0], "forbidden")
        self.assertEqual(self.failureResultOf(subscribing, ServerError).value.code, "forbidden")
        self.assertEqual(harness.client.channels, frozenset())
        self.assertEqual(harness.lost, [])

    def test_unsubscribeForgets(self) -> None:
        harness, connection = self.connected()
        self.subscribed(harness, "listing:3", 1)
        harness.client.unsubscribe("listing:3").addErrback(lambda f: None)
        self.assertEqual(connection.requests("unsubscribe")[0]["channel"], "listing:3")
        self.assertEqual(self.reconnect(harness, userSeq=3), {})

    def test_tokenExpiringSendsAuth(self) -> None:
        harness, connection = self.connected()
        harness.factory.received({"type": "token.expiring", "expiresAt": 1})
        (auth,) = connection.requests("auth")
        self.assertEqual(auth["token"], "token-2")
        self.assertEqual(harness.frames[-1]["type"], "token.expiring")


# End to end against the real service -----------------------------------------------------


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll C{condition} on the real reactor."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.01)


class Live:
    """A L{ReconnectingClient} to a real service, recording what it saw."""

    def __init__(
        self,
        testCase: TestCase,
        url: str,
        tokens: Callable[[int], str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.tokens: list[str] = []
        self.states: list[State] = []
        self.frames: list[dict[str, Any]] = []
        self.unrecovered: list[str] = []
        self._mint = tokens or (lambda n: token("u1"))
        options: dict[str, Any] = {
            "backoff": Backoff(base=0.05, cap=0.2),
            "onState": self.states.append,
            "onFrame": self.frames.append,
            "onRecoveryFailed": self.unrecovered.append,
        }
        options.update(kwargs)
        self.client = ReconnectingClient(url, self.getToken, **options)
        testCase.addCleanup(self.client.close)

    def getToken(self) -> str:
        self.tokens.append(self._mint(len(self.tokens)))
        return self.tokens[-1]

    def opens(self) -> int:
        return sum(1 for state in self.states if state.phase == "open")

    async def opened(self, count: int) -> dict[str, Any]:
        await until(lambda: self.opens() >= count)
        assert self.client.welcome is not None
        return self.client.welcome

    def events(self, channel: str) -> list[tuple[int, str]]:
        return [
            (frame["seq"], frame["event"])
            for frame in self.frames
            if frame.get("type") == "event" and frame["channel"] == channel
        ]


def serverConnection(service: MarketplaceService) -> protocol.ClientProtocol:
    (connection,) = service.factory.connections
    return connection


class ReconnectTests(TestCase):
    """
    The reconnecting client against the whole service on a real port.
    """

    timeout = 30

    async def test_serverRestart1001Reconnects(self) -> None:
        service = await startService(self)
        live = Live(self, wsURL(service))
        live.client.start()
        first = await live.opened(1)
        await service.factory.closeAll()  # what a deploy does: 1001 to everyone
        second = await live.opened(2)
        self.assertNotEqual(first["connectionId"], second["connectionId"])
        waiting = [state for state in live.states if state.phase == "waiting"]
        self.assertEqual([(s.code, s.action) for s in waiting], [(1001, Action.RETRY)])
        self.assertEqual(len(live.tokens), 2)
        self.assertTrue((await live.client.request("ping"))["pong"])

    async def test_listenerRestartedReconnectsAfterBackoff(self) -> None:
        """
        The server goes away and comes back on the same port: refused attempts back
        off with growing delays until it is back.
        """
        service = await startService(self)
        port = wsPort(service)
        live = Live(self, wsURL(service), random=lambda: 1.0)
        live.client.start()
        await live.opened(1)
        await maybeDeferred(service.ports[0].stopListening)
        await service.factory.closeAll()
        await until(lambda: len([s for s in live.states if s.phase == "waiting"]) >= 4)
        self.assertEqual(live.opens(), 1)
        relistened = await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(
            service.factory
        )
        service.ports[0] = relistened  # stopped with the service
        await live.opened(2)
        waits = [s for s in live.states if s.phase == "waiting"]
        self.assertEqual(waits[0].code, 1001)
        self.assertTrue(all(s.code is None for s in waits[1:]), waits)  # refused
        self.assertEqual([s.delay for s in waits[:4]], [0.05, 0.1, 0.2, 0.2])
        self.assertTrue((await live.client.request("ping"))["pong"])

    async def test_disconnectedByTheAppDoesNotReconnect(self) -> None:
        service = await startService(self)
        live = Live(self, wsURL(service))
        live.client.start()
        await live.opened(1)
        serverConnection(service).close(protocol.CLOSE_DISCONNECTED, "logged out")
        final = await live.client.whenStopped()
        self.assertEqual((final.phase, final.code, final.action), ("closed", 4003, Action.STOP))
        await deferLater(reactor, 0.5)  # several backoff windows
        self.assertEqual(live.opens(), 1)
        self.assertEqual(len(live.tokens), 1)
        self.assertEqual(service.factory.connections, set())
        with self.assertRaises(Closed) as raised:
            await live.client.request("ping")
        self.assertEqual(raised.exception.code, 4003)

    async def test_authClose4001FetchesAFreshToken(self) -> None:
        service = await startService(self)
        live = Live(self, wsURL(service), tokens=lambda n: token("u1", ttl=600 + n))
        live.client.start()
        await live.opened(1)
        serverConnection(service).close(protocol.CLOSE_AUTH, "token expired")
        await live.opened(2)
        self.assertEqual(len(live.tokens), 2)
        waiting = [s for s in live.states if s.phase == "waiting"]
        self.assertEqual([(s.code, s.delay) for s in waiting], [(4001, 0.0)])
        identity = serverConnection(service).identity
        assert identity is not None
        self.assertEqual(identity.expiresAt, expiryOf(live.tokens[1]))

    async def test_refusedTokenAtHandshakeRetriesWithAFreshOne(self) -> None:
        """An expired token is refused with HTTP 401; the next token works."""
        service = await startService(self)
        live = Live(self, wsURL(service), tokens=lambda n: token("u1", ttl=-60 if n == 0 else 600))
        live.client.start()
        await live.opened(1)
        (waiting,) = [s for s in live.states if s.phase == "waiting"]
        self.assertEqual((waiting.action, waiting.delay), (Action.REAUTH, 0.0))
        self.assertEqual(handshakeStatus(waiting.reason), 401)

    async def test_tokenExpiringIsRefreshedOnTheLiveConnection(self) -> None:
        """
        C{token.expiring} is answered with C{auth} and a fresh token: the connection
        outlives the old token, and nothing reconnects.
        """
        service = await startService(self, **{"jwt-leeway": "0", "token-expiry-notice": "1.5"})
        live = Live(self, wsURL(service), tokens=lambda n: token("u1", ttl=2 if n == 0 else 600))
        live.client.start()
        await live.opened(1)
        old = expiryOf(live.tokens[0])
        await until(lambda: len(live.tokens) == 2)
        await until(lambda: serverConnection(service).identity.expiresAt != old)  # type: ignore[union-attr]
        self.assertEqual(
            serverConnection(service).identity.expiresAt,  # type: ignore[union-attr]
            expiryOf(live.tokens[1]),
        )
        await deferLater(reactor, max(0.0, old - time.time()) + 0.4)
        self.assertEqual(live.opens(), 1)
        self.assertEqual([s.phase for s in live.states], ["connecting", "open"])
        self.assertTrue((await live.client.request("ping"))["pong"])


class LiveRecoveryTests(TestCase):
    """
    Events published while the client is disconnected arrive after it reconnects,
    once each, in order, on a subscribed channel and on the user's own channel.
    """

    timeout = 30

    async def test_missedEventsReplayedAfterReconnect(self) -> None:
        service = await startService(self)
        port = wsPort(service)
        live = Live(self, wsURL(service))
        live.client.start()
        await live.opened(1)
        listing, mine = Channel("listing", "42"), Channel("user", "u1")
        result = await live.client.subscribe(str(listing))
        self.assertEqual(result["channel"], "listing:42")
        await service.live.publish(listing, "listing.updated", {"n": 1})
        await service.live.publish(mine, "notification", {"n": 1})
        await until(lambda: len(live.events("listing:42")) == 1 == len(live.events("user:u1")))

        await maybeDeferred(service.ports[0].stopListening)
        await service.factory.closeAll()
        await until(lambda: live.client.state.phase != "open")
        for n in (2, 3, 4):
            await service.live.publish(listing, "listing.updated", {"n": n})
            await service.live.publish(mine, "notification", {"n": n})
        relistened = await serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(
            service.factory
        )
        service.ports[0] = relistened
        await live.opened(2)
        await until(
            lambda: len(live.events("listing:42")) >= 4 and len(live.events("user:u1")) >= 4
        )
        await service.live.publish(listing, "listing.updated", {"n": 5})
        await until(lambda: len(live.events("listing:42")) >= 5)
        await deferLater(reactor, 0.2)  # room for a duplicate to show up

        listingSeqs = [seq for seq, _ in live.events("listing:42")]
        userSeqs = [seq for seq, _ in live.events("user:u1")]
        self.assertEqual(listingSeqs, list(range(listingSeqs[0], listingSeqs[0] + 5)))
        self.assertEqual(userSeqs, list(range(userSeqs[0], userSeqs[0] + 4)))
        self.assertEqual(
            [f["data"]["n"] for f in live.frames if f.get("channel") == "listing:42"],
            [1, 2, 3, 4, 5],
        )
        self.assertEqual(live.unrecovered, [])
