"""One AsyncMongoClient per configured database: open, look up, close.

The broker never opens a client per request. Each client is built once at
startup with the database's pool options, shared by every call, and closed
at shutdown; pymongo does the pooling and the broker observes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
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
        return cls({name: _open(name, settings) for name, settings in databases.items()})

    async def reconfigure(self, databases: Mapping[str, DatabaseSettings]) -> list[DatabasePool]:
        """Switch to a new set of databases; returns the pools it retired.

        Unchanged databases keep their client. New or re-tuned ones get a new
        client, used by every call from now on; calls already running finish
        on the client they started with, and the caller closes a retired pool
        once its calls are done (see `close_when_idle`).
        """
        retired = []
        pools = {}
        for name, settings in databases.items():
            old = self._pools.get(name)
            if old is not None and old.settings == settings:
                pools[name] = old
                continue
            pool = pools[name] = _open(name, settings)
            await pool.client.aconnect()
            if old is not None:
                retired.append(old)
            log.info("database %s %s", name, "re-tuned" if old is not None else "added")
        for name, old in self._pools.items():
            if name not in databases:
                retired.append(old)
                log.info("database %s removed", name)
        self._pools = pools
        return retired

    async def connect(self) -> None:
        """Start monitoring and fill min_pool_size; never fails on a down database."""
        for pool in self._pools.values():
            await pool.client.aconnect()
            log.info(
                "database %s -> %s (db %s, max_pool_size=%d)",
                pool.name,
                pool.settings.redacted_uri,
                pool.db.name,
                pool.settings.max_pool_size,
            )

    def get(self, name: str, visible: Callable[[str], bool] | None = None) -> DatabasePool:
        """The pool of database ``name``; NOT_FOUND if it is not configured.

        ``visible`` says which database names the caller may use: the
        NOT_FOUND message lists only those, so a token scoped to some
        databases does not learn the names of the others.
        """
        try:
            return self._pools[name]
        except KeyError:
            known = [n for n in sorted(self._pools) if visible is None or visible(n)]
            raise UnknownDatabaseError(name, known) from None

    def __iter__(self) -> Iterator[DatabasePool]:
        return iter(self._pools.values())

    def names(self) -> list[str]:
        return sorted(self._pools)

    async def close_when_idle(self, pool: DatabasePool, timeout: float) -> None:
        """Close a retired pool once its in-flight calls are done (or after ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pool.stats.in_flight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await _close(pool)

    async def close(self) -> None:
        for pool in self._pools.values():
            await _close(pool)


def _open(name: str, settings: DatabaseSettings) -> DatabasePool:
    stats = DatabaseStats.create(name, settings.max_pool_size, settings.min_pool_size)
    client: AsyncMongoClient[Any] = AsyncMongoClient(
        settings.uri.get_secret_value(),
        event_listeners=stats.listeners(),
        connect=False,
        **settings.client_options(),
    )
    stats.topology.attach(lambda: client.topology_description)
    admission = Admission(
        name,
        slots=settings.max_pool_size,
        max_waiting=settings.max_waiting,
        wait_timeout_s=settings.wait_queue_timeout_ms / 1000,
    )
    return DatabasePool(
        name, settings, client, client.get_database(settings.database or name), stats, admission
    )


# Closing sends endSessions to the server; a slow or unreachable server must
# not hold up a shutdown that has a deadline of its own.
_CLOSE_TIMEOUT_S = 0.5


async def _close(pool: DatabasePool) -> None:
    try:
        await asyncio.wait_for(pool.client.close(), _CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning("closing the client for database %s timed out; dropping it", pool.name)
    except Exception:  # closing must go on for the other databases
        log.exception("error closing the client for database %s", pool.name)
