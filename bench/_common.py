"""
What the benchmark scripts (L{fanout}, L{chat}) share: their common options, the
pipe that drives a client process, CPU readings, the server's start and stop around a
run, the machine's description, and the table's common lines.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from multiprocessing.process import BaseProcess
from typing import Any

from _server import (
    ServerFailed,
    ServerProcess,
    cleanEnvironment,
    cpuSeconds,
    dropSchema,
    machineBusySeconds,
    serverArguments,
)
from _stats import merge
from _subscribers import raiseFileLimit

DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/test"
#: Open files the server needs besides its WebSocket connections (listeners, database
#: pool, logs, the HTTP API's connections).
FILE_MARGIN = 256


class BenchFailed(Exception):
    """The run cannot go on; the message says why."""


# Options


def addPhaseArguments(
    parser: argparse.ArgumentParser, *, rates: str, what: str, verb: str, duration: float
) -> None:
    """C{--rates}, C{--duration}, C{--max-seconds}: the phases, C{what} each C{verb}."""
    parser.add_argument(
        "--rates",
        default=rates,
        help=f"fixed {what} rates per second, one phase each, comma-separated; "
        f"empty for none ({rates})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=duration,
        metavar="SECONDS",
        help=f"seconds each fixed-rate phase {verb} ({duration:g})",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help=f"seconds the flat-out phase {verb}; 0 skips it (5)",
    )


def addClientArguments(
    parser: argparse.ArgumentParser, *, spread: str, loop: str, concurrency: str, drain: str
) -> None:
    """C{--client-processes}, C{--loop}, C{--connect-concurrency}, C{--drain-timeout}."""
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        metavar="N",
        help=f"processes {spread} (1)",
    )
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help=f"{loop} (auto)",
    )
    parser.add_argument(
        "--connect-concurrency",
        type=int,
        default=50,
        metavar="N",
        help=f"WebSocket handshakes in progress at once, per client process{concurrency} (50)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help=f"longest wait after a phase for {drain} (15)",
    )


def addServerArguments(parser: argparse.ArgumentParser, example: str) -> None:
    """C{--database-url}, C{--server-arg} (C{example} in its help) and C{--json}."""
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        help="PostgreSQL for the server (DATABASE_URL, else "
        f"{DEFAULT_DATABASE_URL}); a throw-away schema is made and dropped",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help=f"extra argument for twist marketplace-ws, repeatable (--server-arg={example})",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document instead of the table"
    )


def parseCommon(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse C{argv}: C{--rates} as a list of numbers, C{--loop auto} as the loop it takes."""
    arguments = parser.parse_args(argv)
    try:
        arguments.rates = [float(r) for r in arguments.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: {arguments.rates!r} is not a comma-separated list of numbers")
    if arguments.loop == "auto":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            arguments.loop = "asyncio"
        else:
            arguments.loop = "uvloop"
    return arguments


# Progress and the machine


def say(message: str) -> None:
    """Progress, on standard error so that --json output stays one document."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        # Other work on the machine skews every figure: say how busy it was.
        "loadAverage": os.getloadavg(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "marketplace-ws": version("marketplace-ws"),
        "twisted": version("twisted"),
        "autobahn": version("autobahn"),
        "revision": revision(),
    }


def revision() -> str:
    """The checkout's commit, and whether the tree differed from it (figures move with code)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        described = subprocess.run(
            ["git", "-C", here, "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return described.stdout.strip() or "?"


# Client processes


class ClientProcess:
    """One client process (C{target(pipe, *args)}, spawned) and the pipe that drives it."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipe, child = context.Pipe()
        self.process: BaseProcess = context.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        #: The connections it opens.
        self.count = count

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def send(self, *command: Any) -> None:
        self.pipe.send(command)

    def receive(self, timeout: float) -> Any:
        try:
            if self.pipe.poll(timeout):
                return self.pipe.recv()
        except (EOFError, OSError):
            self.process.join(1)
            raise BenchFailed(
                f"subscriber process {self.pid} died (exit status {self.process.exitcode}); "
                "its traceback is above"
            ) from None
        raise BenchFailed(f"subscriber process {self.pid} did not answer in {timeout:.0f} s")

    def ask(self, *command: Any, timeout: float = 30.0) -> Any:
        self.send(*command)
        return self.receive(timeout)

    async def askSoon(self, *command: Any, timeout: float = 30.0) -> Any:
        """L{ask}, without blocking the publisher's event loop (and the pinger) meanwhile."""
        self.send(*command)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.pipe.poll():
                    break
            except (EOFError, OSError):
                break
            await asyncio.sleep(0.002)
        return self.receive(0)

    def end(self) -> None:
        if self.process.is_alive():
            try:
                self.ask("stop", 1.0, timeout=10)
            except BenchFailed:
                pass
            self.process.join(5)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
        self.pipe.close()


# CPU


def _ownCpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuTimes:
    """
    CPU seconds of the server processes, the client processes, this process and the
    whole machine (busy): read at once, or (L{since}) spent since an earlier reading.
    """

    def __init__(self, servers: list[float], clients: list[float], own: float, busy: float):
        self.servers = servers
        self.clients = clients
        self.own = own
        self.busy = busy

    @classmethod
    def read(cls, servers: Sequence[int], clients: Sequence[int]) -> CpuTimes:
        return cls(
            [cpuSeconds(pid) for pid in servers],
            [cpuSeconds(pid) for pid in clients],
            _ownCpu(),
            machineBusySeconds(),
        )

    def since(self, servers: Sequence[int], clients: Sequence[int]) -> CpuTimes:
        """What the same processes spent from this reading to now."""
        now = CpuTimes.read(servers, clients)
        return CpuTimes(
            [a - b for a, b in zip(now.servers, self.servers, strict=True)],
            [a - b for a, b in zip(now.clients, self.clients, strict=True)],
            now.own - self.own,
            now.busy - self.busy,
        )

    def other(self, server: float, more: float) -> float:
        """The machine's CPU besides C{server}, the clients', this process's and C{more}."""
        return max(0.0, self.busy - server - sum(self.clients) - self.own - more)


# The run


class BaseBenchmark:
    """
    A run: a throw-away schema, secrets and data directory, the server processes started
    in it (L{startServer}), the client processes (L{clients}), and L{report}. Subclasses
    say what they measure (L{measure}), how many open files they need, and how their
    servers stop.
    """

    def __init__(self, arguments: argparse.Namespace) -> None:
        self.arguments = arguments
        self.jwtSecret = secrets.token_urlsafe(48)
        self.apiSecret = secrets.token_urlsafe(48)
        self.schema = f"bench_{os.getpid()}_{secrets.token_hex(3)}"
        self.servers: list[ServerProcess] = []
        self.clients: list[Any] = []
        self.report: dict[str, Any] = {"machine": machine(), "phases": []}

    @property
    def server(self) -> ServerProcess | None:
        """The first server process (the one the HTTP API is called on)."""
        return self.servers[0] if self.servers else None

    # Set-up

    def filesNeeded(self) -> int:
        raise NotImplementedError

    def fileLimitProblem(self, hard: int, needed: int) -> str:
        raise NotImplementedError

    def checkFileLimit(self) -> None:
        needed = self.filesNeeded()
        # Raised here, before anything is started, so the server inherits it too.
        soft, hard = raiseFileLimit(needed)
        self.report["fileLimit"] = {"soft": soft, "hard": hard, "needed": needed}
        if soft != resource.RLIM_INFINITY and soft < needed:
            raise SystemExit(self.fileLimitProblem(hard, needed))

    def environment(self, **extra: str) -> dict[str, str]:
        # Secrets travel in the environment, not in argv where ps shows them.
        settings = {
            "DATABASE_URL": self.arguments.database_url,
            "JWT_SECRET": self.jwtSecret,
            "HTTP_API_SECRET": self.apiSecret,
        }
        settings.update(extra)
        return cleanEnvironment(settings)

    def startServer(self, directory: str, env: dict[str, str], label: str = "") -> ServerProcess:
        """Start one more server process in C{directory} and wait until it listens."""
        server = ServerProcess(
            serverArguments(self.schema, directory, self.arguments.server_arg), env, cwd=directory
        )
        self.servers.append(server)
        server.waitReady(60)
        say(
            f"server{label} pid {server.pid}: WebSocket port {server.ports['websocket']}, "
            f"HTTP port {server.ports['http']}"
        )
        return server

    def clientOptions(self, **more: Any) -> dict[str, Any]:
        """What every client process is told: handshakes at once, their timeout, its loop."""
        return {
            "concurrency": self.arguments.connect_concurrency,
            "timeout": 30.0,
            "loop": self.arguments.loop,
            **more,
        }

    def connectClients(self, timeout: float) -> tuple[list[Any], float, int, dict[str, int]]:
        """Have every client process connect: its answers, the seconds, connections, failures."""
        started = time.monotonic()
        for client in self.clients:
            client.send("connect")
        answers = [c.receive(timeout=timeout) for c in self.clients]
        seconds = time.monotonic() - started
        connected: int = sum(a["connected"] for a in answers)
        failures: dict[str, int] = merge(a["failures"] for a in answers)
        return answers, seconds, connected, failures

    # Phases

    def phasePlan(self) -> list[tuple[str, float | None, float]]:
        """The measured phases: name, rate (None: flat out), seconds."""
        arguments = self.arguments
        plan: list[tuple[str, float | None, float]] = [
            (f"{rate:g}/s", rate, arguments.duration) for rate in arguments.rates
        ]
        if arguments.max_seconds > 0:
            plan.append(("max", None, arguments.max_seconds))
        return plan

    def checkServers(self) -> None:
        for server in self.servers:
            if not server.alive():
                raise ServerFailed(server.death())

    def measure(self, dataDir: str) -> None:
        raise NotImplementedError

    # Tear-down

    def stopServer(self, server: ServerProcess, final: dict[str, Any]) -> dict[str, Any]:
        """Stop C{server} (SIGTERM): C{final}, with how it ended added."""
        status, seconds = server.stop(timeout=30)
        final.update(
            {
                "exitStatus": status,
                "shutdownSeconds": seconds,
                "logLines": server.lines,
                "logLevels": dict(server.levels),
                "problems": list(server.problems),
            }
        )
        return final

    def stopServers(self) -> None:
        raise NotImplementedError

    def stopOthers(self) -> None:
        """What else the run started, stopped after the clients."""

    def finish(self) -> None:
        self.stopServers()
        for client in self.clients:
            client.end()
        self.stopOthers()
        try:
            dropSchema(self.arguments.database_url, self.schema)
        except Exception as e:  # noqa: BLE001 - reported, never hides the run's own error
            say(f"could not drop schema {self.schema}: {e}")

    def run(self) -> dict[str, Any]:
        self.checkFileLimit()
        with tempfile.TemporaryDirectory(prefix="mws-bench-") as dataDir:
            try:
                self.measure(dataDir)
            finally:
                self.finish()
        return self.report


def runMain(
    name: str,
    benchmark: Callable[[argparse.Namespace], BaseBenchmark],
    arguments: argparse.Namespace,
    table: Callable[[dict[str, Any]], str],
) -> int:
    """Run the benchmark and print its report: the exit status (2: phases skipped)."""
    # Interrupted or terminated, the bench still stops its server and drops its schema.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = benchmark(arguments).run()
    except (ServerFailed, BenchFailed) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 1
    if arguments.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))
    return 2 if report.get("skipped") else 0


# Output


def _milliseconds(microseconds: int | None) -> float | None:
    return None if microseconds is None else microseconds / 1000


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def tableHeading(
    report: dict[str, Any], kind: str, versions: str = "", more: str = ""
) -> list[str]:
    """The table's title and machine lines: C{versions} after Twisted's, C{more} at the end."""
    m = report["machine"]
    return [
        f"marketplace-ws {kind} benchmark, {m['date']}",
        f"machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, Python {m['python']}, "
        f"marketplace-ws {m['marketplace-ws']} ({m.get('revision', '?')}), Twisted {m['twisted']}"
        f"{versions}; load average before the run {m['loadAverage'][0]:.2f}{more}",
    ]


def planText(settings: dict[str, Any], unit: str) -> str:
    """The settings line's client processes and phases, at so many C{unit}s a second."""
    s = settings
    return (
        f"{s['clientProcesses']} process(es) ({s['clientLoop']}), phases of {s['duration']:g} s "
        f"at {', '.join(f'{r:g}' for r in s['rates']) or 'no'} {unit}/s"
        + (f" then flat out for {s['maxSeconds']:g} s" if s["maxSeconds"] > 0 else "")
    )


def phaseNotes(p: dict[str, Any], achieved: float) -> list[str]:
    """The notes every phase may have: incomplete, closed connections, below its rate."""
    notes = []
    if not p["complete"]:
        notes.append("drain incomplete")
    if p["closedConnections"]:
        notes.append(f"{p['closedConnections']} closed {p['closeCodes']}")
    if p["targetRate"] and achieved < 0.95 * p["targetRate"]:
        notes.append("below target rate")
    return notes


def serverLines(server: dict[str, Any], shutdown: str = "") -> list[str]:
    """How the (first) server ended: C{shutdown} said after its shutdown time."""
    return [
        "",
        f"server: exit status {server['exitStatus']} after SIGTERM, shutdown took "
        f"{server['shutdownSeconds']:.2f} s{shutdown}; {server['logLines']} log lines "
        f"{server['logLevels']}",
        *(f"  {problem}" for problem in server["problems"]),
    ]
