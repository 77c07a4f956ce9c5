"""
Latency histograms cheap enough to update once per received frame.

A benchmark with 5,000 subscribers records millions of latencies per phase; keeping them
all would cost the client more memory and time than the server it measures. Values (in
microseconds) are rounded down to their 11 most significant bits, so each is kept to
within 0.1% and a histogram holds a few thousand keys at most, small enough to send
from a subscriber process to the parent through a pipe.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

#: Values below 2**BITS keep their exact value; larger ones lose their low bits.
BITS = 11


def bucket(value: int) -> int:
    """The key under which C{value} (microseconds, >= 0) is counted."""
    if value < 1 << BITS:
        return value
    shift = value.bit_length() - BITS
    return (value >> shift) << shift


def merge(histograms: Iterable[Mapping[K, int]]) -> dict[K, int]:
    """The counts of every key summed (histograms, or any counts by key)."""
    total: dict[K, int] = {}
    for histogram in histograms:
        for key, count in histogram.items():
            total[key] = total.get(key, 0) + count
    return total


def percentiles(histogram: Mapping[int, int], quantiles: Iterable[float]) -> list[int | None]:
    """The value at each quantile (0..1), by the nearest-rank method; None when empty."""
    count = sum(histogram.values())
    wanted = list(quantiles)
    if count == 0:
        return [None for _ in wanted]
    keys = sorted(histogram)
    results: list[int | None] = []
    for q in wanted:
        # Nearest rank: the smallest value with at least q of all values at or below it.
        rank = max(1, min(count, math.ceil(q * count)))
        seen = 0
        for key in keys:
            seen += histogram[key]
            if seen >= rank:
                results.append(key)
                break
    return results
