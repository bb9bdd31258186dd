"""Requests and answers for every call of both clients: pure functions, no I/O.

`BrokerClient` (``client.py``) and `AsyncBrokerClient` (``async_client.py``)
do each operation in the same four steps: build the request here, send it
through the channel (`_channel`, with the retry loop of `retry.RetryState`),
map a failure to its exception (`errors`), and build the result here. This
module is the part they share, in the style of httpx's shared request
building: the checks of every argument, the BSON encodings (pymongo's rules
for ids, sorts, projections and hints), the proto messages, the bookkeeping
of a retried insert and of a cursor, and the result objects made from the
answers. Nothing here sends, sleeps or waits, so all of it is tested without
a broker (tests/unit/test_client_requests.py).

Every document crosses the wire as one whole BSON document (``bson.encode``),
so every BSON type survives exactly. The argument shapes follow pymongo's
``helpers_shared`` (``_index_document``, ``_fields_list_to_dict``), so code
written for pymongo passes the same values here.

grpc, the generated modules and the result classes are imported inside the
functions that need them: the clients import this module, and importing a
client must stay cheap (no grpc, protobuf or asyncio before the first call).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeAlias

import bson
from bson.codec_options import DEFAULT_CODEC_OPTIONS, CodecOptions
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from broker_client._channel import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    DEFAULT_MAX_SEND_MESSAGE_BYTES,
    normalize_target,
    retire,
)
from broker_client._version import __version__
from broker_client.errors import BrokerError, DuplicateKeyError, InvalidOperation
from broker_client.retry import RetryPolicy, RetryState

if TYPE_CHECKING:
    from typing_extensions import TypeVar

    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, InsertManyResult, InsertOneResult, PingResult

    # The document type: dict unless document_class or codec_options say
    # otherwise. A TypeVar default (PEP 696) needs typing_extensions on
    # Python 3.11, which type checkers have; at run time it is not needed.
    DocumentT = TypeVar("DocumentT", bound=Mapping[str, Any], default=dict[str, Any])
else:
    from typing import TypeVar

    DocumentT = TypeVar("DocumentT", bound=Mapping[str, Any])

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CursorState",
    "DocumentT",
    "Hint",
    "Insert",
    "Projection",
    "Settings",
    "Sort",
    "WriteConcernSpec",
    "check_count",
    "check_documents",
    "check_length",
    "check_name",
    "check_timeout",
    "decode_batch",
    "decode_id",
    "encode_filter",
    "encode_for_insert",
    "encode_hint",
    "encode_projection",
    "encode_sort",
    "find_one_request",
    "find_request",
    "first_document",
    "insert_many_result",
    "insert_one_result",
    "missing_attribute",
    "ping_request",
    "ping_result",
    "prepare_insert",
    "stats_request",
    "stats_result",
    "write_concern_message",
]

_D = TypeVar("_D", bound=Mapping[str, Any])

#: The time limit of every call unless the client or the call says otherwise.
#: A sidecar answers in milliseconds; a caller that waits longer than this
#: is better told so than left waiting. The broker's own default is 30 s too.
DEFAULT_TIMEOUT_S: Final = 30.0

INT32_MAX: Final = 2**31 - 1
_WRITE_CONCERN_KEYS: Final = frozenset({"w", "j", "wtimeout"})


class _HasDocument(Protocol):
    """pymongo's ``WriteConcern`` (or anything with its ``document``)."""

    @property
    def document(self) -> Mapping[str, Any]: ...


#: ``{"w": 1 | "majority", "j": bool, "wtimeout": ms}`` or a pymongo WriteConcern.
WriteConcernSpec: TypeAlias = Mapping[str, Any] | _HasDocument


# --- arguments ----------------------------------------------------------------------


def check_timeout(value: object, name: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive, finite number of seconds, not {value!r}")
    return float(value)


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} name must be an instance of str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} name must not be empty")
    return value


def check_count(value: object, name: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an instance of int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, not {value}")
    return value


def check_length(length: int | None) -> int:
    """``to_list``'s ``length``: 0 for all."""
    if length is None:
        return 0
    if check_count(length, "length") == 0:
        raise ValueError("length must be greater than 0")
    return length


def check_documents(documents: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``insert_many``'s documents as a list; refuses a single mapping or an empty list."""
    if isinstance(documents, Mapping) or not isinstance(documents, Iterable):
        raise TypeError("documents must be a non-empty list")
    listed = list(documents)
    if not listed:
        raise TypeError("documents must be a non-empty list")
    return listed


def missing_attribute(owner: object, name: str, child: str, index: str) -> AttributeError:
    """pymongo's error for ``client._x`` or ``database._x``: private names are not databases."""
    return AttributeError(
        f"{type(owner).__name__} has no attribute {name!r}. To access the {name} {child}, "
        f"use {index}[{name!r}]."
    )


class Settings(Generic[DocumentT]):
    """A client's checked options, the same for `BrokerClient` and `AsyncBrokerClient`.

    ``channel_defaults`` is what the client kind adds to the channel options
    (the sync client's single-threaded streams).
    """

    __slots__ = (
        "channel_options",
        "codec_options",
        "id_codec_options",
        "metadata",
        "retries",
        "target",
        "timeout",
    )

    def __init__(
        self,
        target: str,
        *,
        timeout: float,
        document_class: type[DocumentT] | None,
        codec_options: CodecOptions[DocumentT] | None,
        token: str | None,
        metadata: Sequence[tuple[str, str]],
        options: Sequence[tuple[str, Any | None]],
        retries: RetryPolicy | None,
        channel_defaults: Mapping[str, Any],
    ) -> None:
        self.target = normalize_target(target)
        self.timeout = check_timeout(timeout)
        opts: CodecOptions[Any] = codec_options if codec_options is not None else DEFAULT_CODEC_OPTIONS
        if not isinstance(opts, CodecOptions):
            raise TypeError(f"codec_options must be a bson.CodecOptions, not {type(opts).__name__}")
        if document_class is not None:
            opts = opts.with_options(document_class=document_class)
        self.codec_options: CodecOptions[DocumentT] = opts
        # Ids are read out of one-field documents: decode those as dicts
        # whatever the document class, keeping the other options (uuid, tz).
        self.id_codec_options: CodecOptions[dict[str, Any]] = opts.with_options(document_class=dict)
        if retries is not None and not isinstance(retries, RetryPolicy):
            raise TypeError(f"retries must be a RetryPolicy or None, not {type(retries).__name__}")
        self.retries = retries
        call_metadata = [(str(k).lower(), str(v)) for k, v in metadata]
        if token is not None:
            if not isinstance(token, str) or not token:
                raise ValueError("token must be a non-empty str")
            call_metadata.append(("authorization", f"Bearer {token}"))
        self.metadata: tuple[tuple[str, str], ...] = tuple(call_metadata)
        channel_options: dict[str, Any] = {
            "grpc.max_receive_message_length": DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
            "grpc.max_send_message_length": DEFAULT_MAX_SEND_MESSAGE_BYTES,
            # Fork safety: a channel of its own connections (see _channel).
            "grpc.use_local_subchannel_pool": 1,
            "grpc.primary_user_agent": f"mongo-broker-client/{__version__}",
            **channel_defaults,
        }
        for key, value in options:
            if value is None:
                # gRPC reads some options by key alone (SingleThreadedUnaryStream),
                # so None is the way to drop a default.
                channel_options.pop(key, None)
            else:
                channel_options[key] = value
        self.channel_options: list[tuple[str, Any]] = list(channel_options.items())

    def deadline(self, timeout: float | None) -> float:
        """A call's time limit in seconds: its own ``timeout=``, or the client's."""
        return self.timeout if timeout is None else check_timeout(timeout)

    def retry_state(self, operation: str, timeout: float | None) -> RetryState:
        """A new operation's attempts, under the client's policy and the call's deadline."""
        return RetryState(self.retries, time.monotonic() + self.deadline(timeout), operation)


# --- BSON ---------------------------------------------------------------------------


#: A sort: a key, a list of keys or of ``(key, direction)`` pairs, or a mapping.
Sort: TypeAlias = str | Sequence[str | tuple[str, Any]] | Mapping[str, Any]
#: A projection: a mapping, or a list of field names to include.
Projection: TypeAlias = Mapping[str, Any] | Iterable[str]
#: An index hint: its name, or its key pattern (as a sort is given).
Hint: TypeAlias = str | Sequence[str | tuple[str, Any]] | Mapping[str, Any]

_ASCENDING = 1
_DOC_TYPE_ERROR = (
    "{name} must be an instance of dict, bson.son.SON, bson.raw_bson.RawBSONDocument, "
    "or another mapping type, not {type}"
)


def _check_mapping(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(_DOC_TYPE_ERROR.format(name=name, type=type(value).__name__))
    return value


def _encode(doc: Mapping[str, Any], codec_options: CodecOptions[Any]) -> bytes:
    if isinstance(doc, RawBSONDocument):
        return bytes(doc.raw)
    return bson.encode(doc, codec_options=codec_options)


def encode_for_insert(document: Mapping[str, Any], codec_options: CodecOptions[Any]) -> bytes:
    """Encode a document to insert, giving it an ``_id`` first if it has none (see `prepare_insert`)."""
    return prepare_insert(document, codec_options)[0]


def prepare_insert(document: Mapping[str, Any], codec_options: CodecOptions[Any]) -> tuple[bytes, Any]:
    """Encode a document to insert: ``(bson, the ObjectId made here or None)``.

    A document without ``_id`` gets a new ObjectId first. As pymongo does, it
    is written into the caller's mapping, so the caller can see it. The id is
    also returned: an id made here, in this call, is what makes a retried
    insert safe (a duplicate of it can only be this call's own earlier
    attempt). None means the caller chose the id, or, for a
    RawBSONDocument, which is sent unchanged as pymongo sends it, that the
    broker will make it. ``bson.encode`` always writes ``_id`` first in a
    top-level document, as MongoDB stores it.
    """
    _check_mapping(document, "document")
    if isinstance(document, RawBSONDocument):
        return bytes(document.raw), None
    if "_id" in document:
        return bson.encode(document, codec_options=codec_options), None
    new_id = ObjectId()
    if isinstance(document, MutableMapping):
        document["_id"] = new_id
    else:
        # A read-only mapping cannot take the id (pymongo would raise);
        # send a copy that has one.
        document = {"_id": new_id, **document}
    return bson.encode(document, codec_options=codec_options), new_id


def encode_filter(filter: Mapping[str, Any] | None, codec_options: CodecOptions[Any]) -> bytes:
    """A filter as BSON; empty bytes (match everything) for None."""
    if filter is None:
        return b""
    return _encode(_check_mapping(filter, "filter"), codec_options)


def encode_projection(projection: Projection | None, codec_options: CodecOptions[Any]) -> bytes:
    """A projection as BSON; ``["a", "b"]`` becomes ``{"a": 1, "b": 1}``; None is empty bytes."""
    if projection is None:
        return b""
    if isinstance(projection, Mapping):
        return _encode(projection, codec_options)
    if isinstance(projection, str) or not isinstance(projection, Sequence | set | frozenset):
        raise TypeError("projection must be a mapping or list of key names")
    names = list(projection)
    if not all(isinstance(name, str) for name in names):
        raise TypeError("projection must be a list of key names, each an instance of str")
    return bson.encode(dict.fromkeys(names, 1), codec_options=codec_options)


def _index_document(spec: Sort, option: str) -> dict[str, Any]:
    # pymongo's helpers_shared._index_list + _index_document, plus a bare
    # key string (pymongo's Cursor.sort accepts one, find(sort=) does not).
    if isinstance(spec, str):
        return {spec: _ASCENDING}
    if isinstance(spec, Mapping):
        pairs: list[Any] = list(spec.items())
    elif isinstance(spec, list | tuple):
        pairs = list(spec)
    else:
        raise TypeError(
            f"{option} must be a key, a list of (key, direction) pairs or a mapping, "
            f"not {type(spec).__name__}"
        )
    if not pairs:
        raise ValueError(f"{option} must not be empty")
    index: dict[str, Any] = {}
    for item in pairs:
        pair = (item, _ASCENDING) if isinstance(item, str) else item
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(f"each {option} item must be a key or a (key, direction) pair, not {item!r}")
        key, direction = pair
        if not isinstance(key, str):
            raise TypeError(f"first item in each {option} pair must be an instance of str, not {type(key)}")
        if isinstance(direction, bool) or not isinstance(direction, int | str | Mapping):
            raise TypeError(
                f"second item in each {option} pair must be 1, -1, '2d', a mapping such as "
                f"{{'$meta': 'textScore'}}, or another valid specifier, not {direction!r}"
            )
        index[key] = direction
    return index


def encode_sort(sort: Sort | None, codec_options: CodecOptions[Any]) -> bytes:
    """A sort as a BSON document whose key order is the sort order; None is empty bytes."""
    if sort is None:
        return b""
    return bson.encode(_index_document(sort, "sort"), codec_options=codec_options)


def encode_hint(hint: Hint | None, codec_options: CodecOptions[Any]) -> tuple[str | None, bytes | None]:
    """``(hint_name, hint_keys)``: a name stays a name, a key pattern becomes BSON."""
    if hint is None:
        return None, None
    if isinstance(hint, str):
        return hint, None
    return None, bson.encode(_index_document(hint, "hint"), codec_options=codec_options)


# --- requests -----------------------------------------------------------------------


def ping_request(database: str | None) -> broker_pb2.PingRequest:
    """Ping every database (None), or the one named."""
    from broker_client.proto.broker.v1 import broker_pb2

    return broker_pb2.PingRequest(database=database or "")


def stats_request(database: str | None) -> broker_pb2.StatsRequest:
    """Stats of every database (None), or of the one named."""
    from broker_client.proto.broker.v1 import broker_pb2

    return broker_pb2.StatsRequest(database=database or "")


def find_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
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
    """The FindRequest of ``find()`` (and ``find_one``): every argument checked and encoded."""
    from broker_client.proto.broker.v1 import broker_pb2

    hint_name, hint_keys = encode_hint(hint, codec_options)
    if comment is not None and not isinstance(comment, str):
        raise TypeError(f"comment must be a str, not {type(comment).__name__}")
    request = broker_pb2.FindRequest(
        database=database,
        collection=collection,
        filter=encode_filter(filter, codec_options),
        projection=encode_projection(projection, codec_options),
        sort=encode_sort(sort, codec_options),
        skip=check_count(skip, "skip"),
        limit=check_count(limit, "limit"),
        batch_size=check_count(batch_size, "batch_size", INT32_MAX),
        max_time_ms=check_count(max_time_ms, "max_time_ms") if max_time_ms is not None else 0,
        comment=comment or "",
    )
    if hint_name is not None:
        request.hint_name = hint_name
    elif hint_keys is not None:
        request.hint_keys = hint_keys
    return request


def find_one_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    filter: Any | None,
    projection: Projection | None,
    *,
    sort: Sort | None,
    skip: int,
    hint: Hint | None,
    max_time_ms: int | None,
    comment: str | None,
) -> broker_pb2.FindRequest:
    """The FindOne call's request: a find with ``limit=1``."""
    # As in pymongo, a filter that is not a mapping is an _id to look up.
    if filter is not None and not isinstance(filter, Mapping):
        filter = {"_id": filter}
    return find_request(
        database,
        collection,
        codec_options,
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


def write_concern_message(spec: WriteConcernSpec | None) -> broker_pb2.WriteConcern | None:
    """The proto WriteConcern; None for the broker's default."""
    if spec is None:
        return None
    from broker_client.proto.broker.v1 import broker_pb2

    document: Mapping[str, Any] = spec if isinstance(spec, Mapping) else spec.document
    unknown = set(document) - _WRITE_CONCERN_KEYS
    if unknown:
        raise ValueError(
            f"write_concern has unsupported key(s) {sorted(unknown)}; use w, j and wtimeout (ms)"
        )
    message = broker_pb2.WriteConcern()
    w = document.get("w")
    if w is not None:
        if isinstance(w, bool) or not isinstance(w, int | str):
            raise TypeError(f"write_concern w must be an int or a tag such as 'majority', not {w!r}")
        if isinstance(w, int):
            message.w_nodes = check_count(w, "write_concern w", INT32_MAX)
        else:
            message.w_tag = w
    j = document.get("j")
    if j is not None:
        if not isinstance(j, bool):
            raise TypeError(f"write_concern j must be a bool, not {j!r}")
        message.j = j
    wtimeout = document.get("wtimeout")
    if wtimeout is not None:
        message.wtimeout_ms = check_count(wtimeout, "write_concern wtimeout")
    return message


class Insert:
    """One ``insert_one`` or ``insert_many``: its documents as BSON, and what each attempt sends.

    Building it gives every document without an ``_id`` a new ObjectId
    (`prepare_insert`) and checks the options. ``made_ids[i]`` is the
    ObjectId made here for document ``i``, or None (the caller's id, or a
    RawBSONDocument's, made by the broker). The client sends `request`, and
    after a failure asks `failed` what to do. The rules, which keep a retry
    from storing a document twice:

    - Retried only when every id was made here (and the write concern is
      acknowledged), on the errors and within the limits of the call's
      `RetryState` (UNAVAILABLE, POOL_EXHAUSTED). Any other insert is sent
      once.
    - After an attempt whose outcome is unknown (`retrying`), a
      DuplicateKeyError on a later attempt may be that attempt's own
      documents. The ids are new ObjectIds, so the broker is asked which of
      them are stored (`failed` gives that Find, on ``_id``): an id of ours
      that is there can only have been stored by this call. Ordered: the
      documents up to and including the failed one must be there, and the
      ones after it that are not are sent next. Unordered: every document
      was tried, so all must be there (`found`). Otherwise, or when that
      Find fails, the DuplicateKeyError is raised: it is a real conflict
      (another unique index) or cannot be told from one.
    - The error's ``inserted_count`` and ``failed_index`` always count in
      the caller's list, not in the last attempt's.
    """

    __slots__ = (
        "_documents",
        "_id_codec_options",
        "_maybe_stored",
        "_must_be_stored",
        "_rest",
        "_template",
        "acknowledged",
        "made_ids",
        "pending",
        "retry_safe",
    )

    def __init__(
        self,
        database: str,
        collection: str,
        documents: list[Mapping[str, Any]],
        *,
        ordered: bool,
        bypass_document_validation: bool,
        write_concern: WriteConcernSpec | None,
        settings: Settings[Any],
    ) -> None:
        from broker_client.proto.broker.v1 import broker_pb2

        prepared = [prepare_insert(document, settings.codec_options) for document in documents]
        template = broker_pb2.InsertRequest(
            database=database,
            collection=collection,
            ordered=bool(ordered),
            bypass_document_validation=bool(bypass_document_validation),
        )
        concern = write_concern_message(write_concern)
        if concern is not None:
            template.write_concern.CopyFrom(concern)
        self._template = template
        self._id_codec_options = settings.id_codec_options
        self._documents = [encoded for encoded, _ in prepared]
        self.made_ids: list[Any] = [made for _, made in prepared]
        # w=0 (which the broker refuses) would confirm nothing.
        self.acknowledged = not (
            concern is not None and concern.WhichOneof("w") == "w_nodes" and concern.w_nodes == 0
        )
        self.retry_safe = self.acknowledged and all(made is not None for made in self.made_ids)
        #: The documents (indexes in the caller's list) not known to be stored.
        self.pending = list(range(len(documents)))
        self._maybe_stored = False
        self._must_be_stored: list[int] = []
        self._rest: list[int] = []

    @property
    def ordered(self) -> bool:
        return self._template.ordered

    def request(self) -> broker_pb2.InsertRequest:
        """The next attempt's request: the documents still pending."""
        from broker_client.proto.broker.v1 import broker_pb2

        request = broker_pb2.InsertRequest(documents=[self._documents[i] for i in self.pending])
        request.MergeFrom(self._template)
        return request

    def inserted_ids(self, response: broker_pb2.InsertResponse | None) -> list[Any]:
        """Every document's ``_id``, once all are stored (``response`` None: known from `found`)."""
        if self.retry_safe or response is None:
            return list(self.made_ids)
        return [decode_id(raw, self._id_codec_options) for raw in response.inserted_ids]

    def failed(self, exc: BrokerError) -> broker_pb2.FindRequest | None:
        """After an attempt failed with ``exc``: the Find that asks which of our ids are stored, or
        None to back off and retry. Raises ``exc`` when the insert must not be sent again."""
        self._rebase(exc)
        if not self.retry_safe:
            raise exc
        if not (isinstance(exc, DuplicateKeyError) and self._maybe_stored):
            return None
        pending = self.pending
        if self.ordered:
            failed = exc.failed_index
            if failed is None or failed not in pending:
                raise exc
            cut = pending.index(failed) + 1
            self._must_be_stored, self._rest = pending[:cut], pending[cut:]
        else:
            self._must_be_stored, self._rest = list(pending), []
        from broker_client.proto.broker.v1 import broker_pb2

        return broker_pb2.FindRequest(
            database=self._template.database,
            collection=self._template.collection,
            filter=bson.encode(
                {"_id": {"$in": [self.made_ids[i] for i in pending]}}, codec_options=self._id_codec_options
            ),
            projection=bson.encode({"_id": 1}),
        )

    def retrying(self) -> None:
        """An attempt failed without an answer and will be retried: it may have been stored."""
        self._maybe_stored = True

    def found(self, exc: BrokerError, documents: Sequence[bytes]) -> bool:
        """With the answer of `failed`'s Find: True when every document is stored; False when
        `pending` (now the ones after the failed one not yet stored) must be sent. Raises ``exc``
        when one of ours that must be there is not: the duplicate is not ours."""
        stored = {doc["_id"] for doc in decode_batch(documents, self._id_codec_options)}
        missing = [i for i in self._must_be_stored if self.made_ids[i] not in stored]
        if missing:
            if not self.ordered:
                exc.metadata["failed_index"] = str(missing[0])
                exc.metadata["inserted_count"] = str(len(self.made_ids) - len(missing))
            raise exc
        self.pending = [i for i in self._rest if self.made_ids[i] not in stored]
        return not self.pending

    def _rebase(self, exc: BrokerError) -> None:
        """Make a failed attempt's ``failed_index`` and ``inserted_count`` count in the caller's list."""
        pending, total = self.pending, len(self.made_ids)
        if len(pending) == total:
            return
        failed, inserted = exc.failed_index, exc.inserted_count
        if failed is not None and 0 <= failed < len(pending):
            exc.metadata["failed_index"] = str(pending[failed])
        if inserted is not None:
            exc.metadata["inserted_count"] = str(total - len(pending) + inserted)


class CursorState(Generic[DocumentT]):
    """The bookkeeping of one ``find()`` cursor (`Cursor`, `AsyncCursor`): stream, buffer, retries.

    Each gRPC message is one MongoDB batch of documents; `received` decodes
    a batch at a time, as the iteration reaches it. A cursor belongs to the
    process that opened it: after ``fork()``, the child must call ``find()``
    again.
    """

    __slots__ = ("buffer", "done", "pid", "request", "retrieved", "seconds", "settings", "state", "stream")

    def __init__(
        self, request: broker_pb2.FindRequest, seconds: float, settings: Settings[DocumentT]
    ) -> None:
        self.request = request
        self.seconds = seconds
        self.settings = settings
        #: The open Find call, or None.
        self.stream: Any = None
        self.buffer: deque[DocumentT] = deque()
        self.done = False
        self.pid = os.getpid()
        #: Documents received so far.
        self.retrieved = 0
        self.state: RetryState | None = None

    @property
    def attempts(self) -> int:
        return self.state.attempts if self.state is not None else 0

    def start(self) -> RetryState:
        """Before fetching a batch: the find's retry state; refuses a cursor from before a fork."""
        if self.pid != os.getpid():
            raise InvalidOperation(
                f"this cursor was opened in process {self.pid} before a fork; "
                "call find() again in this process"
            )
        if self.state is None:
            # The deadline starts with the first batch: find() itself sends nothing.
            self.state = self.settings.retry_state("Find", self.seconds)
        return self.state

    def backoff(self, exc: BrokerError, state: RetryState) -> float:
        """After opening or reading the stream failed: the pause before reopening it.

        Raises ``exc`` when the find must end instead: documents were handed
        over already (a restart would repeat them), or ``state`` says no.
        """
        self.stream = None
        if self.retrieved:
            self.done = True
            raise exc
        try:
            return state.backoff(exc)
        except BrokerError:
            self.done = True
            raise

    def received(self, response: broker_pb2.FindResponse | None) -> None:
        """A batch into the buffer; None marks the end."""
        if response is None:
            self.done = True
            self.stream = None
            return
        batch: list[DocumentT] = decode_batch(response.documents, self.settings.codec_options)
        self.retrieved += len(batch)
        self.buffer.extend(batch)

    def detach(self) -> Any:
        """Stop: drop buffered documents; the stream to cancel, if this process may."""
        stream, self.stream = self.stream, None
        self.done = True
        self.buffer.clear()
        if stream is not None and self.pid != os.getpid():
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
            stream = self.stream
            if stream is not None and self.pid != os.getpid():
                retire(stream)
        except Exception:  # a half-built cursor, or interpreter shutdown
            pass


# --- answers ------------------------------------------------------------------------


def decode_batch(documents: Sequence[bytes], codec_options: CodecOptions[_D]) -> list[_D]:
    """Decode one Find message's documents (one whole BSON document each)."""
    if not documents:
        return []
    # One C call for the whole batch instead of one per document: the
    # elements are complete documents, so their concatenation is a valid
    # BSON document sequence.
    return bson.decode_all(b"".join(documents), codec_options)


def decode_id(raw: bytes, codec_options: CodecOptions[Any]) -> Any:
    """The value of a one-field ``{"_id": value}`` document from InsertResponse."""
    return bson.decode(raw, codec_options)["_id"]


def first_document(response: broker_pb2.FindResponse, codec_options: CodecOptions[_D]) -> _D | None:
    """FindOne's answer: the document, or None when nothing matched."""
    found = decode_batch(response.documents, codec_options)
    return found[0] if found else None


def insert_one_result(ids: list[Any], acknowledged: bool, attempts: int) -> InsertOneResult:
    from broker_client.results import InsertOneResult

    return InsertOneResult(ids[0] if ids else None, acknowledged, attempts)


def insert_many_result(ids: list[Any], acknowledged: bool, attempts: int) -> InsertManyResult:
    from broker_client.results import InsertManyResult

    return InsertManyResult(ids, acknowledged, attempts)


def ping_result(response: broker_pb2.PingResponse, attempts: int = 1) -> PingResult:
    from broker_client.results import DatabasePing, PingResult, PoolSummary

    return PingResult(
        version=response.version,
        databases=tuple(
            DatabasePing(
                database=db.database,
                ok=db.ok,
                rtt_ms=db.rtt_ms,
                pool=PoolSummary(
                    connections_open=db.pool.connections_open,
                    connections_in_use=db.pool.connections_in_use,
                    max_pool_size=db.pool.max_pool_size,
                ),
                error=db.error,
            )
            for db in response.databases
        ),
        attempts=attempts,
    )


_MAP_FIELDS: Final = frozenset({"checkout_failures", "operations", "rpcs", "errors", "command_failures"})


def stats_result(response: broker_pb2.StatsResponse, attempts: int = 1) -> BrokerStats:
    from dataclasses import fields

    from broker_client.results import BrokerStats, DatabaseStats

    # Field by field from the dataclass, so a field the proto lacks fails
    # loudly here rather than reading as zero.
    names = [f.name for f in fields(DatabaseStats)]
    databases = []
    for db in response.databases:
        values: dict[str, Any] = {}
        for name in names:
            value = getattr(db, name)
            values[name] = dict(value) if name in _MAP_FIELDS else value
        databases.append(DatabaseStats(**values))
    return BrokerStats(
        version=response.version, uptime_s=response.uptime_s, databases=tuple(databases), attempts=attempts
    )
