"""pymongo CMAP listeners -> live pool figures for one configured database.

The driver owns the pool; the broker only observes it through the driver's
own events (as mongobetween does with the Go driver's PoolMonitor). A
listener runs inside pymongo's operations, so it must never raise: every
callback only bumps integers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from pymongo import monitoring

__all__ = ["PoolMonitor", "PoolSnapshot", "TopologyMonitor"]

log = logging.getLogger("mongo_broker.monitoring")


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    connections_open: int
    connections_in_use: int
    connections_created: int
    connections_closed: int
    pool_clears: int


class PoolMonitor(monitoring.ConnectionPoolListener):
    """Counts connections of one MongoClient's pools (one pool per server)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._open = 0
        self._in_use = 0
        self._created = 0
        self._closed = 0
        self._clears = 0

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(
            connections_open=self._open,
            connections_in_use=self._in_use,
            connections_created=self._created,
            connections_closed=self._closed,
            pool_clears=self._clears,
        )

    # Pool lifecycle -------------------------------------------------------
    def pool_created(self, event: monitoring.PoolCreatedEvent) -> None:
        pass

    def pool_ready(self, event: monitoring.PoolReadyEvent) -> None:
        pass

    def pool_cleared(self, event: monitoring.PoolClearedEvent) -> None:
        self._clears += 1
        log.warning("pool for %s at %s cleared", self.database, event.address)

    def pool_closed(self, event: monitoring.PoolClosedEvent) -> None:
        pass

    # Connections ----------------------------------------------------------
    def connection_created(self, event: monitoring.ConnectionCreatedEvent) -> None:
        self._open += 1
        self._created += 1

    def connection_ready(self, event: monitoring.ConnectionReadyEvent) -> None:
        pass

    def connection_closed(self, event: monitoring.ConnectionClosedEvent) -> None:
        self._open -= 1
        self._closed += 1

    def connection_check_out_started(
        self, event: monitoring.ConnectionCheckOutStartedEvent
    ) -> None:
        pass

    def connection_check_out_failed(self, event: monitoring.ConnectionCheckOutFailedEvent) -> None:
        pass

    def connection_checked_out(self, event: monitoring.ConnectionCheckedOutEvent) -> None:
        self._in_use += 1

    def connection_checked_in(self, event: monitoring.ConnectionCheckedInEvent) -> None:
        self._in_use -= 1


class TopologyMonitor(monitoring.TopologyListener):
    """Tracks whether one client's database can take writes, from SDAM events.

    pymongo's CSOT replaces serverSelectionTimeoutMS with the whole remaining
    time limit, so a call to a dead database would wait out its full deadline.
    The broker consults this monitor first and waits at most
    server_selection_timeout_ms, or nothing at all once SDAM has seen the
    database go down.
    """

    def __init__(self, database: str) -> None:
        self.database = database
        self.available = False
        # True once a heartbeat has failed since start or since the last
        # success: the database is known to be down, not merely undiscovered.
        self.known_down = False
        self.last_error: str | None = None
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._changed = asyncio.Event()

    async def wait_available(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the database to become available."""
        if self.available or timeout <= 0 or self._changed is None:
            return self.available
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.available:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return self.available

    def _notify(self) -> None:
        loop, changed = self._loop, self._changed
        if loop is None or changed is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            changed.set()
        else:  # pymongo may call listeners from another thread
            loop.call_soon_threadsafe(changed.set)

    def opened(self, event: monitoring.TopologyOpenedEvent) -> None:
        pass

    def closed(self, event: monitoring.TopologyClosedEvent) -> None:
        pass

    def description_changed(self, event: monitoring.TopologyDescriptionChangedEvent) -> None:
        try:
            description = event.new_description
            available = description.has_writable_server()
            errors = [
                str(sd.error) for sd in description.server_descriptions().values() if sd.error
            ]
            before = (self.available, self.known_down)
            if available:
                self.known_down = False
                self.last_error = None
            elif errors:
                self.known_down = True
                self.last_error = errors[0]
            if (available, self.known_down) != before:
                if available:
                    log.info("database %s is available", self.database)
                elif self.known_down:
                    log.warning("database %s is unreachable: %s", self.database, self.last_error)
            self.available = available
            self._notify()
        except Exception:  # a listener must never break the driver
            log.exception("topology listener failed")
