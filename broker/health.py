"""The standard gRPC health service (grpc.health.v1), driven by SDAM.

Service names:
- "" (overall): SERVING while the broker accepts calls; NOT_SERVING from
  the moment it starts draining. It does not follow the databases, so a
  database outage does not take every pod out of its Service at once.
- "broker.v1.Broker": the same as "".
- one name per configured database: SERVING while the driver can reach a
  writable server for it, NOT_SERVING while it cannot.

Watch streams last as long as a client's connection: every client that
health-checks (gRPC's client-side health checking, which the bundled clients
turn on for TCP targets) holds one per broker it is connected to. They are
counted apart from the calls (``server.max_health_watches``), so thousands of
idle watchers cannot take the data plane's or the operators' room. A Watch
past the bound is answered UNIMPLEMENTED: gRPC clients then treat the broker
as healthy and carry on without health checking, where RESOURCE_EXHAUSTED
would take the broker out of their rotation altogether.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from broker_client.proto.broker.v1 import broker_pb2
from grpc_health.v1 import health_pb2

# The public name of the asyncio servicer; the type stubs know only the sync one.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from broker.pools import DatabasePool

__all__ = ["BROKER_SERVICE", "Health"]

log = logging.getLogger("mongo_broker.health")

BROKER_SERVICE = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _BoundedHealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpc_health's servicer, with at most ``max_watches`` Watch streams open at once."""

    def __init__(self, max_watches: int) -> None:
        super().__init__()
        self.max_watches = max_watches
        self.watches = 0
        self.refused = 0

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self.watches >= self.max_watches:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "health Watch refused (%d so far): %d streams open, server.max_health_watches=%d",
                    self.refused,
                    self.watches,
                    self.max_watches,
                )
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"this broker already serves {self.max_watches} health Watch streams "
                "(server.max_health_watches): check the health with Check, or raise the limit",
            )
        self.watches += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watches -= 1


class Health:
    """Owns the HealthServicer and keeps its statuses in step with the databases."""

    def __init__(self, max_watches: int) -> None:
        self.servicer = _BoundedHealthServicer(max_watches)
        self._tasks: set[asyncio.Task[None]] = set()
        self._current: dict[str, DatabasePool] = {}

    async def start(self, pools: Iterable[DatabasePool]) -> None:
        await self.servicer.set("", _SERVING)
        await self.servicer.set(BROKER_SERVICE, _SERVING)
        await self.track(pools)

    async def track(self, pools: Iterable[DatabasePool]) -> None:
        """Follow these databases (after start or a reload); forget the others."""
        current = {pool.name: pool for pool in pools}
        for name in set(self._current) - set(current):
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        for name, pool in current.items():
            if self._current.get(name) is pool:
                continue
            topology = pool.stats.topology
            await self.servicer.set(name, _SERVING if topology.available else _NOT_SERVING)
            topology.on_change.append(self._follower(pool))
        self._current = current

    def _follower(self, pool: DatabasePool) -> Callable[[bool], None]:
        loop = asyncio.get_running_loop()

        def changed(available: bool) -> None:
            # Called from pymongo's monitor; the servicer lives on the loop.
            loop.call_soon_threadsafe(self._schedule, pool, available)

        return changed

    def _schedule(self, pool: DatabasePool, available: bool) -> None:
        # A client retired by a reload must not speak for its successor.
        if self._current.get(pool.name) is not pool:
            return
        name = pool.name
        task = asyncio.ensure_future(self.servicer.set(name, _SERVING if available else _NOT_SERVING))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutting_down(self) -> None:
        """Every service NOT_SERVING, for good: probes see the drain at once."""
        await self.servicer.enter_graceful_shutdown()
