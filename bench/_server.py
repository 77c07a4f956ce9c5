"""
The server under test: C{twist marketplace-ws} as a real subprocess, its ports read
from its JSON log lines, its CPU time and memory read from C{/proc}.

Measuring a real process (not a service started inside the benchmark's own reactor)
keeps the server's CPU apart from the clients', and runs the exact code path an
operator runs, JSON logging included.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerFailed(Exception):
    """The server did not start, or died; the message carries its last output."""


def binary(name: str) -> str:
    """A console script installed next to the running interpreter (tox's venv)."""
    return os.path.join(os.path.dirname(sys.executable), name)


def cleanEnvironment(extra: Mapping[str, str]) -> dict[str, str]:
    """
    This process's environment without any marketplace-ws setting, so a value exported
    in the operator's shell (a WS_* limit, a stray DATABASE_URL) cannot change what is
    measured; the benchmark passes every setting it depends on explicitly.
    """
    from marketplace_ws.config import SETTINGS

    names = {s.env for s in SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


class ServerProcess:
    """
    One running server. A thread reads its standard output (JSON log records), so the
    pipe never fills up and stalls the server, and counts what it logs.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], cwd: str) -> None:
        argv = [binary("twist"), "marketplace-ws", *args]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
        )
        self.pid = self.process.pid
        self.ports: dict[str, int] = {}
        self.ready = threading.Event()
        self.lines = 0
        self.levels: collections.Counter[str] = collections.Counter()
        #: The last records at warning level or above, formatted, for the report.
        self.problems: collections.deque[str] = collections.deque(maxlen=20)
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._threads = [
            threading.Thread(target=self._readStdout, daemon=True),
            threading.Thread(target=self._readStderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _readStdout(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self.lines += 1
            try:
                # twist's JSON log format starts each record with RS (0x1e).
                event = json.loads(raw.strip(b"\x1e\n"))
            except ValueError:
                self.tail.append(raw.decode(errors="replace").rstrip())
                continue
            level = event.get("log_level")
            name = level.get("name", "?") if isinstance(level, dict) else str(level)
            self.levels[name] += 1
            text = _format(event)
            self.tail.append(text)
            if name in {"warn", "error", "critical"}:
                self.problems.append(f"[{name}] {text}")
            if "listener" in event and event.get("port") is not None:
                self.ports[event["listener"]] = int(event["port"])
            if event.get("log_format") == "marketplace-ws ready":
                self.ready.set()

    def _readStderr(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.stderr.append(raw.decode(errors="replace").rstrip())

    def waitReady(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.1):
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"the server exited with status {self.process.returncode} before it was "
                    f"ready:\n" + "\n".join([*self.tail, *self.stderr])
                )
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"the server was not ready after {timeout:.0f} s:\n" + "\n".join(self.tail)
                )

    def alive(self) -> bool:
        return self.process.poll() is None

    def death(self) -> str:
        """Why the server is gone: its exit status and its last words."""
        status = self.process.poll()
        how = (
            f"was killed by signal {-status}"
            if status is not None and status < 0
            else (f"exited with status {status}")
        )
        last = [*list(self.tail)[-10:], *self.stderr]
        return f"the server (pid {self.pid}) {how} during the run; its last lines:\n" + "\n".join(
            f"  {line}" for line in last
        )

    def stop(self, timeout: float) -> tuple[int, float]:
        """
        SIGTERM, as an orchestrator stops it, then wait: C{(exit status, seconds)}.
        Past C{timeout} the process is killed (status then negative).
        """
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for thread in self._threads:
            thread.join(5)
        return self.process.returncode, time.monotonic() - started


def _format(event: dict[str, Any]) -> str:
    try:
        from twisted.logger import formatEvent

        return formatEvent(event)
    except Exception:  # noqa: BLE001 - a record that cannot be formatted is still shown
        return str(event.get("log_format", event))


def cpuSeconds(pid: int) -> float:
    """User plus system CPU time of a process so far, from C{/proc/PID/stat}."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def machineBusySeconds() -> float:
    """CPU time all processors have spent busy since boot (C{/proc/stat}), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLOCK_TICKS


def rssBytes(pid: int) -> int:
    """Resident set size of a process, from C{VmRSS} in C{/proc/PID/status}."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def dropSchema(url: str, schema: str) -> None:
    """Drop the benchmark's throw-away schema, with everything the migrations made in it."""
    import psycopg2

    from marketplace_ws.db import parse_database_url

    conn = psycopg2.connect(parse_database_url(url).dsn(), connect_timeout=5)
    try:
        conn.autocommit = True
        conn.cursor().execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        conn.close()


def scrapeMetrics(port: int, timeout: float = 10.0) -> dict[str, float]:
    """
    C{GET /metrics} of a server: each sample's value by its name with labels, as the
    text exposition writes it (C{mws_frames_out_total{type="event"}}). The benchmark
    starts the server without C{METRICS_TOKEN}, so no bearer token is needed.
    """
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


def metricSum(samples: dict[str, float], name: str) -> float:
    """The sum of a metric's samples over all its labels (0 when it is absent)."""
    return sum(
        value
        for key, value in samples.items()
        if key == name or (key.startswith(name + "{") and key.endswith("}"))
    )


def freePort() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the kernel's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """
    A private C{redis-server} for one run: 127.0.0.1 only, on a port of its own, no
    persistence, its files in a throw-away directory. Nothing else talks to it, so no
    key, counter or pub/sub channel of the run can collide with another's, and its CPU
    time is the run's.
    """

    def __init__(self, directory: str, binary: str = "redis-server") -> None:
        import shutil

        path = shutil.which(binary)
        if path is None:
            raise ServerFailed(f"{binary} is not installed: pass --redis-url redis://…")
        self.port = freePort()
        self.process = subprocess.Popen(
            [
                path,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--protected-mode", "yes"),
                *("--dir", directory, "--logfile", os.path.join(directory, "redis.log")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.pid = self.process.pid
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def waitReady(self, timeout: float) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"redis-server exited with status {self.process.returncode}: " + self._log()
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"redis-server was not ready after {timeout:.0f} s")
            time.sleep(0.05)

    def _log(self) -> str:
        try:
            with open(os.path.join(self.directory, "redis.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _socketInodes(pid: int) -> set[int]:
    inodes = set()
    directory = f"/proc/{pid}/fd"
    for name in os.listdir(directory):
        try:
            target = os.readlink(os.path.join(directory, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def connectedPorts(pid: int, remotePort: int) -> list[int]:
    """
    The local ports of a process's TCP connections to C{remotePort} (its database
    connections), from C{/proc/PID/fd} and C{/proc/PID/net/tcp*}.
    """
    inodes = _socketInodes(pid)
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, inode = fields[1], fields[2], int(fields[9])
                    if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remotePort:
                        ports.append(int(local.rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def databaseBackends(url: str, pids: Sequence[int]) -> list[int]:
    """
    The PostgreSQL backend processes serving these processes' database connections:
    matched by client port in C{pg_stat_activity}. Their CPU time is the database's
    share of the work (C{/proc/PID/stat} is readable by anyone on Linux).
    """
    import psycopg2

    from marketplace_ws.db import parse_database_url

    parsed = parse_database_url(url)
    ports: list[int] = []
    for pid in pids:
        ports += connectedPorts(pid, parsed.port or 5432)
    if not ports:
        return []
    conn = psycopg2.connect(parsed.dsn(), connect_timeout=5)
    try:
        conn.autocommit = True
        cursor = conn.cursor()
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s)", (ports,))
        return [row[0] for row in cursor.fetchall()]
    finally:
        conn.close()


def processesNamed(name: str) -> list[int]:
    """Every process whose command name (C{/proc/PID/stat}'s second field) is C{name}."""
    pids = []
    wanted = f"({name})".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read(256)
        except OSError:
            continue
        if stat[stat.index(b" ") + 1 :].startswith(wanted):
            pids.append(int(entry))
    return pids


def cpuSecondsOf(pids: Sequence[int]) -> dict[int, float]:
    """CPU time of each process still there (a process gone since is left out)."""
    times = {}
    for pid in pids:
        try:
            times[pid] = cpuSeconds(pid)
        except (OSError, ValueError, IndexError):
            continue
    return times


def cpuDelta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two L{cpuSecondsOf}, by the processes in both."""
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def serverArguments(schema: str, dataDir: str, extra: Sequence[str]) -> list[str]:
    """C{twist marketplace-ws}'s arguments for a benchmark: loopback, kernel-picked ports."""
    return [
        # Loopback only: nothing of the benchmark is reachable from outside.
        "--ws-endpoint",
        "tcp:0:interface=127.0.0.1",
        "--http-endpoint",
        "tcp:0:interface=127.0.0.1",
        "--database-schema",
        schema,
        "--migrate",
        "--data-dir",
        dataDir,
        *extra,
    ]
