"""
Keep tokens out of every log line, Twisted's and Autobahn's included.

Our own log calls never name a token, but libraries log what they see: a request
line with C{?token=}, a header. L{Redactor} is a log observer that runs before the
observers that write, and scrubs each event in place (observers of one publisher
share the event dict), so whatever writes the event sees only C{[redacted]}.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import ILogObserver, LogEvent, LogPublisher, globalLogPublisher
from zope.interface import implementer

REDACTED = "[redacted]"

_PATTERNS = (
    # ?token=… and &access_token=… in URLs and request lines.
    re.compile(r"(?i)(\b(?:access_)?token=)[^&\s\"'#;,)]+"),
    # Authorization: Bearer …
    re.compile(r"(?i)(\bbearer\s+)[^\s\"',;]+"),
    # Anything shaped like a JWT, wherever it appears.
    re.compile(r"()\beyJ[\w-]*\.[\w-]*\.[\w-]*"),
)


def redact(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def _needsWork(text: str) -> bool:
    lowered = text.lower()
    return "token=" in lowered or "bearer" in lowered or "eyj" in lowered


@implementer(ILogObserver)
class Redactor:
    """Scrub tokens from the fields of each event, in place."""

    def __call__(self, event: LogEvent) -> None:
        for key, value in list(event.items()):
            if key.startswith("log_") and key != "log_text":
                continue
            if isinstance(value, str):
                if _needsWork(value):
                    event[key] = redact(value)
            elif isinstance(value, bytes):
                text = value.decode("utf-8", "replace")
                if _needsWork(text):
                    event[key] = redact(text)
            elif not isinstance(value, int | float | bool | type(None)):
                text = _safeRepr(value)
                if _needsWork(text):
                    event[key] = redact(text)


def _safeRepr(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a broken __str__ must not break logging
        return ""


def installRedaction(publisher: LogPublisher = globalLogPublisher) -> Redactor:
    """
    Add the redactor to C{publisher}. Call it before logging begins (C{twist} adds its
    writing observers after C{makeService}), so the redactor sees each event first.
    """
    redactor = Redactor()
    publisher.addObserver(redactor)
    return redactor
