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
from broker_client._requests import DEFAULT_TIMEOUT_S, DocumentT, Hint, Projection, Sort, WriteConcernSpec
from broker_client.errors import BrokerError, map_rpc_errors
from broker_client.retry import DEFAULT_RETRY_POLICY, RetryPolicy, RetryState

if TYPE_CHECKING:
    import grpc
    from bson.codec_options import CodecOptions

    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, InsertManyResult, InsertOneResult, PingResult

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
        target: str,
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

    def _open_find(self, request: broker_pb2.FindRequest, timeout: float) -> Any:
        with map_rpc_errors:
            return self._holder.stub().Find(request, timeout=timeout, metadata=self._settings.metadata)

    async def _read(self, stream: Any) -> broker_pb2.FindResponse | None:
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

    async def _find_all(self, request: broker_pb2.FindRequest, state: RetryState) -> list[bytes]:
        """Every document of a Find, as BSON (see `BrokerClient._find_all`)."""
        while True:
            try:
                stream = self._open_find(request, state.next_timeout())
                documents: list[bytes] = []
                while (response := await self._read(stream)) is not None:
                    documents.extend(response.documents)
                return documents
            except BrokerError as exc:
                await _sleep(state.backoff(exc))

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

    def get_collection(self, name: str) -> AsyncCollection[DocumentT]:
        return AsyncCollection(self, name)

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
    """A collection: awaitable ``insert_one``, ``insert_many``, ``find_one``; ``find`` gives an `AsyncCursor`.

    The arguments, results, errors and retries are those of `Collection`.
    """

    def __init__(self, database: AsyncDatabase[DocumentT], name: str) -> None:
        self._database = database
        self._client = database.client
        self._name = _requests.check_name(name, "collection")

    @property
    def name(self) -> str:
        return self._name

    @property
    def full_name(self) -> str:
        return f"{self._database.name}.{self._name}"

    @property
    def database(self) -> AsyncDatabase[DocumentT]:
        return self._database

    def __eq__(self, other: object) -> bool:
        if isinstance(other, AsyncCollection):
            return self._database == other._database and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._database, self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._database!r}, {self._name!r})"

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
        timeout: float | None = None,
    ) -> AsyncCursor[DocumentT]:
        """A lazy `AsyncCursor` over the matching documents; not awaited (see `Collection.find`)."""
        settings = self._client._settings
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
        timeout: float | None = None,
    ) -> DocumentT | None:
        """The first matching document, or None (see `Collection.find_one`)."""
        settings = self._client._settings
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
        )
        state = settings.retry_state("FindOne", timeout)
        response = await self._client._call("FindOne", request, state)
        return _requests.first_document(response, settings.codec_options)

    async def insert_one(
        self,
        document: Mapping[str, Any],
        *,
        bypass_document_validation: bool = False,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> InsertOneResult:
        """Insert one document (see `Collection.insert_one`)."""
        insert = _requests.Insert(
            self._database.name,
            self._name,
            [document],
            ordered=True,
            bypass_document_validation=bypass_document_validation,
            write_concern=write_concern,
            settings=self._client._settings,
        )
        state = self._client._settings.retry_state("Insert", timeout)
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
        """Insert documents in one call (see `Collection.insert_many`)."""
        insert = _requests.Insert(
            self._database.name,
            self._name,
            _requests.check_documents(documents),
            ordered=ordered,
            bypass_document_validation=bypass_document_validation,
            write_concern=write_concern,
            settings=self._client._settings,
        )
        state = self._client._settings.retry_state("Insert", timeout)
        ids = await self._client._insert(insert, state)
        return _requests.insert_many_result(ids, insert.acknowledged, state.attempts)


class AsyncCursor(Generic[DocumentT]):
    """The result of ``AsyncCollection.find()``: ``async for doc in cursor``.

    Lazy like `Cursor`: nothing is sent until the first ``__anext__``; each
    gRPC message is one MongoDB batch. ``await cursor.close()`` (or leaving
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
                        find.stream = client._open_find(find.request, state.next_timeout())
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
