"""Requests into pymongo arguments: every field checked, documents validated, never re-encoded.

One function per piece of a request (collection names, encodings, a Find's
options, an Insert's documents, the write concern), each raising
INVALID_ARGUMENT (or PERMISSION_DENIED for a write the database forbids)
with a message naming the field. The handlers in service.py call these
before any round trip; nothing here does I/O or touches the call's state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import pymongo
from broker_client.proto.broker.v1 import broker_pb2
from pymongo import common
from pymongo.write_concern import WriteConcern

from broker import documents
from broker.errors import Reason, RpcError, invalid_argument
from broker.pools import DatabasePool

__all__ = [
    "INLINE_VALIDATION_BYTES",
    "JSON_FIELDS_NEED_ENCODING",
    "collection_name",
    "find_options",
    "find_request_as_bson",
    "json_mode",
    "max_document_bytes",
    "prepare_inserts",
    "validate",
    "writable_collection_name",
    "write_concern",
]

_T = TypeVar("_T")

# Validating a request walks every byte of its documents in Python, about
# 0.6 µs a field: an 8 MB document of tiny fields takes half a second. Above
# this many bytes the walk runs in a worker thread, so the event loop, and
# every other call, goes on meanwhile (the walk is Python code, so the
# interpreter hands the loop its turn every few milliseconds). Below it the
# walk takes at most a few milliseconds, less than the loop would lose to
# the thread hop (~50 µs) on every small call.
INLINE_VALIDATION_BYTES = 64 * 1024


# MongoDB's documented restrictions on collection names
# (https://www.mongodb.com/docs/manual/reference/limits/#naming-restrictions),
# checked by the broker for every call so that a bad name is refused the same
# way whatever the server: `$cmd` and other `$` names are the wire
# protocol's, not collections.
_MAX_COLLECTION_BYTES = 255
_SYSTEM_PREFIX = "system."


def collection_name(name: str) -> str:
    """``name`` if it is a valid collection name, else INVALID_ARGUMENT naming the rule it breaks."""
    if not name:
        raise invalid_argument("collection is required")
    if len(name.encode()) > _MAX_COLLECTION_BYTES:
        raise invalid_argument(f"collection name is longer than {_MAX_COLLECTION_BYTES} bytes")
    if "\0" in name:
        raise invalid_argument("collection name must not contain the NUL character")
    if "$" in name:
        raise invalid_argument(
            f"collection name {name!r} must not contain '$' (reserved by MongoDB, as in $cmd)"
        )
    return name


def writable_collection_name(name: str, pool: DatabasePool) -> str:
    """``name`` if a write may go to it: valid, and not system.* unless the database allows it."""
    name = collection_name(name)
    if name.startswith(_SYSTEM_PREFIX) and not pool.settings.allow_system_writes:
        raise RpcError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"collection {name!r} is a system collection: writes to system.* are refused "
            f"unless databases.{pool.name}.allow_system_writes is true",
            Reason.NOT_AUTHORIZED,
        )
    return name


def _non_negative(value: int, field: str) -> int:
    if value < 0:
        raise invalid_argument(f"{field} must not be negative, got {value}")
    return value


JSON_FIELDS_NEED_ENCODING = (
    "the *_json fields are read only with encoding ENCODING_CANONICAL_JSON or ENCODING_RELAXED_JSON"
)
_JSON_MODES = {
    broker_pb2.ENCODING_CANONICAL_JSON: "canonical",
    broker_pb2.ENCODING_RELAXED_JSON: "relaxed",
}


def json_mode(encoding: broker_pb2.Encoding.ValueType) -> str | None:
    """None for BSON, else the Extended JSON mode; INVALID_ARGUMENT for an unknown encoding."""
    if encoding == broker_pb2.ENCODING_BSON:
        return None
    try:
        return _JSON_MODES[encoding]
    except KeyError:
        raise invalid_argument(f"unknown encoding {encoding}") from None


async def validate(size: int, validation: Callable[[], _T]) -> _T:
    """Run ``validation`` of ``size`` bytes of documents: inline, or off the event loop if large."""
    if size <= INLINE_VALIDATION_BYTES:
        return validation()
    return await asyncio.to_thread(validation)


def max_document_bytes(pool: DatabasePool) -> int:
    """The largest document the database server stores: its maxBsonObjectSize.

    From the server's handshake (hello), through pymongo's view of the
    topology; 16 MiB, every MongoDB's, while no writable server is known.
    """
    servers = pool.client.topology_description.server_descriptions().values()
    return min((s.max_bson_size for s in servers if s.is_writable), default=common.MAX_BSON_SIZE)


def prepare_inserts(
    request: broker_pb2.InsertRequest, mode: str | None, checks: documents.Checks, max_bytes: int
) -> documents.PreparedInsert:
    """An Insert's documents, from BSON or Extended JSON, checked and ready for insert_many."""
    raw_documents: Sequence[bytes] = request.documents
    if mode is not None:
        raw_documents = [
            documents.json_to_bson(text, f"json_documents[{i}]")
            for i, text in enumerate(request.json_documents)
        ]
    return documents.prepare_inserts(raw_documents, checks, max_bytes)


def find_request_as_bson(request: broker_pb2.FindRequest) -> tuple[broker_pb2.FindRequest, str | None]:
    """The request with any Extended JSON documents turned into BSON, and the JSON mode."""
    mode = json_mode(request.encoding)
    if mode is None:
        if request.filter_json or request.projection_json or request.sort_json or request.hint_keys_json:
            raise invalid_argument(JSON_FIELDS_NEED_ENCODING)
        return request, None
    if request.filter or request.projection or request.sort or request.WhichOneof("hint") == "hint_keys":
        raise invalid_argument("filter/projection/sort/hint_keys hold BSON but encoding is Extended JSON")
    converted = broker_pb2.FindRequest()
    converted.CopyFrom(request)
    for field in ("filter", "projection", "sort"):
        text = getattr(request, f"{field}_json")
        if text:
            setattr(converted, field, documents.json_to_bson(text, f"{field}_json"))
    if request.hint_keys_json:
        converted.hint_keys = documents.json_to_bson(request.hint_keys_json, "hint_keys_json")
    return converted, mode


def find_options(
    request: broker_pb2.FindRequest, default_batch_size: int, checks: documents.Checks
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "skip": _non_negative(request.skip, "skip"),
        "limit": _non_negative(request.limit, "limit"),
        "batch_size": _non_negative(request.batch_size, "batch_size") or default_batch_size,
    }
    _non_negative(request.max_time_ms, "max_time_ms")
    options["filter"] = documents.raw_document(request.filter, "filter", checks)
    projection = documents.raw_document(request.projection, "projection", checks)
    if projection is not None:
        options["projection"] = projection
    if request.sort:
        sort = documents.parse_document(request.sort, "sort", checks.max_depth)
        if sort:
            options["sort"] = _index_spec(sort, "sort", index_types=False)
    hint = request.WhichOneof("hint")
    if hint == "hint_name":
        if not request.hint_name:
            raise invalid_argument("hint_name is empty: give an index name")
        options["hint"] = request.hint_name
    elif hint == "hint_keys":
        options["hint"] = _index_spec(
            documents.parse_document(request.hint_keys, "hint_keys", checks.max_depth),
            "hint_keys",
            index_types=True,
        )
    return options


_INDEX_DIRECTIONS = (1, -1)


def _index_spec(spec: dict[str, Any], field: str, *, index_types: bool) -> list[tuple[str, Any]]:
    """Check a sort or hint document and turn it into pymongo's list of pairs.

    A sort direction is 1, -1 or {"$meta": ...}; a hint may also name an
    index type such as "text" or "hashed".
    """
    if not spec:
        raise invalid_argument(f"{field} is an empty document: give at least one key")
    pairs: list[tuple[str, Any]] = []
    for key, direction in spec.items():
        if isinstance(direction, bool) or not (
            (isinstance(direction, int | float) and direction in _INDEX_DIRECTIONS)
            or (index_types and isinstance(direction, str))
            or (isinstance(direction, dict) and "$meta" in direction)
        ):
            allowed = "1, -1, an index type string" if index_types else "1, -1"
            raise invalid_argument(f"{field}.{key}: must be {allowed} or {{'$meta': ...}}, got {direction!r}")
        pairs.append((key, int(direction) if isinstance(direction, float) else direction))
    return pairs


def write_concern(request: broker_pb2.InsertRequest) -> WriteConcern | None:
    if not request.HasField("write_concern"):
        return None
    wc = request.write_concern
    kwargs: dict[str, Any] = {}
    which = wc.WhichOneof("w")
    if which == "w_nodes":
        kwargs["w"] = _non_negative(wc.w_nodes, "write_concern.w_nodes")
        if wc.w_nodes == 0:
            # Unacknowledged: the broker could not say what landed, and a
            # retried insert could not be told from a lost one.
            raise invalid_argument("write_concern.w_nodes = 0 (unacknowledged) is not supported; use w >= 1")
    elif which == "w_tag":
        kwargs["w"] = wc.w_tag
    if wc.HasField("j"):
        kwargs["j"] = wc.j
    if wc.wtimeout_ms:
        kwargs["wtimeout"] = _non_negative(wc.wtimeout_ms, "write_concern.wtimeout_ms")
    try:
        return WriteConcern(**kwargs)
    except (pymongo.errors.ConfigurationError, TypeError, ValueError) as exc:
        raise invalid_argument(f"write_concern: {exc}") from None
