"""The Broker servicer: Find, Insert and Ping. Thin: validate, run, map errors.

Runs on grpc.aio with pymongo's AsyncMongoClient. A synchronous server would
pin one thread to every open Find stream for as long as the client takes to
read it; with asyncio an idle stream costs a suspended coroutine.

Every call runs inside `pymongo.timeout(...)` built from the gRPC deadline
(or the database's default_timeout_ms), so server selection, pool checkout
and the server-side maxTimeMS all stop when the caller stops waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pymongo
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc
from pymongo.write_concern import WriteConcern

from broker import documents
from broker.errors import Reason, RpcError, invalid_argument, to_rpc_error
from broker.pools import DatabasePool, Pools
from broker.settings import ServerSettings

__all__ = ["BrokerService"]

log = logging.getLogger("mongo_broker.service")

# pymongo may raise a timeout a hair before the deadline (it leaves the
# server maxTimeMS minus one round trip); within this margin it is ours.
_DEADLINE_SLACK_S = 0.010


class _Call:
    """One call's database and time limit."""

    __slots__ = ("deadline", "pool")

    def __init__(self, pool: DatabasePool, deadline: float) -> None:
        self.pool = pool
        self.deadline = deadline

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def _time_limit(
    context: grpc.aio.ServicerContext[Any, Any], pool: DatabasePool, max_time_ms: int
) -> float:
    remaining = context.time_remaining()
    # No deadline from the client shows up as None or as a huge number.
    if remaining is None or remaining > 10 * 365 * 86400:
        remaining = pool.settings.default_timeout_ms / 1000
    if max_time_ms > 0:
        remaining = min(remaining, max_time_ms / 1000)
    return float(remaining)


class BrokerService(broker_pb2_grpc.BrokerServicer):
    """Serves every worker's calls from the shared pools."""

    def __init__(self, pools: Pools, server: ServerSettings, version: str) -> None:
        self._pools = pools
        self._server = server
        self._version = version

    @asynccontextmanager
    async def _call(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        database: str,
        max_time_ms: int = 0,
    ) -> AsyncIterator[_Call]:
        """Resolve the database, apply the time limit, and turn failures into statuses."""
        name = database
        call: _Call | None = None
        try:
            if not database:
                raise invalid_argument("database is required: name one of the configured databases")
            pool = self._pools.get(database)
            limit = _time_limit(context, pool, max_time_ms)
            call = _Call(pool, time.monotonic() + limit)
            if limit <= 0:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's deadline had already passed when it reached the broker",
                    Reason.TIMEOUT,
                )
            await _require_available(pool, limit)
            with pymongo.timeout(limit):
                yield call
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            passed = call is not None and call.remaining() <= _DEADLINE_SLACK_S
            error = to_rpc_error(exc, database=name, deadline_passed=passed)
            log.debug("call on %r failed: %r", name, error)
            # grpc-stubs lags grpc.aio: abort_with_status exists since grpcio 1.38.
            await context.abort_with_status(error.to_status())  # type: ignore[attr-defined]

    async def Find(  # type: ignore[override]  # grpc.aio also accepts a writing coroutine
        self,
        request: broker_pb2.FindRequest,
        context: grpc.aio.ServicerContext[broker_pb2.FindRequest, broker_pb2.FindResponse],
    ) -> None:
        # A coroutine that writes, rather than an async generator, so the
        # pymongo.timeout context and the cursor's cleanup stay in one task.
        cursor = None
        try:
            async with self._call(context, request.database, request.max_time_ms) as call:
                options = _find_options(request, call.pool.settings.default_batch_size)
                collection = call.pool.db.get_collection(_collection_name(request.collection))
                cursor = collection.find_raw_batches(**options)
                cap = self._server.max_response_message_bytes
                async for batch in cursor:
                    for chunk in documents.chunk_documents(documents.split_batch(batch), cap):
                        await context.write(broker_pb2.FindResponse(documents=chunk))
        finally:
            if cursor is not None:
                await _close_cursor(cursor)

    async def Insert(
        self,
        request: broker_pb2.InsertRequest,
        context: grpc.aio.ServicerContext[broker_pb2.InsertRequest, broker_pb2.InsertResponse],
    ) -> broker_pb2.InsertResponse:
        async with self._call(context, request.database) as call:
            if not request.documents:
                raise invalid_argument("documents is empty: send at least one BSON document")
            prepared = documents.prepare_inserts(request.documents)
            collection = call.pool.db.get_collection(
                _collection_name(request.collection),
                write_concern=_write_concern(request),
            )
            await collection.insert_many(
                prepared.documents,
                ordered=request.ordered if request.HasField("ordered") else True,
                bypass_document_validation=request.bypass_document_validation,
            )
            return broker_pb2.InsertResponse(
                inserted_ids=prepared.id_documents,
                inserted_count=len(prepared.id_documents),
            )
        raise AssertionError("unreachable: _call aborts on error")  # pragma: no cover

    async def Ping(
        self,
        request: broker_pb2.PingRequest,
        context: grpc.aio.ServicerContext[broker_pb2.PingRequest, broker_pb2.PingResponse],
    ) -> broker_pb2.PingResponse:
        if request.database:
            # A named database that does not answer fails the call (UNAVAILABLE, ...).
            async with self._call(context, request.database) as call:
                result = await _ping(call.pool)
            return broker_pb2.PingResponse(version=self._version, databases=[result])
        # Every database: report each one's health; the call itself succeeds.
        results = await asyncio.gather(
            *(self._ping_reporting(pool, context) for pool in self._pools)
        )
        return broker_pb2.PingResponse(version=self._version, databases=results)

    async def _ping_reporting(
        self, pool: DatabasePool, context: grpc.aio.ServicerContext[Any, Any]
    ) -> broker_pb2.DatabasePing:
        start = time.monotonic()
        limit = _time_limit(context, pool, 0)
        try:
            await _require_available(pool, limit)
            with pymongo.timeout(limit):
                return await _ping(pool)
        except Exception as exc:
            passed = time.monotonic() - start >= limit - _DEADLINE_SLACK_S
            error = to_rpc_error(exc, database=pool.name, deadline_passed=passed)
            return broker_pb2.DatabasePing(
                database=pool.name,
                ok=False,
                error=f"{error.code.name}: {error.message}",
                pool=_pool_summary(pool),
            )


async def _require_available(pool: DatabasePool, limit: float) -> None:
    """Fail fast with UNAVAILABLE when the database cannot be reached.

    pymongo's CSOT would otherwise spend the call's whole time limit on server
    selection; this keeps server_selection_timeout_ms meaningful.
    """
    topology = pool.topology
    if topology.available:
        return
    settings = pool.settings
    wait = (
        0.0
        if topology.known_down and settings.fail_fast
        else settings.server_selection_timeout_ms / 1000
    )
    if await topology.wait_available(min(wait, limit)):
        return
    if wait > limit:
        raise RpcError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"database {pool.name!r} did not become available within the call's time limit",
            Reason.TIMEOUT,
            {"database": pool.name},
        )
    cause = f": {topology.last_error}" if topology.last_error else ""
    raise RpcError(
        grpc.StatusCode.UNAVAILABLE,
        f"database {pool.name!r} is unreachable{cause}; the broker retries in the background "
        f"every heartbeat_frequency_ms ({settings.heartbeat_frequency_ms} ms); retry later",
        Reason.DATABASE_UNAVAILABLE,
        {"database": pool.name},
    )


async def _ping(pool: DatabasePool) -> broker_pb2.DatabasePing:
    start = time.perf_counter()
    await pool.db.command("ping")
    rtt_ms = (time.perf_counter() - start) * 1000
    return broker_pb2.DatabasePing(
        database=pool.name, ok=True, rtt_ms=rtt_ms, pool=_pool_summary(pool)
    )


def _pool_summary(pool: DatabasePool) -> broker_pb2.PoolSummary:
    snapshot = pool.monitor.snapshot()
    return broker_pb2.PoolSummary(
        connections_open=snapshot.connections_open,
        connections_in_use=snapshot.connections_in_use,
        max_pool_size=pool.settings.max_pool_size,
    )


async def _close_cursor(cursor: Any) -> None:
    # Runs after the call's own time limit may have expired (or the task was
    # cancelled by a departed client), so killCursors gets a fresh, short one.
    try:
        with pymongo.timeout(5):
            await cursor.close()
    except Exception:
        log.warning(
            "could not close a server cursor; it will time out on the server", exc_info=True
        )


def _collection_name(name: str) -> str:
    if not name:
        raise invalid_argument("collection is required")
    if len(name.encode()) > 255:
        raise invalid_argument("collection name is longer than 255 bytes")
    return name


def _non_negative(value: int, field: str) -> int:
    if value < 0:
        raise invalid_argument(f"{field} must not be negative, got {value}")
    return value


def _find_options(request: broker_pb2.FindRequest, default_batch_size: int) -> dict[str, Any]:
    options: dict[str, Any] = {
        "skip": _non_negative(request.skip, "skip"),
        "limit": _non_negative(request.limit, "limit"),
        "batch_size": _non_negative(request.batch_size, "batch_size") or default_batch_size,
    }
    _non_negative(request.max_time_ms, "max_time_ms")
    options["filter"] = documents.raw_document(request.filter, "filter")
    projection = documents.raw_document(request.projection, "projection")
    if projection is not None:
        options["projection"] = projection
    if request.sort:
        sort = documents.parse_document(request.sort, "sort")
        if sort:
            options["sort"] = _index_spec(sort, "sort", index_types=False)
    hint = request.WhichOneof("hint")
    if hint == "hint_name":
        if not request.hint_name:
            raise invalid_argument("hint_name is empty: give an index name")
        options["hint"] = request.hint_name
    elif hint == "hint_keys":
        options["hint"] = _index_spec(
            documents.parse_document(request.hint_keys, "hint_keys"), "hint_keys", index_types=True
        )
    if request.comment:
        options["comment"] = request.comment
    return options


_INDEX_DIRECTIONS = (1, -1)


def _index_spec(spec: dict[str, Any], field: str, *, index_types: bool) -> list[tuple[str, Any]]:
    """Check a sort or hint document and turn it into pymongo's list of pairs.

    A sort direction is 1, -1 or {"$meta": ...}; a hint may also name an
    index type such as "text" or "hashed".
    """
    if not spec:
        raise invalid_argument(f"{field} is an empty document: give at least one key")
    pairs: list[tuple[str, Any]] = []
    for key, direction in spec.items():
        if isinstance(direction, bool) or not (
            (isinstance(direction, int | float) and direction in _INDEX_DIRECTIONS)
            or (index_types and isinstance(direction, str))
            or (isinstance(direction, dict) and "$meta" in direction)
        ):
            allowed = "1, -1, an index type string" if index_types else "1, -1"
            raise invalid_argument(
                f"{field}.{key}: must be {allowed} or {{'$meta': ...}}, got {direction!r}"
            )
        pairs.append((key, int(direction) if isinstance(direction, float) else direction))
    return pairs


def _write_concern(request: broker_pb2.InsertRequest) -> WriteConcern | None:
    if not request.HasField("write_concern"):
        return None
    wc = request.write_concern
    kwargs: dict[str, Any] = {}
    which = wc.WhichOneof("w")
    if which == "w_nodes":
        kwargs["w"] = _non_negative(wc.w_nodes, "write_concern.w_nodes")
    elif which == "w_tag":
        kwargs["w"] = wc.w_tag
    if wc.HasField("j"):
        kwargs["j"] = wc.j
    if wc.wtimeout_ms:
        kwargs["wtimeout"] = _non_negative(wc.wtimeout_ms, "write_concern.wtimeout_ms")
    try:
        return WriteConcern(**kwargs)
    except (pymongo.errors.ConfigurationError, TypeError, ValueError) as exc:
        raise invalid_argument(f"write_concern: {exc}") from None
