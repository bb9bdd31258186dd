"""Result objects: pymongo's insert results, and typed Ping and Stats answers.

They are read-only values, built from the broker's answers by `_requests`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BrokerStats",
    "DatabasePing",
    "DatabaseStats",
    "InsertManyResult",
    "InsertOneResult",
    "PingResult",
    "PoolSummary",
]


@dataclass(frozen=True, slots=True)
class InsertOneResult:
    """What ``insert_one`` returns (pymongo's ``InsertOneResult``)."""

    inserted_id: Any
    """The ``_id`` of the document, as the broker reported it."""
    acknowledged: bool = True
    """False when the write concern was ``w=0``: nothing was confirmed."""
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (more than 1 after retries)."""


@dataclass(frozen=True, slots=True)
class InsertManyResult:
    """What ``insert_many`` returns (pymongo's ``InsertManyResult``)."""

    inserted_ids: list[Any]
    """The ``_id`` of every document, in the order given."""
    acknowledged: bool = True
    """False when the write concern was ``w=0``: nothing was confirmed."""
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (more than 1 after retries)."""


@dataclass(frozen=True, slots=True)
class PoolSummary:
    """The broker's connection pool to one database."""

    connections_open: int
    connections_in_use: int
    max_pool_size: int


@dataclass(frozen=True, slots=True)
class DatabasePing:
    """One database's answer to a ping."""

    database: str
    ok: bool
    rtt_ms: float
    """Round-trip time of MongoDB's ``ping`` command, in milliseconds."""
    pool: PoolSummary
    error: str
    """Why the ping failed; empty when ``ok``."""


@dataclass(frozen=True, slots=True)
class PingResult:
    """``BrokerClient.ping()``: the broker's version and each database's state."""

    version: str
    databases: tuple[DatabasePing, ...]
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (more than 1 after retries)."""

    @property
    def ok(self) -> bool:
        """True when every pinged database answered."""
        return all(db.ok for db in self.databases)

    def __getitem__(self, database: str) -> DatabasePing:
        for db in self.databases:
            if db.database == database:
                return db
        raise KeyError(database)

    def __iter__(self) -> Iterator[DatabasePing]:
        return iter(self.databases)


@dataclass(frozen=True, slots=True)
class DatabaseStats:
    """One database's pool, queue, operation and server figures (see the proto)."""

    database: str
    connections_open: int
    connections_in_use: int
    connections_idle: int
    connections_created: int
    connections_closed: int
    max_pool_size: int
    pool_clears: int
    wait_queue_length: int
    wait_queue_max: int
    max_waiting: int
    wait_p50_ms: float
    wait_p99_ms: float
    wait_max_ms: float
    checkout_failures: Mapping[str, int]
    operations: Mapping[str, int]
    rpcs: Mapping[str, int]
    errors: Mapping[str, int]
    rpcs_in_flight: int
    open_cursors: int
    available: bool
    server_type: str
    server_rtt_ms: float
    last_error: str
    recommended_max_pool_size: int
    demand_connections: float
    round_trips_per_second: float
    mean_hold_ms: float
    command_failures: Mapping[str, int]
    abandoned_round_trips: int
    stalled_streams: int


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """``BrokerClient.stats()``: the broker's version, uptime and per-database stats."""

    version: str
    uptime_s: float
    databases: tuple[DatabaseStats, ...] = field(default=())
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (more than 1 after retries)."""

    def __getitem__(self, database: str) -> DatabaseStats:
        for db in self.databases:
            if db.database == database:
                return db
        raise KeyError(database)

    def __iter__(self) -> Iterator[DatabaseStats]:
        return iter(self.databases)
