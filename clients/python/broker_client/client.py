"""BrokerClient, Database, Collection and Cursor: pymongo's shape over gRPC.

Nothing here touches the network until the first call: the channel is made
then (see `_channel`), and again in a forked child. grpc and the generated
protobuf modules are imported at that point too, not at import time. Then a
process that imports the package and never calls the broker does not pay
~50 ms of imports (grpc, protobuf, grpc_status and the generated modules).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar, overload

from bson.codec_options import DEFAULT_CODEC_OPTIONS, CodecOptions

from broker_client import _codec
from broker_client._channel import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    DEFAULT_MAX_SEND_MESSAGE_BYTES,
    GATE,
    ChannelHolder,
    normalize_target,
    retire,
)
from broker_client._codec import Hint, Projection, Sort
from broker_client._version import __version__
from broker_client.errors import InvalidOperation, from_rpc_error
from broker_client.results import (
    BrokerStats,
    InsertManyResult,
    InsertOneResult,
    PingResult,
    ping_result_from_proto,
    stats_from_proto,
)

if TYPE_CHECKING:
    import grpc

    from broker_client.proto.broker.v1 import broker_pb2

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "BrokerClient",
    "Collection",
    "Cursor",
    "Database",
    "WriteConcernSpec",
]

#: The time limit of every call unless the client or the call says otherwise.
#: A sidecar answers in milliseconds; a caller that waits longer than this
#: is better told so than left waiting. The broker's own default is 30 s too.
DEFAULT_TIMEOUT_S: Final = 30.0

_D = TypeVar("_D", bound=Mapping[str, Any])
_INT32_MAX: Final = 2**31 - 1
_WRITE_CONCERN_KEYS: Final = frozenset({"w", "j", "wtimeout"})


class _HasDocument(Protocol):
    """pymongo's ``WriteConcern`` (or anything with its ``document``)."""

    @property
    def document(self) -> Mapping[str, Any]: ...


#: ``{"w": 1 | "majority", "j": bool, "wtimeout": ms}`` or a pymongo WriteConcern.
WriteConcernSpec = Mapping[str, Any] | _HasDocument


def _check_timeout(value: object, name: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def _check_count(value: object, name: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an instance of int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, not {value}")
    return value


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} name must be an instance of str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} name must not be empty")
    return value


def _write_concern(spec: WriteConcernSpec | None) -> tuple[broker_pb2.WriteConcern | None, bool]:
    """The proto WriteConcern (None: the broker's default) and whether it is acknowledged."""
    if spec is None:
        return None, True
    from broker_client.proto.broker.v1 import broker_pb2

    document: Mapping[str, Any] = spec if isinstance(spec, Mapping) else spec.document
    unknown = set(document) - _WRITE_CONCERN_KEYS
    if unknown:
        raise ValueError(
            f"write_concern has unsupported key(s) {sorted(unknown)}; use w, j and wtimeout (ms)"
        )
    message = broker_pb2.WriteConcern()
    acknowledged = True
    w = document.get("w")
    if w is not None:
        if isinstance(w, bool) or not isinstance(w, int | str):
            raise TypeError(f"write_concern w must be an int or a tag such as 'majority', not {w!r}")
        if isinstance(w, int):
            message.w_nodes = _check_count(w, "write_concern w", _INT32_MAX)
            acknowledged = w != 0
        else:
            message.w_tag = w
    j = document.get("j")
    if j is not None:
        if not isinstance(j, bool):
            raise TypeError(f"write_concern j must be a bool, not {j!r}")
        message.j = j
    wtimeout = document.get("wtimeout")
    if wtimeout is not None:
        message.wtimeout_ms = _check_count(wtimeout, "write_concern wtimeout")
    return message, acknowledged


class BrokerClient(Generic[_D]):
    """A client for one mongo-broker, shaped like pymongo's ``MongoClient``.

    Args:
        target: the broker's address: ``"unix:///run/mongo-broker.sock"``,
            ``"unix:/run/mongo-broker.sock"``, a bare absolute path (taken as
            a Unix socket), ``"127.0.0.1:50051"`` or ``"dns:///host:50051"``.
        timeout: the default time limit of every call, in seconds
            (default `DEFAULT_TIMEOUT_S`, 30 s). Each call may pass its own
            ``timeout=``. It becomes the gRPC deadline, which the broker
            carries through to MongoDB. There is no "wait forever".
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

    The client is thread-safe and fork-safe: its channel is made on first
    use and made anew in a forked child, which never touches the parent's.
    """

    @overload
    def __init__(
        self: BrokerClient[dict[str, Any]],
        target: str,
        *,
        timeout: float = ...,
        document_class: None = None,
        codec_options: None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any | None]] = (),
    ) -> None: ...

    @overload
    def __init__(
        self: BrokerClient[_D],
        target: str,
        *,
        timeout: float = ...,
        document_class: type[_D],
        codec_options: CodecOptions[Any] | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any | None]] = (),
    ) -> None: ...

    @overload
    def __init__(
        self: BrokerClient[_D],
        target: str,
        *,
        timeout: float = ...,
        document_class: None = None,
        codec_options: CodecOptions[_D],
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any | None]] = (),
    ) -> None: ...

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        document_class: type[Any] | None = None,
        codec_options: CodecOptions[Any] | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any | None]] = (),
    ) -> None:
        self._target = normalize_target(target)
        self._timeout = _check_timeout(timeout)
        opts: CodecOptions[Any] = codec_options if codec_options is not None else DEFAULT_CODEC_OPTIONS
        if not isinstance(opts, CodecOptions):
            raise TypeError(f"codec_options must be a bson.CodecOptions, not {type(opts).__name__}")
        if document_class is not None:
            opts = opts.with_options(document_class=document_class)
        self._codec_options: CodecOptions[_D] = opts
        # Ids are read out of one-field documents: decode those as dicts
        # whatever the document class, keeping the other options (uuid, tz).
        self._id_codec_options: CodecOptions[dict[str, Any]] = opts.with_options(document_class=dict)
        call_metadata = [(str(k).lower(), str(v)) for k, v in metadata]
        if token is not None:
            if not isinstance(token, str) or not token:
                raise ValueError("token must be a non-empty str")
            call_metadata.append(("authorization", f"Bearer {token}"))
        self._metadata: tuple[tuple[str, str], ...] = tuple(call_metadata)
        channel_options: dict[str, Any] = {
            "grpc.max_receive_message_length": DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
            "grpc.max_send_message_length": DEFAULT_MAX_SEND_MESSAGE_BYTES,
            # Fork safety: a channel of its own connections (see _channel).
            "grpc.use_local_subchannel_pool": 1,
            # Fork safety: streams polled by the caller's thread, inside the
            # fork gate; equals grpc.experimental.ChannelOptions
            # .SingleThreadedUnaryStream, spelled out so that the
            # constructor does not import grpc. Also the faster path.
            "SingleThreadedUnaryStream": 1,
            "grpc.primary_user_agent": f"mongo-broker-client/{__version__}",
        }
        for key, value in options:
            if value is None:
                # gRPC reads some options by key alone (SingleThreadedUnaryStream),
                # so None is the way to drop a default.
                channel_options.pop(key, None)
            else:
                channel_options[key] = value
        self._holder = ChannelHolder(self._target, list(channel_options.items()), credentials)

    # --- pymongo's navigation --------------------------------------------

    def __getitem__(self, name: str) -> Database[_D]:
        return Database(self, name)

    def __getattr__(self, name: str) -> Database[_D]:
        if name.startswith("_"):
            raise AttributeError(
                f"BrokerClient has no attribute {name!r}. To access the {name} database, "
                f"use client[{name!r}]."
            )
        return Database(self, name)

    def get_database(self, name: str) -> Database[_D]:
        """The database ``name`` as configured on the broker (not necessarily MongoDB's name)."""
        return Database(self, name)

    # --- properties --------------------------------------------------------

    @property
    def target(self) -> str:
        """The gRPC target this client connects to."""
        return self._target

    @property
    def timeout(self) -> float:
        """The default time limit of each call, in seconds."""
        return self._timeout

    @property
    def codec_options(self) -> CodecOptions[_D]:
        return self._codec_options

    # --- calls -------------------------------------------------------------

    def ping(self, database: str | None = None, *, timeout: float | None = None) -> PingResult:
        """Check the broker and its databases (all, or the one named)."""
        from broker_client.proto.broker.v1 import broker_pb2

        request = broker_pb2.PingRequest(database=database or "")
        response: broker_pb2.PingResponse = self._unary("Ping", request, timeout)
        return ping_result_from_proto(response)

    def stats(self, database: str | None = None, *, timeout: float | None = None) -> BrokerStats:
        """The broker's pool, queue and operation figures (all databases, or the one named)."""
        from broker_client.proto.broker.v1 import broker_pb2

        request = broker_pb2.StatsRequest(database=database or "")
        response: broker_pb2.StatsResponse = self._unary("Stats", request, timeout)
        return stats_from_proto(response)

    def close(self) -> None:
        """Close this process's channel. Later calls raise InvalidOperation.

        In a forked child it leaves the parent's channel alone, as it must.
        """
        self._holder.close()

    def __enter__(self) -> BrokerClient[_D]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BrokerClient({self._target!r})"

    # --- plumbing ------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else _check_timeout(timeout)

    def _unary(self, method: str, request: Any, timeout: float | None) -> Any:
        seconds = self._deadline(timeout)
        import grpc

        try:
            with GATE:
                callable_ = getattr(self._holder.stub(), method)
                return callable_(request, timeout=seconds, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _open_find(
        self, request: broker_pb2.FindRequest, seconds: float
    ) -> Iterator[broker_pb2.FindResponse]:
        # Called inside the fork gate by Cursor.
        stub = self._holder.stub()
        # iter() returns the call itself; it satisfies the stubs' typing.
        return iter(stub.Find(request, timeout=seconds, metadata=self._metadata))


class Database(Generic[_D]):
    """A database configured on the broker (``client["appdb"]``)."""

    def __init__(self, client: BrokerClient[_D], name: str) -> None:
        self._client = client
        self._name = _check_name(name, "database")

    @property
    def name(self) -> str:
        return self._name

    @property
    def client(self) -> BrokerClient[_D]:
        return self._client

    def __getitem__(self, name: str) -> Collection[_D]:
        return Collection(self, name)

    def __getattr__(self, name: str) -> Collection[_D]:
        if name.startswith("_"):
            raise AttributeError(
                f"Database has no attribute {name!r}. To access the {name} collection, "
                f"use database[{name!r}]."
            )
        return Collection(self, name)

    def get_collection(self, name: str) -> Collection[_D]:
        return Collection(self, name)

    def ping(self, *, timeout: float | None = None) -> PingResult:
        """Ping this database only."""
        return self._client.ping(self._name, timeout=timeout)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Database):
            return self._client is other._client and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self._client), self._name))

    def __repr__(self) -> str:
        return f"Database({self._client!r}, {self._name!r})"


class Collection(Generic[_D]):
    """A collection: ``insert_one``, ``insert_many``, ``find``, ``find_one``."""

    def __init__(self, database: Database[_D], name: str) -> None:
        self._database = database
        self._client = database.client
        self._name = _check_name(name, "collection")

    @property
    def name(self) -> str:
        return self._name

    @property
    def full_name(self) -> str:
        return f"{self._database.name}.{self._name}"

    @property
    def database(self) -> Database[_D]:
        return self._database

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Collection):
            return self._database == other._database and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._database, self._name))

    def __repr__(self) -> str:
        return f"Collection({self._database!r}, {self._name!r})"

    # --- writes ------------------------------------------------------------

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
        (not on a RawBSONDocument, whose id the broker makes).
        """
        encoded = _codec.encode_for_insert(document, self._client.codec_options)
        ids, acknowledged = self._insert([encoded], True, bypass_document_validation, write_concern, timeout)
        return InsertOneResult(ids[0] if ids else None, acknowledged)

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
        ``inserted_count`` and ``failed_index`` say what happened.
        """
        if isinstance(documents, Mapping) or not isinstance(documents, Iterable):
            raise TypeError("documents must be a non-empty list")
        opts = self._client.codec_options
        encoded = [_codec.encode_for_insert(doc, opts) for doc in documents]
        if not encoded:
            raise TypeError("documents must be a non-empty list")
        ids, acknowledged = self._insert(encoded, ordered, bypass_document_validation, write_concern, timeout)
        return InsertManyResult(ids, acknowledged)

    def _insert(
        self,
        encoded: list[bytes],
        ordered: bool,
        bypass_document_validation: bool,
        write_concern: WriteConcernSpec | None,
        timeout: float | None,
    ) -> tuple[list[Any], bool]:
        from broker_client.proto.broker.v1 import broker_pb2

        concern, acknowledged = _write_concern(write_concern)
        request = broker_pb2.InsertRequest(
            database=self._database.name,
            collection=self._name,
            documents=encoded,
            ordered=bool(ordered),
            bypass_document_validation=bool(bypass_document_validation),
        )
        if concern is not None:
            request.write_concern.CopyFrom(concern)
        response: broker_pb2.InsertResponse = self._client._unary("Insert", request, timeout)
        id_opts = self._client._id_codec_options
        return [_codec.decode_id(raw, id_opts) for raw in response.inserted_ids], acknowledged

    # --- reads -------------------------------------------------------------

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
    ) -> Cursor[_D]:
        """A lazy cursor over the matching documents; nothing is sent until iterated.

        ``timeout`` bounds the whole call, from the first batch to the last,
        including the time the caller takes between batches. ``limit=0``
        means no limit. ``batch_size=0`` means the broker's default.
        """
        from broker_client.proto.broker.v1 import broker_pb2

        opts = self._client.codec_options
        hint_name, hint_keys = _codec.encode_hint(hint, opts)
        if comment is not None and not isinstance(comment, str):
            raise TypeError(f"comment must be a str, not {type(comment).__name__}")
        request = broker_pb2.FindRequest(
            database=self._database.name,
            collection=self._name,
            filter=_codec.encode_filter(filter, opts),
            projection=_codec.encode_projection(projection, opts),
            sort=_codec.encode_sort(sort, opts),
            skip=_check_count(skip, "skip"),
            limit=_check_count(limit, "limit"),
            batch_size=_check_count(batch_size, "batch_size", _INT32_MAX),
            max_time_ms=_check_count(max_time_ms, "max_time_ms") if max_time_ms is not None else 0,
            comment=comment or "",
        )
        if hint_name is not None:
            request.hint_name = hint_name
        elif hint_keys is not None:
            request.hint_keys = hint_keys
        return Cursor(self._client, request, self._client._deadline(timeout))

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
    ) -> _D | None:
        """The first matching document, or None.

        As in pymongo, a ``filter`` that is not a mapping is an ``_id`` to
        look up: ``find_one(oid)`` is ``find_one({"_id": oid})``.
        """
        if filter is not None and not isinstance(filter, Mapping):
            filter = {"_id": filter}
        cursor = self.find(
            filter,
            projection,
            sort=sort,
            skip=skip,
            limit=1,
            hint=hint,
            max_time_ms=max_time_ms,
            comment=comment,
            timeout=timeout,
        )
        # Read the stream to its end (at most one document) rather than
        # cancelling it after the first: a cancel would count as a failed
        # call on the broker.
        with cursor:
            found = cursor.to_list()
        return found[0] if found else None


class Cursor(Generic[_D]):
    """The result of ``find()``: a lazy iterator over the server's stream.

    Each gRPC message is one MongoDB batch of documents. They are decoded a
    batch at a time, as the iteration reaches it. ``close()`` (or leaving a
    ``with`` block) cancels the call if it is still running. A cursor
    belongs to the process that opened it: after ``fork()``, the child must
    call ``find()`` again.
    """

    def __init__(self, client: BrokerClient[_D], request: broker_pb2.FindRequest, seconds: float) -> None:
        self._client = client
        self._request = request
        self._seconds = seconds
        self._codec_options = client.codec_options
        self._stream: Iterator[broker_pb2.FindResponse] | None = None
        self._buffer: deque[_D] = deque()
        self._done = False
        self._pid = os.getpid()
        self._retrieved = 0

    def __iter__(self) -> Cursor[_D]:
        return self

    def __next__(self) -> _D:
        while not self._buffer:
            if self._done:
                raise StopIteration
            self._fetch()
        return self._buffer.popleft()

    def next(self) -> _D:
        """pymongo's spelling of ``next(cursor)``."""
        return self.__next__()

    def to_list(self, length: int | None = None) -> list[_D]:
        """The remaining documents (at most ``length``) as a list (pymongo 4.9+)."""
        if length is None:
            return list(self)
        if _check_count(length, "length") == 0:
            raise ValueError("length must be greater than 0")
        out: list[_D] = []
        for doc in self:
            out.append(doc)
            if len(out) >= length:
                break
        return out

    @property
    def alive(self) -> bool:
        """True while the cursor may still return documents."""
        return bool(self._buffer) or not self._done

    @property
    def retrieved(self) -> int:
        """Documents received from the broker so far."""
        return self._retrieved

    def _fetch(self) -> None:
        if self._pid != os.getpid():
            raise InvalidOperation(
                f"this cursor was opened in process {self._pid} before a fork; "
                "call find() again in this process"
            )
        import grpc

        try:
            with GATE:
                if self._stream is None:
                    self._stream = self._client._open_find(self._request, self._seconds)
                response = next(self._stream, None)
        except grpc.RpcError as exc:
            self._done = True
            self._stream = None
            raise from_rpc_error(exc) from None
        if response is None:
            self._done = True
            self._stream = None
            return
        batch = _codec.decode_batch(response.documents, self._codec_options)
        self._retrieved += len(batch)
        self._buffer.extend(batch)

    def close(self) -> None:
        """Stop: cancel the call if it is still running and drop buffered documents."""
        stream, self._stream = self._stream, None
        self._done = True
        self._buffer.clear()
        if stream is None:
            return
        if self._pid != os.getpid():
            # Inherited from the parent: its call is not ours to cancel.
            retire(stream)
            return
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            with GATE:
                cancel()

    def __enter__(self) -> Cursor[_D]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # In the owning process grpc cancels an abandoned call itself. In a
        # forked child that would act on the parent's call, so keep it
        # untouched instead. No locks here: __del__ may run at any moment,
        # even inside the fork gate's own bookkeeping.
        try:
            stream = self._stream
            if stream is not None and self._pid != os.getpid():
                retire(stream)
        except Exception:  # a half-built cursor, or interpreter shutdown
            pass
