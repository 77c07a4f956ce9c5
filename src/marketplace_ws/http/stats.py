"""
C{GET /api/v1/stats}: this process's counters, for an admin page of the Next.js app.

They are the process's own (connections, subscriptions, events in and out), not the
deployment's: behind a load balancer each call reaches one process. Prometheus scrapes
C{/metrics} of every process for the whole picture.
"""

from __future__ import annotations

from typing import Any

from marketplace_ws.http._routes import Call, Route


async def stats(call: Call) -> dict[str, Any]:
    return call.backend.stats()


ROUTES = (
    Route(
        method="GET",
        path="/stats",
        operationId="stats",
        summary="This process's counters",
        description="A JSON object of counters and gauges; its members may grow between versions.",
        tag="operations",
        handler=stats,
        response={"type": "object"},
        responseExample={"connections": 1840, "users": 1312, "channels": 2977},
    ),
)
