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

from broker.admission import Admission
from broker.errors import UnknownDatabaseError
from broker.monitoring import DatabaseStats
from broker.settings import DatabaseSettings

__all__ = ["DatabasePool", "Pools"]

log = logging.getLogger("mongo_broker.pools")


@dataclass(frozen=True, slots=True)
class DatabasePool:
    """A configured database: its settings, its client and what observes it."""

    name: str
    settings: DatabaseSettings
    client: AsyncMongoClient[Any]
    db: AsyncDatabase[Any]
    stats: DatabaseStats
    admission: Admission


class Pools:
    """The configured databases, by their configured name."""

    def __init__(self, pools: Mapping[str, DatabasePool]) -> None:
        self._pools = dict(pools)

    @classmethod
    def build(cls, databases: Mapping[str, DatabaseSettings]) -> Pools:
        """Construct one client per database. No I/O happens until `connect`."""
        pools = {}
        for name, settings in databases.items():
            stats = DatabaseStats.create(name, settings.max_pool_size, settings.min_pool_size)
            client: AsyncMongoClient[Any] = AsyncMongoClient(
                settings.uri.get_secret_value(),
                event_listeners=stats.listeners(),
                connect=False,
                **settings.client_options(),
            )
            db = client.get_database(settings.database or name)
            admission = Admission(
                name,
                slots=settings.max_pool_size,
                max_waiting=settings.max_waiting,
                wait_timeout_s=settings.wait_queue_timeout_ms / 1000,
            )
            pools[name] = DatabasePool(name, settings, client, db, stats, admission)
        return cls(pools)

    async def connect(self) -> None:
        """Start monitoring and fill min_pool_size; never fails on a down database."""
        loop = asyncio.get_running_loop()
        for pool in self._pools.values():
            pool.stats.topology.bind_loop(loop)
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
