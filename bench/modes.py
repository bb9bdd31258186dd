"""The benchmark's modes (how a worker reaches the database) and its one percentile function.

The worker program, ``harness/worker.py``, runs every worker of every
workload and defines the modes (its docstring has the table: churn,
per-process, mongobetween, broker-uds, broker-tcp, direct-shared); the
harness and the report name them from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from harness.worker import (
    BROKER_MODES,
    BROKER_TCP,
    BROKER_UDS,
    CHURN,
    CLIENT_MODES,
    DIRECT_SHARED,
    MODES,
    MONGOBETWEEN,
    PER_PROCESS,
    seed_id,
)

__all__ = [
    "BROKER_MODES",
    "BROKER_TCP",
    "BROKER_UDS",
    "CHURN",
    "CLIENT_MODES",
    "DIRECT_SHARED",
    "MODES",
    "MONGOBETWEEN",
    "PER_PROCESS",
    "percentile",
    "percentiles",
    "seed_id",
]


def percentile(values: Sequence[float], point: float) -> float:
    """Nearest-rank percentile of ``values``; NaN for none. The bench's one definition."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, math.ceil(point / 100 * len(ordered))) - 1]


def percentiles(values: Sequence[float], points: Sequence[float] = (50, 99, 99.9)) -> dict[str, float]:
    """Nearest-rank percentiles of ``values`` as {"p50": ..., "p99": ..., "p99.9": ...}."""
    ordered = sorted(values)
    return {f"p{point:g}": percentile(ordered, point) for point in points}
