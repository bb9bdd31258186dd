"""Prometheus metrics: two histograms observed per call, the rest read at scrape time.

Latency and queue wait are histograms (buckets, not averages). Everything
else (pool connections, queue lengths, counters by command and reason, the
pool-size advice) already lives in each database's `DatabaseStats`; a custom
collector reads it when Prometheus scrapes, so there is one set of numbers
behind Stats and /metrics alike.

The registry belongs to the broker instance, not to the module, so several
brokers (tests) never share metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker.pools import DatabasePool
from broker.stats import database_stats

__all__ = ["METRIC_NAMES", "BrokerMetrics"]

log = logging.getLogger("mongo_broker.metrics")

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_WAIT_BUCKETS = (0.0, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Every metric family the broker exposes (the README documents each).
METRIC_NAMES = (
    "mongo_broker_rpc_duration_seconds",
    "mongo_broker_queue_wait_seconds",
    "mongo_broker_connections",
    "mongo_broker_connections_created_total",
    "mongo_broker_connections_closed_total",
    "mongo_broker_max_pool_size",
    "mongo_broker_pool_clears_total",
    "mongo_broker_wait_queue_length",
    "mongo_broker_wait_queue_max",
    "mongo_broker_checkout_failures_total",
    "mongo_broker_commands_total",
    "mongo_broker_command_failures_total",
    "mongo_broker_rpcs_in_flight",
    "mongo_broker_open_cursors",
    "mongo_broker_database_up",
    "mongo_broker_server_rtt_seconds",
    "mongo_broker_recommended_max_pool_size",
    "mongo_broker_abandoned_round_trips_total",
    "mongo_broker_stalled_streams_total",
    "mongo_broker_coalesced_round_trips_total",
    "mongo_broker_coalesced_calls_total",
)


class _StatsCollector(Collector):
    def __init__(self, databases: Callable[[], Iterable[DatabasePool]]) -> None:
        self._databases = databases

    def collect(self) -> Iterator[Metric]:
        label = ["database"]
        connections = GaugeMetricFamily(
            "mongo_broker_connections",
            "Pool connections to the database by state (open, in_use, idle).",
            labels=["database", "state"],
        )
        created = CounterMetricFamily(
            "mongo_broker_connections_created", "Pool connections opened.", labels=label
        )
        closed = CounterMetricFamily(
            "mongo_broker_connections_closed", "Pool connections closed.", labels=label
        )
        max_pool = GaugeMetricFamily("mongo_broker_max_pool_size", "Configured max_pool_size.", labels=label)
        clears = CounterMetricFamily(
            "mongo_broker_pool_clears",
            "Times the driver cleared the pool (network errors).",
            labels=label,
        )
        queue = GaugeMetricFamily(
            "mongo_broker_wait_queue_length", "Calls waiting for a connection now.", labels=label
        )
        queue_max = GaugeMetricFamily(
            "mongo_broker_wait_queue_max", "Most calls waiting at once since start.", labels=label
        )
        failures = CounterMetricFamily(
            "mongo_broker_checkout_failures",
            "Calls that could not get a connection, by reason.",
            labels=["database", "reason"],
        )
        commands = CounterMetricFamily(
            "mongo_broker_commands",
            "Commands sent to MongoDB, by name.",
            labels=["database", "command"],
        )
        command_failures = CounterMetricFamily(
            "mongo_broker_command_failures",
            "Commands that failed, by name.",
            labels=["database", "command"],
        )
        in_flight = GaugeMetricFamily("mongo_broker_rpcs_in_flight", "Calls being served now.", labels=label)
        cursors = GaugeMetricFamily(
            "mongo_broker_open_cursors",
            "Server cursors held open by Find streams now.",
            labels=label,
        )
        up = GaugeMetricFamily(
            "mongo_broker_database_up",
            "1 when the driver can reach a writable server.",
            labels=label,
        )
        rtt = GaugeMetricFamily(
            "mongo_broker_server_rtt_seconds",
            "Heartbeat round-trip time to the server.",
            labels=label,
        )
        advice = GaugeMetricFamily(
            "mongo_broker_recommended_max_pool_size",
            "max_pool_size the last minute's demand calls for (Little's law, +25%).",
            labels=label,
        )
        abandoned = CounterMetricFamily(
            "mongo_broker_abandoned_round_trips",
            "Database round trips still running a second past their time limit, answered without.",
            labels=label,
        )
        stalled = CounterMetricFamily(
            "mongo_broker_stalled_streams",
            "Find streams ended at their time limit because their client stopped reading.",
            labels=label,
        )
        coalesced = CounterMetricFamily(
            "mongo_broker_coalesced_round_trips",
            "Round trips that carried more than one waiting call (queue-time coalescing).",
            labels=label,
        )
        coalesced_calls = CounterMetricFamily(
            "mongo_broker_coalesced_calls",
            "Calls carried by coalesced round trips.",
            labels=label,
        )
        for db in self._databases():
            # The same snapshot as the Stats reply: one set of numbers.
            snap = database_stats(db)
            name = snap.database
            for state, value in (
                ("open", snap.connections_open),
                ("in_use", snap.connections_in_use),
                ("idle", snap.connections_idle),
            ):
                connections.add_metric([name, state], value)
            created.add_metric([name], snap.connections_created)
            closed.add_metric([name], snap.connections_closed)
            max_pool.add_metric([name], snap.max_pool_size)
            clears.add_metric([name], snap.pool_clears)
            queue.add_metric([name], snap.wait_queue_length)
            queue_max.add_metric([name], snap.wait_queue_max)
            for reason, count in snap.checkout_failures.items():
                failures.add_metric([name, reason], count)
            for command, count in snap.operations.items():
                commands.add_metric([name, command], count)
            for command, count in snap.command_failures.items():
                command_failures.add_metric([name, command], count)
            in_flight.add_metric([name], snap.rpcs_in_flight)
            cursors.add_metric([name], snap.open_cursors)
            up.add_metric([name], 1 if snap.available else 0)
            if snap.server_rtt_ms > 0:  # 0: no heartbeat has measured it yet
                rtt.add_metric([name], snap.server_rtt_ms / 1000)
            advice.add_metric([name], snap.recommended_max_pool_size)
            abandoned.add_metric([name], snap.abandoned_round_trips)
            stalled.add_metric([name], snap.stalled_streams)
            coalesced.add_metric([name], snap.coalesced_round_trips)
            coalesced_calls.add_metric([name], snap.coalesced_calls)
        yield from (
            connections, created, closed, max_pool, clears, queue, queue_max, failures,
            commands, command_failures, in_flight, cursors, up, rtt, advice, abandoned, stalled,
            coalesced, coalesced_calls,
        )  # fmt: skip


class BrokerMetrics:
    """The broker's metrics registry; `serve_http` exposes it on GET /metrics."""

    def __init__(self, databases: Callable[[], Iterable[DatabasePool]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.rpc_duration = Histogram(
            "mongo_broker_rpc_duration_seconds",
            "Time to answer a call, by method, database and gRPC status code.",
            ["method", "database", "code"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "mongo_broker_queue_wait_seconds",
            "Time a database round trip waited for a pool connection.",
            ["database"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(databases))
        # Each (method, database, code) and each database's histogram child,
        # looked up once: labels() validates and locks on every call. The
        # keys are bounded: methods and codes are fixed sets, and databases
        # are the configured names (or "" for a name that is not one).
        self._durations: dict[tuple[str, str, str], Any] = {}
        self._waits: dict[str, Any] = {}
        self._http: Any = None

    def observe_call(self, method: str, database: str, code: str, seconds: float) -> None:
        """One call's duration, under its method, database ("" if none) and status code."""
        key = (method, database, code)
        child = self._durations.get(key)
        if child is None:
            child = self._durations[key] = self.rpc_duration.labels(method, database, code)
        child.observe(seconds)

    def observe_queue_wait(self, database: str, seconds: float) -> None:
        """The time one call's round trips waited for a pool connection, in all."""
        child = self._waits.get(database)
        if child is None:
            child = self._waits[database] = self.queue_wait.labels(database)
        child.observe(seconds)

    def serve_http(self, address: str) -> int:
        """Serve /metrics on ``address`` ("HOST:PORT") in a daemon thread; returns the port."""
        host, _, port = address.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        self._http = server
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
