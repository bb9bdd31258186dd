"""AsyncBrokerClient, AsyncDatabase, AsyncCollection, AsyncCursor: BrokerClient's API, awaitable.

The twin of ``client.py``, line for line, on grpc.aio: every call builds its
request and result with `_requests`, retries as the call's `RetryState`
allows (pausing with ``asyncio.sleep``), and maps failures with
`errors.map_rpc_errors`. The channel is made by the first call, inside the
running event loop, and belongs to that loop: use one client per loop. The
rules for forking are in `_channel` (in short: ``await client.close()``
before forking a process that used one, or fork before the first call).

Neither asyncio nor grpc is imported until the first call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic

from broker_client import _requests
from broker_client._channel import AsyncChannelHolder
from broker_client._requests import (
    DEFAULT_TIMEOUT_S,
    Collation,
    DocumentT,
    Hint,
    Projection,
    Sort,
    Update,
    WriteConcernSpec,
)
from broker_client.errors import BrokerError, as_bulk_write_error, as_write_error, map_rpc_errors
from broker_client.operations import ReturnDocument
from broker_client.retry import DEFAULT_RETRY_POLICY, RetryPolicy, RetryState

if TYPE_CHECKING:
    import grpc
    from bson.codec_options import CodecOptions

    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import (
        BrokerStats,
        BulkWriteResult,
        DeleteResult,
        InsertManyResult,
        InsertOneResult,
        PingResult,
        UpdateResult,
    )

__all__ = ["AsyncBrokerClient", "AsyncCollection", "AsyncCursor", "AsyncDatabase"]


async def _sleep(seconds: float) -> None:
    # Imported here: asyncio comes with the first call, not with the import.
    import asyncio

    await asyncio.sleep(seconds)


class AsyncBrokerClient(Generic[DocumentT]):
    """A client for one mongo-broker for asyncio programs; ``BrokerClient``'s API, awaitable.

    >>> async with AsyncBrokerClient("unix:///run/mongo-broker.sock") as client:
    ...     items = client["appdb"]["items"]
    ...     await items.insert_one({"sku": "a1"})
    ...     async for doc in items.find({"sku": "a1"}):
    ...         print(doc)

    It takes the same arguments as `BrokerClient`, retries the same way, and
    raises the same exceptions. Its gRPC channel is made by the first call,
    inside the running event loop, and belongs to that loop: a call from
    another loop raises InvalidOperation. Make one client per event loop.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        document_class: type[DocumentT] | None = None,
        codec_options: CodecOptions[DocumentT] | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any | None]] = (),
        retries: RetryPolicy | None = DEFAULT_RETRY_POLICY,
    ) -> None:
        self._settings = _requests.Settings(
            target,
            timeout=timeout,
            document_class=document_class,
            codec_options=codec_options,
            token=token,
            metadata=metadata,
            options=options,
            retries=retries,
            channel_defaults={},
        )
        self._holder = AsyncChannelHolder(self._settings.target, self._settings.channel_options, credentials)

    # --- pymongo's navigation and properties ------------------------------------

    def __getitem__(self, name: str) -> AsyncDatabase[DocumentT]:
        return AsyncDatabase(self, name)

    def __getattr__(self, name: str) -> AsyncDatabase[DocumentT]:
        if name.startswith("_"):
            raise _requests.missing_attribute(self, name, "database", "client")
        return AsyncDatabase(self, name)

    def get_database(self, name: str) -> AsyncDatabase[DocumentT]:
        """The database ``name`` as configured on the broker (not necessarily MongoDB's name)."""
        return AsyncDatabase(self, name)

    @property
    def target(self) -> str:
        """The gRPC target this client connects to."""
        return self._settings.target

    @property
    def timeout(self) -> float:
        """The default time limit of each call, in seconds."""
        return self._settings.timeout

    @property
    def codec_options(self) -> CodecOptions[DocumentT]:
        return self._settings.codec_options

    @property
    def retries(self) -> RetryPolicy | None:
        """How failed calls are retried (None: never)."""
        return self._settings.retries

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings.target!r})"

    # --- calls ---------------------------------------------------------------------

    async def ping(self, database: str | None = None, *, timeout: float | None = None) -> PingResult:
        """Check the broker and its databases (all, or the one named)."""
        state = self._settings.retry_state("Ping", timeout)
        response = await self._call("Ping", _requests.ping_request(database), state)
        return _requests.ping_result(response, state.attempts)

    async def stats(self, database: str | None = None, *, timeout: float | None = None) -> BrokerStats:
        """The broker's pool, queue and operation figures (all databases, or the one named)."""
        state = self._settings.retry_state("Stats", timeout)
        response = await self._call("Stats", _requests.stats_request(database), state)
        return _requests.stats_result(response, state.attempts)

    async def close(self) -> None:
        """Close the channel (cancelling calls in flight). Later calls raise InvalidOperation.

        Closing also lets grpc.aio stop its poller thread once no channel is
        left, which a process must do before it forks (see `_channel`).
        """
        await self._holder.close()

    async def __aenter__(self) -> AsyncBrokerClient[DocumentT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- the channel, with retries -------------------------------------------------

    async def _unary(self, method: str, request: Any, timeout: float) -> Any:
        """One attempt of the unary call ``method`` ("Ping", "Insert", ...)."""
        with map_rpc_errors:
            call = getattr(self._holder.stub(), method)
            return await call(request, timeout=timeout, metadata=self._settings.metadata)

    def _open_stream(self, method: str, request: Any, timeout: float) -> Any:
        """Open the server-streaming call ``method`` ("Find", "Aggregate", "Distinct")."""
        with map_rpc_errors:
            call = getattr(self._holder.stub(), method)
            return call(request, timeout=timeout, metadata=self._settings.metadata)

    async def _read(self, stream: Any) -> Any | None:
        """The stream's next message, or None at its end."""
        import grpc.aio

        with map_rpc_errors:
            response = await stream.read()
        return None if response is grpc.aio.EOF else response  # type: ignore[attr-defined]

    async def _call(self, method: str, request: Any, state: RetryState) -> Any:
        """The unary call, retried as ``state`` allows; its response."""
        with state:
            while True:
                try:
                    return await self._unary(method, request, state.next_timeout())
                except BrokerError as exc:
                    await _sleep(state.backoff(exc))

    async def _collect(self, method: str, request: Any, state: RetryState) -> list[Any]:
        """Every message of the streaming call ``method`` (see `BrokerClient._collect`)."""
        while True:
            try:
                stream = self._open_stream(method, request, state.next_timeout())
                responses: list[Any] = []
                while (response := await self._read(stream)) is not None:
                    responses.append(response)
                return responses
            except BrokerError as exc:
                await _sleep(state.backoff(exc))

    async def _find_all(self, request: broker_pb2.FindRequest, state: RetryState) -> list[bytes]:
        """Every document of a Find, as BSON."""
        responses = await self._collect("Find", request, state)
        return [document for response in responses for document in response.documents]

    async def _insert(self, insert: _requests.Insert, state: RetryState) -> list[Any]:
        """Send ``insert``, retried by its rules (see `_requests.Insert`); every ``_id``."""
        with state:
            while True:
                try:
                    response = await self._unary("Insert", insert.request(), state.next_timeout())
                except BrokerError as exc:
                    lookup = insert.failed(exc)
                    if lookup is None:
                        delay = state.backoff(exc)
                        insert.retrying()
                        await _sleep(delay)
                        continue
                    # A duplicate key that may be an earlier attempt's own documents.
                    try:
                        stored = await self._find_all(lookup, state.fresh("Find (was the insert stored?)"))
                    except BrokerError as read_error:
                        raise exc from read_error
                    if insert.found(exc, stored):
                        return insert.inserted_ids(None)
                else:
                    return insert.inserted_ids(response)


class AsyncDatabase(Generic[DocumentT]):
    """A database configured on the broker (``client["appdb"]``)."""

    def __init__(self, client: AsyncBrokerClient[DocumentT], name: str) -> None:
        self._client = client
        self._name = _requests.check_name(name, "database")

    @property
    def name(self) -> str:
        return self._name

    @property
    def client(self) -> AsyncBrokerClient[DocumentT]:
        return self._client

    def __getitem__(self, name: str) -> AsyncCollection[DocumentT]:
        return AsyncCollection(self, name)

    def __getattr__(self, name: str) -> AsyncCollection[DocumentT]:
        if name.startswith("_"):
            raise _requests.missing_attribute(self, name, "collection", "database")
        return AsyncCollection(self, name)

    def get_collection(
        self,
        name: str,
        codec_options: CodecOptions[Any] | None = None,
        read_preference: Any | None = None,
        write_concern: WriteConcernSpec | None = None,
        read_concern: Any | None = None,
    ) -> AsyncCollection[DocumentT]:
        """The collection ``name`` with options (see `Database.get_collection`)."""
        return AsyncCollection(
            self,
            name,
            codec_options=codec_options,
            read_preference=read_preference,
            write_concern=write_concern,
            read_concern=read_concern,
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncDatabase):
            return self._client is other._client and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self._client), self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client!r}, {self._name!r})"

    async def ping(self, *, timeout: float | None = None) -> PingResult:
        """Ping this database only."""
        return await self._client.ping(self._name, timeout=timeout)


class AsyncCollection(Generic[DocumentT]):
    """A collection for asyncio programs: `Collection`'s methods, awaitable; ``find`` gives an `AsyncCursor`.

    The arguments, results, errors and retries are those of `Collection`.

    Reads (``find``, ``find_one``, ``count_documents``, ``distinct``,
    ``aggregate``) use the collection's read preference and read concern;
    writes use its write concern unless the call gives one. Every method
    also takes ``timeout=`` (seconds), the call's time limit.
    """

    def __init__(
        self,
        database: AsyncDatabase[DocumentT],
        name: str,
        *,
        codec_options: CodecOptions[Any] | None = None,
        read_preference: Any | None = None,
        write_concern: WriteConcernSpec | None = None,
        read_concern: Any | None = None,
    ) -> None:
        self._database = database
        self._client = database.client
        self._name = _requests.check_name(name, "collection")
        settings = self._client._settings
        self._settings = settings if codec_options is None else settings.with_codec_options(codec_options)
        # Converted now, so that a bad option fails here rather than at the first call.
        self._read = _requests.ReadOptions(read_preference, read_concern, self._settings.codec_options)
        _requests.write_concern_message(write_concern)
        self._read_preference = read_preference
        self._read_concern = read_concern
        self._write_concern = write_concern

    @property
    def name(self) -> str:
        return self._name

    @property
    def full_name(self) -> str:
        return f"{self._database.name}.{self._name}"

    @property
    def database(self) -> AsyncDatabase[DocumentT]:
        return self._database

    @property
    def codec_options(self) -> CodecOptions[DocumentT]:
        return self._settings.codec_options

    @property
    def read_preference(self) -> Any | None:
        """The read preference given (None: the broker's configured one)."""
        return self._read_preference

    @property
    def read_concern(self) -> Any | None:
        """The read concern given (None: the server's default)."""
        return self._read_concern

    @property
    def write_concern(self) -> WriteConcernSpec | None:
        """The default write concern of this collection's writes (None: the broker's)."""
        return self._write_concern

    def with_options(
        self,
        codec_options: CodecOptions[Any] | None = None,
        read_preference: Any | None = None,
        write_concern: WriteConcernSpec | None = None,
        read_concern: Any | None = None,
    ) -> AsyncCollection[DocumentT]:
        """This collection with some options changed, as pymongo's ``with_options``."""
        return AsyncCollection(
            self._database,
            self._name,
            codec_options=codec_options if codec_options is not None else self._settings.codec_options,
            read_preference=read_preference if read_preference is not None else self._read_preference,
            write_concern=write_concern if write_concern is not None else self._write_concern,
            read_concern=read_concern if read_concern is not None else self._read_concern,
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncCollection):
            return self._database == other._database and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._database, self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._database!r}, {self._name!r})"

    def _concern(self, write_concern: WriteConcernSpec | None) -> WriteConcernSpec | None:
        return write_concern if write_concern is not None else self._write_concern

    async def _write(self, method: str, request: Any, timeout: float | None, convert: Any) -> Any:
        """Send a write that is never retried; a failure raised as pymongo's exception (``convert``)."""
        state = self._settings.retry_state(method, timeout)
        try:
            return await self._client._call(method, request, state)
        except BrokerError as exc:
            converted = convert(exc)
            if converted is exc:
                raise
            raise converted from None

    # --- reads ------------------------------------------------------------------------

    def find(
        self,
        filter: Mapping[str, Any] | None = None,
        projection: Projection | None = None,
        *,
        sort: Sort | None = None,
        skip: int = 0,
        limit: int = 0,
        batch_size: int = 0,
        hint: Hint | None = None,
        max_time_ms: int | None = None,
        comment: str | None = None,
        collation: Collation | None = None,
        timeout: float | None = None,
    ) -> AsyncCursor[DocumentT]:
        """A lazy cursor over the matching documents; nothing is sent until iterated.

        ``timeout`` bounds the whole call, from the first batch to the last,
        including the time the caller takes between batches, and any
        retries. ``limit=0`` means no limit. ``batch_size=0`` means the
        broker's default. A failure before the first documents arrive is
        retried by the client's ``retries`` policy; a failure after that
        raises (a restart would return documents twice).
        """
        settings = self._settings
        request = _requests.find_request(
            self._database.name,
            self._name,
            settings.codec_options,
            filter,
            projection,
            sort=sort,
            skip=skip,
            limit=limit,
            batch_size=batch_size,
            hint=hint,
            max_time_ms=max_time_ms,
            comment=comment,
            collation=collation,
            read=self._read,
        )
        return AsyncCursor(self._client, _requests.CursorState(request, settings.deadline(timeout), settings))

    async def find_one(
        self,
        filter: Any | None = None,
        projection: Projection | None = None,
        *,
        sort: Sort | None = None,
        skip: int = 0,
        hint: Hint | None = None,
        max_time_ms: int | None = None,
        comment: str | None = None,
        collation: Collation | None = None,
        timeout: float | None = None,
    ) -> DocumentT | None:
        """The first matching document, or None.

        As in pymongo, a ``filter`` that is not a mapping is an ``_id`` to
        look up: ``find_one(oid)`` is ``find_one({"_id": oid})``.
        """
        settings = self._settings
        request = _requests.find_one_request(
            self._database.name,
            self._name,
            settings.codec_options,
            filter,
            projection,
            sort=sort,
            skip=skip,
            hint=hint,
            max_time_ms=max_time_ms,
            comment=comment,
            collation=collation,
            read=self._read,
        )
        state = settings.retry_state("FindOne", timeout)
        response = await self._client._call("FindOne", request, state)
        return _requests.first_document(response, settings.codec_options)

    async def count_documents(
        self,
        filter: Mapping[str, Any],
        *,
        comment: str | None = None,
        skip: int = 0,
        limit: int = 0,
        hint: Hint | None = None,
        collation: Collation | None = None,
        maxTimeMS: int | None = None,  # pymongo's name
        timeout: float | None = None,
    ) -> int:
        """How many documents ``filter`` matches (after ``skip``, at most ``limit``; 0: no limit)."""
        request = _requests.count_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            skip=skip,
            limit=limit,
            hint=hint,
            collation=collation,
            comment=comment,
            max_time_ms=maxTimeMS,
            read=self._read,
        )
        state = self._settings.retry_state("Count", timeout)
        return int((await self._client._call("Count", request, state)).count)

    async def estimated_document_count(
        self,
        comment: str | None = None,
        *,
        maxTimeMS: int | None = None,  # pymongo's name
        timeout: float | None = None,
    ) -> int:
        """The collection's size from its metadata: fast, without a filter."""
        request = _requests.count_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            None,
            estimated=True,
            comment=comment,
            max_time_ms=maxTimeMS,
            read=self._read,
        )
        state = self._settings.retry_state("Count", timeout)
        return int((await self._client._call("Count", request, state)).count)

    async def distinct(
        self,
        key: str,
        filter: Mapping[str, Any] | None = None,
        *,
        comment: str | None = None,
        collation: Collation | None = None,
        maxTimeMS: int | None = None,  # pymongo's name
        timeout: float | None = None,
    ) -> list[Any]:
        """The distinct values of ``key`` (dot notation) among the documents ``filter`` matches.

        The broker streams them in one message or several; all are read,
        retried as a whole if the stream fails, before the list is returned.
        """
        settings = self._settings
        request = _requests.distinct_request(
            self._database.name,
            self._name,
            settings.codec_options,
            key,
            filter,
            collation=collation,
            comment=comment,
            max_time_ms=maxTimeMS,
            read=self._read,
        )
        state = settings.retry_state("Distinct", timeout)
        with state:
            responses = await self._client._collect("Distinct", request, state)
        return _requests.distinct_values(responses, settings.codec_options)

    async def aggregate(
        self,
        pipeline: Sequence[Mapping[str, Any]],
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        allowDiskUse: bool | None = None,  # pymongo's name
        batchSize: int = 0,
        hint: Hint | None = None,
        collation: Collation | None = None,
        maxTimeMS: int | None = None,
        timeout: float | None = None,
    ) -> AsyncCursor[DocumentT]:
        """Run ``pipeline``: a cursor over its results, framed and read as ``find()``'s.

        As pymongo's, the call is sent at once (its first batch is read
        here, so a refused pipeline raises here). Retried like ``find``
        until its first documents, except a pipeline with ``$out`` or
        ``$merge``, which writes (with the collection's write concern) and
        is sent once.
        """
        settings = self._settings
        writes = _requests.pipeline_writes(pipeline) if isinstance(pipeline, list | tuple) else False
        request = _requests.aggregate_request(
            self._database.name,
            self._name,
            settings.codec_options,
            pipeline,
            allow_disk_use=allowDiskUse,
            batch_size=batchSize,
            hint=hint,
            collation=collation,
            let=let,
            comment=comment,
            max_time_ms=maxTimeMS,
            read=self._read,
            write_concern=self._write_concern,
        )
        find = _requests.CursorState(
            request, settings.deadline(timeout), settings, method="Aggregate", retry=not writes
        )
        cursor = AsyncCursor(self._client, find)
        await cursor._fetch()
        return cursor

    # --- writes -----------------------------------------------------------------------

    async def insert_one(
        self,
        document: Mapping[str, Any],
        *,
        bypass_document_validation: bool = False,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> InsertOneResult:
        """Insert one document. Without an ``_id`` it gets an ObjectId, here, first.

        As pymongo does, the new ``_id`` is also set on ``document`` itself
        (not on a RawBSONDocument, whose id the broker makes). Only such an
        insert, with the id made here, is retried: a retry that finds the
        id already stored reports success, as the first attempt landed.
        """
        insert = _requests.Insert(
            self._database.name,
            self._name,
            [document],
            ordered=True,
            bypass_document_validation=bypass_document_validation,
            write_concern=self._concern(write_concern),
            settings=self._settings,
        )
        state = self._settings.retry_state("Insert", timeout)
        ids = await self._client._insert(insert, state)
        return _requests.insert_one_result(ids, insert.acknowledged, state.attempts)

    async def insert_many(
        self,
        documents: Iterable[Mapping[str, Any]],
        ordered: bool = True,
        *,
        bypass_document_validation: bool = False,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> InsertManyResult:
        """Insert documents in one call; each without an ``_id`` gets an ObjectId first.

        With ``ordered=True`` (the default) the broker stops at the first
        error, else it carries on. Either way the exception's
        ``inserted_count`` and ``failed_index`` say what happened. Retried
        only when every ``_id`` was made here (see `insert_one`).
        """
        insert = _requests.Insert(
            self._database.name,
            self._name,
            _requests.check_documents(documents),
            ordered=ordered,
            bypass_document_validation=bypass_document_validation,
            write_concern=self._concern(write_concern),
            settings=self._settings,
        )
        state = self._settings.retry_state("Insert", timeout)
        ids = await self._client._insert(insert, state)
        return _requests.insert_many_result(ids, insert.acknowledged, state.attempts)

    async def _update(self, request: broker_pb2.UpdateRequest, timeout: float | None) -> UpdateResult:
        response = await self._write("Update", request, timeout, as_write_error)
        return _requests.update_result(
            response, _requests.acknowledged(request), self._settings.id_codec_options
        )

    async def update_one(  # noqa: PLR0917 (pymongo's positional order)
        self,
        filter: Mapping[str, Any],
        update: Update,
        upsert: bool = False,
        bypass_document_validation: bool | None = None,
        collation: Collation | None = None,
        array_filters: list[Mapping[str, Any]] | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Update the first document ``filter`` matches, with ``$``-operators or a pipeline (a list).

        Never retried (see ``broker_client.retry``). A write error raises
        WriteError (DuplicateKeyError for a duplicate key, e.g. on upsert).
        """
        request = _requests.update_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            update=update,
            upsert=upsert,
            bypass_document_validation=bypass_document_validation,
            collation=collation,
            array_filters=array_filters,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=self._concern(write_concern),
        )
        return await self._update(request, timeout)

    async def update_many(  # noqa: PLR0917 (pymongo's positional order)
        self,
        filter: Mapping[str, Any],
        update: Update,
        upsert: bool = False,
        array_filters: list[Mapping[str, Any]] | None = None,
        bypass_document_validation: bool | None = None,
        collation: Collation | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Update every document ``filter`` matches (see `update_one`)."""
        request = _requests.update_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            update=update,
            multi=True,
            upsert=upsert,
            bypass_document_validation=bypass_document_validation,
            collation=collation,
            array_filters=array_filters,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=self._concern(write_concern),
        )
        return await self._update(request, timeout)

    async def replace_one(  # noqa: PLR0917 (pymongo's positional order)
        self,
        filter: Mapping[str, Any],
        replacement: Mapping[str, Any],
        upsert: bool = False,
        bypass_document_validation: bool | None = None,
        collation: Collation | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> UpdateResult:
        """Replace the first document ``filter`` matches with ``replacement`` (no ``$`` keys)."""
        request = _requests.update_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            replacement=replacement,
            upsert=upsert,
            bypass_document_validation=bypass_document_validation,
            collation=collation,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=self._concern(write_concern),
        )
        return await self._update(request, timeout)

    async def _delete(
        self,
        filter: Mapping[str, Any],
        *,
        multi: bool,
        collation: Collation | None,
        hint: Hint | None,
        let: Mapping[str, Any] | None,
        comment: str | None,
        write_concern: WriteConcernSpec | None,
        timeout: float | None,
    ) -> DeleteResult:
        request = _requests.delete_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            multi=multi,
            collation=collation,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=self._concern(write_concern),
        )
        response = await self._write("Delete", request, timeout, as_write_error)
        return _requests.delete_result(response, _requests.acknowledged(request))

    async def delete_one(
        self,
        filter: Mapping[str, Any],
        collation: Collation | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> DeleteResult:
        """Delete the first document ``filter`` matches. Never retried."""
        return await self._delete(
            filter,
            multi=False,
            collation=collation,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=write_concern,
            timeout=timeout,
        )

    async def delete_many(
        self,
        filter: Mapping[str, Any],
        collation: Collation | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> DeleteResult:
        """Delete every document ``filter`` matches (``{}``: all of them). Never retried."""
        return await self._delete(
            filter,
            multi=True,
            collation=collation,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=write_concern,
            timeout=timeout,
        )

    async def _find_and_modify(
        self, request: broker_pb2.FindOneAndModifyRequest, timeout: float | None
    ) -> DocumentT | None:
        response = await self._write("FindOneAndModify", request, timeout, as_write_error)
        return _requests.modified_document(response, self._settings.codec_options)

    async def find_one_and_update(  # noqa: PLR0917 (pymongo's positional order)
        self,
        filter: Mapping[str, Any],
        update: Update,
        projection: Projection | None = None,
        sort: Sort | None = None,
        upsert: bool = False,
        return_document: bool = ReturnDocument.BEFORE,
        array_filters: list[Mapping[str, Any]] | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        collation: Collation | None = None,
        maxTimeMS: int | None = None,  # pymongo's name
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> DocumentT | None:
        """Update one document atomically; the document before (default) or after the change, or None.

        ``sort`` picks the document when several match. With ``upsert`` and
        ``return_document=ReturnDocument.AFTER`` the inserted document is
        returned. Never retried.
        """
        request = _requests.find_one_and_modify_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            update=update,
            projection=projection,
            sort=sort,
            upsert=upsert,
            return_document=return_document,
            array_filters=array_filters,
            hint=hint,
            collation=collation,
            let=let,
            comment=comment,
            max_time_ms=maxTimeMS,
            write_concern=self._concern(write_concern),
        )
        return await self._find_and_modify(request, timeout)

    async def find_one_and_replace(  # noqa: PLR0917 (pymongo's positional order)
        self,
        filter: Mapping[str, Any],
        replacement: Mapping[str, Any],
        projection: Projection | None = None,
        sort: Sort | None = None,
        upsert: bool = False,
        return_document: bool = ReturnDocument.BEFORE,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        collation: Collation | None = None,
        maxTimeMS: int | None = None,  # pymongo's name
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> DocumentT | None:
        """Replace one document atomically; the document before (default) or after, or None."""
        request = _requests.find_one_and_modify_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            replacement=replacement,
            projection=projection,
            sort=sort,
            upsert=upsert,
            return_document=return_document,
            hint=hint,
            collation=collation,
            let=let,
            comment=comment,
            max_time_ms=maxTimeMS,
            write_concern=self._concern(write_concern),
        )
        return await self._find_and_modify(request, timeout)

    async def find_one_and_delete(
        self,
        filter: Mapping[str, Any],
        projection: Projection | None = None,
        sort: Sort | None = None,
        hint: Hint | None = None,
        *,
        let: Mapping[str, Any] | None = None,
        comment: str | None = None,
        collation: Collation | None = None,
        maxTimeMS: int | None = None,  # pymongo's name
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> DocumentT | None:
        """Delete one document atomically; the deleted document, or None."""
        request = _requests.find_one_and_modify_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            filter,
            remove=True,
            projection=projection,
            sort=sort,
            hint=hint,
            collation=collation,
            let=let,
            comment=comment,
            max_time_ms=maxTimeMS,
            write_concern=self._concern(write_concern),
        )
        return await self._find_and_modify(request, timeout)

    async def bulk_write(
        self,
        requests: Sequence[Any],
        ordered: bool = True,
        bypass_document_validation: bool | None = None,
        *,
        comment: str | None = None,
        let: Mapping[str, Any] | None = None,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> BulkWriteResult:
        """Run InsertOne, UpdateOne, UpdateMany, ReplaceOne, DeleteOne and DeleteMany requests in one call.

        pymongo's own request objects are accepted too. Each InsertOne
        document without an ``_id`` gets an ObjectId first, set on the
        document. Ordered (the default): it stops at the first failure;
        unordered: it carries on. A failure raises BulkWriteError (a
        duplicate key too, as in pymongo), whose ``details`` say what
        failed and what landed. Never retried.
        """
        request = _requests.bulk_write_request(
            self._database.name,
            self._name,
            self._settings.codec_options,
            requests,
            ordered=ordered,
            bypass_document_validation=bypass_document_validation,
            comment=comment,
            let=let,
            write_concern=self._concern(write_concern),
        )
        response = await self._write("BulkWrite", request, timeout, as_bulk_write_error)
        return _requests.bulk_write_result(
            response, _requests.acknowledged(request), self._settings.id_codec_options
        )


class AsyncCursor(Generic[DocumentT]):
    """The result of ``AsyncCollection.find()`` and ``await aggregate()``: ``async for doc in cursor``.

    Like `Cursor`: ``find()``'s sends nothing until the first ``__anext__``,
    ``aggregate()`` reads the first batch before returning it; each gRPC
    message is one MongoDB batch. ``await cursor.close()`` (or leaving
    an ``async with`` block) cancels the call if it is still running.
    """

    def __init__(self, client: AsyncBrokerClient[DocumentT], find: _requests.CursorState[DocumentT]) -> None:
        self._client = client
        self._find = find

    @property
    def alive(self) -> bool:
        """True while the cursor may still return documents."""
        return bool(self._find.buffer) or not self._find.done

    @property
    def retrieved(self) -> int:
        """Documents received from the broker so far."""
        return self._find.retrieved

    @property
    def attempts(self) -> int:
        """How many times the Find was sent (more than 1 after retries; 0 before the first batch)."""
        return self._find.attempts

    def __aiter__(self) -> AsyncCursor[DocumentT]:
        return self

    async def __anext__(self) -> DocumentT:
        find = self._find
        while not find.buffer:
            if find.done:
                raise StopAsyncIteration
            await self._fetch()
        return find.buffer.popleft()

    async def _fetch(self) -> None:
        """Get the next batch into the buffer, or mark the end (see `Cursor._fetch`)."""
        find, client = self._find, self._client
        state = find.start()
        with state:
            while True:
                try:
                    if find.stream is None:
                        find.stream = client._open_stream(find.method, find.request, state.next_timeout())
                    response = await client._read(find.stream)
                    break
                except BrokerError as exc:
                    await _sleep(find.backoff(exc, state))
        find.received(response)

    async def next(self) -> DocumentT:
        """pymongo's spelling of ``await anext(cursor)``."""
        return await self.__anext__()

    async def to_list(self, length: int | None = None) -> list[DocumentT]:
        """The remaining documents (at most ``length``) as a list."""
        most = _requests.check_length(length)
        out: list[DocumentT] = []
        async for doc in self:
            out.append(doc)
            if len(out) == most:
                break
        return out

    async def close(self) -> None:
        """Stop: cancel the call if it is still running and drop buffered documents."""
        stream = self._find.detach()
        if stream is not None:
            stream.cancel()

    async def __aenter__(self) -> AsyncCursor[DocumentT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
