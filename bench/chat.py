"""
Chat benchmark: N pairs of users sending each other messages through C{message.send},
with the database in the loop (a transaction per message).

    python bench/chat.py --pairs 100 --rates 100,500,1000,2000
    .tox/bench/bin/python bench/chat.py --json     # in tox -e bench's environment (uvloop)

Like bench/fanout.py, three kinds of process measured apart: the server (C{twist
marketplace-ws}, a real subprocess on throw-away ports and a throw-away database
schema), the chatters (one or more processes of lean WebSocket clients, see
L{_chatters}), and this process, which opens the N conversations through
C{POST /api/v1/conversations} (find-or-create, participants C{chat-a<i>} and
C{chat-b<i>}), drives the phases, and reads everyone's CPU time from C{/proc}: the
server's, the chatters', and PostgreSQL's (the backends that serve the server's pool,
found by client port in C{pg_stat_activity}, and every C{postgres} process of the
machine).

Each phase sends messages for a few seconds (at a fixed total rate, then flat out),
both users of every pair taking turns, waits until every acknowledged message has
reached the other participant or delivery stalls, and reports messages/s, the fraction
delivered, send-to-delivered and send-to-acknowledged latency, and CPU per message.
See docs/benchmarks.rst. Everything runs over 127.0.0.1; the server is stopped with
SIGTERM and its schema dropped at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from _chatters import serve
from _common import (
    FILE_MARGIN,
    BaseBenchmark,
    BenchFailed,
    ClientProcess,
    CpuTimes,
    _fmt,
    _milliseconds,
    addClientArguments,
    addPhaseArguments,
    addServerArguments,
    parseCommon,
    phaseNotes,
    planText,
    runMain,
    say,
    serverLines,
    tableHeading,
)
from _publisher import Connection, ResponseError
from _server import (
    ServerProcess,
    cpuDelta,
    cpuSeconds,
    cpuSecondsOf,
    databaseBackends,
    processesNamed,
    scrapeMetrics,
)
from _stats import merge, percentiles

#: The server's transaction for one message, as named in mws_db_query_seconds.
SEND_QUERY = 'query="message.send"'


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chat.py",
        description="Chat benchmark of marketplace-ws: N pairs of users, message.send "
        "with the database in the loop.",
    )
    parser.add_argument(
        "--pairs",
        "-n",
        type=int,
        default=100,
        metavar="N",
        help="conversations, two users and two connections each (100)",
    )
    addPhaseArguments(
        parser, rates="100,500,1000,2000", what="total message", verb="sends", duration=5.0
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds of an unreported first phase at 100 messages/s, which opens the "
        "database pool and fills the server's caches; 0 skips it (2)",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=100,
        metavar="N",
        help="messages sent and not yet acknowledged, at most, over all connections; "
        "when all are, the next message waits (100)",
    )
    parser.add_argument(
        "--body-bytes",
        type=int,
        default=64,
        metavar="N",
        help="length of each message's body, at least the t=<ns> stamp (64)",
    )
    addClientArguments(
        parser,
        spread="the pairs are spread over; both users of a pair share one",
        loop="event loop of the chatter processes; auto takes uvloop when installed",
        concurrency="",
        drain="its replies and deliveries",
    )
    addServerArguments(parser, "--database-pool-size=10")
    arguments = parseCommon(parser, argv)
    if arguments.pairs < 1 or any(r <= 0 for r in arguments.rates):
        parser.error("--pairs and every rate must be positive")
    if arguments.client_processes < 1 or arguments.in_flight < 1:
        parser.error("--client-processes and --in-flight must be at least 1")
    arguments.client_processes = min(arguments.client_processes, arguments.pairs)
    return arguments


class ChatterProcess(ClientProcess):
    """One chatter process (L{_chatters.serve}) and the pipe that drives it."""

    def __init__(
        self, port: int, pairs: list[tuple[int, str, str, str, str]], options: dict[str, Any]
    ) -> None:
        super().__init__(serve, (port, pairs, options), 2 * len(pairs))
        self.pairs = len(pairs)


async def openConversations(port: int, secret: str, pairs: int) -> list[int]:
    """C{POST /api/v1/conversations} for each pair, four requests at a time: their ids."""
    head = (
        "POST /api/v1/conversations HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {secret}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: "
    ).encode()
    ids: list[int] = [0] * pairs
    queue = list(range(pairs))

    async def worker(connection: Connection) -> None:
        while queue:
            i = queue.pop()
            body = json.dumps(
                {
                    "listingId": f"bench-{i}",
                    "participants": [
                        {"userId": f"chat-a{i}", "role": "buyer"},
                        {"userId": f"chat-b{i}", "role": "seller"},
                    ],
                }
            ).encode()
            try:
                status, content = await connection.post(body)
            except (OSError, ResponseError) as e:
                raise BenchFailed(f"POST /api/v1/conversations failed: {e}") from None
            if status not in (200, 201):
                raise BenchFailed(
                    f"POST /api/v1/conversations answered HTTP {status}: {content[:300]!r}"
                )
            ids[i] = int(json.loads(content)["id"])

    connections = [Connection(port, head) for _ in range(4)]
    try:
        await asyncio.gather(*(worker(c) for c in connections))
    finally:
        for connection in connections:
            connection.close()
    return ids


def _metric(samples: dict[str, float], name: str, labelled: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(name + "{") and labelled in k)


class ChatBenchmark(BaseBenchmark):
    def __init__(self, arguments: argparse.Namespace) -> None:
        super().__init__(arguments)
        self.clients: list[ChatterProcess] = []

    def filesNeeded(self) -> int:
        pairs: int = self.arguments.pairs
        return 2 * pairs + FILE_MARGIN

    def fileLimitProblem(self, hard: int, needed: int) -> str:
        return (
            f"chat.py: RLIMIT_NOFILE: the hard limit is {hard} open files and "
            f"{self.arguments.pairs} pairs need about {needed}: raise it or pass "
            "fewer --pairs"
        )

    def startServers(self, dataDir: str) -> ServerProcess:
        arguments = self.arguments
        env = self.environment()
        self.report["settings"] = {
            "pairs": arguments.pairs,
            "rates": arguments.rates,
            "duration": arguments.duration,
            "maxSeconds": arguments.max_seconds,
            "warmup": arguments.warmup,
            "inFlight": arguments.in_flight,
            "bodyBytes": arguments.body_bytes,
            "clientProcesses": arguments.client_processes,
            "clientLoop": arguments.loop,
            "serverArgs": arguments.server_arg,
            "schema": self.schema,
        }
        say(f"starting twist marketplace-ws (schema {self.schema})")
        return self.startServer(dataDir, env)

    def connect(self, server: ServerProcess) -> None:
        from marketplace_ws.auth import mintToken

        arguments = self.arguments
        count = arguments.pairs
        say(f"opening {count} conversations through POST /api/v1/conversations")
        started = time.monotonic()
        ids = asyncio.run(openConversations(server.ports["http"], self.apiSecret, count))
        opened = time.monotonic() - started

        def token(user: str) -> str:
            return mintToken(self.jwtSecret, user, ttl=3 * 3600)

        pairs = [
            (ids[i], f"chat-a{i}", token(f"chat-a{i}"), f"chat-b{i}", token(f"chat-b{i}"))
            for i in range(count)
        ]
        processes = arguments.client_processes
        options = self.clientOptions()
        say(f"connecting {2 * count} users from {processes} process(es)")
        cpuBefore = cpuSeconds(server.pid)
        self.clients = [
            ChatterProcess(server.ports["websocket"], pairs[i::processes], options)
            for i in range(processes)
        ]
        _, seconds, connected, failures = self.connectClients(60 + count / 10)
        time.sleep(0.5)
        self.report["connect"] = {
            "conversations": count,
            "conversationsSeconds": opened,
            "requested": 2 * count,
            "connected": connected,
            "failures": failures,
            "seconds": seconds,
            "serverCpuSeconds": cpuSeconds(server.pid) - cpuBefore,
        }
        say(
            f"{count} conversations in {opened:.1f} s; {connected} users subscribed in "
            f"{seconds:.1f} s" + (f"; failures: {failures}" if failures else "")
        )
        if connected < 2 * count:
            raise BenchFailed("not every user could connect: " + json.dumps(failures))

    # Phases

    def progress(self) -> tuple[int, int, int]:
        answers = [c.ask("progress") for c in self.clients]
        return (
            sum(a[0] for a in answers),
            sum(a[1] for a in answers),
            sum(a[2] for a in answers),
        )

    def drain(self) -> bool:
        """Wait until every acknowledged message was delivered, or delivery stalls."""
        deadline = time.monotonic() + self.arguments.drain_timeout
        last, lastChange = -1, time.monotonic()
        while True:
            delivered, acked, _ = self.progress()
            now = time.monotonic()
            if delivered >= acked:
                return True
            if delivered != last:
                last, lastChange = delivered, now
            elif now - lastChange > 1.0 or now > deadline:
                return False
            time.sleep(0.02)

    def phases(self, server: ServerProcess) -> None:
        plan: list[tuple[str, float | None, float]] = []
        if self.arguments.warmup > 0:
            plan.append(("warm-up", 100.0, self.arguments.warmup))
        for name, rate, seconds in plan + self.phasePlan():
            self.checkServers()
            say(f"phase {name}: sending for {seconds:g} s")
            result = self.phase(server, name, rate, seconds)
            if name == "warm-up":
                self.report["warmup"] = result
            else:
                self.report["phases"].append(result)

    def phase(
        self, server: ServerProcess, name: str, rate: float | None, seconds: float
    ) -> dict[str, Any]:
        arguments = self.arguments
        padding = b" " + b"x" * max(0, arguments.body_bytes - 22)
        for client in self.clients:
            client.ask("reset")
        backends = databaseBackends(arguments.database_url, [server.pid])
        postgres = processesNamed("postgres")
        metrics = scrapeMetrics(server.ports["http"])
        serverPids = [server.pid]
        clientPids = [c.pid for c in self.clients]
        backendTimes = cpuSecondsOf(backends)
        postgresTimes = cpuSecondsOf(postgres)
        cpu = CpuTimes.read(serverPids, clientPids)
        lines = server.lines
        started = time.monotonic()
        wait = arguments.drain_timeout
        for client in self.clients:
            share = client.pairs / arguments.pairs
            client.send(
                "run",
                None if rate is None else rate * share,
                seconds,
                max(1, round(arguments.in_flight * share)),
                padding,
                wait,
            )
        runs = [c.receive(timeout=seconds + wait + 30) for c in self.clients]
        complete = self.drain()
        measured = time.monotonic() - started
        cpu = cpu.since(serverPids, clientPids)
        (serverCpu,) = cpu.servers
        backendCpu = cpuDelta(backendTimes, cpuSecondsOf(backends))
        postgresCpu = cpuDelta(postgresTimes, cpuSecondsOf(postgres))
        after = scrapeMetrics(server.ports["http"])
        collected = [c.ask("collect") for c in self.clients]

        def total(key: str) -> int:
            return sum(c[key] for c in collected)

        acked, delivered = total("acked"), total("received")
        window = max(r["seconds"] for r in runs)
        deliveries = merge(c["histogram"] for c in collected)
        acks = merge(c["ackHistogram"] for c in collected)
        d50, d99 = percentiles(deliveries, [0.50, 0.99])
        a50, a99 = percentiles(acks, [0.50, 0.99])
        transactions = _metric(after, "mws_db_query_seconds_count", SEND_QUERY) - _metric(
            metrics, "mws_db_query_seconds_count", SEND_QUERY
        )
        transactionSeconds = _metric(after, "mws_db_query_seconds_sum", SEND_QUERY) - _metric(
            metrics, "mws_db_query_seconds_sum", SEND_QUERY
        )

        def perMessage(cpu: float) -> float | None:
            return 1000 * cpu / acked if acked else None

        return {
            "phase": name,
            "targetRate": rate,
            "sent": total("sent"),
            "acked": acked,
            "unanswered": sum(r["unanswered"] for r in runs),
            "errors": merge(c["errors"] for c in collected),
            "firstError": next((c["firstError"] for c in collected if c["firstError"]), None),
            "duplicates": total("duplicates"),
            "sendSeconds": window,
            "messagesPerSecond": acked / window if window > 0 else 0.0,
            "delivered": delivered,
            "echoes": total("echoes"),
            "deliveredFraction": delivered / acked if acked else None,
            "complete": complete,
            "deliveryMs": {
                "p50": _milliseconds(d50),
                "p99": _milliseconds(d99),
                "max": _milliseconds(max(c["maxLatency"] for c in collected))
                if delivered
                else None,
            },
            "ackMs": {
                "p50": _milliseconds(a50),
                "p99": _milliseconds(a99),
                "max": _milliseconds(max(c["maxAck"] for c in collected)) if acked else None,
            },
            # The server's own timing of each message's transaction (BEGIN to COMMIT),
            # waiting for a pool connection included, from /metrics.
            "transactions": transactions,
            "transactionMeanMs": 1000 * transactionSeconds / transactions if transactions else None,
            "serverCpuSeconds": serverCpu,
            "serverCpuMsPerMessage": perMessage(serverCpu),
            "serverCpuShare": serverCpu / measured,
            "databaseBackends": backends,
            "databaseCpuMsPerMessage": perMessage(backendCpu),
            "databaseCpuShare": backendCpu / measured,
            # Every postgres process of the machine: the WAL writer and checkpointer, and
            # other users' backends as well as the server's.
            "postgresAllCpuShare": postgresCpu / measured,
            "clientCpuShare": [seconds / measured for seconds in cpu.clients],
            "ownCpuShare": cpu.own / measured,
            "otherCpuShare": cpu.other(serverCpu, postgresCpu) / measured,
            "measuredSeconds": measured,
            "serverLogLines": server.lines - lines,
            "closedConnections": total("closedInPhase"),
            "closeCodes": merge(c["closeCodes"] for c in collected),
            "otherFrames": total("other"),
        }

    # Tear-down

    def stopServers(self) -> None:
        for server in self.servers:
            say("stopping the server (SIGTERM)")
            self.report["server"] = self.stopServer(server, {})

    def measure(self, dataDir: str) -> None:
        server = self.startServers(dataDir)
        self.connect(server)
        self.phases(server)


# Output


def table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        *tableHeading(report, "chat"),
        f"settings: {s['pairs']} pairs ({2 * s['pairs']} users) in "
        + planText(s, "messages")
        + f", {s['inFlight']} messages unacknowledged at most, bodies of {s['bodyBytes']} "
        "characters" + (f", server args {' '.join(s['serverArgs'])}" if s["serverArgs"] else ""),
    ]
    c = report.get("connect")
    if c:
        lines.append(
            f"connect: {c['conversations']} conversations opened in "
            f"{c['conversationsSeconds']:.1f} s; {c['connected']}/{c['requested']} users "
            f"subscribed to their conversation in {c['seconds']:.1f} s"
            + (f"; failures {c['failures']}" if c["failures"] else "")
        )
    phases = report["phases"]
    if phases:
        header = (
            f"{'phase':>7} {'msg/s':>6} {'delivered':>9} "
            f"{'dlv p50':>7} {'dlv p99':>7} {'dlv max':>7} "
            f"{'ack p50':>7} {'ack p99':>7} {'ack max':>7} {'tx ms':>6} "
            f"{'srv ms':>6} {'pg ms':>6} {'srv CPU':>7} {'pg CPU':>6} {'pg all':>6} "
            f"{'clients':>7} {'other':>6}  notes"
        )
        lines += ["", header, "-" * len(header)]
        for p in phases:
            notes = []
            if p["errors"]:
                notes.append(f"errors {p['errors']}")
            if p["unanswered"]:
                notes.append(f"{p['unanswered']} unanswered")
            notes += phaseNotes(p, p["messagesPerSecond"])
            if p["serverCpuShare"] > 0.9:
                notes.append("server CPU-bound")
            fraction = p["deliveredFraction"]
            lines.append(
                f"{p['phase']:>7} {p['messagesPerSecond']:>6,.0f} "
                f"{_fmt(None if fraction is None else 100 * fraction, 2) + '%':>9} "
                f"{_fmt(p['deliveryMs']['p50'], 2):>7} {_fmt(p['deliveryMs']['p99'], 2):>7} "
                f"{_fmt(p['deliveryMs']['max']):>7} "
                f"{_fmt(p['ackMs']['p50'], 2):>7} {_fmt(p['ackMs']['p99'], 2):>7} "
                f"{_fmt(p['ackMs']['max']):>7} {_fmt(p['transactionMeanMs'], 2):>6} "
                f"{_fmt(p['serverCpuMsPerMessage'], 3):>6} "
                f"{_fmt(p['databaseCpuMsPerMessage'], 3):>6} "
                f"{100 * p['serverCpuShare']:>6.0f}% {100 * p['databaseCpuShare']:>5.0f}% "
                f"{100 * p['postgresAllCpuShare']:>5.0f}% "
                f"{100 * sum(p['clientCpuShare']):>6.0f}% {100 * p['otherCpuShare']:>5.0f}%  "
                f"{'; '.join(notes)}"
            )
    server = report.get("server")
    if server:
        lines += serverLines(server)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    return runMain("chat.py", ChatBenchmark, parseArguments(argv), table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
