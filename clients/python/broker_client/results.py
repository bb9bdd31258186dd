"""Result objects: pymongo's write results, and typed Ping and Stats answers.

They are read-only values, built from the broker's answers by `_requests`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BrokerStats",
    "BulkWriteResult",
    "DatabasePing",
    "DatabaseStats",
    "DeleteResult",
    "InsertManyResult",
    "InsertOneResult",
    "PeerStats",
    "PingResult",
    "PoolSummary",
    "UpdateResult",
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
class UpdateResult:
    """What ``update_one``, ``update_many`` and ``replace_one`` return (pymongo's ``UpdateResult``)."""

    matched_count: int
    """Documents the filter matched (0 for an upsert that inserted)."""
    modified_count: int
    """Documents actually changed (a match may already be as asked)."""
    upserted_id: Any = None
    """The ``_id`` of the document an upsert inserted, or None."""
    acknowledged: bool = True
    """False when the write concern was ``w=0``: nothing was confirmed."""
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (always 1: updates are never retried)."""

    @property
    def did_upsert(self) -> bool:
        """True when an upsert inserted a document."""
        return self.upserted_id is not None

    @property
    def raw_result(self) -> dict[str, Any]:
        """The counts in the shape of MongoDB's update reply, as pymongo's ``raw_result``."""
        raw: dict[str, Any] = {
            "n": self.matched_count + (1 if self.did_upsert else 0),
            "nModified": self.modified_count,
            "ok": 1.0,
            "updatedExisting": self.matched_count > 0,
        }
        if self.did_upsert:
            raw["upserted"] = self.upserted_id
        return raw


@dataclass(frozen=True, slots=True)
class DeleteResult:
    """What ``delete_one`` and ``delete_many`` return (pymongo's ``DeleteResult``)."""

    deleted_count: int
    acknowledged: bool = True
    """False when the write concern was ``w=0``: nothing was confirmed."""
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (always 1: deletes are never retried)."""

    @property
    def raw_result(self) -> dict[str, Any]:
        """The count in the shape of MongoDB's delete reply, as pymongo's ``raw_result``."""
        return {"n": self.deleted_count, "ok": 1.0}


@dataclass(frozen=True, slots=True)
class BulkWriteResult:
    """What ``bulk_write`` returns (pymongo's ``BulkWriteResult``)."""

    inserted_count: int
    matched_count: int
    modified_count: int
    deleted_count: int
    upserted_count: int
    upserted_ids: dict[int, Any] = field(default_factory=dict)
    """The ``_id`` of each document an upsert inserted, by the operation's index in the list."""
    acknowledged: bool = True
    """False when the write concern was ``w=0``: nothing was confirmed."""
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (always 1: bulk writes are never retried)."""

    @property
    def bulk_api_result(self) -> dict[str, Any]:
        """The counts as pymongo's ``bulk_api_result`` (and `BulkWriteError.details`) spell them."""
        return {
            "writeErrors": [],
            "writeConcernErrors": [],
            "nInserted": self.inserted_count,
            "nUpserted": self.upserted_count,
            "nMatched": self.matched_count,
            "nModified": self.modified_count,
            "nRemoved": self.deleted_count,
            "upserted": [{"index": index, "_id": id_} for index, id_ in sorted(self.upserted_ids.items())],
        }


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
    coalesced_round_trips: int
    coalesced_calls: int


@dataclass(frozen=True, slots=True)
class PeerStats:
    """Calls one calling host made to the broker (``BrokerStats.peers``)."""

    host: str
    calls: int
    last_call_s_ago: float


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """``BrokerClient.stats()``: the broker's version, uptime and per-database stats."""

    version: str
    uptime_s: float
    databases: tuple[DatabaseStats, ...] = field(default=())
    attempts: int = field(default=1, compare=False)
    """How many times the call was sent (more than 1 after retries)."""
    instance: str = ""
    """The broker that answered (its ``server.instance``; default its host name)."""
    caller: str = ""
    """This call's own address as that broker saw it, e.g. ``ipv4:10.0.0.7:53412``."""
    peers: tuple[PeerStats, ...] = field(default=())
    """Calls to that broker by calling host, most recently seen first (at most 64)."""

    def __getitem__(self, database: str) -> DatabaseStats:
        for db in self.databases:
            if db.database == database:
                return db
        raise KeyError(database)

    def __iter__(self) -> Iterator[DatabaseStats]:
        return iter(self.databases)
