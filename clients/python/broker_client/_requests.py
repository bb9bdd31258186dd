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
    service_config,
)
from broker_client._version import __version__
from broker_client.errors import BrokerError, DuplicateKeyError, InvalidOperation
from broker_client.operations import check_replacement, check_requests, check_update, request_kind
from broker_client.retry import RetryPolicy, RetryState, may_retry

if TYPE_CHECKING:
    from typing_extensions import TypeVar

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

    # The document type: dict unless document_class or codec_options say
    # otherwise. A TypeVar default (PEP 696) needs typing_extensions on
    # Python 3.11, which type checkers have; at run time it is not needed.
    DocumentT = TypeVar("DocumentT", bound=Mapping[str, Any], default=dict[str, Any])
else:
    from typing import TypeVar

    DocumentT = TypeVar("DocumentT", bound=Mapping[str, Any])

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Collation",
    "CursorState",
    "DocumentT",
    "Hint",
    "Insert",
    "Projection",
    "ReadOptions",
    "Settings",
    "Sort",
    "Update",
    "WriteConcernSpec",
    "acknowledged",
    "aggregate_request",
    "bulk_write_request",
    "bulk_write_result",
    "check_comment",
    "check_count",
    "check_documents",
    "check_length",
    "check_name",
    "check_timeout",
    "count_request",
    "decode_batch",
    "decode_id",
    "delete_request",
    "delete_result",
    "distinct_request",
    "distinct_values",
    "encode_collation",
    "encode_document",
    "encode_filter",
    "encode_for_insert",
    "encode_hint",
    "encode_projection",
    "encode_sort",
    "find_one_and_modify_request",
    "find_one_request",
    "find_request",
    "first_document",
    "insert_many_result",
    "insert_one_result",
    "missing_attribute",
    "modified_document",
    "ping_request",
    "ping_result",
    "pipeline_writes",
    "prepare_insert",
    "read_concern_level",
    "read_preference_message",
    "stats_request",
    "stats_result",
    "update_request",
    "update_result",
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
        target: str | Sequence[str],
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
            # round_robin over every replica a target names, and health checks
            # over TCP (see _channel.service_config); a user's own
            # grpc.service_config replaces it.
            "grpc.service_config": service_config(self.target),
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

    def retry_state(self, operation: str, timeout: float | None, *, retry: bool = True) -> RetryState:
        """A new operation's attempts, under the client's policy and the call's deadline.

        ``operation`` is the RPC's name: the ones that are never retried
        (`retry.NEVER_RETRIED`), and any with ``retry=False``, are sent once.
        """
        policy = self.retries if retry and may_retry(operation) else None
        return RetryState(policy, time.monotonic() + self.deadline(timeout), operation)

    def with_codec_options(self, codec_options: CodecOptions[Any]) -> Settings[Any]:
        """These settings with other codec options: a collection's own (``get_collection``)."""
        if not isinstance(codec_options, CodecOptions):
            raise TypeError(f"codec_options must be a bson.CodecOptions, not {type(codec_options).__name__}")
        new: Settings[Any] = object.__new__(Settings)
        for name in Settings.__slots__:
            setattr(new, name, getattr(self, name))
        new.codec_options = codec_options
        new.id_codec_options = codec_options.with_options(document_class=dict)
        return new


# --- BSON ---------------------------------------------------------------------------


#: A sort: a key, a list of keys or of ``(key, direction)`` pairs, or a mapping.
Sort: TypeAlias = str | Sequence[str | tuple[str, Any]] | Mapping[str, Any]
#: A projection: a mapping, or a list of field names to include.
Projection: TypeAlias = Mapping[str, Any] | Iterable[str]
#: An index hint: its name, or its key pattern (as a sort is given).
Hint: TypeAlias = str | Sequence[str | tuple[str, Any]] | Mapping[str, Any]
#: A collation: a mapping such as ``{"locale": "fr"}``, or pymongo's ``Collation``.
Collation: TypeAlias = Mapping[str, Any] | _HasDocument
#: An update: ``$``-operators, or a pipeline (a list of stages).
Update: TypeAlias = Mapping[str, Any] | list[Mapping[str, Any]]

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
    collation: Collation | None = None,
    read: ReadOptions | None = None,
) -> broker_pb2.FindRequest:
    """The FindRequest of ``find()`` (and ``find_one``): every argument checked and encoded."""
    from broker_client.proto.broker.v1 import broker_pb2

    hint_name, hint_keys = encode_hint(hint, codec_options)
    check_comment(comment)
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
        collation=encode_collation(collation, codec_options),
    )
    if hint_name is not None:
        request.hint_name = hint_name
    elif hint_keys is not None:
        request.hint_keys = hint_keys
    if read is not None:
        read.apply(request)
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
    collation: Collation | None = None,
    read: ReadOptions | None = None,
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
        collation=collation,
        read=read,
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
    """The bookkeeping of one ``find()`` or ``aggregate()`` cursor (`Cursor`, `AsyncCursor`).

    Each gRPC message is one MongoDB batch of documents; `received` decodes
    a batch at a time, as the iteration reaches it. A cursor belongs to the
    process that opened it: after ``fork()``, the child must call ``find()``
    again.
    """

    __slots__ = (
        "buffer",
        "done",
        "method",
        "pid",
        "request",
        "retrieved",
        "retry",
        "seconds",
        "settings",
        "state",
        "stream",
    )

    def __init__(
        self,
        request: broker_pb2.FindRequest | broker_pb2.AggregateRequest,
        seconds: float,
        settings: Settings[DocumentT],
        *,
        method: str = "Find",
        retry: bool = True,
    ) -> None:
        self.request = request
        #: The streaming call: "Find", or "Aggregate" (the same FindResponse messages).
        self.method = method
        #: False for an aggregate that writes ($out, $merge): sent once.
        self.retry = retry
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
                "call find() (or aggregate()) again in this process"
            )
        if self.state is None:
            # The deadline starts with the first batch: find() itself sends nothing.
            self.state = self.settings.retry_state(self.method, self.seconds, retry=self.retry)
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

    from broker_client.results import BrokerStats, DatabaseStats, PeerStats

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
    peers = tuple(PeerStats(p.host, p.calls, p.last_call_s_ago) for p in response.peers)
    return BrokerStats(
        version=response.version,
        uptime_s=response.uptime_s,
        databases=tuple(databases),
        attempts=attempts,
        instance=response.instance,
        caller=response.caller,
        peers=peers,
    )


# --- read options -------------------------------------------------------------------

# pymongo's mode names (``ReadPreference.document["mode"]``) and read concern
# levels, to the proto's enum numbers.
_READ_PREFERENCE_MODES: Final = {
    "primary": 1,
    "primaryPreferred": 2,
    "secondary": 3,
    "secondaryPreferred": 4,
    "nearest": 5,
}
_READ_CONCERN_LEVELS: Final = {"local": 1, "available": 2, "majority": 3, "linearizable": 4, "snapshot": 5}
_MISSING: Final = object()


def read_preference_message(
    preference: Any | None, codec_options: CodecOptions[Any]
) -> broker_pb2.ReadPreference | None:
    """pymongo's read preference as the proto's; None (the broker's configured one) for None.

    ``preference`` is one of pymongo's own objects: ``pymongo.ReadPreference.SECONDARY``,
    ``pymongo.read_preferences.Secondary(tag_sets=[...], max_staleness=120)``, ... Their
    ``document`` (``{"mode", "tags", "maxStalenessSeconds"}``, what pymongo sends to a
    mongos) is read, so pymongo itself need not be imported here.
    """
    if preference is None:
        return None
    from broker_client.proto.broker.v1 import broker_pb2

    document = getattr(preference, "document", None)
    if not isinstance(document, Mapping) or "mode" not in document:
        raise TypeError(
            "read_preference must be one of pymongo's read preferences (pymongo.ReadPreference.SECONDARY, "
            f"pymongo.read_preferences.Secondary(tag_sets=...), ...), not {preference!r}"
        )
    mode = _READ_PREFERENCE_MODES.get(document["mode"])
    if mode is None:
        raise ValueError(f"unknown read preference mode {document['mode']!r}")
    message = broker_pb2.ReadPreference(mode=mode)  # type: ignore[arg-type]
    for tags in document.get("tags") or ():
        tag_set = _check_mapping(tags, "each tag set")
        message.tag_sets.append(bson.encode(tag_set, codec_options=codec_options))
    staleness = document.get("maxStalenessSeconds")
    if staleness is not None and staleness > 0:
        message.max_staleness_s = check_count(staleness, "max_staleness")
    return message


def read_concern_level(concern: Any | None) -> int:
    """pymongo's ``ReadConcern`` (or a level name) as the proto's level; 0, the server's default, for
    None or ``ReadConcern()``."""
    if concern is None:
        return 0
    level = concern if isinstance(concern, str) else getattr(concern, "level", _MISSING)
    if level is _MISSING:
        raise TypeError(
            f"read_concern must be a pymongo.read_concern.ReadConcern or a level name, not {concern!r}"
        )
    if level is None:
        return 0
    number = _READ_CONCERN_LEVELS.get(level) if isinstance(level, str) else None
    if number is None:
        raise ValueError(f"unknown read concern level {level!r}; use one of {sorted(_READ_CONCERN_LEVELS)}")
    return number


class ReadOptions:
    """A collection's read preference and read concern, converted once, set on each read request."""

    __slots__ = ("read_concern", "read_preference")

    def __init__(
        self, read_preference: Any | None, read_concern: Any | None, codec_options: CodecOptions[Any]
    ) -> None:
        self.read_preference = read_preference_message(read_preference, codec_options)
        self.read_concern = read_concern_level(read_concern)

    def apply(self, request: Any) -> None:
        """Set both on a Find, Count, Distinct or Aggregate request (unset: the defaults)."""
        if self.read_preference is not None:
            request.read_preference.CopyFrom(self.read_preference)
        if self.read_concern:
            request.read_concern = self.read_concern


# --- the arguments of the other operations ------------------------------------------


def check_comment(comment: object) -> str:
    """A comment, which the contract carries as a string; "" for None."""
    if comment is None:
        return ""
    if not isinstance(comment, str):
        raise TypeError(f"comment must be a str, not {type(comment).__name__}")
    return comment


def _max_time(value: int | None, name: str = "maxTimeMS") -> int:
    return 0 if value is None else check_count(value, name)


def encode_collation(collation: Collation | None, codec_options: CodecOptions[Any]) -> bytes:
    """A collation (a mapping, or pymongo's ``Collation``) as BSON; empty bytes for None."""
    if collation is None:
        return b""
    document = collation if isinstance(collation, Mapping) else getattr(collation, "document", None)
    if not isinstance(document, Mapping):
        raise TypeError(
            f"collation must be a mapping or a pymongo.collation.Collation, not {type(collation).__name__}"
        )
    return _encode(document, codec_options)


def encode_document(document: Mapping[str, Any] | None, name: str, codec_options: CodecOptions[Any]) -> bytes:
    """A document argument (``let``, a filter) as BSON; empty bytes for None."""
    if document is None:
        return b""
    return _encode(_check_mapping(document, name), codec_options)


def _encode_array_filters(array_filters: Any | None, codec_options: CodecOptions[Any]) -> list[bytes]:
    if array_filters is None:
        return []
    if not isinstance(array_filters, list):
        raise TypeError(f"array_filters must be a list, not {type(array_filters).__name__}")
    return [_encode(_check_mapping(f, "each array filter"), codec_options) for f in array_filters]


def _set_update(message: Any, update: Update, codec_options: CodecOptions[Any]) -> None:
    """``update`` or ``update_pipeline`` of an Update, FindOneAndModify or UpdateModel."""
    checked = check_update(update)
    if isinstance(checked, list):
        message.update_pipeline.extend(_encode(stage, codec_options) for stage in checked)
    else:
        message.update = _encode(checked, codec_options)


def _set_hint(message: Any, hint: Hint | None, codec_options: CodecOptions[Any]) -> None:
    hint_name, hint_keys = encode_hint(hint, codec_options)
    if hint_name is not None:
        message.hint_name = hint_name
    elif hint_keys is not None:
        message.hint_keys = hint_keys


def _set_write_concern(message: Any, write_concern: WriteConcernSpec | None) -> None:
    concern = write_concern_message(write_concern)
    if concern is not None:
        message.write_concern.CopyFrom(concern)


def acknowledged(request: Any) -> bool:
    """False when a write request's write concern is ``w=0`` (which confirms nothing)."""
    if not request.HasField("write_concern"):
        return True
    concern = request.write_concern
    return not (concern.WhichOneof("w") == "w_nodes" and concern.w_nodes == 0)


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r}")
    return value


# --- the requests of the other operations -------------------------------------------


def update_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    filter: Mapping[str, Any],
    *,
    update: Update | None = None,
    replacement: Mapping[str, Any] | None = None,
    multi: bool = False,
    upsert: bool = False,
    bypass_document_validation: bool | None = None,
    collation: Collation | None = None,
    array_filters: list[Mapping[str, Any]] | None = None,
    hint: Hint | None = None,
    let: Mapping[str, Any] | None = None,
    comment: str | None = None,
    write_concern: WriteConcernSpec | None = None,
) -> broker_pb2.UpdateRequest:
    """The Update call: ``update_one``, ``update_many`` (``update``) or ``replace_one`` (``replacement``)."""
    from broker_client.proto.broker.v1 import broker_pb2

    request = broker_pb2.UpdateRequest(
        database=database,
        collection=collection,
        filter=_encode(_check_mapping(filter, "filter"), codec_options),
        multi=multi,
        upsert=_check_bool(upsert, "upsert"),
        array_filters=_encode_array_filters(array_filters, codec_options),
        collation=encode_collation(collation, codec_options),
        let=encode_document(let, "let", codec_options),
        comment=check_comment(comment),
        bypass_document_validation=bool(bypass_document_validation),
    )
    if replacement is not None:
        request.replacement = _encode(check_replacement(replacement), codec_options)
    elif update is not None:
        _set_update(request, update, codec_options)
    else:
        raise TypeError("an update needs an update document (or pipeline), or a replacement")
    _set_hint(request, hint, codec_options)
    _set_write_concern(request, write_concern)
    return request


def delete_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    filter: Mapping[str, Any],
    *,
    multi: bool,
    collation: Collation | None = None,
    hint: Hint | None = None,
    let: Mapping[str, Any] | None = None,
    comment: str | None = None,
    write_concern: WriteConcernSpec | None = None,
) -> broker_pb2.DeleteRequest:
    """The Delete call of ``delete_one`` / ``delete_many`` (``multi``)."""
    from broker_client.proto.broker.v1 import broker_pb2

    request = broker_pb2.DeleteRequest(
        database=database,
        collection=collection,
        filter=_encode(_check_mapping(filter, "filter"), codec_options),
        multi=multi,
        collation=encode_collation(collation, codec_options),
        let=encode_document(let, "let", codec_options),
        comment=check_comment(comment),
    )
    _set_hint(request, hint, codec_options)
    _set_write_concern(request, write_concern)
    return request


def find_one_and_modify_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    filter: Mapping[str, Any],
    *,
    update: Update | None = None,
    replacement: Mapping[str, Any] | None = None,
    remove: bool = False,
    projection: Projection | None = None,
    sort: Sort | None = None,
    upsert: bool = False,
    return_document: bool = False,
    array_filters: list[Mapping[str, Any]] | None = None,
    hint: Hint | None = None,
    collation: Collation | None = None,
    let: Mapping[str, Any] | None = None,
    comment: str | None = None,
    max_time_ms: int | None = None,
    bypass_document_validation: bool | None = None,
    write_concern: WriteConcernSpec | None = None,
) -> broker_pb2.FindOneAndModifyRequest:
    """The FindOneAndModify call of ``find_one_and_update`` / ``_replace`` / ``_delete`` (``remove``)."""
    from broker_client.proto.broker.v1 import broker_pb2

    if not isinstance(return_document, bool):
        raise ValueError("return_document must be ReturnDocument.BEFORE or ReturnDocument.AFTER")
    request = broker_pb2.FindOneAndModifyRequest(
        database=database,
        collection=collection,
        filter=_encode(_check_mapping(filter, "filter"), codec_options),
        sort=encode_sort(sort, codec_options),
        projection=encode_projection(projection, codec_options),
        remove=remove,
        upsert=_check_bool(upsert, "upsert"),
        return_document=(
            broker_pb2.RETURN_DOCUMENT_AFTER if return_document else broker_pb2.RETURN_DOCUMENT_BEFORE
        ),
        array_filters=_encode_array_filters(array_filters, codec_options),
        collation=encode_collation(collation, codec_options),
        let=encode_document(let, "let", codec_options),
        comment=check_comment(comment),
        max_time_ms=_max_time(max_time_ms),
        bypass_document_validation=bool(bypass_document_validation),
    )
    if replacement is not None:
        request.replacement = _encode(check_replacement(replacement), codec_options)
    elif update is not None:
        _set_update(request, update, codec_options)
    elif not remove:
        raise TypeError("find_one_and_modify needs an update, a replacement or remove")
    _set_hint(request, hint, codec_options)
    _set_write_concern(request, write_concern)
    return request


def count_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    filter: Mapping[str, Any] | None,
    *,
    estimated: bool = False,
    skip: int = 0,
    limit: int = 0,
    hint: Hint | None = None,
    collation: Collation | None = None,
    comment: str | None = None,
    max_time_ms: int | None = None,
    read: ReadOptions | None = None,
) -> broker_pb2.CountRequest:
    """The Count call of ``count_documents`` (a filter), or ``estimated_document_count`` (``estimated``)."""
    from broker_client.proto.broker.v1 import broker_pb2

    request = broker_pb2.CountRequest(
        database=database,
        collection=collection,
        estimated=estimated,
        filter=b"" if estimated else _encode(_check_mapping(filter, "filter"), codec_options),
        skip=check_count(skip, "skip"),
        limit=check_count(limit, "limit"),
        collation=encode_collation(collation, codec_options),
        comment=check_comment(comment),
        max_time_ms=_max_time(max_time_ms),
    )
    _set_hint(request, hint, codec_options)
    if read is not None:
        read.apply(request)
    return request


def distinct_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    key: str,
    filter: Mapping[str, Any] | None,
    *,
    collation: Collation | None = None,
    comment: str | None = None,
    max_time_ms: int | None = None,
    read: ReadOptions | None = None,
) -> broker_pb2.DistinctRequest:
    """The Distinct call of ``distinct``."""
    from broker_client.proto.broker.v1 import broker_pb2

    if not isinstance(key, str):
        raise TypeError(f"key must be an instance of str, not {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    request = broker_pb2.DistinctRequest(
        database=database,
        collection=collection,
        key=key,
        filter=encode_filter(filter, codec_options),
        collation=encode_collation(collation, codec_options),
        comment=check_comment(comment),
        max_time_ms=_max_time(max_time_ms),
    )
    if read is not None:
        read.apply(request)
    return request


#: The stages that make an aggregate write: it is then never retried.
_WRITE_STAGES: Final = frozenset({"$out", "$merge"})


def pipeline_writes(pipeline: Sequence[Mapping[str, Any]]) -> bool:
    """True when a pipeline has a ``$out`` or ``$merge`` stage."""
    return any(not _WRITE_STAGES.isdisjoint(stage.keys()) for stage in pipeline)


def aggregate_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    pipeline: Sequence[Mapping[str, Any]],
    *,
    allow_disk_use: bool | None = None,
    batch_size: int = 0,
    hint: Hint | None = None,
    collation: Collation | None = None,
    let: Mapping[str, Any] | None = None,
    comment: str | None = None,
    max_time_ms: int | None = None,
    read: ReadOptions | None = None,
    write_concern: WriteConcernSpec | None = None,
    bypass_document_validation: bool | None = None,
) -> broker_pb2.AggregateRequest:
    """The Aggregate call of ``aggregate``. The write concern is sent only for a pipeline that writes."""
    from broker_client.proto.broker.v1 import broker_pb2

    if not isinstance(pipeline, list | tuple):
        raise TypeError(f"pipeline must be a list, not {type(pipeline).__name__}")
    stages = [_encode(_check_mapping(stage, "each pipeline stage"), codec_options) for stage in pipeline]
    if not stages:
        # pymongo allows an empty pipeline (every document); the contract asks
        # for a stage, and this one changes nothing.
        stages = [bson.encode({"$match": {}})]
    request = broker_pb2.AggregateRequest(
        database=database,
        collection=collection,
        pipeline=stages,
        batch_size=check_count(batch_size, "batchSize", INT32_MAX),
        collation=encode_collation(collation, codec_options),
        let=encode_document(let, "let", codec_options),
        comment=check_comment(comment),
        max_time_ms=_max_time(max_time_ms),
        bypass_document_validation=bool(bypass_document_validation),
    )
    if allow_disk_use is not None:
        request.allow_disk_use = _check_bool(allow_disk_use, "allowDiskUse")
    _set_hint(request, hint, codec_options)
    if read is not None:
        read.apply(request)
    if pipeline_writes(pipeline):
        _set_write_concern(request, write_concern)
    return request


def _write_model(request: Any, codec_options: CodecOptions[Any]) -> broker_pb2.WriteModel:
    """One of ``bulk_write``'s requests (ours or pymongo's) as a WriteModel."""
    from broker_client.proto.broker.v1 import broker_pb2

    kind = request_kind(request)
    model = broker_pb2.WriteModel()
    if kind == "InsertOne":
        document = request._doc
        model.insert_one.document = prepare_insert(document, codec_options)[0]
        return model
    filter = _encode(_check_mapping(request._filter, "filter"), codec_options)
    collation = encode_collation(request._collation, codec_options)
    if kind in ("UpdateOne", "UpdateMany"):
        update = model.update_one if kind == "UpdateOne" else model.update_many
        update.filter = filter
        _set_update(update, request._doc, codec_options)
        update.upsert = bool(request._upsert)
        update.array_filters.extend(_encode_array_filters(request._array_filters, codec_options))
        update.collation = collation
        _set_hint(update, request._hint, codec_options)
    elif kind == "ReplaceOne":
        model.replace_one.filter = filter
        model.replace_one.replacement = _encode(check_replacement(request._doc), codec_options)
        model.replace_one.upsert = bool(request._upsert)
        model.replace_one.collation = collation
        _set_hint(model.replace_one, request._hint, codec_options)
    else:
        delete = model.delete_one if kind == "DeleteOne" else model.delete_many
        delete.filter = filter
        delete.collation = collation
        _set_hint(delete, request._hint, codec_options)
    return model


def bulk_write_request(
    database: str,
    collection: str,
    codec_options: CodecOptions[Any],
    requests: Sequence[Any],
    *,
    ordered: bool = True,
    bypass_document_validation: bool | None = None,
    comment: str | None = None,
    let: Mapping[str, Any] | None = None,
    write_concern: WriteConcernSpec | None = None,
) -> broker_pb2.BulkWriteRequest:
    """The BulkWrite call of ``bulk_write``.

    Each InsertOne document without an ``_id`` gets an ObjectId here, set on
    the document itself, as ``insert_one`` and pymongo do.
    """
    from broker_client.proto.broker.v1 import broker_pb2

    operations = [_write_model(request, codec_options) for request in check_requests(requests)]
    request = broker_pb2.BulkWriteRequest(
        database=database,
        collection=collection,
        operations=operations,
        ordered=_check_bool(ordered, "ordered"),
        bypass_document_validation=bool(bypass_document_validation),
        comment=check_comment(comment),
        let=encode_document(let, "let", codec_options),
    )
    _set_write_concern(request, write_concern)
    return request


# --- the answers of the other operations --------------------------------------------


def update_result(
    response: broker_pb2.UpdateResponse, acknowledged: bool, codec_options: CodecOptions[Any]
) -> UpdateResult:
    from broker_client.results import UpdateResult

    upserted = decode_id(response.upserted_id, codec_options) if response.upserted_id else None
    return UpdateResult(response.matched_count, response.modified_count, upserted, acknowledged)


def delete_result(response: broker_pb2.DeleteResponse, acknowledged: bool) -> DeleteResult:
    from broker_client.results import DeleteResult

    return DeleteResult(response.deleted_count, acknowledged)


def modified_document(
    response: broker_pb2.FindOneAndModifyResponse, codec_options: CodecOptions[_D]
) -> _D | None:
    """FindOneAndModify's answer: the document, or None when nothing matched."""
    if not response.document:
        return None
    return bson.decode(response.document, codec_options)


def distinct_values(
    responses: Sequence[broker_pb2.DistinctResponse], codec_options: CodecOptions[Any]
) -> list[Any]:
    """Distinct's answer: the values of every message, in order."""
    values: list[Any] = []
    for response in responses:
        values.extend(bson.decode(response.values, codec_options)["values"])
    return values


def bulk_write_result(
    response: broker_pb2.BulkWriteResponse, acknowledged: bool, codec_options: CodecOptions[Any]
) -> BulkWriteResult:
    from broker_client.results import BulkWriteResult

    return BulkWriteResult(
        inserted_count=response.inserted_count,
        matched_count=response.matched_count,
        modified_count=response.modified_count,
        deleted_count=response.deleted_count,
        upserted_count=response.upserted_count,
        upserted_ids={item.index: decode_id(item.id, codec_options) for item in response.upserted_ids},
        acknowledged=acknowledged,
    )
