"""BSON in and out, with pymongo's rules for ids, sorts, projections and hints.

Every document crosses the wire as one whole BSON document (``bson.encode``),
so every BSON type survives exactly. The argument shapes follow pymongo's
``helpers_shared`` (``_index_document``, ``_fields_list_to_dict``), so code
written for pymongo passes the same values here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias, TypeVar

import bson
from bson.codec_options import CodecOptions
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

if TYPE_CHECKING:
    from broker_client.proto.broker.v1 import broker_pb2
    from broker_client.results import BrokerStats, PingResult

__all__ = [
    "Hint",
    "Projection",
    "Sort",
    "decode_batch",
    "decode_id",
    "encode_filter",
    "encode_for_insert",
    "encode_hint",
    "encode_projection",
    "encode_sort",
    "ping_result",
    "prepare_insert",
    "stats_result",
]

_D = TypeVar("_D", bound=Mapping[str, Any])

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


# --- answers ----------------------------------------------------------------------


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


_MAP_FIELDS: Final = frozenset({"checkout_failures", "operations", "rpcs", "errors"})


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
