"""AsyncBrokerClient: the same API as BrokerClient, awaitable, on grpc.aio.

Every call builds the same requests and follows the same retry rules as the
sync client (`_base`, `_ops`); only the running differs: grpc.aio calls and
``asyncio.sleep``. The channel is made by the first call, inside the running
event loop, and belongs to that loop: use one client per loop. The rules
for forking are in `_channel` (in short: ``await client.close()`` before
forking a process that used one, or fork before the first call).

Neither asyncio nor grpc is imported until the first call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from broker_client import _ops
from broker_client._base import ClientBase, CollectionBase, CursorBase, DatabaseBase, DocumentT
from broker_client._channel import AsyncChannelHolder
from broker_client._ops import WriteConcernSpec
from broker_client._requests import Hint, Projection, Sort
from broker_client.errors import BrokerError, from_rpc_error

if TYPE_CHECKING:
    import grpc

    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, InsertManyResult, InsertOneResult, PingResult

__all__ = ["AsyncBrokerClient", "AsyncCollection", "AsyncCursor", "AsyncDatabase"]

_T = TypeVar("_T")


class AsyncBrokerClient(ClientBase["AsyncDatabase[DocumentT]", AsyncChannelHolder, DocumentT]):
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

    def _make_holder(
        self, target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> AsyncChannelHolder:
        return AsyncChannelHolder(target, options, credentials)

    def _make_database(self, name: str) -> AsyncDatabase[DocumentT]:
        return AsyncDatabase(self, name)

    # --- calls -------------------------------------------------------------

    async def ping(self, database: str | None = None, *, timeout: float | None = None) -> PingResult:
        """Check the broker and its databases (all, or the one named)."""
        return await self._run(self._ping(database, timeout))

    async def stats(self, database: str | None = None, *, timeout: float | None = None) -> BrokerStats:
        """The broker's pool, queue and operation figures (all databases, or the one named)."""
        return await self._run(self._stats(database, timeout))

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

    # --- running plans -------------------------------------------------------

    async def _run(self, plan: _ops.Plan[_T]) -> _T:
        stepper = _ops.Stepper(plan)
        while (op := stepper.next()) is not None:
            try:
                stepper.sent(await self._step(op))
            except BrokerError as exc:
                stepper.failed(exc)
        return stepper.result

    async def _step(self, op: _ops.Op) -> Any:
        import asyncio

        if isinstance(op, _ops.Sleep):
            await asyncio.sleep(op.seconds)
            return None
        import grpc.aio

        try:
            if isinstance(op, _ops.ReadFind):
                response = await op.stream.read()
                return None if response is grpc.aio.EOF else response  # type: ignore[attr-defined]
            stub = self._holder.stub()
            if isinstance(op, _ops.OpenFind):
                return stub.Find(op.request, timeout=op.timeout, metadata=self._metadata)
            method = getattr(stub, op.method)
            return await method(op.request, timeout=op.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class AsyncDatabase(DatabaseBase[AsyncBrokerClient[DocumentT], "AsyncCollection[DocumentT]"]):
    """A database configured on the broker (``client["appdb"]``)."""

    def _make_collection(self, name: str) -> AsyncCollection[DocumentT]:
        return AsyncCollection(self, name)

    async def ping(self, *, timeout: float | None = None) -> PingResult:
        """Ping this database only."""
        return await self._client.ping(self._name, timeout=timeout)


class AsyncCollection(
    CollectionBase[
        AsyncBrokerClient[DocumentT], AsyncDatabase[DocumentT], "AsyncCursor[DocumentT]", DocumentT
    ]
):
    """A collection: awaitable ``insert_one``, ``insert_many``, ``find_one``; ``find`` gives an `AsyncCursor`.

    The arguments, results, errors and retries are those of `Collection`.
    """

    def _make_cursor(self, request: broker_pb2.FindRequest, seconds: float) -> AsyncCursor[DocumentT]:
        return AsyncCursor(self._client, request, seconds)

    async def insert_one(
        self,
        document: Mapping[str, Any],
        *,
        bypass_document_validation: bool = False,
        write_concern: WriteConcernSpec | None = None,
        timeout: float | None = None,
    ) -> InsertOneResult:
        """Insert one document (see `Collection.insert_one`)."""
        return await self._client._run(
            self._insert_one(document, bypass_document_validation, write_concern, timeout)
        )

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
        return await self._client._run(
            self._insert_many(documents, ordered, bypass_document_validation, write_concern, timeout)
        )

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
        return await self._client._run(
            self._find_one(filter, projection, sort, skip, hint, max_time_ms, comment, timeout)
        )


class AsyncCursor(CursorBase[AsyncBrokerClient[DocumentT], DocumentT]):
    """The result of ``AsyncCollection.find()``: ``async for doc in cursor``.

    Lazy like `Cursor`: nothing is sent until the first ``__anext__``; each
    gRPC message is one MongoDB batch. ``await cursor.close()`` (or leaving
    an ``async with`` block) cancels the call if it is still running.
    """

    def __aiter__(self) -> AsyncCursor[DocumentT]:
        return self

    async def __anext__(self) -> DocumentT:
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            await self._client._run(self._fetch())
        return self._buffer.popleft()

    async def next(self) -> DocumentT:
        """pymongo's spelling of ``await anext(cursor)``."""
        return await self.__anext__()

    async def to_list(self, length: int | None = None) -> list[DocumentT]:
        """The remaining documents (at most ``length``) as a list."""
        most = self._check_length(length)
        out: list[DocumentT] = []
        async for doc in self:
            out.append(doc)
            if len(out) == most:
                break
        return out

    async def close(self) -> None:
        """Stop: cancel the call if it is still running and drop buffered documents."""
        stream = self._detach()
        if stream is not None:
            stream.cancel()

    async def __aenter__(self) -> AsyncCursor[DocumentT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
