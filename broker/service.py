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
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import pymongo
import pymongo.errors
from broker_client.proto.broker.v1 import broker_pb2, broker_pb2_grpc
from bson.raw_bson import RawBSONDocument

from broker import coalesce, documents, pipelines, requests
from broker.call import (
    DEADLINE_SLACK_S,
    Calls,
    Context,
    DatabaseCall,
    require_available,
    time_limit,
    transmit,
)
from broker.errors import Reason, RpcError, bulk_write_error, invalid_argument, to_rpc_error
from broker.metrics import BrokerMetrics
from broker.pools import DatabasePool, Pools
from broker.security import JS_OPERATORS
from broker.settings import Settings
from broker.stats import database_stats, peer_stats, pool_summary

__all__ = ["BrokerService"]

log = logging.getLogger("mongo_broker.service")

# The first batch of a Find that names no batch_size, on a collection whose
# document size the broker has not seen yet: MongoDB's own default first
# batch. Later batches are sized from the documents seen (see _batch_for).
_FIRST_BATCH = 101
_FAILED_TO_PARSE = 9


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
        # Databases whose server refuses maxTimeMS on distinct (see _distinct).
        self._distinct_without_time_limit: set[str] = set()
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
            # One more than the cap: the broker must tell "exactly the cap"
            # from "more than the cap" to never end silently short.
            cap = self._result_cap(options, "limit")
            max_message = self._settings.limits.max_response_message_bytes
            wanted = options["batch_size"]
            options["batch_size"] = self._first_batch_size(
                request.collection, request.batch_size, call, max_message, wanted
            )
            cursor = self._cursor(request, call, options)
            await self._stream(
                context,
                call,
                cursor,
                collection=request.collection,
                wanted=wanted,
                cap=cap,
                json_mode=json_mode,
            )

    def _result_cap(self, options: dict[str, Any], key: str) -> int:
        """limits.max_find_documents for this call, asking for one more to tell "exactly" from "more"."""
        cap = self._settings.limits.max_find_documents
        if cap and (options.get(key, 0) == 0 or options[key] > cap):
            options[key] = cap + 1
            return cap
        return 0

    async def _stream(
        self,
        context: Context,
        call: DatabaseCall,
        cursor: Any,
        *,
        collection: str,
        wanted: int,
        cap: int,
        json_mode: str | None,
        first_in_hand: bool = False,
    ) -> None:
        """Run a Find's cursor and send its batches; close the cursor before the call is answered.

        Closing it here rather than after _serve has answered matters for a
        stalled stream: its final status waits in gRPC behind the message the
        client does not read, for as long as the client keeps the call open,
        and the server cursor and the batch must not wait with it.

        ``first_in_hand``: the cursor came with its first batch (an
        aggregate's), so taking it needs no round trip.
        """
        max_message = self._settings.limits.max_response_message_bytes
        batches = aiter(cursor)
        counted: DatabasePool | None = None
        docs: list[bytes] = []
        try:
            first = True
            # After the first batch, an exhausted cursor has no round trip
            # left: stop without taking an admission slot.
            while first or cursor.alive:
                if first and first_in_hand:
                    batch = await _next_batch(batches)
                else:
                    batch = await call.round_trip(_next_batch(batches))
                first = False
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
                    call.pool.stats.document_sizes.remember(collection, mean)
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
            lookup = _coalescible_lookup(request, options)
            if lookup is not None:
                docs = await self._find_by_id(request, call, options, lookup)
            else:
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

    async def _find_by_id(
        self, request: broker_pb2.FindRequest, call: DatabaseCall, options: dict[str, Any], lookup: Any
    ) -> list[bytes]:
        """A FindOne by `_id` equality: alone, or coalesced with others waiting (see coalesce.py)."""
        collection = self._readable(request, call)
        key = (
            "FindOne",
            request.collection,
            request.projection,
            request.read_preference.SerializeToString(deterministic=True),
            request.read_concern,
        )
        run = functools.partial(
            coalesce.find_by_ids, collection, options.get("projection"), options["comment"]
        )
        found = await call.coalesced(key, lookup, len(request.filter), run)
        return [found] if found is not None else []

    @staticmethod
    def _first_batch_size(collection: str, asked: int, call: DatabaseCall, budget: int, wanted: int) -> int:
        """The first batch's size: what a stream holds while its client does not read.

        Batches are sized to about one message (``budget`` bytes): the first
        from the size this collection's documents had in earlier Finds (or,
        with none seen and no batch_size asked, MongoDB's default 101), the
        later ones from this Find's own documents (see _size_next_batch).
        """
        seen = call.pool.stats.document_sizes.get(collection)
        if seen is not None:
            return _batch_for(wanted, budget, seen)
        if not asked:
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

    def _cursor(self, request: broker_pb2.FindRequest, call: DatabaseCall, options: dict[str, Any]) -> Any:
        return self._readable(request, call).find_raw_batches(**options)

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
            collection = self._writable(request, call)
            if len(prepared.documents) == 1:
                # A single document may ride with other waiting inserts (see coalesce.py).
                key = (
                    "Insert",
                    request.collection,
                    request.write_concern.SerializeToString(deterministic=True),
                    request.bypass_document_validation,
                )
                run = functools.partial(
                    coalesce.insert_many, collection, call.comment(), request.bypass_document_validation
                )
                await call.coalesced(key, prepared, prepared.bytes, run)
            else:
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

    def _stored(self) -> documents.Checks:
        """What a stored document (an insert, a replacement) is held to: depth only."""
        return documents.Checks(self._settings.limits.max_bson_depth)

    async def Update(
        self,
        request: broker_pb2.UpdateRequest,
        context: grpc.aio.ServicerContext[broker_pb2.UpdateRequest, broker_pb2.UpdateResponse],
    ) -> broker_pb2.UpdateResponse:
        async with self._calls.serve(
            context, "Update", request.database, request.collection, request.max_time_ms, write=True
        ) as call:
            request, json_mode = requests.request_as_bson(request)
            method, arguments = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.update_arguments,
                    request,
                    self._checks(),
                    self._stored(),
                    call.comment(request.comment),
                ),
            )
            result = await call.round_trip(getattr(self._writable(request, call), method)(**arguments))
            call.documents = result.modified_count
            upserted = b"" if result.upserted_id is None else documents.id_document(result.upserted_id)
            return broker_pb2.UpdateResponse(
                matched_count=result.matched_count,
                modified_count=result.modified_count,
                **_encoded("upserted_id", upserted, json_mode),
            )
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    async def Delete(
        self,
        request: broker_pb2.DeleteRequest,
        context: grpc.aio.ServicerContext[broker_pb2.DeleteRequest, broker_pb2.DeleteResponse],
    ) -> broker_pb2.DeleteResponse:
        async with self._calls.serve(
            context, "Delete", request.database, request.collection, request.max_time_ms, write=True
        ) as call:
            request, _ = requests.request_as_bson(request)
            method, arguments = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.delete_arguments, request, self._checks(), call.comment(request.comment)
                ),
            )
            result = await call.round_trip(getattr(self._writable(request, call), method)(**arguments))
            call.documents = result.deleted_count
            return broker_pb2.DeleteResponse(deleted_count=result.deleted_count)
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    async def FindOneAndModify(
        self,
        request: broker_pb2.FindOneAndModifyRequest,
        context: grpc.aio.ServicerContext[
            broker_pb2.FindOneAndModifyRequest, broker_pb2.FindOneAndModifyResponse
        ],
    ) -> broker_pb2.FindOneAndModifyResponse:
        async with self._calls.serve(
            context, "FindOneAndModify", request.database, request.collection, request.max_time_ms, write=True
        ) as call:
            request, json_mode = requests.request_as_bson(request)
            method, arguments = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.find_and_modify_arguments,
                    request,
                    self._checks(),
                    self._stored(),
                    call.comment(request.comment),
                ),
            )
            # Raw: the document goes back as the server's bytes.
            collection = self._writable(request, call).with_options(codec_options=documents.RAW)
            found = await call.round_trip(getattr(collection, method)(**arguments))
            raw = found.raw if found is not None else b""
            call.documents, call.bytes = (1, len(raw)) if raw else (0, 0)
            return broker_pb2.FindOneAndModifyResponse(**_encoded("document", raw, json_mode))
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    async def Count(
        self,
        request: broker_pb2.CountRequest,
        context: grpc.aio.ServicerContext[broker_pb2.CountRequest, broker_pb2.CountResponse],
    ) -> broker_pb2.CountResponse:
        async with self._calls.serve(
            context, "Count", request.database, request.collection, request.max_time_ms
        ) as call:
            request, _ = requests.request_as_bson(request)
            method, arguments = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.count_arguments, request, self._checks(), call.comment(request.comment)
                ),
            )
            count = await call.round_trip(getattr(self._readable(request, call), method)(**arguments))
            return broker_pb2.CountResponse(count=count)
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    async def Distinct(  # type: ignore[override]  # grpc.aio also accepts a writing coroutine
        self,
        request: broker_pb2.DistinctRequest,
        context: grpc.aio.ServicerContext[broker_pb2.DistinctRequest, broker_pb2.DistinctResponse],
    ) -> None:
        async with self._calls.serve(
            context, "Distinct", request.database, request.collection, request.max_time_ms
        ) as call:
            request, json_mode = requests.request_as_bson(request)
            arguments = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.distinct_arguments, request, self._checks(), call.comment(request.comment)
                ),
            )
            # Raw documents among the values stay the server's bytes.
            collection = self._readable(request, call).with_options(codec_options=documents.RAW)
            values = await call.round_trip(self._distinct(collection, arguments, call.pool))
            call.documents = len(values)
            call.stage = "sending to the client"
            for chunk in documents.chunk_values(values, self._settings.limits.max_response_message_bytes):
                call.bytes += len(chunk)
                await transmit(
                    context.write(broker_pb2.DistinctResponse(**_encoded("values", chunk, json_mode))), call
                )

    async def _distinct(self, collection: Any, arguments: dict[str, Any], pool: DatabasePool) -> list[Any]:
        """Run distinct; on a server that refuses its maxTimeMS, without one.

        pymongo sends every operation under a time limit with maxTimeMS,
        and FerretDB 1.x refuses that field on distinct alone (FailedToParse:
        unknown field "maxTimeMS"), which would fail every Distinct there.
        Such a server is remembered, and its distincts run outside the
        call's pymongo.timeout: the broker still answers DEADLINE_EXCEEDED
        when the time limit passes (Call.round_trip), but the server does not
        stop the command by itself.
        """
        if pool.name not in self._distinct_without_time_limit:
            try:
                return list(await collection.distinct(**arguments))
            except pymongo.errors.OperationFailure as exc:
                if not _refuses_max_time(exc):
                    raise
            self._distinct_without_time_limit.add(pool.name)
            log.warning(
                "database %r refuses maxTimeMS on distinct; its Distinct calls run without a "
                "server-side time limit from now on",
                pool.name,
            )
        task = asyncio.get_running_loop().create_task(
            collection.distinct(**arguments), context=contextvars.Context()
        )
        return list(await task)

    async def Aggregate(  # type: ignore[override]  # grpc.aio also accepts a writing coroutine
        self,
        request: broker_pb2.AggregateRequest,
        context: grpc.aio.ServicerContext[broker_pb2.AggregateRequest, broker_pb2.FindResponse],
    ) -> None:
        async with self._calls.serve(
            context, "Aggregate", request.database, request.collection, request.max_time_ms
        ) as call:
            request, json_mode = requests.request_as_bson(request)
            arguments = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.aggregate_arguments,
                    request,
                    self._checks(),
                    call.pool.settings.default_batch_size,
                    call.comment(request.comment),
                ),
            )
            writes = self._vet_pipeline(arguments["pipeline"], call)
            wanted = arguments["batchSize"]
            max_message = self._settings.limits.max_response_message_bytes
            arguments["batchSize"] = self._first_batch_size(
                request.collection, request.batch_size, call, max_message, wanted
            )
            # A pipeline that writes ($out, $merge) does so under the request's write concern.
            collection = self._readable(request, call, **(requests.write_options(request) if writes else {}))
            cursor = await call.round_trip(collection.aggregate_raw_batches(**arguments))
            # A pipeline has no limit to ask one more than the cap for: the
            # stream stops, refused, at the first batch that passes it.
            await self._stream(
                context,
                call,
                cursor,
                collection=request.collection,
                wanted=wanted,
                cap=self._settings.limits.max_find_documents,
                json_mode=json_mode,
                first_in_hand=True,
            )

    def _vet_pipeline(self, stages: list[RawBSONDocument], call: DatabaseCall) -> bool:
        """Hold every collection the pipeline reaches to the caller's allowlists; True if it writes.

        A $out or $merge into another configured database is pointed at
        that database's MongoDB name, and is allowed only when both are
        served by the same deployment (the same URI): the server would
        otherwise write to a namesake database on the wrong deployment.
        """
        reach = pipelines.inspect_bson([bytes(stage.raw) for stage in stages])
        for target in reach.reaches:
            pool = call.pool if target.database is None else call.other_pool(target.database)
            if target.write:
                name = requests.writable_collection_name(target.collection, pool)
                call.require_writable(pool, name)
            else:
                call.principal.authorize(pool.name, requests.collection_name(target.collection), write=False)
            if target.database is not None:
                # The stage names a configured database; the server needs its MongoDB name.
                if pool.settings.uri.get_secret_value() != call.pool.settings.uri.get_secret_value():
                    raise invalid_argument(
                        f"{target.path}: database {pool.name!r} is on another deployment than "
                        f"{call.pool.name!r}; $out and $merge write only within one deployment"
                    )
                stages[-1] = RawBSONDocument(
                    pipelines.retarget(bytes(stages[-1].raw), pool.db.name), documents.RAW
                )
        return reach.writes

    async def BulkWrite(
        self,
        request: broker_pb2.BulkWriteRequest,
        context: grpc.aio.ServicerContext[broker_pb2.BulkWriteRequest, broker_pb2.BulkWriteResponse],
    ) -> broker_pb2.BulkWriteResponse:
        async with self._calls.serve(
            context, "BulkWrite", request.database, request.collection, write=True
        ) as call:
            request, json_mode = requests.request_as_bson(request)
            if not request.operations:
                raise invalid_argument("operations is empty: send at least one operation")
            most = self._settings.limits.max_insert_documents
            if len(request.operations) > most:
                raise RpcError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{len(request.operations)} operations exceed limits.max_insert_documents ({most}); "
                    "split the bulk write",
                    Reason.LIMIT_EXCEEDED,
                )
            models, inserted, size = await requests.validate(
                request.ByteSize(),
                functools.partial(
                    requests.bulk_operations,
                    request,
                    self._checks(),
                    self._stored(),
                    requests.max_document_bytes(call.pool),
                ),
            )
            options = requests.common_options(request, call.comment(request.comment), self._checks())
            call.documents, call.bytes = len(models), size
            try:
                result = await call.round_trip(
                    self._writable(request, call).bulk_write(
                        models,
                        ordered=request.ordered if request.HasField("ordered") else True,
                        # Sent only when set: some servers refuse the field on a delete.
                        bypass_document_validation=request.bypass_document_validation or None,
                        **options,
                    )
                )
            except pymongo.errors.BulkWriteError as exc:
                raise bulk_write_error(exc, call.pool.name, "operation") from None
            except KeyError as exc:
                # pymongo adds up the server's replies and needs every count
                # in them; FerretDB 1.24 leaves nModified out of an update
                # reply that carries write errors. Nobody can say then what
                # was written, and the caller must hear so, not INTERNAL.
                log.warning("BulkWrite on %r: the database's reply lacks %s", call.pool.name, exc)
                raise RpcError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the database answered the bulk write without the field {exc} the driver needs "
                    "to count what was written; some operations may have been applied, so read "
                    "back before retrying",
                    Reason.OPERATION_FAILED,
                    {"database": call.pool.name},
                ) from None
            return broker_pb2.BulkWriteResponse(
                inserted_count=result.inserted_count,
                matched_count=result.matched_count,
                modified_count=result.modified_count,
                deleted_count=result.deleted_count,
                upserted_count=result.upserted_count,
                upserted_ids=[
                    broker_pb2.IndexedId(index=i, **_encoded("id", documents.id_document(v), json_mode))
                    for i, v in sorted(result.upserted_ids.items())
                ],
                inserted_ids=[
                    broker_pb2.IndexedId(index=i, **_encoded("id", raw, json_mode)) for i, raw in inserted
                ],
            )
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover

    @staticmethod
    def _writable(request: Any, call: DatabaseCall) -> Any:
        """The request's collection, for a write, under its write concern."""
        return call.pool.db.get_collection(
            requests.writable_collection_name(request.collection, call.pool),
            codec_options=documents.DECODE,
            **requests.write_options(request),
        )

    def _readable(self, request: Any, call: DatabaseCall, **options: Any) -> Any:
        """The request's collection for a read: its read preference, read concern, and ``options``."""
        return call.pool.db.get_collection(
            requests.collection_name(request.collection),
            codec_options=documents.DECODE,
            **requests.read_options(request, self._checks()),
            **options,
        )

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
            sees_everything = all(principal.may_use(pool.name) for pool in self._pools)
            return broker_pb2.StatsResponse(
                version=self._version,
                uptime_s=time.monotonic() - self._started,
                databases=[database_stats(pool) for pool in pools],
                instance=self._settings.server.instance,
                caller=call.peer,
                # Who else calls is the whole broker's business: a token
                # scoped to some databases learns no other caller's address.
                peers=peer_stats(self._calls.peers) if sees_everything else (),
                peers_dropped=self._calls.peers.dropped if sees_everything else 0,
            )
        raise AssertionError("unreachable: _serve aborts on error")  # pragma: no cover


def _coalescible_lookup(request: broker_pb2.FindRequest, options: dict[str, Any]) -> Any:
    """The IdLookup of a FindOne that only looks one `_id` up, else None.

    Sort, skip, hint and collation would change which document one lookup
    finds, and a projection without `_id` would hide what a shared answer is
    matched by: such lookups go alone.
    """
    if any(k in options for k in ("sort", "hint", "collation")) or options["skip"]:
        return None
    projection = options.get("projection")
    if projection is not None and "_id" in projection and not projection["_id"]:
        return None
    return documents.id_lookup(request.filter)


def _refuses_max_time(exc: pymongo.errors.OperationFailure) -> bool:
    details = exc.details if isinstance(exc.details, Mapping) else {}
    return exc.code == _FAILED_TO_PARSE and 'unknown field "maxTimeMS"' in str(details.get("errmsg", ""))


def _encoded(field: str, raw: bytes, json_mode: str | None) -> dict[str, Any]:
    """``{field: raw}``, or ``{field_json: text}`` in an Extended JSON encoding; nothing for empty."""
    if not raw:
        return {}
    if json_mode is None:
        return {field: raw}
    return {f"{field}_json": documents.bson_to_json(raw, json_mode)}


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
