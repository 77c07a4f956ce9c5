"""
Run C{twist marketplace-ws} as a real subprocess, the way an operator does, and learn
its ports from its JSON log lines.

C{twist} writes JSON log lines when its standard output is not a terminal; the
service logs one C{listening} event per listener with its bound port, so tests pass
port 0 and read the real ports back.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


def binary(name: str) -> str:
    """A console script installed next to the running interpreter."""
    return os.path.join(os.path.dirname(sys.executable), name)


def baseEnvironment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    The test process's environment without any marketplace-ws setting, so a value
    exported in the developer's shell cannot change what a test sees.
    """
    from marketplace_ws.config import SETTINGS

    env = {k: v for k, v in os.environ.items() if k not in {s.env for s in SETTINGS}}
    env.update(extra or {})
    return env


class ServerProcess(ProcessProtocol):
    """
    One server subprocess: C{ready} fires when both listeners are up, C{ended} with
    the exit code when it ends.
    """

    def __init__(self) -> None:
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[int] = Deferred()
        self.stdout = b""
        self.stderr = b""
        self.events: list[dict[str, Any]] = []
        self.ports: dict[str, int] = {}
        self._partial = b""

    @property
    def wsPort(self) -> int:
        return self.ports.get("websocket") or self.ports["http+websocket"]

    @property
    def httpPort(self) -> int:
        return self.ports.get("http") or self.ports["http+websocket"]

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        self._partial += data
        *lines, self._partial = self._partial.split(b"\n")
        for line in lines:
            try:
                # twist's JSON log format starts each record with RS (0x1e).
                event = json.loads(line.strip(b"\x1e"))
            except ValueError:
                continue
            self.events.append(event)
            if "listener" in event and event.get("port") is not None:
                self.ports[event["listener"]] = int(event["port"])
            if event.get("log_format") == "marketplace-ws ready" and not self.ready.called:
                self.ready.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        if reason.check(ProcessDone):
            code = 0
        elif reason.check(ProcessTerminated):
            value = reason.value
            code = value.exitCode if value.exitCode is not None else -(value.signal or 0)
        else:
            code = -1
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(
                    f"server exited with {code} before it was ready:\n"
                    f"{self.stderr.decode(errors='replace')}"
                )
            )
        self.ended.callback(code)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.transport is not None
        self.transport.signalProcess(sig)

    def logText(self) -> str:
        """Every log message, formatted, one per line (for greps in assertions)."""
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.events)


def spawnServer(
    args: Sequence[str], env: Mapping[str, str], cwd: str | None = None
) -> ServerProcess:
    """
    Start C{twist marketplace-ws ARGS}. The caller must wait for C{ended} (or signal
    and wait) so no process outlives its test.
    """
    process = ServerProcess()
    argv = [binary("twist"), "marketplace-ws", *args]
    reactor.spawnProcess(process, argv[0], argv, env=dict(env), path=cwd)
    return process


def runCommand(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None
) -> Deferred[tuple[int, bytes, bytes]]:
    """Run a short command to completion: C{(exit code, stdout, stderr)}."""
    process = ServerProcess()
    process.ready.addErrback(lambda _: None)
    reactor.spawnProcess(process, argv[0], list(argv), env=dict(env), path=cwd)
    return process.ended.addCallback(lambda code: (code, process.stdout, process.stderr))
