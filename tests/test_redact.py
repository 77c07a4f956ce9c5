"""
The log redactor: tokens never reach an observer that writes.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import ILogObserver, LogEvent, LogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import provider

from marketplace_ws.auth import mintToken
from marketplace_ws.redact import REDACTED, installRedaction, redact

TOKEN = mintToken("r" * 40, "user-7")


class RedactTests(SynchronousTestCase):
    def test_patterns(self) -> None:
        self.assertEqual(
            redact("GET /?token=abc.def&x=1 HTTP/1.1"), f"GET /?token={REDACTED}&x=1 HTTP/1.1"
        )
        self.assertEqual(
            redact("Authorization: Bearer sekrit"), f"Authorization: Bearer {REDACTED}"
        )
        self.assertNotIn(TOKEN, redact(f"header {TOKEN} trailer"))
        self.assertEqual(redact("nothing to see"), "nothing to see")

    def test_observerScrubsBeforeWriters(self) -> None:
        """
        Added before the writing observer, the redactor scrubs fields of any type,
        so the writer formats only redacted text.
        """
        publisher = LogPublisher()
        installRedaction(publisher)
        written: list[str] = []

        @provider(ILogObserver)
        def writer(event: LogEvent) -> None:
            written.append(formatEvent(event))

        publisher.addObserver(writer)

        class Request:
            def __str__(self) -> str:
                return f"<request /chat?token={TOKEN}>"

        event: dict[str, Any] = {
            "log_format": "{a} {b} {c}",
            "a": f"/?token={TOKEN}",
            "b": f"Bearer {TOKEN}".encode(),
            "c": Request(),
        }
        publisher(event)
        self.assertEqual(len(written), 1)
        self.assertNotIn(TOKEN, written[0])
        self.assertIn(REDACTED, written[0])
