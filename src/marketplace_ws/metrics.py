"""
What the server counts, and the one place the counts become Prometheus text
(C{/metrics}) and JSON (C{/api/v1/stats}).

The hot paths (a frame in, an event out) only add to plain integers in L{Counters};
nothing is formatted or locked until a scrape reads them through L{ServerCollector}.
Latencies are Prometheus histograms, observed once per event (not per subscriber) and
once per query.

Label values are always from closed sets — op names the server knows, error codes,
refusal reasons, channel kinds, query names — never a user id, channel name or event
name a client or the backend chose, so a scrape stays small and never carries data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Seconds: from 100 µs (one process, memory broker) to several seconds (a backlog).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Counters:
    """
    Counts kept by the WebSocket side, each a plain integer or a C{Counter}.

    @ivar framesIn: requests received, by op; C{unknown} for ops the server does not
        have, C{invalid} for frames that are not requests at all.
    @ivar framesOut: frames sent, by type (C{ok}, C{error}, C{event}, C{welcome}, …).
    @ivar errors: error replies, by code.
    @ivar refused: connections turned away, by reason (a token's rejection reason,
        C{origin}, C{subprotocol}, C{auth_timeout}, C{auth_required},
        C{too_many_connections}).
    @ivar published: events published by this process, by channel kind.
    """

    __slots__ = ("accepted", "errors", "framesIn", "framesOut", "published", "refused", "slow")

    def __init__(self) -> None:
        self.accepted = 0
        self.slow = 0
        self.framesIn: Counter[str] = Counter()
        self.framesOut: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.published: Counter[str] = Counter()


class ServerCollector(Collector):
    """
    Reads L{Counters} and the live gauges at scrape time.

    @param gauges: C{name -> (help, read)}: current values such as open connections.
    """

    def __init__(
        self,
        counters: Counters,
        gauges: dict[str, tuple[str, Callable[[], float]]],
        totals: dict[str, tuple[str, Callable[[], float]]],
    ) -> None:
        self._counters = counters
        self._gauges = gauges
        self._totals = totals

    def collect(self) -> Iterator[Any]:
        c = self._counters
        yield _counter("mws_connections_accepted", "WebSocket connections welcomed.", c.accepted)
        yield _labelled(
            "mws_connections_refused", "Connections turned away, by reason.", "reason", c.refused
        )
        yield _counter(
            "mws_slow_consumer_disconnects",
            "Connections closed with 4008 for not reading their events.",
            c.slow,
        )
        yield _labelled("mws_frames_in", "Requests received, by op.", "op", c.framesIn)
        yield _labelled("mws_frames_out", "Frames sent, by type.", "type", c.framesOut)
        yield _labelled("mws_errors", "Error replies sent, by code.", "code", c.errors)
        yield _labelled(
            "mws_events_published", "Events published here, by channel kind.", "kind", c.published
        )
        for name, (text, read) in self._gauges.items():
            yield GaugeMetricFamily(name, text, value=read())
        for name, (text, read) in self._totals.items():
            yield CounterMetricFamily(name, text, value=read())


def _counter(name: str, text: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _labelled(name: str, text: str, label: str, values: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class Metrics:
    """
    One process's metrics: its own registry (so services in one test process do not
    collide), the histograms, the collector for L{Counters}, and process CPU and memory.
    """

    def __init__(self, counters: Counters | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.counters = counters or Counters()
        self.publishLatency = Histogram(
            "mws_publish_to_send_seconds",
            "From the broker accepting an event to this process writing it to the last "
            "local subscriber.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queryLatency = Histogram(
            "mws_db_query_seconds",
            "Database queries and transactions, by name.",
            ["query", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        self.totals: dict[str, tuple[str, Callable[[], float]]] = {}
        self.registry.register(ServerCollector(self.counters, self.gauges, self.totals))
        self.registry.register(ProcessCollector(registry=None))

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        """Report C{read()} at every scrape."""
        self.gauges[name] = (text, read)

    def total(self, name: str, text: str, read: Callable[[], float]) -> None:
        """Report C{read()}, a count kept elsewhere that only grows, at every scrape."""
        self.totals[name] = (text, read)

    def observeQuery(self, name: str, seconds: float, ok: bool) -> None:
        """The database pool's C{observe} hook."""
        self.queryLatency.labels(name, "ok" if ok else "error").observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything."""
        return bytes(generate_latest(self.registry))
