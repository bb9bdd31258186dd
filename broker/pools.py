"""One AsyncMongoClient per configured database: open, look up, close.

The broker never opens a client per request. Each client is built once at
startup with the database's pool options, shared by every call, and closed
at shutdown; pymongo does the pooling and the broker observes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from broker.monitoring import PoolMonitor, TopologyMonitor
from broker.settings import DatabaseSettings

__all__ = ["DatabasePool", "Pools", "UnknownDatabaseError"]

log = logging.getLogger("mongo_broker.pools")


class UnknownDatabaseError(LookupError):
    """A call named a database that is not configured."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        known = ", ".join(repr(n) for n in self.known) or "none"
        return f"database {self.name!r} is not configured on this broker; configured: {known}"


@dataclass(frozen=True, slots=True)
class DatabasePool:
    """A configured database: its settings, its client and what observes it."""

    name: str
    settings: DatabaseSettings
    client: AsyncMongoClient[Any]
    db: AsyncDatabase[Any]
    monitor: PoolMonitor
    topology: TopologyMonitor


class Pools:
    """The configured databases, by their configured name."""

    def __init__(self, pools: Mapping[str, DatabasePool]) -> None:
        self._pools = dict(pools)

    @classmethod
    def build(cls, databases: Mapping[str, DatabaseSettings]) -> Pools:
        """Construct one client per database. No I/O happens until `connect`."""
        pools = {}
        for name, settings in databases.items():
            monitor = PoolMonitor(name)
            topology = TopologyMonitor(name)
            client: AsyncMongoClient[Any] = AsyncMongoClient(
                settings.uri.get_secret_value(),
                event_listeners=[monitor, topology],
                connect=False,
                **settings.client_options(),
            )
            db = client.get_database(settings.database or name)
            pools[name] = DatabasePool(name, settings, client, db, monitor, topology)
        return cls(pools)

    async def connect(self) -> None:
        """Start monitoring and fill min_pool_size; never fails on a down database."""
        loop = asyncio.get_running_loop()
        for pool in self._pools.values():
            pool.topology.bind_loop(loop)
            await pool.client.aconnect()
            log.info(
                "database %s -> %s (db %s, max_pool_size=%d)",
                pool.name,
                pool.settings.redacted_uri,
                pool.db.name,
                pool.settings.max_pool_size,
            )

    def get(self, name: str) -> DatabasePool:
        try:
            return self._pools[name]
        except KeyError:
            raise UnknownDatabaseError(name, sorted(self._pools)) from None

    def __iter__(self) -> Iterator[DatabasePool]:
        return iter(self._pools.values())

    def names(self) -> list[str]:
        return sorted(self._pools)

    async def close(self) -> None:
        for pool in self._pools.values():
            try:
                await pool.client.close()
            except Exception:  # closing must go on for the other databases
                log.exception("error closing the client for database %s", pool.name)
