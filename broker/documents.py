"""BSON on the wire: validate what comes in, frame what goes out.

Documents pass through the broker as the caller's own bytes. Incoming
documents are decoded once, only to validate them and to find their `_id`;
what is sent to MongoDB is the original bytes (as RawBSONDocument), so field
order, numeric types and every BSON type survive exactly. Outgoing batches
from `find_raw_batches` are cut into documents by their length prefixes,
never decoded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import bson
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from broker.errors import Reason, invalid_argument

__all__ = [
    "Inspector",
    "PreparedInsert",
    "bson_to_json",
    "chunk_documents",
    "json_to_bson",
    "parse_document",
    "prepare_inserts",
    "raw_document",
    "split_batch",
]

# Dates outside Python's datetime range are valid BSON; decode them as
# DatetimeMS instead of failing.
_DECODE: CodecOptions[dict[str, Any]] = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_RAW: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO
)
_INT32 = struct.Struct("<i")
# A `repeated bytes` element costs a tag byte and a varint length (<= 5 bytes).
_FIELD_OVERHEAD = 6


def parse_document(data: bytes, field: str) -> dict[str, Any]:
    """Decode ``data`` as exactly one BSON document, or raise INVALID_ARGUMENT naming ``field``."""
    try:
        return bson.decode(data, _DECODE)
    except Exception as exc:  # bson raises several types for malformed input
        raise invalid_argument(
            f"{field} is not a valid BSON document ({len(data)} bytes): {exc}",
            Reason.INVALID_BSON,
        ) from None


# Checks a decoded document further (depth, operators); raises RpcError.
Inspector = Callable[[dict[str, Any], str], None]


def raw_document(data: bytes, field: str, inspect: Inspector | None = None) -> RawBSONDocument | None:
    """Validate ``data`` and return it unchanged as a RawBSONDocument; empty means absent."""
    if not data:
        return None
    decoded = parse_document(data, field)
    if inspect is not None:
        inspect(decoded, field)
    return RawBSONDocument(data, _RAW)


class PreparedInsert:
    """Documents ready for insert_many, and their `_id`s for the response."""

    __slots__ = ("documents", "id_documents")

    def __init__(self) -> None:
        self.documents: list[RawBSONDocument] = []
        # {"_id": value} encoded as BSON, one per document, in request order.
        self.id_documents: list[bytes] = []


def _with_object_id(data: bytes, oid: ObjectId) -> bytes:
    # Prepend an `_id` element and fix up the length prefix: the rest of the
    # document is kept byte for byte. `_id` first is where pymongo puts it.
    element = b"\x07_id\x00" + oid.binary
    return _INT32.pack(len(data) + len(element)) + element + data[4:]


def prepare_inserts(raw_documents: Sequence[bytes], inspect: Inspector | None = None) -> PreparedInsert:
    """Validate every document and give one without `_id` a new ObjectId.

    pymongo will not add an `_id` to a RawBSONDocument, so the broker does, and
    returns it, as pymongo does for dicts. Clients normally generate `_id`s
    themselves, which makes a retried insert detectable as a duplicate key.
    """
    prepared = PreparedInsert()
    for index, data in enumerate(raw_documents):
        field = f"documents[{index}]"
        decoded = parse_document(data, field)
        if inspect is not None:
            inspect(decoded, field)
        if "_id" in decoded:
            value = decoded["_id"]
            if isinstance(value, dict):
                # Keep an embedded `_id` document's exact bytes.
                value = RawBSONDocument(data, _RAW)["_id"]
            prepared.documents.append(RawBSONDocument(data, _RAW))
            prepared.id_documents.append(bson.encode({"_id": value}))
        else:
            oid = ObjectId()
            prepared.documents.append(RawBSONDocument(_with_object_id(data, oid), _RAW))
            prepared.id_documents.append(bson.encode({"_id": oid}))
    return prepared


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


def json_to_bson(text: str, field: str) -> bytes:
    """Parse one Extended JSON document (canonical or relaxed) into BSON bytes.

    Raises INVALID_ARGUMENT saying where the text failed.
    """
    try:
        value = json_util.loads(text, json_options=_JSON_READ)
    except json.JSONDecodeError as exc:
        raise invalid_argument(
            f"{field} is not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            Reason.INVALID_JSON,
        ) from None
    except Exception as exc:  # json_util raises several types for bad $-types
        raise invalid_argument(f"{field} is not valid Extended JSON: {exc}", Reason.INVALID_JSON) from None
    if not isinstance(value, dict):
        raise invalid_argument(
            f"{field} must be a JSON object, got {type(value).__name__}", Reason.INVALID_JSON
        )
    try:
        return bson.encode(value)
    except Exception as exc:
        raise invalid_argument(f"{field} cannot be stored as BSON: {exc}", Reason.INVALID_JSON) from None


def bson_to_json(raw: bytes, mode: str) -> str:
    """Write one BSON document as Extended JSON, "canonical" or "relaxed"."""
    return json_util.dumps(bson.decode(raw, _DECODE), json_options=_JSON_WRITE[mode])
