"""BrokerClient, Database, Collection and Cursor: pymongo's shape over gRPC.

Nothing here touches the network until the first call: the channel is made
then (see `_channel`), and again in a forked child. grpc and the generated
protobuf modules are imported at that point too, not at import time. Then a
process that imports the package and never calls the broker does not pay
~50 ms of imports (grpc, protobuf, grpc_status and the generated modules).

What the calls send and how they are retried is shared with
``AsyncBrokerClient`` (`_base`, `_ops`); this module runs it with blocking
gRPC calls, each inside the fork gate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from broker_client import _ops
from broker_client._base import (
    DEFAULT_TIMEOUT_S,
    ClientBase,
    CollectionBase,
    CursorBase,
    DatabaseBase,
    DocumentT,
)
from broker_client._channel import GATE, ChannelHolder
from broker_client._ops import WriteConcernSpec
from broker_client._requests import Hint, Projection, Sort
from broker_client.errors import BrokerError, from_rpc_error

if TYPE_CHECKING:
    import grpc

    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, InsertManyResult, InsertOneResult, PingResult

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "BrokerClient",
    "Collection",
    "Cursor",
    "Database",
    "WriteConcernSpec",
]

_T = TypeVar("_T")

_CHANNEL_OPTIONS: Final = {
    # Fork safety: streams polled by the caller's thread, inside the fork
    # gate; equals grpc.experimental.ChannelOptions.SingleThreadedUnaryStream,
    # spelled out so that the constructor does not import grpc. Also the
    # faster path.
    "SingleThreadedUnaryStream": 1,
}


class BrokerClient(ClientBase["Database[DocumentT]", ChannelHolder, DocumentT]):
    """A client for one mongo-broker, shaped like pymongo's ``MongoClient``.

    Args:
        target: the broker's address: ``"unix:///run/mongo-broker.sock"``,
            ``"unix:/run/mongo-broker.sock"``, a bare absolute path (taken as
            a Unix socket), ``"127.0.0.1:50051"`` or ``"dns:///host:50051"``.
        timeout: the default time limit of every call, in seconds
            (default `DEFAULT_TIMEOUT_S`, 30 s). Each call may pass its own
            ``timeout=``. It becomes the gRPC deadline, which the broker
            carries through to MongoDB, and it covers every retry too.
            There is no "wait forever".
        document_class: the type documents are decoded into (default dict),
            e.g. ``bson.son.SON`` or ``bson.raw_bson.RawBSONDocument``.
        codec_options: full BSON codec options (tz_aware, uuid_representation,
            type_registry, ...), as pymongo's. ``document_class``, if given,
            overrides theirs. Default: ``bson.DEFAULT_CODEC_OPTIONS``.
        token: a bearer token, sent as ``authorization: Bearer <token>``.
        metadata: more gRPC metadata sent with every call, e.g.
            ``[("x-request-id", "job-42")]``.
        credentials: ``grpc.ChannelCredentials`` for TLS (from
            ``grpc.ssl_channel_credentials``); default plaintext, as suits a
            Unix socket or loopback.
        options: extra gRPC channel options as ``(key, value)`` pairs; they
            override the defaults (receive limit 17 MiB, send limit 48 MiB,
            local subchannel pool, single-threaded streams), and a value of
            None drops a default. The last two make fork() safe: change them
            only knowingly.
        retries: a `RetryPolicy` (default `DEFAULT_RETRY_POLICY`: 3 tries,
            backoff from 50 ms up to 1 s, full jitter), or None to send
            every call once. Retried: UNAVAILABLE and POOL_EXHAUSTED, for
            pings, stats, find_one, a find until its first documents, and
            inserts whose every ``_id`` this client made (see
            ``broker_client.retry``).

    The client is thread-safe and fork-safe: its channel is made on first
    use and made anew in a forked child, which never touches the parent's.
    """

    _extra_channel_options = _CHANNEL_OPTIONS

    def _make_holder(
        self, target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> ChannelHolder:
        return ChannelHolder(target, options, credentials)

    def _make_database(self, name: str) -> Database[DocumentT]:
        return Database(self, name)

    # --- calls -------------------------------------------------------------

    def ping(self, database: str | None = None, *, timeout: float | None = None) -> PingResult:
        """Check the broker and its databases (all, or the one named)."""
        return self._run(self._ping(database, timeout))

    def stats(self, database: str | None = None, *, timeout: float | None = None) -> BrokerStats:
        """The broker's pool, queue and operation figures (all databases, or the one named)."""
        return self._run(self._stats(database, timeout))

    def close(self) -> None:
        """Close this process's channel. Later calls raise InvalidOperation.

        In a forked child it leaves the parent's channel alone, as it must.
        """
        self._holder.close()

    def __enter__(self) -> BrokerClient[DocumentT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- running plans -------------------------------------------------------

    def _run(self, plan: _ops.Plan[_T]) -> _T:
        stepper = _ops.Stepper(plan)
        while (op := stepper.next()) is not None:
            try:
                stepper.sent(self._step(op))
            except BrokerError as exc:
                stepper.failed(exc)
        return stepper.result

    def _step(self, op: _ops.Op) -> Any:
        if isinstance(op, _ops.Sleep):
            time.sleep(op.seconds)
            return None
        import grpc

        try:
            with GATE:
                if isinstance(op, _ops.ReadFind):
                    return next(op.stream, None)
                stub = self._holder.stub()
                if isinstance(op, _ops.OpenFind):
                    # iter() returns the call itself; it satisfies the stubs' typing.
                    return iter(stub.Find(op.request, timeout=op.timeout, metadata=self._metadata))
                method = getattr(stub, op.method)
                return method(op.request, timeout=op.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


class Database(DatabaseBase[BrokerClient[DocumentT], "Collection[DocumentT]"]):
    """A database configured on the broker (``client["appdb"]``)."""

    def _make_collection(self, name: str) -> Collection[DocumentT]:
        return Collection(self, name)

    def ping(self, *, timeout: float | None = None) -> PingResult:
        """Ping this database only."""
        return self._client.ping(self._name, timeout=timeout)


class Collection(
    CollectionBase[BrokerClient[DocumentT], Database[DocumentT], "Cursor[DocumentT]", DocumentT]
):
    """A collection: ``insert_one``, ``insert_many``, ``find``, ``find_one``."""

    def _make_cursor(self, request: broker_pb2.FindRequest, seconds: float) -> Cursor[DocumentT]:
        return Cursor(self._client, request, seconds)

    def insert_one(
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
        return self._client._run(
            self._insert_one(document, bypass_document_validation, write_concern, timeout)
        )

    def insert_many(
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
        return self._client._run(
            self._insert_many(documents, ordered, bypass_document_validation, write_concern, timeout)
        )

    def find_one(
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
        """The first matching document, or None.

        As in pymongo, a ``filter`` that is not a mapping is an ``_id`` to
        look up: ``find_one(oid)`` is ``find_one({"_id": oid})``.
        """
        return self._client._run(
            self._find_one(filter, projection, sort, skip, hint, max_time_ms, comment, timeout)
        )


class Cursor(CursorBase[BrokerClient[DocumentT], DocumentT]):
    """The result of ``find()``: a lazy iterator over the server's stream.

    Each gRPC message is one MongoDB batch of documents. They are decoded a
    batch at a time, as the iteration reaches it. ``close()`` (or leaving a
    ``with`` block) cancels the call if it is still running. A cursor
    belongs to the process that opened it: after ``fork()``, the child must
    call ``find()`` again.
    """

    def __iter__(self) -> Cursor[DocumentT]:
        return self

    def __next__(self) -> DocumentT:
        while not self._buffer:
            if self._done:
                raise StopIteration
            self._client._run(self._fetch())
        return self._buffer.popleft()

    def next(self) -> DocumentT:
        """pymongo's spelling of ``next(cursor)``."""
        return self.__next__()

    def to_list(self, length: int | None = None) -> list[DocumentT]:
        """The remaining documents (at most ``length``) as a list (pymongo 4.9+)."""
        most = self._check_length(length)
        out: list[DocumentT] = []
        for doc in self:
            out.append(doc)
            if len(out) == most:
                break
        return out

    def close(self) -> None:
        """Stop: cancel the call if it is still running and drop buffered documents."""
        stream = self._detach()
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            with GATE:
                cancel()

    def __enter__(self) -> Cursor[DocumentT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
