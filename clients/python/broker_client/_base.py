"""What BrokerClient and AsyncBrokerClient share: options, navigation, requests, plans.

The two clients differ only in how they run a plan (see `_ops`): blocking
gRPC in ``client.py``, grpc.aio in ``async_client.py``. Everything else, from
the constructor's checks to the request messages, the retry state of each
call and the cursor's bookkeeping, is here, once.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic

from bson.codec_options import DEFAULT_CODEC_OPTIONS, CodecOptions

from broker_client import _ops, _requests
from broker_client._channel import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    DEFAULT_MAX_SEND_MESSAGE_BYTES,
    retire,
)
from broker_client._requests import Hint, Projection, Sort
from broker_client._version import __version__
from broker_client.errors import BrokerError, InvalidOperation
from broker_client.retry import DEFAULT_RETRY_POLICY, RetryPolicy, RetryState

if TYPE_CHECKING:
    import grpc
    from typing_extensions import TypeVar

    from broker_client._channel import AsyncChannelHolder, ChannelHolder
    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, InsertManyResult, InsertOneResult, PingResult

    # The document type: dict unless document_class or codec_options say
    # otherwise. A TypeVar default (PEP 696) needs typing_extensions on
    # Python 3.11, which type checkers have; at run time it is not needed.
    DocumentT = TypeVar("DocumentT", bound=Mapping[str, Any], default=dict[str, Any])
else:
    from typing import TypeVar

    DocumentT = TypeVar("DocumentT", bound=Mapping[str, Any])

__all__ = ["DEFAULT_TIMEOUT_S", "ClientBase", "CollectionBase", "CursorBase", "DatabaseBase", "DocumentT"]

#: The time limit of every call unless the client or the call says otherwise.
#: A sidecar answers in milliseconds; a caller that waits longer than this
#: is better told so than left waiting. The broker's own default is 30 s too.
DEFAULT_TIMEOUT_S: Final = 30.0

_Client = TypeVar("_Client", bound="ClientBase[Any, Any, Any]")
_Database = TypeVar("_Database", bound="DatabaseBase[Any, Any]")
_Collection = TypeVar("_Collection")
_Cursor = TypeVar("_Cursor")
_Holder = TypeVar("_Holder", bound="ChannelHolder | AsyncChannelHolder")
_Result = TypeVar("_Result")


def check_timeout(value: object, name: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} name must be an instance of str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} name must not be empty")
    return value


class ClientBase(Generic[_Database, _Holder, DocumentT]):
    """The constructor, properties, navigation and plans of both clients."""

    _holder: _Holder

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
        from broker_client._channel import normalize_target

        self._target = normalize_target(target)
        self._timeout = check_timeout(timeout)
        opts: CodecOptions[Any] = codec_options if codec_options is not None else DEFAULT_CODEC_OPTIONS
        if not isinstance(opts, CodecOptions):
            raise TypeError(f"codec_options must be a bson.CodecOptions, not {type(opts).__name__}")
        if document_class is not None:
            opts = opts.with_options(document_class=document_class)
        self._codec_options: CodecOptions[DocumentT] = opts
        # Ids are read out of one-field documents: decode those as dicts
        # whatever the document class, keeping the other options (uuid, tz).
        self._id_codec_options: CodecOptions[dict[str, Any]] = opts.with_options(document_class=dict)
        if retries is not None and not isinstance(retries, RetryPolicy):
            raise TypeError(f"retries must be a RetryPolicy or None, not {type(retries).__name__}")
        self._retries = retries
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
            "grpc.primary_user_agent": f"mongo-broker-client/{__version__}",
            **self._extra_channel_options,
        }
        for key, value in options:
            if value is None:
                # gRPC reads some options by key alone (SingleThreadedUnaryStream),
                # so None is the way to drop a default.
                channel_options.pop(key, None)
            else:
                channel_options[key] = value
        self._holder = self._make_holder(self._target, list(channel_options.items()), credentials)

    # What each client adds to the channel options, and its channel holder.
    _extra_channel_options: Mapping[str, Any] = {}

    def _make_holder(
        self, target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> _Holder:
        raise NotImplementedError

    def _make_database(self, name: str) -> _Database:
        raise NotImplementedError

    # --- pymongo's navigation --------------------------------------------

    def __getitem__(self, name: str) -> _Database:
        return self._make_database(name)

    def __getattr__(self, name: str) -> _Database:
        if name.startswith("_"):
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}. To access the {name} database, "
                f"use client[{name!r}]."
            )
        return self._make_database(name)

    def get_database(self, name: str) -> _Database:
        """The database ``name`` as configured on the broker (not necessarily MongoDB's name)."""
        return self._make_database(name)

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
    def codec_options(self) -> CodecOptions[DocumentT]:
        return self._codec_options

    @property
    def retries(self) -> RetryPolicy | None:
        """How failed calls are retried (None: never)."""
        return self._retries

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._target!r})"

    # --- plans ---------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> float:
        return self._timeout if timeout is None else check_timeout(timeout)

    def _retry_state(self, operation: str, timeout: float | None) -> RetryState:
        return RetryState(self._retries, time.monotonic() + self._deadline(timeout), operation)

    def _ping(self, database: str | None, timeout: float | None) -> _ops.Plan[PingResult]:
        from broker_client.proto.broker.v1 import broker_pb2

        state = self._retry_state("Ping", timeout)
        request = broker_pb2.PingRequest(database=database or "")
        return _ops.counted(state, _ops.ping_plan(request, state))

    def _stats(self, database: str | None, timeout: float | None) -> _ops.Plan[BrokerStats]:
        from broker_client.proto.broker.v1 import broker_pb2

        state = self._retry_state("Stats", timeout)
        request = broker_pb2.StatsRequest(database=database or "")
        return _ops.counted(state, _ops.stats_plan(request, state))


class DatabaseBase(Generic[_Client, _Collection]):
    """A database configured on the broker (``client["appdb"]``)."""

    def __init__(self, client: _Client, name: str) -> None:
        self._client = client
        self._name = _check_name(name, "database")

    def _make_collection(self, name: str) -> _Collection:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self._name

    @property
    def client(self) -> _Client:
        return self._client

    def __getitem__(self, name: str) -> _Collection:
        return self._make_collection(name)

    def __getattr__(self, name: str) -> _Collection:
        if name.startswith("_"):
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}. To access the {name} collection, "
                f"use database[{name!r}]."
            )
        return self._make_collection(name)

    def get_collection(self, name: str) -> _Collection:
        return self._make_collection(name)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DatabaseBase):
            return self._client is other._client and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((id(self._client), self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client!r}, {self._name!r})"


class CollectionBase(Generic[_Client, _Database, _Cursor, DocumentT]):
    """A collection: requests and plans for ``insert_one``, ``insert_many``, ``find``, ``find_one``."""

    def __init__(self, database: _Database, name: str) -> None:
        self._database = database
        self._client: _Client = database.client
        self._name = _check_name(name, "collection")

    def _make_cursor(self, request: broker_pb2.FindRequest, seconds: float) -> _Cursor:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self._name

    @property
    def full_name(self) -> str:
        return f"{self._database_name}.{self._name}"

    @property
    def database(self) -> _Database:
        return self._database

    @property
    def _database_name(self) -> str:
        return self._database.name

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CollectionBase):
            return self._database == other._database and self._name == other._name
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._database, self._name))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._database!r}, {self._name!r})"

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
    ) -> _Cursor:
        """A lazy cursor over the matching documents; nothing is sent until iterated.

        ``timeout`` bounds the whole call, from the first batch to the last,
        including the time the caller takes between batches, and any
        retries. ``limit=0`` means no limit. ``batch_size=0`` means the
        broker's default. A failure before the first documents arrive is
        retried by the client's ``retries`` policy; a failure after that
        raises (a restart would return documents twice).
        """
        request = self._find_request(
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
        return self._make_cursor(request, self._client._deadline(timeout))

    def _find_request(
        self,
        filter: Mapping[str, Any] | None,
        projection: Projection | None,
        *,
        sort: Sort | None,
        skip: int,
        limit: int,
        batch_size: int,
        hint: Hint | None,
        max_time_ms: int | None,
        comment: str | None,
    ) -> broker_pb2.FindRequest:
        from broker_client.proto.broker.v1 import broker_pb2

        opts = self._client.codec_options
        hint_name, hint_keys = _requests.encode_hint(hint, opts)
        if comment is not None and not isinstance(comment, str):
            raise TypeError(f"comment must be a str, not {type(comment).__name__}")
        request = broker_pb2.FindRequest(
            database=self._database_name,
            collection=self._name,
            filter=_requests.encode_filter(filter, opts),
            projection=_requests.encode_projection(projection, opts),
            sort=_requests.encode_sort(sort, opts),
            skip=_ops.check_count(skip, "skip"),
            limit=_ops.check_count(limit, "limit"),
            batch_size=_ops.check_count(batch_size, "batch_size", _ops.INT32_MAX),
            max_time_ms=_ops.check_count(max_time_ms, "max_time_ms") if max_time_ms is not None else 0,
            comment=comment or "",
        )
        if hint_name is not None:
            request.hint_name = hint_name
        elif hint_keys is not None:
            request.hint_keys = hint_keys
        return request

    def _find_one(  # noqa: PLR0917 - find_one's own arguments, in its order
        self,
        filter: Any | None,
        projection: Projection | None,
        sort: Sort | None,
        skip: int,
        hint: Hint | None,
        max_time_ms: int | None,
        comment: str | None,
        timeout: float | None,
    ) -> _ops.Plan[DocumentT | None]:
        # As in pymongo, a filter that is not a mapping is an _id to look up.
        if filter is not None and not isinstance(filter, Mapping):
            filter = {"_id": filter}
        request = self._find_request(
            filter,
            projection,
            sort=sort,
            skip=skip,
            limit=1,
            batch_size=0,
            hint=hint,
            max_time_ms=max_time_ms,
            comment=comment,
        )
        state = self._client._retry_state("FindOne", timeout)
        return _ops.counted(state, self._first(_ops.find_one_plan(request, state)))

    def _first(self, plan: _ops.Plan[list[bytes]]) -> _ops.Plan[DocumentT | None]:
        raw = yield from plan
        found: list[DocumentT] = _requests.decode_batch(raw, self._client.codec_options)
        return found[0] if found else None

    # --- writes ------------------------------------------------------------

    def _insert_one(
        self,
        document: Mapping[str, Any],
        bypass_document_validation: bool,
        write_concern: _ops.WriteConcernSpec | None,
        timeout: float | None,
    ) -> _ops.Plan[InsertOneResult]:
        return self._insert(
            [document], True, bypass_document_validation, write_concern, timeout, _insert_one_result
        )

    def _insert_many(
        self,
        documents: Iterable[Mapping[str, Any]],
        ordered: bool,
        bypass_document_validation: bool,
        write_concern: _ops.WriteConcernSpec | None,
        timeout: float | None,
    ) -> _ops.Plan[InsertManyResult]:
        if isinstance(documents, Mapping) or not isinstance(documents, Iterable):
            raise TypeError("documents must be a non-empty list")
        listed = list(documents)
        if not listed:
            raise TypeError("documents must be a non-empty list")
        return self._insert(
            listed, ordered, bypass_document_validation, write_concern, timeout, _insert_many_result
        )

    def _insert(  # noqa: PLR0917 - the insert methods' own arguments, and what to return
        self,
        documents: list[Mapping[str, Any]],
        ordered: bool,
        bypass_document_validation: bool,
        write_concern: _ops.WriteConcernSpec | None,
        timeout: float | None,
        result: Callable[[list[Any], bool, int], _Result],
    ) -> _ops.Plan[_Result]:
        opts = self._client.codec_options
        prepared = [_requests.prepare_insert(document, opts) for document in documents]
        template = _ops.insert_template(
            self._database_name, self._name, ordered, bypass_document_validation, write_concern
        )
        state = self._client._retry_state("Insert", timeout)
        plan = _ops.insert_plan(
            template,
            [encoded for encoded, _ in prepared],
            [made for _, made in prepared],
            self._client._id_codec_options,
            state,
        )
        ids = yield from _ops.counted(state, plan)
        return result(ids, _ops.acknowledged(template), state.attempts)


def _insert_one_result(ids: list[Any], acknowledged: bool, attempts: int) -> InsertOneResult:
    from broker_client.results import InsertOneResult

    return InsertOneResult(ids[0] if ids else None, acknowledged, attempts)


def _insert_many_result(ids: list[Any], acknowledged: bool, attempts: int) -> InsertManyResult:
    from broker_client.results import InsertManyResult

    return InsertManyResult(ids, acknowledged, attempts)


class CursorBase(Generic[_Client, DocumentT]):
    """The bookkeeping of ``find()``'s cursors: buffer, counts, retries, fork checks.

    Each gRPC message is one MongoDB batch of documents; they are decoded a
    batch at a time, as the iteration reaches it. A cursor belongs to the
    process that opened it: after ``fork()``, the child must call ``find()``
    again.
    """

    def __init__(self, client: _Client, request: broker_pb2.FindRequest, seconds: float) -> None:
        self._client = client
        self._request = request
        self._seconds = seconds
        self._codec_options: CodecOptions[DocumentT] = client.codec_options
        self._stream: Any = None
        self._buffer: deque[DocumentT] = deque()
        self._done = False
        self._pid = os.getpid()
        self._retrieved = 0
        self._state: RetryState | None = None

    @property
    def alive(self) -> bool:
        """True while the cursor may still return documents."""
        return bool(self._buffer) or not self._done

    @property
    def retrieved(self) -> int:
        """Documents received from the broker so far."""
        return self._retrieved

    @property
    def attempts(self) -> int:
        """How many times the Find was sent (more than 1 after retries; 0 before the first batch)."""
        return self._state.attempts if self._state is not None else 0

    def _fetch(self) -> _ops.Plan[None]:
        """Get the next batch into the buffer, or mark the end."""
        if self._pid != os.getpid():
            raise InvalidOperation(
                f"this cursor was opened in process {self._pid} before a fork; "
                "call find() again in this process"
            )
        if self._state is None:
            # The deadline starts with the first batch: find() itself sends nothing.
            self._state = self._client._retry_state("Find", self._seconds)
        return _ops.counted(self._state, self._fetch_plan(self._state))

    def _fetch_plan(self, state: RetryState) -> _ops.Plan[None]:
        while True:
            try:
                if self._stream is None:
                    self._stream = yield _ops.OpenFind(self._request, state.next_timeout())
                response = yield _ops.ReadFind(self._stream)
                break
            except BrokerError as exc:
                self._stream = None
                if self._retrieved:
                    # Documents were handed over: a restart would repeat them.
                    self._done = True
                    raise
                try:
                    delay = state.backoff(exc)
                except BrokerError:
                    self._done = True
                    raise
                yield _ops.Sleep(delay)
        if response is None:
            self._done = True
            self._stream = None
            return
        batch = _requests.decode_batch(response.documents, self._codec_options)
        self._retrieved += len(batch)
        self._buffer.extend(batch)

    @staticmethod
    def _check_length(length: int | None) -> int:
        """``to_list``'s ``length``: 0 for all."""
        if length is None:
            return 0
        if _ops.check_count(length, "length") == 0:
            raise ValueError("length must be greater than 0")
        return length

    def _detach(self) -> Any:
        """Stop: drop buffered documents; the stream to cancel, if this process may."""
        stream, self._stream = self._stream, None
        self._done = True
        self._buffer.clear()
        if stream is not None and self._pid != os.getpid():
            # Inherited from the parent: its call is not ours to cancel.
            retire(stream)
            return None
        return stream

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
