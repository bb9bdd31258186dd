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
            a Unix socket), ``"127.0.0.1:50051"`` or ``"dns:///host:50051"``;
            or the replicas of a shared tier, as ``"dns:///name:port"`` (a
            name with several addresses) or a list of ``"IP:port"``. Calls
            are spread over every replica (``round_robin``), and over TCP
            each replica is health-checked: one that starts draining leaves
            the rotation, and a retried call goes to another.
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
            pings, stats and the reads (find_one, count_documents,
            estimated_document_count, distinct; find and aggregate until
            their first documents, not an aggregate that writes), and
            inserts whose every ``_id`` this client made. Never for the
            other writes (see ``broker_client.retry``).

    The client is thread-safe and fork-safe: its channel is made on first
    use and made anew in a forked child, which never touches the parent's.
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

    def _open_stream(self, method: str, request: Any, timeout: float) -> Iterator[Any]:
        """Open the server-streaming call ``method`` ("Find", "Aggregate", "Distinct")."""
        with map_rpc_errors, GATE:
            call = getattr(self._holder.stub(), method)
            # iter() returns the call itself; it satisfies the stubs' typing.
            return iter(call(request, timeout=timeout, metadata=self._settings.metadata))

    def _read(self, stream: Iterator[Any]) -> Any | None:
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

    def _collect(self, method: str, request: Any, state: RetryState) -> list[Any]:
        """Every message of the streaming call ``method``.

        A failure anywhere in the stream may restart it from the beginning:
        nothing reaches the caller before the end, so nothing can be handed
        over twice.
        """
        while True:
            try:
                stream = self._open_stream(method, request, state.next_timeout())
                responses: list[Any] = []
                while (response := self._read(stream)) is not None:
                    responses.append(response)
                return responses
            except BrokerError as exc:
                time.sleep(state.backoff(exc))

    def _find_all(self, request: broker_pb2.FindRequest, state: RetryState) -> list[bytes]:
        """Every document of a Find, as BSON."""
        return [
            document for response in self._collect("Find", request, state) for document in response.documents
        ]

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

    def get_collection(
        self,
        name: str,
        codec_options: CodecOptions[Any] | None = None,
        read_preference: Any | None = None,
        write_concern: WriteConcernSpec | None = None,
        read_concern: Any | None = None,
    ) -> Collection[DocumentT]:
        """The collection ``name``, with options as pymongo's ``get_collection`` takes them.

        ``read_preference`` is one of pymongo's (``pymongo.ReadPreference.SECONDARY``,
        ``pymongo.read_preferences.Secondary(tag_sets=..., max_staleness=...)``),
        ``read_concern`` a ``pymongo.read_concern.ReadConcern``; both apply to
        the collection's reads. ``write_concern`` is the default of its
        writes, ``codec_options`` its documents' encoding. Unset: the
        client's codec options and the broker's configured defaults.
        """
        return Collection(
            self,
            name,
            codec_options=codec_options,
            read_preference=read_preference,
            write_concern=write_concern,
            read_concern=read_concern,
        )

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
    """A collection, with pymongo's methods: inserts, updates, deletes, reads and bulk writes.

    Reads (``find``, ``find_one``, ``count_documents``, ``distinct``,
    ``aggregate``) use the collection's read preference and read concern;
    writes use its write concern unless the call gives one. Every method
    also takes ``timeout=`` (seconds), the call's time limit.
    """

    def __init__(
        self,
        database: Database[DocumentT],
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
    def database(self) -> Database[DocumentT]:
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
    ) -> Collection[DocumentT]:
        """This collection with some options changed, as pymongo's ``with_options``."""
        return Collection(
            self._database,
            self._name,
            codec_options=codec_options if codec_options is not None else self._settings.codec_options,
            read_preference=read_preference if read_preference is not None else self._read_preference,
            write_concern=write_concern if write_concern is not None else self._write_concern,
            read_concern=read_concern if read_concern is not None else self._read_concern,
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Collection):
            return self._database == other._database and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._database, self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._database!r}, {self._name!r})"

    def _concern(self, write_concern: WriteConcernSpec | None) -> WriteConcernSpec | None:
        return write_concern if write_concern is not None else self._write_concern

    def _write(self, method: str, request: Any, timeout: float | None, convert: Any) -> Any:
        """Send a write that is never retried; a failure raised as pymongo's exception (``convert``)."""
        state = self._settings.retry_state(method, timeout)
        try:
            return self._client._call(method, request, state)
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
    ) -> Cursor[DocumentT]:
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
        response = self._client._call("FindOne", request, state)
        return _requests.first_document(response, settings.codec_options)

    def count_documents(
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
        return int(self._client._call("Count", request, state).count)

    def estimated_document_count(
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
        return int(self._client._call("Count", request, state).count)

    def distinct(
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
            responses = self._client._collect("Distinct", request, state)
        return _requests.distinct_values(responses, settings.codec_options)

    def aggregate(
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
    ) -> Cursor[DocumentT]:
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
        cursor = Cursor(self._client, find)
        cursor._fetch()
        return cursor

    # --- writes -----------------------------------------------------------------------

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
            write_concern=self._concern(write_concern),
            settings=self._settings,
        )
        state = self._settings.retry_state("Insert", timeout)
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
            write_concern=self._concern(write_concern),
            settings=self._settings,
        )
        state = self._settings.retry_state("Insert", timeout)
        ids = self._client._insert(insert, state)
        return _requests.insert_many_result(ids, insert.acknowledged, state.attempts)

    def _update(self, request: broker_pb2.UpdateRequest, timeout: float | None) -> UpdateResult:
        response = self._write("Update", request, timeout, as_write_error)
        return _requests.update_result(
            response, _requests.acknowledged(request), self._settings.id_codec_options
        )

    def update_one(  # noqa: PLR0917 (pymongo's positional order)
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
        return self._update(request, timeout)

    def update_many(  # noqa: PLR0917 (pymongo's positional order)
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
        return self._update(request, timeout)

    def replace_one(  # noqa: PLR0917 (pymongo's positional order)
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
        return self._update(request, timeout)

    def _delete(
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
        response = self._write("Delete", request, timeout, as_write_error)
        return _requests.delete_result(response, _requests.acknowledged(request))

    def delete_one(
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
        return self._delete(
            filter,
            multi=False,
            collation=collation,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=write_concern,
            timeout=timeout,
        )

    def delete_many(
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
        return self._delete(
            filter,
            multi=True,
            collation=collation,
            hint=hint,
            let=let,
            comment=comment,
            write_concern=write_concern,
            timeout=timeout,
        )

    def _find_and_modify(
        self, request: broker_pb2.FindOneAndModifyRequest, timeout: float | None
    ) -> DocumentT | None:
        response = self._write("FindOneAndModify", request, timeout, as_write_error)
        return _requests.modified_document(response, self._settings.codec_options)

    def find_one_and_update(  # noqa: PLR0917 (pymongo's positional order)
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
        return self._find_and_modify(request, timeout)

    def find_one_and_replace(  # noqa: PLR0917 (pymongo's positional order)
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
        return self._find_and_modify(request, timeout)

    def find_one_and_delete(
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
        return self._find_and_modify(request, timeout)

    def bulk_write(
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
        response = self._write("BulkWrite", request, timeout, as_bulk_write_error)
        return _requests.bulk_write_result(
            response, _requests.acknowledged(request), self._settings.id_codec_options
        )


class Cursor(Generic[DocumentT]):
    """The result of ``find()`` and ``aggregate()``: an iterator over the server's stream.

    Each gRPC message is one MongoDB batch of documents. They are decoded a
    batch at a time, as the iteration reaches it. ``find()``'s is lazy;
    ``aggregate()`` reads the first batch before returning it. ``close()``
    (or leaving a ``with`` block) cancels the call if it is still running.
    A cursor belongs to the process that opened it: after ``fork()``, the
    child must call ``find()`` (or ``aggregate()``) again.
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
                        find.stream = client._open_stream(find.method, find.request, state.next_timeout())
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
