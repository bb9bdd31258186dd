"""One AsyncMongoClient per configured database: open, look up, close.

The broker never opens a client per request. Each client is built once at
startup with the database's pool options, shared by every call, and closed
at shutdown; pymongo does the pooling and the broker observes it.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from broker.admission import Admission
from broker.coalesce import COALESCE_MAX_BYTES, Coalescer
from broker.errors import UnknownDatabaseError
from broker.monitoring import DatabaseStats
from broker.settings import ConfigError, DatabaseSettings, redact_text, redact_uri

__all__ = ["DatabasePool", "Pools", "check_client"]

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
    # None when coalescing is off for this database.
    coalescer: Coalescer | None


class Pools:
    """The configured databases, by their configured name."""

    def __init__(self, pools: Mapping[str, DatabasePool]) -> None:
        self._pools = dict(pools)

    @classmethod
    def build(cls, databases: Mapping[str, DatabaseSettings]) -> Pools:
        """Construct one client per database. No I/O happens until `connect`.

        Raises ConfigError naming ``databases.NAME.uri`` when pymongo refuses
        a database's URI or options; every database is checked before any
        client is built, so a refusal leaves nothing behind.
        """
        for name, settings in databases.items():
            check_client(name, settings)
        return cls({name: _open(name, settings) for name, settings in databases.items()})

    async def reconfigure(self, databases: Mapping[str, DatabaseSettings]) -> list[DatabasePool]:
        """Switch to a new set of databases; returns the pools it retired.

        Unchanged databases keep their client. New or re-tuned ones get a new
        client, used by every call from now on; calls already running finish
        on the client they started with, and the caller closes a retired pool
        once its calls are done (see `close_when_idle`).
        """
        # Every new database is checked first (a refused URI is a ConfigError
        # before anything is built), then every client is built, and only
        # then connected; if anything fails, the clients opened so far are
        # closed again and the running set is kept, so a refused reload
        # leaks no connections.
        retired = []
        pools = {}
        changed = {
            name: settings
            for name, settings in databases.items()
            if name not in self._pools or self._pools[name].settings != settings
        }
        for name, settings in changed.items():
            check_client(name, settings)
        opened: list[DatabasePool] = []
        try:
            for name, settings in databases.items():
                if name not in changed:
                    pools[name] = self._pools[name]
                    continue
                pool = pools[name] = _open(name, settings)
                opened.append(pool)
            for pool in opened:
                await pool.client.aconnect()
        except BaseException:
            for pool in opened:
                await _close(pool)
            raise
        for pool in opened:
            old = self._pools.get(pool.name)
            if old is not None:
                retired.append(old)
            log.info("database %s %s", pool.name, "re-tuned" if old is not None else "added")
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


def check_client(name: str, settings: DatabaseSettings) -> None:
    """Raise ConfigError, naming ``databases.NAME.uri``, if pymongo refuses the URI or options.

    pymongo's own constructor is the check: it validates the URI and the
    options together, without I/O (a mongodb+srv:// name is resolved only on
    connect). Without event listeners and unconnected, the client starts
    no task and holds nothing, so it is simply dropped.
    """
    uri = settings.uri.get_secret_value()
    try:
        # pymongo only warns about an unknown option or a bad option value
        # and then ignores it; a sidecar would run with a setting nobody
        # asked for, so those warnings refuse the URI too.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            AsyncMongoClient(uri, connect=False, **settings.client_options())
    except (PyMongoError, ValueError, TypeError) as exc:
        raise ConfigError(f"invalid configuration:\n  databases.{name}.uri: {_refusal(exc, uri)}") from None
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            reason = _refusal(ValueError(str(warning.message)), uri)
            raise ConfigError(f"invalid configuration:\n  databases.{name}.uri: {reason}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


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
    coalescer = (
        Coalescer(settings.coalesce_max_calls, COALESCE_MAX_BYTES)
        if settings.coalesce_max_calls > 1
        else None
    )
    return DatabasePool(
        name, settings, client, client.get_database(settings.database or name), stats, admission, coalescer
    )


def _refusal(exc: Exception, uri: str) -> str:
    """pymongo's reason for refusing ``uri``, with the URI, and without any of its secrets."""
    message = str(exc) or type(exc).__name__
    shown = redact_text(message, uri)
    if shown != message:
        # A password with unescaped characters is cut into pieces by the
        # parser, and its error may quote one of them.
        shown += "; percent-encode the user name and password (urllib.parse.quote_plus)"
    return f"pymongo refuses {redact_uri(uri)!r}: {shown}"


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
