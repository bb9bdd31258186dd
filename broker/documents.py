"""BSON on the wire: validate what comes in, frame what goes out.

Documents pass through the broker as the caller's own bytes. Incoming
documents are checked on those bytes by `broker.bsonwalk`, which reads them
as the server will (structure, depth, duplicate keys, denied operators) and
finds an insert's `_id` without decoding; only sort and hint documents,
whose values the broker needs, are decoded, after that check. What is sent
to MongoDB is the original bytes (as RawBSONDocument), so field order,
numeric types and every BSON type survive exactly. Outgoing batches from
`find_raw_batches` are cut into documents by their length prefixes, never
decoded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import bson
import grpc
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from broker import bsonwalk
from broker.errors import Reason, RpcError, invalid_argument
from broker.security import depth_exceeded, operator_denied

__all__ = [
    "DECODE",
    "RAW",
    "Checks",
    "PreparedInsert",
    "bson_to_json",
    "check_document",
    "chunk_documents",
    "chunk_values",
    "id_document",
    "json_to_bson",
    "parse_document",
    "prepare_inserts",
    "raw_document",
    "split_batch",
]

# Dates outside Python's datetime range are valid BSON; decode them as
# DatetimeMS instead of failing.
DECODE: CodecOptions[dict[str, Any]] = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
RAW: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_INT32 = struct.Struct("<i")
# A `repeated bytes` element costs a tag byte and a varint length (<= 5 bytes).
_FIELD_OVERHEAD = 6


@dataclass(frozen=True, slots=True)
class Checks:
    """What an incoming document is held to, besides being one valid BSON document."""

    # limits.max_bson_depth: deeper gets INVALID_ARGUMENT (LIMIT_EXCEEDED).
    max_depth: int
    # Keys refused with PERMISSION_DENIED wherever they appear (the JavaScript
    # operators in a filter or projection); empty for stored documents.
    denied: frozenset[str] = frozenset()


def check_document(data: bytes, field: str, checks: Checks) -> bsonwalk.Walk:
    """Check ``data`` as the server will read it, or raise the RpcError for what is wrong.

    Errors, in the order the walk meets them: malformed BSON (INVALID_BSON),
    a duplicate key (INVALID_REQUEST), nesting past max_depth
    (LIMIT_EXCEEDED); then, for a document that is otherwise valid, a denied
    operator (PERMISSION_DENIED).
    """
    try:
        walked = bsonwalk.walk(data, field, max_depth=checks.max_depth, denied=checks.denied)
    except bsonwalk.MalformedBson as exc:
        where = "" if exc.path == field else f" at {exc.path}"
        raise invalid_argument(
            f"{field} is not a valid BSON document ({len(data)} bytes){where}: {exc.problem}",
            Reason.INVALID_BSON,
        ) from None
    except bsonwalk.DuplicateKey as exc:
        raise invalid_argument(
            f"{exc.path}: duplicate key. A field name may appear only once in a document: "
            "decoders and servers differ on which of two equal keys counts",
        ) from None
    except bsonwalk.TooDeep:
        raise depth_exceeded(field, checks.max_depth) from None
    if walked.denied is not None:
        raise operator_denied(walked.denied)
    return walked


def parse_document(data: bytes, field: str, max_depth: int) -> dict[str, Any]:
    """Check ``data`` (structure, depth, duplicate keys), then decode it, for a sort or hint."""
    check_document(data, field, Checks(max_depth))
    # Checked first, so decoding cannot fail, nor recurse deeper than max_depth.
    return bson.decode(data, DECODE)


def raw_document(data: bytes, field: str, checks: Checks) -> RawBSONDocument | None:
    """Check ``data`` and return it unchanged as a RawBSONDocument; empty means absent."""
    if not data:
        return None
    check_document(data, field, checks)
    return RawBSONDocument(data, RAW)


class PreparedInsert:
    """Documents ready for insert_many, and their `_id`s for the response."""

    __slots__ = ("bytes", "documents", "id_documents")

    def __init__(self) -> None:
        self.documents: list[RawBSONDocument] = []
        # {"_id": value} encoded as BSON, one per document, in request order.
        self.id_documents: list[bytes] = []
        # Size of the documents as the caller sent them (BSON).
        self.bytes = 0


def _with_object_id(data: bytes, oid: ObjectId) -> bytes:
    # Prepend an `_id` element and fix up the length prefix: the rest of the
    # document is kept byte for byte. `_id` first is where pymongo puts it.
    element = b"\x07_id\x00" + oid.binary
    return _INT32.pack(len(data) + len(element)) + element + data[4:]


def _id_document(element: bytes) -> bytes:
    # {"_id": value} from the document's own `_id` element, byte for byte.
    return _INT32.pack(len(element) + 5) + element + b"\x00"


def prepare_inserts(
    raw_documents: Sequence[bytes],
    checks: Checks,
    max_bytes: int,
    *,
    field: str = "documents",
    first: int = 0,
) -> PreparedInsert:
    """Check every document and give one without `_id` a new ObjectId.

    pymongo will not add an `_id` to a RawBSONDocument, so the broker does, and
    returns it, as pymongo does for dicts. Clients normally generate `_id`s
    themselves, which makes a retried insert detectable as a duplicate key.

    A document larger than ``max_bytes`` (the server's maxBsonObjectSize),
    counting an added `_id`, is refused: pymongo does not check a
    RawBSONDocument's size, and some servers store such a document and then
    cannot send it back.
    """
    prepared = PreparedInsert()
    for index, data in enumerate(raw_documents, first):
        where = f"{field}[{index}]" if field == "documents" else field
        walked = check_document(data, where, checks)
        prepared.bytes += len(data)
        if walked.id_element is not None:
            _, start, _, end = walked.id_element
            document = data
            prepared.id_documents.append(_id_document(data[start:end]))
        else:
            oid = ObjectId()
            document = _with_object_id(data, oid)
            prepared.id_documents.append(bson.encode({"_id": oid}))
        if len(document) > max_bytes:
            added = "" if document is data else f" with the _id the broker added ({len(data)} as sent)"
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where} is {len(document)} bytes{added}, larger than the database server's "
                f"maxBsonObjectSize ({max_bytes} bytes); split it, or store large data with GridFS",
                Reason.LIMIT_EXCEEDED,
                {"index": str(index), "document_bytes": str(len(document)), "max_bytes": str(max_bytes)},
            )
        prepared.documents.append(RawBSONDocument(document, RAW))
    return prepared


def id_document(value: Any) -> bytes:
    """{"_id": value} as BSON, for an id the server reported (an upsert's)."""
    return bson.encode({"_id": value}, codec_options=RAW)


# {"values": [...]} costs this much besides its elements: the document's
# length and NUL, the array's element header ("\x04values\x00"), its length
# and NUL.
_VALUES_OVERHEAD = 4 + 1 + 8 + 4 + 1


def chunk_values(values: Sequence[Any], max_bytes: int) -> Iterator[bytes]:
    """Distinct values as BSON documents {"values": [...]}, each under ``max_bytes`` where it can be.

    The server's reply has already been decoded by the driver (sub-documents
    stay raw); the values are encoded back with their own BSON types. A value
    that alone exceeds the cap travels alone, as a Find document does.
    """
    if not values:
        yield bson.encode({"values": []})
        return
    chunk: list[Any] = []
    size = _VALUES_OVERHEAD
    for value in values:
        # The element as it will sit in the array, with a key of up to 7 digits.
        cost = len(bson.encode({"0000000": value}, codec_options=RAW)) - 5
        if chunk and size + cost > max_bytes:
            yield bson.encode({"values": chunk}, codec_options=RAW)
            chunk, size = [], _VALUES_OVERHEAD
        chunk.append(value)
        size += cost
    yield bson.encode({"values": chunk}, codec_options=RAW)


def split_batch(batch: bytes) -> list[bytes]:
    """Cut the concatenated documents of a raw batch at their length prefixes."""
    documents = []
    offset, end = 0, len(batch)
    while offset < end:
        (size,) = _INT32.unpack_from(batch, offset)
        documents.append(batch[offset : offset + size])
        offset += size
    return documents


def chunk_documents(documents: Sequence[bytes], max_bytes: int) -> Iterator[list[bytes]]:
    """Group documents, in order, into lists whose encoded size stays under ``max_bytes``.

    A document that alone exceeds the cap forms a list of its own: a message
    never carries part of a document.
    """
    chunk: list[bytes] = []
    size = 0
    for document in documents:
        cost = len(document) + _FIELD_OVERHEAD
        if chunk and size + cost > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(document)
        size += cost
    if chunk:
        yield chunk


# --- Extended JSON, for clients without a BSON library -------------------------

_JSON_READ = json_util.JSONOptions(
    json_mode=json_util.JSONMode.RELAXED, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_JSON_WRITE = {
    "canonical": json_util.CANONICAL_JSON_OPTIONS.with_options(
        datetime_conversion=DatetimeConversion.DATETIME_AUTO
    ),
    "relaxed": json_util.RELAXED_JSON_OPTIONS.with_options(
        datetime_conversion=DatetimeConversion.DATETIME_AUTO
    ),
}


class _DuplicateJsonKey(Exception):
    """An Extended JSON object has a key twice (json.loads would keep the last)."""


def _json_object(pairs: list[tuple[str, Any]]) -> Any:
    if len(pairs) > 1 and len({key for key, _ in pairs}) < len(pairs):
        raise _DuplicateJsonKey
    return json_util.object_pairs_hook(pairs, _JSON_READ)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object with all its pairs, to find where a duplicate is."""


def _duplicate_json_path(text: str, field: str) -> str:
    """The path of the first object, depth first, that has a key twice (for the message)."""
    stack: list[tuple[Any, str]] = [(json.loads(text, object_pairs_hook=_Pairs), field)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Pairs):
            seen: set[str] = set()
            for key, _ in value:
                if key in seen:
                    return f"{path}.{key}"
                seen.add(key)
            stack.extend((child, f"{path}.{key}") for key, child in reversed(value))
        elif isinstance(value, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(value))))
    return field  # not reached: the first parse found one


def json_to_bson(text: str, field: str) -> bytes:
    """Parse one Extended JSON document (canonical or relaxed) into BSON bytes.

    Raises INVALID_ARGUMENT saying where the text failed. A key given twice
    in one object is refused, as in BSON: json.loads would keep only the
    last. The BSON made here is then checked like any other (check_document).
    """
    try:
        value = json.loads(text, object_pairs_hook=_json_object)
    except _DuplicateJsonKey:
        raise invalid_argument(
            f"{_duplicate_json_path(text, field)}: duplicate key. A field name may appear only once "
            "in a JSON object"
        ) from None
    except json.JSONDecodeError as exc:
        raise invalid_argument(
            f"{field} is not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            Reason.INVALID_JSON,
        ) from None
    except RecursionError:
        raise depth_exceeded(field) from None
    except Exception as exc:  # json_util raises several types for bad $-types
        raise invalid_argument(f"{field} is not valid Extended JSON: {exc}", Reason.INVALID_JSON) from None
    if not isinstance(value, dict):
        raise invalid_argument(
            f"{field} must be a JSON object, got {type(value).__name__}", Reason.INVALID_JSON
        )
    try:
        return bson.encode(value)
    except RecursionError:
        raise depth_exceeded(field) from None
    except Exception as exc:
        raise invalid_argument(f"{field} cannot be stored as BSON: {exc}", Reason.INVALID_JSON) from None


def bson_to_json(raw: bytes, mode: str) -> str:
    """Write one BSON document as Extended JSON, "canonical" or "relaxed"."""
    return json_util.dumps(bson.decode(raw, DECODE), json_options=_JSON_WRITE[mode])


# --- `_id` lookups, for coalescing (see coalesce.py) -----------------------------------

# The `_id` types a lookup may be coalesced for, and how their values compare:
# ObjectId and string by bytes, the integers by value (MongoDB finds {_id: 1}
# for an int32, int64 or double 1 alike, and so does a dict keyed by value).
_OBJECT_ID, _STRING, _INT32_TYPE, _INT64_TYPE, _DOUBLE = 0x07, 0x02, 0x10, 0x12, 0x01
_INT64 = struct.Struct("<q")
_DOUBLE_VALUE = struct.Struct("<d")
_ID_KEY = b"_id\x00"


@dataclass(frozen=True, slots=True)
class IdLookup:
    """A filter that is exactly {"_id": value}: the value's element, and the key it compares by."""

    element: bytes  # type byte and value, without the key
    key: tuple[str, Any]


def _value_key(kind: int, value: bytes) -> tuple[str, Any] | None:
    if kind == _OBJECT_ID:
        return ("oid", value)
    if kind == _STRING:
        return ("str", value[4:-1])
    if kind == _INT32_TYPE:
        return ("num", _INT32.unpack(value)[0])
    if kind == _INT64_TYPE:
        return ("num", _INT64.unpack(value)[0])
    if kind == _DOUBLE:
        return ("num", _DOUBLE_VALUE.unpack(value)[0])
    return None


def _first_id(document: bytes) -> tuple[int, bytes] | None:
    """The type and value of ``document``'s first element if it is `_id` of a comparable type."""
    if len(document) < 10 or document[5:9] != _ID_KEY:
        return None
    kind, start = document[4], 9
    if kind == _OBJECT_ID:
        end = start + 12
    elif kind == _STRING:
        (length,) = _INT32.unpack_from(document, start)
        end = start + 4 + length
    elif kind == _INT32_TYPE:
        end = start + 4
    elif kind in (_INT64_TYPE, _DOUBLE):
        end = start + 8
    else:
        return None
    if end > len(document) - 1:
        return None
    return kind, document[start:end]


def id_lookup(filter_: bytes) -> IdLookup | None:
    """An IdLookup if ``filter_`` (already checked) is exactly one `_id` equality, else None."""
    first = _first_id(filter_)
    if first is None:
        return None
    kind, value = first
    # Nothing after the one element but the document's terminating NUL.
    if 9 + len(value) != len(filter_) - 1 or kind == _DOUBLE:
        return None
    key = _value_key(kind, value)
    return None if key is None else IdLookup(bytes([kind]) + value, key)


def id_key(document: bytes) -> tuple[str, Any] | None:
    """The key a stored document's `_id` compares by, as IdLookup.key; None if not comparable."""
    first = _first_id(document)
    if first is not None:
        return _value_key(*first)
    value = RawBSONDocument(document, RAW).get("_id")
    if isinstance(value, ObjectId):
        return ("oid", value.binary)
    if isinstance(value, str):
        return ("str", value.encode())
    if isinstance(value, int | float) and not isinstance(value, bool):
        return ("num", value)
    return None


def id_filter(element: bytes) -> bytes:
    """{"_id": value} as BSON, from the value's element (type byte and value)."""
    body = element[:1] + _ID_KEY + element[1:]
    return _INT32.pack(len(body) + 5) + body + b"\x00"


def in_filter(elements: Sequence[bytes]) -> bytes:
    """{"_id": {"$in": [...]}} as BSON, from each value's element (type byte and value)."""
    items = b"".join(e[:1] + str(i).encode() + b"\x00" + e[1:] for i, e in enumerate(elements))
    array = _INT32.pack(len(items) + 5) + items + b"\x00"
    in_doc = b"\x04$in\x00" + array
    in_doc = _INT32.pack(len(in_doc) + 5) + in_doc + b"\x00"
    outer = b"\x03_id\x00" + in_doc
    return _INT32.pack(len(outer) + 5) + outer + b"\x00"
