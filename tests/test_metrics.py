"""
The counts behind /metrics and /api/v1/stats, after real traffic.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase, TestCase

from marketplace_ws.client import ServerError
from marketplace_ws.metrics import Counters, Metrics
from tests.test_live import LISTING, drained, join, publish
from tests.test_service import startService


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, re.MULTILINE)
    if match is None:
        raise AssertionError(f"no sample {name} {labels} in:\n{text}")
    return float(match[1])


class MetricsTests(SynchronousTestCase):
    def test_countersRendered(self) -> None:
        counters = Counters()
        metrics = Metrics(counters)
        counters.framesIn["ping"] += 3
        counters.refused["expired"] += 1
        metrics.gauge("mws_connections", "open", lambda: 7)
        metrics.observeQuery("message.send", 0.002, True)
        text = metrics.render().decode()
        self.assertEqual(sample(text, "mws_frames_in_total", op="ping"), 3)
        self.assertEqual(sample(text, "mws_connections_refused_total", reason="expired"), 1)
        self.assertEqual(sample(text, "mws_connections"), 7)
        self.assertEqual(
            sample(text, "mws_db_query_seconds_count", query="message.send", outcome="ok"), 1
        )
        self.assertIn("process_cpu_seconds_total", text)
        self.assertIn("process_resident_memory_bytes", text)


class TrafficTests(TestCase):
    timeout = 30

    async def test_afterTraffic(self) -> None:
        """
        Requests, replies, errors, events and the publish latency are counted, and no
        user id or channel name becomes a label.
        """
        service = await startService(self)
        alice = await join(service, "alice-secret-id")
        await alice.request("ping")
        await alice.request("subscribe", channel="listing:7")
        with self.assertRaises(ServerError):
            await alice.request("subscribe", channel="user:bob")
        with self.assertRaises(ServerError):
            await alice.request("no.such.op")
        for n in range(3):
            await publish(service, LISTING, {"n": n})
        await drained(alice)
        text = service.metrics.render().decode()
        self.assertEqual(sample(text, "mws_connections"), 1)
        self.assertEqual(sample(text, "mws_connections_accepted_total"), 1)
        self.assertEqual(sample(text, "mws_frames_in_total", op="ping"), 2)
        self.assertEqual(sample(text, "mws_frames_in_total", op="subscribe"), 2)
        self.assertEqual(sample(text, "mws_frames_in_total", op="unknown"), 1)
        self.assertEqual(sample(text, "mws_errors_total", code="forbidden"), 1)
        self.assertEqual(sample(text, "mws_errors_total", code="bad_request"), 1)
        self.assertEqual(sample(text, "mws_frames_out_total", type="event"), 3)
        self.assertEqual(sample(text, "mws_frames_out_total", type="welcome"), 1)
        self.assertEqual(sample(text, "mws_events_published_total", kind="listing"), 3)
        self.assertEqual(sample(text, "mws_publish_to_send_seconds_count"), 3)
        self.assertGreaterEqual(
            sample(text, "mws_db_query_seconds_count", query="migrations.exists", outcome="ok"), 1
        )
        self.assertNotIn("alice-secret-id", text)
        self.assertNotIn("listing:7", text)
        await alice.close()
