"""BrokerClient, Database, Collection and Cursor: pymongo's shape over gRPC.

Every call is the same four steps: build the request (`_requests`), send it
through the channel with blocking gRPC inside the fork gate (`_channel`),
retrying as the call's `RetryState` allows, map a failure to its exception
(`errors.map_rpc_errors`), and build the result (`_requests`).
``async_client.py`` is the same code for grpc.aio, line for line, with
``await`` where this module blocks.

Nothing here touches the network until the first call: the channel is made
then (see `_channel`), and again in a forked child. grpc and the generated
protobuf modules are imported at that point too, not at import time. Then a
process that imports the package and never calls the broker does not pay
~50 ms of imports (grpc, protobuf, grpc_status and the generated modules).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic

from broker_client import _requests
from broker_client._channel import GATE, ChannelHolder
from broker_client._requests import DEFAULT_TIMEOUT_S, DocumentT, Hint, Projection, Sort, WriteConcernSpec
from broker_client.errors import BrokerError, map_rpc_errors
from broker_client.retry import DEFAULT_RETRY_POLICY, RetryPolicy, RetryState

if TYPE_CHECKING:
    import grpc
    from bson.codec_options import CodecOptions

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

_CHANNEL_OPTIONS: Final = {
    # Fork safety: streams polled by the caller's thread, inside the fork
    # gate; equals grpc.experimental.ChannelOptions.SingleThreadedUnaryStream,
    # spelled out so that the constructor does not import grpc. Also the
    # faster path.
    "SingleThreadedUnaryStream": 1,
}


class BrokerClient(Generic[DocumentT]):
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
            channel_defaults=_CHANNEL_OPTIONS,
        )
        self._holder = ChannelHolder(self._settings.target, self._settings.channel_options, credentials)

    # --- pymongo's navigation and properties ------------------------------------

    def __getitem__(self, name: str) -> Database[DocumentT]:
        return Database(self, name)

    def __getattr__(self, name: str) -> Database[DocumentT]:
        if name.startswith("_"):
            raise _requests.missing_attribute(self, name, "database", "client")
        return Database(self, name)

    def get_database(self, name: str) -> Database[DocumentT]:
        """The database ``name`` as configured on the broker (not necessarily MongoDB's name)."""
        return Database(self, name)

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

    def ping(self, database: str | None = None, *, timeout: float | None = None) -> PingResult:
        """Check the broker and its databases (all, or the one named)."""
        state = self._settings.retry_state("Ping", timeout)
        response = self._call("Ping", _requests.ping_request(database), state)
        return _requests.ping_result(response, state.attempts)

    def stats(self, database: str | None = None, *, timeout: float | None = None) -> BrokerStats:
        """The broker's pool, queue and operation figures (all databases, or the one named)."""
        state = self._settings.retry_state("Stats", timeout)
        response = self._call("Stats", _requests.stats_request(database), state)
        return _requests.stats_result(response, state.attempts)

    def close(self) -> None:
        """Close this process's channel. Later calls raise InvalidOperation.

        In a forked child it leaves the parent's channel alone, as it must.
        """
        self._holder.close()

    def __enter__(self) -> BrokerClient[DocumentT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the channel, with retries -------------------------------------------------

    def _unary(self, method: str, request: Any, timeout: float) -> Any:
        """One attempt of the unary call ``method`` ("Ping", "Insert", ...)."""
        with map_rpc_errors, GATE:
            call = getattr(self._holder.stub(), method)
            return call(request, timeout=timeout, metadata=self._settings.metadata)

    def _open_find(
        self, request: broker_pb2.FindRequest, timeout: float
    ) -> Iterator[broker_pb2.FindResponse]:
        with map_rpc_errors, GATE:
            # iter() returns the call itself; it satisfies the stubs' typing.
            return iter(self._holder.stub().Find(request, timeout=timeout, metadata=self._settings.metadata))

    def _read(self, stream: Iterator[broker_pb2.FindResponse]) -> broker_pb2.FindResponse | None:
        """The stream's next message, or None at its end."""
        with map_rpc_errors, GATE:
            return next(stream, None)

    def _call(self, method: str, request: Any, state: RetryState) -> Any:
        """The unary call, retried as ``state`` allows; its response."""
        with state:
            while True:
                try:
                    return self._unary(method, request, state.next_timeout())
                except BrokerError as exc:
                    time.sleep(state.backoff(exc))

    def _find_all(self, request: broker_pb2.FindRequest, state: RetryState) -> list[bytes]:
        """Every document of a Find, as BSON.

        A failure anywhere in the stream may restart it from the beginning:
        nothing reaches the caller before the end, so nothing can be handed
        over twice.
        """
        while True:
            try:
                stream = self._open_find(request, state.next_timeout())
                documents: list[bytes] = []
                while (response := self._read(stream)) is not None:
                    documents.extend(response.documents)
                return documents
            except BrokerError as exc:
                time.sleep(state.backoff(exc))

    def _insert(self, insert: _requests.Insert, state: RetryState) -> list[Any]:
        """Send ``insert``, retried by its rules (see `_requests.Insert`); every ``_id``."""
        with state:
            while True:
                try:
                    response = self._unary("Insert", insert.request(), state.next_timeout())
                except BrokerError as exc:
                    lookup = insert.failed(exc)
                    if lookup is None:
                        delay = state.backoff(exc)
                        insert.retrying()
                        time.sleep(delay)
                        continue
                    # A duplicate key that may be an earlier attempt's own documents.
                    try:
                        stored = self._find_all(lookup, state.fresh("Find (was the insert stored?)"))
                    except BrokerError as read_error:
                        raise exc from read_error
                    if insert.found(exc, stored):
                        return insert.inserted_ids(None)
                else:
                    return insert.inserted_ids(response)


class Database(Generic[DocumentT]):
    """A database configured on the broker (``client["appdb"]``)."""

    def __init__(self, client: BrokerClient[DocumentT], name: str) -> None:
        self._client = client
        self._name = _requests.check_name(name, "database")

    @property
    def name(self) -> str:
        return self._name

    @property
    def client(self) -> BrokerClient[DocumentT]:
        return self._client

    def __getitem__(self, name: str) -> Collection[DocumentT]:
        return Collection(self, name)

    def __getattr__(self, name: str) -> Collection[DocumentT]:
        if name.startswith("_"):
            raise _requests.missing_attribute(self, name, "collection", "database")
        return Collection(self, name)

    def get_collection(self, name: str) -> Collection[DocumentT]:
        return Collection(self, name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Database):
            return self._client is other._client and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self._client), self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client!r}, {self._name!r})"

    def ping(self, *, timeout: float | None = None) -> PingResult:
        """Ping this database only."""
        return self._client.ping(self._name, timeout=timeout)


class Collection(Generic[DocumentT]):
    """A collection: ``insert_one``, ``insert_many``, ``find``, ``find_one``."""

    def __init__(self, database: Database[DocumentT], name: str) -> None:
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
    def database(self) -> Database[DocumentT]:
        return self._database

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Collection):
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
    ) -> Cursor[DocumentT]:
        """A lazy cursor over the matching documents; nothing is sent until iterated.

        ``timeout`` bounds the whole call, from the first batch to the last,
        including the time the caller takes between batches, and any
        retries. ``limit=0`` means no limit. ``batch_size=0`` means the
        broker's default. A failure before the first documents arrive is
        retried by the client's ``retries`` policy; a failure after that
        raises (a restart would return documents twice).
        """
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
        return Cursor(self._client, _requests.CursorState(request, settings.deadline(timeout), settings))

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
        response = self._client._call("FindOne", request, state)
        return _requests.first_document(response, settings.codec_options)

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
        ids = self._client._insert(insert, state)
        return _requests.insert_one_result(ids, insert.acknowledged, state.attempts)

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
        ids = self._client._insert(insert, state)
        return _requests.insert_many_result(ids, insert.acknowledged, state.attempts)


class Cursor(Generic[DocumentT]):
    """The result of ``find()``: a lazy iterator over the server's stream.

    Each gRPC message is one MongoDB batch of documents. They are decoded a
    batch at a time, as the iteration reaches it. ``close()`` (or leaving a
    ``with`` block) cancels the call if it is still running. A cursor
    belongs to the process that opened it: after ``fork()``, the child must
    call ``find()`` again.
    """

    def __init__(self, client: BrokerClient[DocumentT], find: _requests.CursorState[DocumentT]) -> None:
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

    def __iter__(self) -> Cursor[DocumentT]:
        return self

    def __next__(self) -> DocumentT:
        find = self._find
        while not find.buffer:
            if find.done:
                raise StopIteration
            self._fetch()
        return find.buffer.popleft()

    def _fetch(self) -> None:
        """Get the next batch into the buffer, or mark the end; the stream is (re)opened as needed."""
        find, client = self._find, self._client
        state = find.start()
        with state:
            while True:
                try:
                    if find.stream is None:
                        find.stream = client._open_find(find.request, state.next_timeout())
                    response = client._read(find.stream)
                    break
                except BrokerError as exc:
                    time.sleep(find.backoff(exc, state))
        find.received(response)

    def next(self) -> DocumentT:
        """pymongo's spelling of ``next(cursor)``."""
        return self.__next__()

    def to_list(self, length: int | None = None) -> list[DocumentT]:
        """The remaining documents (at most ``length``) as a list (pymongo 4.9+)."""
        most = _requests.check_length(length)
        out: list[DocumentT] = []
        for doc in self:
            out.append(doc)
            if len(out) == most:
                break
        return out

    def close(self) -> None:
        """Stop: cancel the call if it is still running and drop buffered documents."""
        stream = self._find.detach()
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            with GATE:
                cancel()

    def __enter__(self) -> Cursor[DocumentT]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
