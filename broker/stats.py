"""One snapshot of a database's pool, queue and counters: the Stats reply, and /metrics too.

Stats and the Prometheus collector (metrics.py) both read this snapshot, so
every figure is gathered in one place and the two can never disagree.
"""

from __future__ import annotations

import time

from broker_client.proto.broker.v1 import broker_pb2

from broker.peers import Peers
from broker.pools import DatabasePool

__all__ = ["checkout_failures", "database_stats", "peer_stats", "pool_summary"]


def checkout_failures(db: DatabasePool) -> dict[str, int]:
    """Round trips that got no connection, by reason: the broker's queue and the driver's."""
    reasons = dict(db.stats.pool.checkout_failures)
    reasons["queue_full"] = db.admission.rejected_full
    reasons["wait_timeout"] = db.admission.rejected_timeout
    return reasons


def database_stats(db: DatabasePool) -> broker_pb2.DatabaseStats:
    """One database's Stats message, read from its observers."""
    stats, pool, admission = db.stats, db.stats.pool, db.admission
    advice = stats.advice()
    return broker_pb2.DatabaseStats(
        database=db.name,
        connections_open=pool.open,
        connections_in_use=pool.in_use,
        connections_idle=pool.idle,
        connections_created=pool.created,
        connections_closed=pool.closed,
        max_pool_size=db.settings.max_pool_size,
        pool_clears=pool.clears,
        wait_queue_length=admission.waiting,
        wait_queue_max=admission.waiting_max,
        max_waiting=admission.max_waiting,
        wait_p50_ms=stats.queue_waits.percentile(50) * 1000,
        wait_p99_ms=stats.queue_waits.percentile(99) * 1000,
        wait_max_ms=stats.queue_waits.maximum * 1000,
        checkout_failures=checkout_failures(db),
        operations=dict(stats.commands.sent),
        rpcs=dict(stats.rpcs),
        errors=dict(stats.errors),
        rpcs_in_flight=stats.in_flight,
        open_cursors=stats.open_cursors,
        available=stats.topology.available,
        server_type=stats.topology.server_type,
        server_rtt_ms=(stats.topology.rtt_s or 0.0) * 1000,
        last_error=stats.topology.last_error or "",
        recommended_max_pool_size=advice.recommended,
        demand_connections=advice.demand,
        round_trips_per_second=advice.arrival_rate,
        mean_hold_ms=advice.mean_hold_ms,
        command_failures=dict(stats.commands.failures),
        abandoned_round_trips=stats.abandoned,
        stalled_streams=stats.stalled_streams,
        coalesced_round_trips=db.coalescer.round_trips if db.coalescer else 0,
        coalesced_calls=db.coalescer.calls if db.coalescer else 0,
    )


def pool_summary(pool: DatabasePool) -> broker_pb2.PoolSummary:
    monitor = pool.stats.pool
    return broker_pb2.PoolSummary(
        connections_open=monitor.open,
        connections_in_use=monitor.in_use,
        max_pool_size=pool.settings.max_pool_size,
    )


def peer_stats(peers: Peers) -> list[broker_pb2.PeerStats]:
    """Calls by calling host, most recently seen first."""
    now = time.monotonic()
    return [
        broker_pb2.PeerStats(host=p.host, calls=p.calls, last_call_s_ago=round(now - p.last_call, 3))
        for p in peers.snapshot()
    ]
