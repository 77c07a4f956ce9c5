"""
Fan-out benchmark: one channel, C subscribers, events published through the HTTP API.

    tox -e bench -- --connections 5000 --json

Three kinds of process, measured apart: the server (C{twist marketplace-ws}, a real
subprocess on throw-away ports and a throw-away database schema), the subscribers (one
or more processes of lean WebSocket clients, one user each, all subscribed to
C{listing:bench}), and this process, which publishes through C{POST /api/v1/publish}
and reads everyone's CPU time and memory from C{/proc}.

Each phase publishes for a few seconds (at a fixed rate, then as fast as answers come
back), waits until every subscriber has every event or delivery stalls, and reports
publishes/s, deliveries/s, the fraction delivered, publish-to-receive latency, and the
server's CPU per 1,000 deliveries. One more connection, subscribed to nothing, pings
the server ten times a second meanwhile: its round trips show how long a fan-out keeps
every other client of the process waiting. See docs/benchmarks.rst for what each
figure means.

With C{--processes 2} (or more) the server processes share one Redis (C{--redis-url},
by default a private C{redis-server} of the run's own on a free port): the subscribers
are dealt over them in turn, events are published through the first one's API, and
each phase also reports the Redis round trips per event published, read from every
process's C{/metrics} before and after it. C{--redis-url} with one process measures
the Redis broker against the in-memory one.
Everything runs over 127.0.0.1; the servers (and a private Redis) are stopped with
SIGTERM and the schema dropped at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from typing import Any

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
from _publisher import PhaseResult, Publisher
from _server import (
    RedisServer,
    ServerProcess,
    cpuSeconds,
    metricSum,
    rssBytes,
    scrapeMetrics,
)
from _stats import merge, percentiles
from _subscribers import Pinger, openPinger, serve

CHANNEL = "listing:bench"
#: Seconds between the pinger's requests.
PING_INTERVAL = 0.1


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fanout.py",
        description="Fan-out benchmark of marketplace-ws: C subscribers of one channel, "
        "events published through POST /api/v1/publish.",
    )
    parser.add_argument(
        "--connections",
        "-c",
        type=int,
        default=1000,
        metavar="C",
        help="subscribers, one user and one connection each (1000)",
    )
    addPhaseArguments(parser, rates="10,100,1000", what="publish", verb="publishes", duration=3.0)
    parser.add_argument(
        "--in-flight",
        type=int,
        default=8,
        metavar="N",
        help="publish requests in flight at most, one per kept-alive HTTP connection (8)",
    )
    parser.add_argument(
        "--payload-bytes",
        type=int,
        default=0,
        metavar="N",
        help="padding added to each event's data, in bytes (0: data is "
        '{"t","n"} only, a frame of about 110 bytes)',
    )
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="subscribers offer permessage-deflate as browsers do; the server then "
        "compresses events of 1 KiB or more per connection (see --payload-bytes)",
    )
    addClientArguments(
        parser,
        spread="the subscribers are spread over",
        loop="event loop of the subscriber processes; auto takes uvloop when it is "
        "installed (tox -e bench installs it): less client CPU per frame",
        concurrency="; kept under the listen backlog",
        drain="its events to arrive",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="server processes sharing one Redis (REDIS_URL); the subscribers are dealt "
        "over them in turn, events are published through the first one (1)",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="REDIS_URL for the server processes: redis://127.0.0.1:6379/N, or 'private' "
        "to start a redis-server of the run's own on a free port (no persistence); "
        "unset with one process: the in-memory broker; unset with more: private",
    )
    addServerArguments(parser, "--permessage-deflate=false")
    arguments = parseCommon(parser, argv)
    if arguments.connections < 1 or any(r <= 0 for r in arguments.rates):
        parser.error("--connections and every rate must be positive")
    if arguments.client_processes < 1 or arguments.in_flight < 1 or arguments.processes < 1:
        parser.error("--processes, --client-processes and --in-flight must be at least 1")
    if arguments.processes > 1 and arguments.redis_url is None:
        arguments.redis_url = "private"
    if arguments.redis_url not in (None, "private") and not arguments.redis_url.startswith(
        ("redis://", "rediss://")
    ):
        parser.error("--redis-url: redis://host:port/db, rediss://… or private")
    return arguments


class SubscriberProcess(ClientProcess):
    """One subscriber process and the pipe that drives it."""

    def __init__(
        self,
        port: int | list[int],
        tokens: list[str],
        options: dict[str, Any],
        channel: str = CHANNEL,
    ) -> None:
        super().__init__(serve, (port, channel, tokens, options), len(tokens))


class Benchmark(BaseBenchmark):
    def __init__(self, arguments: argparse.Namespace) -> None:
        super().__init__(arguments)
        self.redis: RedisServer | None = None
        # A Redis the run does not own may be shared with others (the key prefix is the
        # broker's, not a setting): a channel and user ids of the run's own keep their
        # events, seq counters and presence entries apart from this run's.
        external = arguments.redis_url not in (None, "private")
        tag = secrets.token_hex(4)
        self.channel = f"{CHANNEL}-{tag}" if external else CHANNEL
        self.userPrefix = f"bench-{tag}-" if external else "bench-"
        self.clients: list[SubscriberProcess] = []

    # Set-up

    def filesNeeded(self) -> int:
        connections: int = self.arguments.connections
        return connections + FILE_MARGIN

    def fileLimitProblem(self, hard: int, needed: int) -> str:
        return (
            f"fanout.py: RLIMIT_NOFILE: the hard limit is {hard} open files, and "
            f"{self.arguments.connections} connections need about {needed} in the "
            f"server: raise it (ulimit -Hn, LimitNOFILE= under systemd, --ulimit "
            f"nofile= under Docker) or pass fewer --connections"
        )

    def startRedis(self, dataDir: str) -> str | None:
        """The REDIS_URL to give the servers, after starting a private Redis if asked."""
        url: str | None = self.arguments.redis_url
        if url != "private":
            return url
        directory = os.path.join(dataDir, "redis")
        os.mkdir(directory)
        self.redis = RedisServer(directory)
        self.redis.waitReady(30)
        say(f"private redis-server pid {self.redis.pid} on 127.0.0.1:{self.redis.port}")
        return self.redis.url

    def startServers(self, dataDir: str) -> list[ServerProcess]:
        arguments = self.arguments
        redisURL = self.startRedis(dataDir)
        env = self.environment() if redisURL is None else self.environment(REDIS_URL=redisURL)
        self.report["settings"] = {
            "connections": arguments.connections,
            "rates": arguments.rates,
            "duration": arguments.duration,
            "maxSeconds": arguments.max_seconds,
            "inFlight": arguments.in_flight,
            "payloadBytes": arguments.payload_bytes,
            "clientProcesses": arguments.client_processes,
            "clientLoop": arguments.loop,
            "deflate": arguments.deflate,
            "channel": self.channel,
            "serverArgs": arguments.server_arg,
            "schema": self.schema,
            "processes": arguments.processes,
            "broker": "memory"
            if redisURL is None
            else ("private redis-server" if self.redis is not None else "redis"),
        }
        # One after the other: the first migrates the schema, the others find it done.
        for number in range(arguments.processes):
            directory = os.path.join(dataDir, f"server-{number + 1}")
            os.mkdir(directory)
            say(
                f"starting twist marketplace-ws #{number + 1} (schema {self.schema}, broker "
                f"{self.report['settings']['broker']})"
            )
            self.startServer(directory, env, f" #{number + 1}")
        return self.servers

    def connect(self, servers: list[ServerProcess]) -> None:
        from marketplace_ws.auth import mintToken

        arguments = self.arguments
        count = arguments.connections
        # The run ends long before the tokens do, so no token.expiring frame arrives.
        tokens = [
            mintToken(self.jwtSecret, f"{self.userPrefix}{i}", ttl=3 * 3600) for i in range(count)
        ]
        processes = arguments.client_processes
        options = self.clientOptions(deflate=arguments.deflate)
        ports = [server.ports["websocket"] for server in servers]
        time.sleep(0.5)
        rssBefore = sum(rssBytes(server.pid) for server in servers)
        cpuBefore = sum(cpuSeconds(server.pid) for server in servers)
        say(
            f"connecting {count} subscribers from {processes} process(es)"
            + (f" to {len(servers)} server processes" if len(servers) > 1 else "")
        )
        self.clients = [
            SubscriberProcess(ports, tokens[i::processes], options, self.channel)
            for i in range(processes)
        ]
        answers, seconds, connected, failures = self.connectClients(60 + count / 20)
        compressed = sum(a["deflate"] for a in answers)
        # Let the server finish what the handshakes left (welcome frames, timers).
        time.sleep(1.0)
        rssAfter = sum(rssBytes(server.pid) for server in servers)
        cpu = sum(cpuSeconds(server.pid) for server in servers) - cpuBefore
        self.connected = connected
        self.report["connect"] = {
            "requested": count,
            "connected": connected,
            "deflateNegotiated": compressed,
            "failures": failures,
            "seconds": seconds,
            "perSecond": connected / seconds,
            "serverCpuSeconds": cpu,
            "serverCpuMsPerConnection": 1000 * cpu / max(connected, 1),
            "rssBeforeBytes": rssBefore,
            "rssAfterBytes": rssAfter,
            "rssPerConnectionBytes": (rssAfter - rssBefore) / max(connected, 1),
        }
        say(
            f"{connected} subscribed in {seconds:.1f} s"
            + (f"; failures: {failures}" if failures else "")
        )
        if connected == 0:
            raise BenchFailed("no subscriber could connect: " + json.dumps(failures))

    # Phases

    async def received(self) -> tuple[int, int, int]:
        """Events received so far this phase, the last one's time (ns), and open connections."""
        answers = [await c.askSoon("progress") for c in self.clients]
        return (
            sum(a[0] for a in answers),
            max(a[1] for a in answers),
            sum(a[2] for a in answers),
        )

    async def drain(self, expected: int) -> bool:
        """
        Wait until C{expected} events have arrived, or nothing more arrives for a
        second (lost or dropped), or the drain timeout: whether all arrived.
        """
        deadline = time.monotonic() + self.arguments.drain_timeout
        last, lastChange = -1, time.monotonic()
        while True:
            count, _, _ = await self.received()
            now = time.monotonic()
            if count >= expected:
                return True
            if count != last:
                last, lastChange = count, now
            elif now - lastChange > 1.0 or now > deadline:
                return False
            await asyncio.sleep(0.05)

    async def phases(self, servers: list[ServerProcess]) -> None:
        from marketplace_ws.auth import mintToken

        server = servers[0]
        publisher = Publisher(
            server.ports["http"],
            self.apiSecret,
            self.channel,
            self.arguments.payload_bytes,
            self.arguments.in_flight,
        )
        try:
            ok, detail = await publisher.probe()
            if not ok:
                hint = " (this build does not mount the HTTP API)" if "HTTP 404" in detail else ""
                self.report["skipped"] = f"POST /api/v1/publish did not work{hint}: {detail}"
                say(self.report["skipped"])
                return
            _, _, subscribers = await self.received()
            if not await self.drain(subscribers):
                say("warning: the probe event did not reach every subscriber")
            token = mintToken(self.jwtSecret, f"{self.userPrefix}pinger", ttl=3 * 3600)
            pinger = await openPinger(server.ports["websocket"], token)
            pinging = asyncio.create_task(self.ping(pinger))
            for name, rate, seconds in self.phasePlan():
                self.checkServers()
                say(f"phase {name}: publishing for {seconds:g} s")
                self.report["phases"].append(
                    await self.phase(servers, publisher, pinger, name, rate, seconds)
                )
            pinging.cancel()
            pinger.close()
        finally:
            publisher.close()

    async def ping(self, pinger: Pinger) -> None:
        # Ten a second: well under the default rate limit of 20 requests a second.
        while pinger.transport is not None and not pinger.transport.is_closing():
            pinger.ping()
            await asyncio.sleep(PING_INTERVAL)

    def redisCounters(self, servers: list[ServerProcess]) -> list[dict[str, float]] | None:
        """Each process's Redis and publish counters, from its /metrics (Redis runs only)."""
        if self.arguments.redis_url is None:
            return None
        counters = []
        for server in servers:
            samples = scrapeMetrics(server.ports["http"])
            counters.append(
                {
                    name: metricSum(samples, name)
                    for name in (
                        "mws_redis_round_trips_total",
                        "mws_redis_publish_round_trips_total",
                        "mws_events_published_total",
                        "mws_redis_reconnections_total",
                    )
                }
            )
        return counters

    async def phase(
        self,
        servers: list[ServerProcess],
        publisher: Publisher,
        pinger: Pinger,
        name: str,
        rate: float | None,
        seconds: float,
    ) -> dict[str, Any]:
        for client in self.clients:
            await client.askSoon("reset")
        _, _, subscribers = await self.received()
        redisBefore = self.redisCounters(servers)
        pinger.reset()
        serverPids = [server.pid for server in servers]
        clientPids = [c.pid for c in self.clients]
        redisStart = cpuSeconds(self.redis.pid) if self.redis is not None else 0.0
        cpu = CpuTimes.read(serverPids, clientPids)
        lines = sum(server.lines for server in servers)
        startedNs = time.time_ns()
        result: PhaseResult = await (
            publisher.fixedRate(rate, seconds) if rate is not None else publisher.flatOut(seconds)
        )
        publishedNs = time.time_ns()
        expected = result.ok * subscribers
        complete = await self.drain(expected)
        pings = pinger.summary()
        drainedNs = time.time_ns()
        cpu = cpu.since(serverPids, clientPids)
        serverCpu = sum(cpu.servers)
        redisCpu = cpuSeconds(self.redis.pid) - redisStart if self.redis is not None else None
        redisAfter = self.redisCounters(servers)
        collected = [await c.askSoon("collect") for c in self.clients]
        received = sum(c["received"] for c in collected)
        lastNs = max(c["last"] for c in collected)
        histogram = merge(c["histogram"] for c in collected)
        p50, p99 = percentiles(histogram, [0.50, 0.99])
        rtt50, rtt99 = percentiles(result.histogram, [0.50, 0.99])
        (ping50,) = percentiles(pings["histogram"], [0.50])
        # Deliveries are counted from the first publish to the last event received.
        window = max(lastNs - startedNs, publishedNs - startedNs) / 1e9
        measured = (drainedNs - startedNs) / 1e9
        redis = None
        if redisBefore is not None and redisAfter is not None:
            deltas = [
                {key: after[key] - before[key] for key in after}
                for before, after in zip(redisBefore, redisAfter, strict=True)
            ]

            def total(key: str) -> float:
                return sum(d[key] for d in deltas)

            published = total("mws_events_published_total")
            redis = {
                "perProcess": deltas,
                "published": published,
                "roundTrips": total("mws_redis_round_trips_total"),
                "publishRoundTrips": total("mws_redis_publish_round_trips_total"),
                "roundTripsPerPublish": total("mws_redis_round_trips_total") / published
                if published
                else None,
                "publishRoundTripsPerPublish": total("mws_redis_publish_round_trips_total")
                / published
                if published
                else None,
                "reconnections": total("mws_redis_reconnections_total"),
                "cpuShare": None if redisCpu is None else redisCpu / measured,
            }
        return {
            "phase": name,
            "targetRate": rate,
            "publish": result.asDict(),
            "publishesPerSecond": result.ok / result.seconds,
            "publishRttMs": {"p50": _milliseconds(rtt50), "p99": _milliseconds(rtt99)},
            "subscribers": subscribers,
            "delivered": received,
            "expected": expected,
            "deliveredFraction": received / expected if expected else None,
            "complete": complete,
            "deliveriesPerSecond": received / window if window > 0 else 0.0,
            "deliveryWindowSeconds": window,
            "latencyMs": {
                "p50": _milliseconds(p50),
                "p99": _milliseconds(p99),
                "max": _milliseconds(max(c["maxLatency"] for c in collected)) if received else None,
            },
            "pingMs": {
                "p50": _milliseconds(ping50),
                "max": _milliseconds(pings["maxRtt"]) if pings["answered"] else None,
                "answered": pings["answered"],
                "unanswered": pings["unanswered"],
            },
            "serverCpuSeconds": serverCpu,
            "serverCpuPer1000Deliveries": 1000 * serverCpu / received if received else None,
            "serverCpuShare": serverCpu / measured,
            # One share per server process (the sum above may exceed one CPU).
            "serverCpuShares": [seconds / measured for seconds in cpu.servers],
            "clientCpuShare": [seconds / measured for seconds in cpu.clients],
            "publisherCpuShare": cpu.own / measured,
            "redis": redis,
            # CPU the machine spent on anything else meanwhile (other users, the kernel's
            # own threads): more than a few percent and the figures are noisy.
            "otherCpuShare": cpu.other(serverCpu, redisCpu or 0) / measured,
            "serverLogLines": sum(server.lines for server in servers) - lines,
            "closedConnections": sum(c["closedInPhase"] for c in collected),
            "closeCodes": merge(c["closeCodes"] for c in collected),
            "otherFrames": sum(c["other"] for c in collected),
        }

    # Tear-down

    def stopServers(self) -> None:
        finals = []
        for number, server in enumerate(self.servers):
            final: dict[str, Any] = {}
            if server.alive():
                final["rssEndBytes"] = rssBytes(server.pid)
                final["cpuSecondsTotal"] = cpuSeconds(server.pid)
            say(f"stopping server #{number + 1} (SIGTERM) with its subscribers still connected")
            finals.append(self.stopServer(server, final))
        if finals:
            self.report["server"] = finals[0]
            if len(finals) > 1:
                self.report["servers"] = finals

    def stopOthers(self) -> None:
        if self.redis is not None:
            self.redis.stop()

    def measure(self, dataDir: str) -> None:
        servers = self.startServers(dataDir)
        self.connect(servers)
        asyncio.run(self.phases(servers))


# Output


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        *tableHeading(
            report,
            "fan-out",
            f", Autobahn {m['autobahn']}",
            f"; open files limit {report['fileLimit']['soft']}",
        ),
        f"settings: {s['connections']} subscribers of {s['channel']} in "
        + planText(s, "publishes")
        + f", {s['inFlight']} publishes in flight at most, payload padding "
        f"{s['payloadBytes']} B"
        + (", permessage-deflate offered" if s["deflate"] else "")
        + (f", server args {' '.join(s['serverArgs'])}" if s["serverArgs"] else ""),
        f"servers: {s.get('processes', 1)} process(es), broker {s.get('broker', 'memory')}"
        + (
            "; subscribers dealt over them in turn, events published and the pinger "
            "connected through the first"
            if s.get("processes", 1) > 1
            else ""
        ),
    ]
    c = report.get("connect")
    if c:
        lines.append(
            f"connect: {c['connected']}/{c['requested']} subscribed in {c['seconds']:.1f} s "
            f"({c['perSecond']:,.0f}/s), server CPU {c['serverCpuMsPerConnection']:.2f} ms per "
            f"connection; server RSS {c['rssBeforeBytes'] / 2**20:.1f} -> "
            f"{c['rssAfterBytes'] / 2**20:.1f} MiB = "
            f"{c['rssPerConnectionBytes'] / 1024:.1f} KiB per connection"
            + (f"; {c['deflateNegotiated']} with permessage-deflate" if s["deflate"] else "")
            + (f"; failures {c['failures']}" if c["failures"] else "")
        )
    if report.get("skipped"):
        lines.append(f"phases skipped: {report['skipped']}")
    phases = report["phases"]
    redis = any(p.get("redis") for p in phases)
    if phases:
        header = (
            f"{'phase':>7} {'pub/s':>8} {'deliv/s':>10} {'delivered':>9} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'CPU s/1k':>9} "
            f"{'srv CPU':>7} {'sub CPU':>7} {'pub CPU':>7} {'other':>7} "
            f"{'RTT p50':>8} {'RTT p99':>8} {'ping p50':>8} {'ping max':>8}"
            + (f" {'redis':>6} {'RT/pub':>6} {'pRT/pub':>7}" if redis else "")
            + "  notes"
        )
        lines += ["", header, "-" * len(header)]
        for p in phases:
            notes = []
            if p["publish"]["errors"]:
                notes.append(f"errors {p['publish']['errors']}")
            notes += phaseNotes(p, p["publishesPerSecond"])
            shares = p.get("serverCpuShares") or [p["serverCpuShare"]]
            if max(shares) > 0.9:
                notes.append("server CPU-bound")
            if len(shares) > 1:
                notes.append("srv CPU " + " + ".join(f"{100 * x:.0f}%" for x in shares))
            if max(p["clientCpuShare"]) > 0.9:
                notes.append("subscribers CPU-bound: figures are the client's")
            fraction = p["deliveredFraction"]
            lines.append(
                f"{p['phase']:>7} {p['publishesPerSecond']:>8,.0f} "
                f"{p['deliveriesPerSecond']:>10,.0f} "
                f"{_fmt(None if fraction is None else 100 * fraction, 2) + '%':>9} "
                f"{_fmt(p['latencyMs']['p50']):>8} {_fmt(p['latencyMs']['p99']):>8} "
                f"{_fmt(p['latencyMs']['max']):>8} {_fmt(p['serverCpuPer1000Deliveries'], 4):>9} "
                f"{100 * p['serverCpuShare']:>6.0f}% {100 * sum(p['clientCpuShare']):>6.0f}% "
                f"{100 * p['publisherCpuShare']:>6.0f}% {100 * p['otherCpuShare']:>6.0f}% "
                f"{_fmt(p['publishRttMs']['p50'], 2):>8} "
                f"{_fmt(p['publishRttMs']['p99'], 2):>8} {_fmt(p['pingMs']['p50'], 2):>8} "
                f"{_fmt(p['pingMs']['max']):>8}"
                + (_redisColumns(p["redis"]) if redis else "")
                + f"  {'; '.join(notes)}"
            )
    server = report.get("server")
    if server:
        lines += serverLines(
            server,
            f" with {c['connected'] if c else 0} connections open; RSS at the end "
            f"{server.get('rssEndBytes', 0) / 2**20:.1f} MiB",
        )
        for number, other in enumerate(report.get("servers", [])[1:], start=2):
            lines.append(
                f"server #{number}: exit status {other['exitStatus']}, shutdown took "
                f"{other['shutdownSeconds']:.2f} s; {other['logLines']} log lines "
                f"{other['logLevels']}"
            )
            lines += [f"  {problem}" for problem in other["problems"]]
    return "\n".join(lines)


def _redisColumns(redis: dict[str, Any] | None) -> str:
    """Redis's CPU share, and round trips (all, and publishes') per event published."""
    if redis is None:
        return f" {'-':>6} {'-':>6} {'-':>7}"
    share = redis["cpuShare"]
    return (
        f" {'-' if share is None else f'{100 * share:.0f}%':>6} "
        f"{_fmt(redis['roundTripsPerPublish'], 2):>6} "
        f"{_fmt(redis['publishRoundTripsPerPublish'], 2):>7}"
    )


def main(argv: list[str]) -> int:
    return runMain("fanout.py", Benchmark, parseArguments(argv), table)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
