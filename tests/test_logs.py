"""
What the server logs about connections and HTTP requests: structured events a JSON log
can be searched by, each about one connection naming it.
"""

from __future__ import annotations

import treq
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import provider

from tests.test_connection import DeafProtocol, token, welcomed
from tests.test_service import httpURL, startService, wsURL


class Captured:
    def __init__(self, testCase: TestCase) -> None:
        self.events: list[LogEvent] = []

        @provider(ILogObserver)
        def observe(event: LogEvent) -> None:
            self.events.append(event)

        globalLogPublisher.addObserver(observe)
        testCase.addCleanup(globalLogPublisher.removeObserver, observe)


class LogTests(TestCase):
    timeout = 30

    async def test_accessLine(self) -> None:
        service = await startService(self)
        captured = Captured(self)
        response = await treq.get(httpURL(service, "/health?probe=1"), persistent=False)
        self.assertEqual(response.code, 200)
        await response.content()
        lines = [e for e in captured.events if e.get("access")]
        self.assertEqual(len(lines), 1)
        line = lines[0]
        self.assertEqual(
            (line["method"], line["path"], line["status"]), ("GET", "/health?probe=1", 200)
        )
        self.assertGreater(line["size"], 0)
        self.assertIn("GET /health?probe=1 200", formatEvent(line))

    async def test_autobahnLinesNameTheConnection(self) -> None:
        """
        Autobahn's own lines about a connection (here: dropping a peer that stopped
        answering pings) carry its connection id, like ours.
        """
        service = await startService(self, **{"ping-interval": "0.2", "ping-timeout": "0.2"})
        captured = Captured(self)
        deaf, client = await welcomed(
            self, wsURL(service, f"?token={token()}"), protocol=DeafProtocol
        )
        connectionId = client.welcome["connectionId"]
        await deaf.whenClosed()
        autobahn = [
            e
            for e in captured.events
            if str(e.get("log_namespace", "")).startswith("autobahn")
            and e.get("log_level") is not None
            and e["log_level"].name in ("warn", "error", "info")
        ]
        self.assertTrue(autobahn, "Autobahn logged nothing about the dropped peer")
        for event in autobahn:
            self.assertEqual(event.get("connectionId"), connectionId, formatEvent(event))
            self.assertIn(connectionId, formatEvent(event))
        ours = [e for e in captured.events if e.get("connectionId") == connectionId]
        self.assertTrue(any("closed" in formatEvent(e) for e in ours))
