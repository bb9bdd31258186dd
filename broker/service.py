"""The Broker servicer: one short handler per RPC, each validate -> round trips -> answer.

Runs on grpc.aio with pymongo's AsyncMongoClient. A synchronous server would
pin one thread to every open Find stream for as long as the client takes to
read it; with asyncio an idle stream costs a suspended coroutine.

What every call shares (authentication, the time limit, admission, the
status, access log and metrics) is call.py's; turning a request into pymongo
arguments is requests.py's; the Stats snapshot is stats.py's. What stays
here is each method's own story, and the Find stream's batching.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pymongo
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc

from broker import documents, requests
from broker.call import (
    DEADLINE_SLACK_S,
    Calls,
    Context,
    DatabaseCall,
    require_available,
    time_limit,
    transmit,
)
from broker.errors import Reason, RpcError, invalid_argument, to_rpc_error
from broker.metrics import BrokerMetrics
from broker.pools import DatabasePool, Pools
from broker.security import JS_OPERATORS
from broker.settings import Settings
from broker.stats import database_stats, pool_summary

__all__ = ["BrokerService"]

log = logging.getLogger("mongo_broker.service")

# The first batch of a Find that names no batch_size, on a collection whose
# document size the broker has not seen yet: MongoDB's own default first
# batch. Later batches are sized from the documents seen (see _batch_for).
_FIRST_BATCH = 101


async def _next_batch(batches: AsyncIterator[bytes]) -> bytes | None:
    """The next raw batch, or None when the cursor is exhausted."""
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return None


class BrokerService(broker_pb2_grpc.BrokerServicer):
    """Serves every worker's calls from the shared pools: one short handler per RPC."""

    def __init__(self, pools: Pools, settings: Settings, metrics: BrokerMetrics, version: str) -> None:
        self._pools = pools
        self._version = version
        self._started = time.monotonic()
        self._calls = Calls(pools, settings, metrics)
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Apply (re)loaded settings to calls from now on."""
        self._settings = settings
        self._calls.configure(settings)

    def describe_in_flight(self) -> list[str]:
        """One line per call in flight: method, database, stage and age (SIGUSR1)."""
        return self._calls.describe_in_flight()

    async def drain(self, grace_s: float) -> tuple[int, int]:
        """Refuse new calls; let running ones finish for ``grace_s``; abort the rest."""
        return await self._calls.drain(grace_s)

    def _checks(self) -> documents.Checks:
        """What a filter or projection is held to: depth, and the JavaScript operator guard."""
        denied = frozenset() if self._settings.security.allow_js_operators else JS_OPERATORS
        return documents.Checks(self._settings.limits.max_bson_depth, denied)

    async def Find(  # type: ignore[override]  # grpc.aio also accepts a writing coroutine
        self,
        request: broker_pb2.FindRequest,
        context: grpc.aio.ServicerContext[broker_pb2.FindRequest, broker_pb2.FindResponse],
    ) -> None:
        # A coroutine that writes, rather than an async generator, so the
        # pymongo.timeout context and the cursor's cleanup stay in one task.
        async with self._calls.serve(
            context, "Find", request.database, request.collection, request.max_time_ms
        ) as call:
            request, json_mode = requests.find_request_as_bson(request)
            options = await self._find_options(request, call)
            cap = self._settings.limits.max_find_documents
            if cap and (options["limit"] == 0 or options["limit"] > cap):
                # One more than the cap: the broker must tell "exactly the
                # cap" from "more than the cap" to never end silently short.
                options["limit"] = cap + 1
            else:
                cap = 0
            await self._stream(context, request, call, options=options, cap=cap, json_mode=json_mode)

    async def _stream(
        self,
        context: Context,
        request: broker_pb2.FindRequest,
        call: DatabaseCall,
        *,
        options: dict[str, Any],
        cap: int,
        json_mode: str | None,
    ) -> None:
        """Run a Find's cursor and send its batches; close the cursor before the call is answered.

        Closing it here rather than after _serve has answered matters for a
        stalled stream: its final status waits in gRPC behind the message the
        client does not read, for as long as the client keeps the call open,
        and the server cursor and the batch must not wait with it.
        """
        max_message = self._settings.limits.max_response_message_bytes
        wanted = options["batch_size"]
        options["batch_size"] = self._first_batch_size(request, call, max_message, wanted)
        cursor = self._cursor(request, call, options)
        batches = aiter(cursor)
        counted: DatabasePool | None = None
        docs: list[bytes] = []
        try:
            first = True
            # After the first batch, an exhausted cursor has no round trip
            # left: stop without taking an admission slot.
            while first or cursor.alive:
                first = False
                batch = await call.round_trip(_next_batch(batches))
                if batch is None:
                    break
                if counted is None and cursor.alive and cursor.cursor_id:
                    counted = call.pool
                    counted.stats.open_cursors += 1
                docs = documents.split_batch(batch)
                # The documents are copies: the raw batch need not wait for
                # the client too.
                del batch
                over = bool(cap) and call.documents + len(docs) > cap
                if over:
                    docs = docs[: cap - call.documents]
                call.documents += len(docs)
                call.bytes += sum(len(d) for d in docs)
                if call.documents:
                    mean = call.bytes / call.documents
                    call.pool.stats.document_sizes.remember(request.collection, mean)
                    _size_next_batch(cursor, _batch_for(wanted, max_message, mean))
                call.stage = "sending to the client"
                await _write_batch(context, docs, max_message, json_mode, call)
                if over:
                    raise RpcError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the result has more than limits.max_find_documents ({cap}) documents; "
                        f"{cap} were sent. Narrow the filter, or page with skip and limit",
                        Reason.LIMIT_EXCEEDED,
                    )
        finally:
            docs.clear()
            await self._calls.close_cursor(cursor, call)
            if counted is not None:
                counted.stats.open_cursors -= 1

    async def FindOne(
        self,
        request: broker_pb2.FindRequest,
        context: grpc.aio.ServicerContext[broker_pb2.FindRequest, broker_pb2.FindResponse],
    ) -> broker_pb2.FindResponse:
        async with self._calls.serve(
            context, "FindOne", request.database, request.collection, request.max_time_ms
        ) as call:
            request, json_mode = requests.find_request_as_bson(request)
            options = await self._find_options(request, call)
            if options["limit"] > 1:
                raise invalid_argument(
                    f"FindOne returns at most one document, so limit must be 0 or 1, got {options['limit']}; "
                    "use Find for more"
                )
            # A negative limit is pymongo's single batch: the server returns
            # the document and closes the cursor in the same reply.
            options["limit"], options["batch_size"] = -1, 0
            cursor = self._cursor(request, call, options)
            try:
                batch = await call.round_trip(_next_batch(aiter(cursor)))
            finally:
                await self._calls.close_cursor(cursor, call)
            docs = documents.split_batch(batch)[:1] if batch else []
            call.documents = len(docs)
            call.bytes = sum(len(d) for d in docs)
            if json_mode is not None:
                texts = [documents.bson_to_json(d, json_mode) for d in docs]
                return broker_pb2.FindResponse(json_documents=texts)
            return broker_pb2.FindResponse(documents=docs)
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    @staticmethod
    def _first_batch_size(
        request: broker_pb2.FindRequest, call: DatabaseCall, budget: int, wanted: int
    ) -> int:
        """The first batch's size: what a stream holds while its client does not read.

        Batches are sized to about one message (``budget`` bytes): the first
        from the size this collection's documents had in earlier Finds (or,
        with none seen and no batch_size asked, MongoDB's default 101), the
        later ones from this Find's own documents (see _size_next_batch).
        """
        seen = call.pool.stats.document_sizes.get(request.collection)
        if seen is not None:
            return _batch_for(wanted, budget, seen)
        if not request.batch_size:
            return min(wanted, _FIRST_BATCH)
        return wanted

    async def _find_options(self, request: broker_pb2.FindRequest, call: DatabaseCall) -> dict[str, Any]:
        size = len(request.filter) + len(request.projection) + len(request.sort) + len(request.hint_keys)
        options = await requests.validate(
            size,
            functools.partial(
                requests.find_options, request, call.pool.settings.default_batch_size, self._checks()
            ),
        )
        options["comment"] = call.comment(request.comment)
        return options

    @staticmethod
    def _cursor(request: broker_pb2.FindRequest, call: DatabaseCall, options: dict[str, Any]) -> Any:
        collection = call.pool.db.get_collection(requests.collection_name(request.collection))
        return collection.find_raw_batches(**options)

    async def Insert(
        self,
        request: broker_pb2.InsertRequest,
        context: grpc.aio.ServicerContext[broker_pb2.InsertRequest, broker_pb2.InsertResponse],
    ) -> broker_pb2.InsertResponse:
        async with self._calls.serve(
            context, "Insert", request.database, request.collection, write=True
        ) as call:
            json_mode = requests.json_mode(request.encoding)
            sent: Sequence[bytes] | Sequence[str] = request.documents
            if json_mode is not None:
                if request.documents:
                    raise invalid_argument(
                        "documents holds BSON but encoding is Extended JSON: send json_documents"
                    )
                sent = request.json_documents
            elif request.json_documents:
                raise invalid_argument(requests.JSON_FIELDS_NEED_ENCODING)
            if not sent:
                raise invalid_argument("documents is empty: send at least one document")
            most = self._settings.limits.max_insert_documents
            if len(sent) > most:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{len(sent)} documents exceed limits.max_insert_documents ({most}); split the insert",
                    Reason.LIMIT_EXCEEDED,
                )
            prepared = await requests.validate(
                sum(len(d) for d in sent),
                functools.partial(
                    requests.prepare_inserts,
                    request,
                    json_mode,
                    documents.Checks(self._settings.limits.max_bson_depth),
                    requests.max_document_bytes(call.pool),
                ),
            )
            call.documents = len(prepared.documents)
            call.bytes = prepared.bytes
            collection = call.pool.db.get_collection(
                requests.writable_collection_name(request.collection, call.pool),
                write_concern=requests.write_concern(request),
            )
            await call.round_trip(
                collection.insert_many(
                    prepared.documents,
                    ordered=request.ordered if request.HasField("ordered") else True,
                    bypass_document_validation=request.bypass_document_validation,
                    comment=call.comment(),
                )
            )
            if json_mode is not None:
                return broker_pb2.InsertResponse(
                    inserted_ids_json=[documents.bson_to_json(d, json_mode) for d in prepared.id_documents],
                    inserted_count=len(prepared.id_documents),
                )
            return broker_pb2.InsertResponse(
                inserted_ids=prepared.id_documents,
                inserted_count=len(prepared.id_documents),
            )
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    async def Ping(
        self,
        request: broker_pb2.PingRequest,
        context: grpc.aio.ServicerContext[broker_pb2.PingRequest, broker_pb2.PingResponse],
    ) -> broker_pb2.PingResponse:
        # Pings skip the admission queue: an operator must be able to ask
        # "is the database there?" while the queue is full.
        if request.database:
            # A named database that does not answer fails the call (UNAVAILABLE, ...).
            async with self._calls.serve(context, "Ping", request.database) as call:
                result = await _ping(call.pool)
            return broker_pb2.PingResponse(version=self._version, databases=[result])
        # Every database the caller may use: report each one's health; the
        # call itself succeeds, and is counted under each database pinged.
        async with self._calls.serve_local(context, "Ping") as call:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise RpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "the call's deadline had already passed when it reached the broker",
                    Reason.TIMEOUT,
                )
            pools = [pool for pool in self._pools if call.principal.may_use(pool.name)]
            call.count_under(pools)
            call.stage = "pinging every database"
            results = await asyncio.gather(*(self._ping_reporting(pool, context) for pool in pools))
            return broker_pb2.PingResponse(version=self._version, databases=results)
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    async def _ping_reporting(self, pool: DatabasePool, context: Context) -> broker_pb2.DatabasePing:
        start = time.monotonic()
        limit = time_limit(context, pool, 0)
        try:
            await require_available(pool, limit)
            with pymongo.timeout(limit):
                return await _ping(pool)
        except Exception as exc:
            passed = time.monotonic() - start >= limit - DEADLINE_SLACK_S
            error = to_rpc_error(exc, database=pool.name, deadline_passed=passed)
            return broker_pb2.DatabasePing(
                database=pool.name,
                ok=False,
                error=f"{error.code.name}: {error.message}",
                pool=pool_summary(pool),
            )

    async def Stats(
        self,
        request: broker_pb2.StatsRequest,
        context: grpc.aio.ServicerContext[broker_pb2.StatsRequest, broker_pb2.StatsResponse],
    ) -> broker_pb2.StatsResponse:
        # Not counted under its databases: reading Stats must not change it.
        async with self._calls.serve_local(context, "Stats", request.database) as call:
            principal = call.principal
            if request.database:
                principal.authorize(request.database, "", write=False)
                pools = [self._pools.get(request.database, principal.may_use)]
            else:
                pools = [pool for pool in self._pools if principal.may_use(pool.name)]
            return broker_pb2.StatsResponse(
                version=self._version,
                uptime_s=time.monotonic() - self._started,
                databases=[database_stats(pool) for pool in pools],
            )
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover


async def _ping(pool: DatabasePool) -> broker_pb2.DatabasePing:
    start = time.perf_counter()
    await pool.db.command("ping")
    rtt_ms = (time.perf_counter() - start) * 1000
    return broker_pb2.DatabasePing(database=pool.name, ok=True, rtt_ms=rtt_ms, pool=pool_summary(pool))


async def _write_batch(
    context: Context, docs: list[bytes], max_message: int, json_mode: str | None, call: DatabaseCall
) -> None:
    """Send one batch as one message, or several when it is larger than ``max_message``.

    Each write is awaited before the next message is built, so gRPC holds at
    most one of this stream's messages at a time.
    """
    if json_mode is None:
        for chunk in documents.chunk_documents(docs, max_message):
            await transmit(context.write(broker_pb2.FindResponse(documents=chunk)), call)
        return
    texts = [documents.bson_to_json(d, json_mode).encode() for d in docs]
    for part in documents.chunk_documents(texts, max_message):
        await transmit(
            context.write(broker_pb2.FindResponse(json_documents=[t.decode() for t in part])), call
        )


def _batch_for(wanted: int, budget: int, mean_document_bytes: float) -> int:
    """Documents per batch: what was asked, but no more than about ``budget`` bytes."""
    return max(1, min(wanted, int(budget // max(mean_document_bytes, 1.0))))


def _size_next_batch(cursor: Any, size: int) -> None:
    """Set the batchSize of the cursor's next getMore.

    pymongo's public ``batch_size()`` refuses once a cursor has run
    (InvalidOperation: cannot set options after executing query), and there
    is no other public way to size a getMore; the getMore reads
    ``_batch_size``. A test (tests/test_parked_streams.py) checks that
    batches follow it, so a pymongo that changes this is noticed.
    """
    if hasattr(cursor, "_batch_size"):
        cursor._batch_size = size
