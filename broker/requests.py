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
from typing import Any, NamedTuple, TypeVar

import grpc
import pymongo
from broker_client.proto.broker.v1 import broker_pb2
from bson.raw_bson import RawBSONDocument
from google.protobuf.message import Message
from pymongo import common, read_preferences
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from broker import documents, pipelines
from broker.errors import Reason, RpcError, invalid_argument
from broker.pools import DatabasePool

__all__ = [
    "INLINE_VALIDATION_BYTES",
    "JSON_FIELDS_NEED_ENCODING",
    "Change",
    "aggregate_arguments",
    "bulk_operations",
    "change",
    "collation",
    "collection_name",
    "common_options",
    "count_arguments",
    "delete_arguments",
    "distinct_arguments",
    "documents_list",
    "find_and_modify_arguments",
    "find_options",
    "find_request_as_bson",
    "hint",
    "json_mode",
    "max_document_bytes",
    "prepare_inserts",
    "read_options",
    "request_as_bson",
    "sort",
    "update_arguments",
    "validate",
    "writable_collection_name",
    "write_concern",
    "write_options",
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
    if mode is not None and (
        request.filter or request.projection or request.sort or request.WhichOneof("hint") == "hint_keys"
    ):
        raise invalid_argument("filter/projection/sort/hint_keys hold BSON but encoding is Extended JSON")
    return request_as_bson(request)


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
    if (chosen := hint(request, checks)) is not None:
        options["hint"] = chosen
    if (value := collation(request.collation, checks)) is not None:
        options["collation"] = value
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


def write_concern(request: Any) -> WriteConcern | None:
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


# --- what every new method shares -------------------------------------------------

_M = TypeVar("_M", bound=Message)
_JSON_SUFFIX = "_json"


def request_as_bson(request: _M) -> tuple[_M, str | None]:
    """The request with every Extended JSON field (``x_json``) turned into its BSON twin ``x``.

    With ENCODING_BSON, a ``*_json`` field set is INVALID_ARGUMENT; with an
    Extended JSON encoding, a BSON twin set is. Nested messages (read
    preference tag sets, BulkWrite's models) are converted the same way.
    """
    mode = json_mode(request.encoding)  # type: ignore[attr-defined]
    if mode is None:
        misplaced = _json_fields_set(request, "")
        if misplaced:
            raise invalid_argument(f"{JSON_FIELDS_NEED_ENCODING} ({', '.join(misplaced)})")
        return request, None
    converted = type(request)()
    converted.CopyFrom(request)
    _convert_json(converted, "")
    return converted, mode


def _json_fields_set(message: Message, prefix: str) -> list[str]:
    found: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.name.endswith(_JSON_SUFFIX):
            found.append(path)
        elif field.message_type is not None:
            items = value if _is_repeated(field) else [value]
            for i, item in enumerate(items):
                where = f"{path}[{i}]." if _is_repeated(field) else f"{path}."
                found.extend(_json_fields_set(item, where))
    return found


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


def _convert_json(message: Message, prefix: str) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.name.endswith(_JSON_SUFFIX):
            twin = fields.get(field.name[: -len(_JSON_SUFFIX)])
            if twin is None:
                continue
            if _is_repeated(field):
                target = getattr(message, twin.name)
                if len(target):
                    raise invalid_argument(f"{prefix}{twin.name} holds BSON but encoding is Extended JSON")
                target.extend(documents.json_to_bson(t, f"{path}[{i}]") for i, t in enumerate(value))
            else:
                if message.HasField(twin.name) if twin.containing_oneof else getattr(message, twin.name):
                    raise invalid_argument(
                        f"{prefix}{twin.name} holds BSON but encoding is Extended JSON: send {path}"
                    )
                setattr(message, twin.name, documents.json_to_bson(value, path))
        elif field.message_type is not None:
            if _is_repeated(field):
                for i, item in enumerate(value):
                    _convert_json(item, f"{path}[{i}].")
            else:
                _convert_json(value, f"{path}.")


def documents_list(items: Sequence[bytes], field: str, checks: documents.Checks) -> list[RawBSONDocument]:
    """Each element checked as one document, e.g. array_filters or a pipeline's stages."""
    checked: list[RawBSONDocument] = []
    for i, data in enumerate(items):
        document = documents.raw_document(data, f"{field}[{i}]", checks)
        if document is None:
            raise invalid_argument(f"{field}[{i}] is empty: every element must be one BSON document")
        checked.append(document)
    return checked


def hint(request: Any, checks: documents.Checks, prefix: str = "") -> str | list[tuple[str, Any]] | None:
    """An index hint, by name or by key pattern (the ``hint`` oneof), if the request has one."""
    if "hint" not in request.DESCRIPTOR.oneofs_by_name:
        return None
    which = request.WhichOneof("hint")
    if which == "hint_name":
        if not request.hint_name:
            raise invalid_argument(f"{prefix}hint_name is empty: give an index name")
        return str(request.hint_name)
    if which == "hint_keys":
        field = f"{prefix}hint_keys"
        return _index_spec(
            documents.parse_document(request.hint_keys, field, checks.max_depth), field, index_types=True
        )
    return None


def collation(data: bytes, checks: documents.Checks, field: str = "collation") -> dict[str, Any] | None:
    """A collation document, decoded: pymongo takes only a dict or a Collation."""
    if not data:
        return None
    parsed = documents.parse_document(data, field, checks.max_depth)
    if not parsed:
        raise invalid_argument(f"{field} is an empty document: give at least a locale")
    return parsed


def sort(data: bytes, checks: documents.Checks, field: str = "sort") -> list[tuple[str, Any]] | None:
    if not data:
        return None
    parsed = documents.parse_document(data, field, checks.max_depth)
    return _index_spec(parsed, field, index_types=False) if parsed else None


class Change(NamedTuple):
    """What an update does: an operator document, a pipeline, or a replacement."""

    kind: str  # "update" or "replacement"
    value: RawBSONDocument | list[RawBSONDocument]


def change(
    request: Any, guard: documents.Checks, stored: documents.Checks, prefix: str = ""
) -> Change | None:
    """The request's update, update_pipeline or replacement: exactly one, of the right shape.

    An update document must be all operators ({"$set": ...}) and a
    replacement none, as pymongo and MongoDB require: the one would
    otherwise replace the whole document by accident, the other fail late.
    None when none of them is given (a FindOneAndModify with remove).
    """
    # With a default: a ReplaceOneModel has no update fields, an UpdateModel no replacement.
    given = [f for f in ("update", "update_pipeline", "replacement") if getattr(request, f, None)]
    if len(given) > 1:
        raise invalid_argument(f"give only one of {prefix}{' and '.join(given)}")
    if not given:
        return None
    field = f"{prefix}{given[0]}"
    if given[0] == "update_pipeline":
        stages = documents_list(request.update_pipeline, field, guard)
        # An update's pipeline may only reshape the document ($set, $unset,
        # $replaceWith, ...): one that reached another collection would
        # escape the allowlists, so it is refused here, not left to the server.
        reach = pipelines.inspect_bson([bytes(s.raw) for s in stages], field, allow_output=False)
        if reach.reaches:
            raise invalid_argument(
                f"{reach.reaches[0].path}: an update pipeline cannot read other collections"
            )
        return Change("update", stages)
    data: bytes = getattr(request, given[0])
    # A replacement is data to store, held to what an inserted document is;
    # an update's operators are guarded as a filter's are.
    walked = documents.check_document(data, field, guard if given[0] == "update" else stored)
    if given[0] == "update":
        if walked.fields == 0:
            raise invalid_argument(f"{field} is empty: give update operators such as $set")
        if walked.operators != walked.fields:
            raise invalid_argument(
                f"{field} must hold only update operators ($set, $inc, ...): to replace the whole "
                "document, send it as replacement (replace_one / find_one_and_replace)"
            )
        return Change("update", RawBSONDocument(data, documents.RAW))
    if walked.operators:
        raise invalid_argument(
            f"{field} must not hold $-operators: a replacement is a whole document; "
            "to change fields, send update (update_one / find_one_and_update)"
        )
    return Change("replacement", RawBSONDocument(data, documents.RAW))


_READ_MODES = {
    broker_pb2.READ_PREFERENCE_MODE_UNSPECIFIED: read_preferences.Primary,
    broker_pb2.READ_PREFERENCE_PRIMARY: read_preferences.Primary,
    broker_pb2.READ_PREFERENCE_PRIMARY_PREFERRED: read_preferences.PrimaryPreferred,
    broker_pb2.READ_PREFERENCE_SECONDARY: read_preferences.Secondary,
    broker_pb2.READ_PREFERENCE_SECONDARY_PREFERRED: read_preferences.SecondaryPreferred,
    broker_pb2.READ_PREFERENCE_NEAREST: read_preferences.Nearest,
}
_READ_CONCERNS = {
    broker_pb2.READ_CONCERN_LOCAL: "local",
    broker_pb2.READ_CONCERN_AVAILABLE: "available",
    broker_pb2.READ_CONCERN_MAJORITY: "majority",
    broker_pb2.READ_CONCERN_LINEARIZABLE: "linearizable",
    broker_pb2.READ_CONCERN_SNAPSHOT: "snapshot",
}
# MongoDB's floor for maxStalenessSeconds (the driver checks it only at
# server selection, too late for a clear message).
_MIN_STALENESS_S = 90


def read_options(request: Any, checks: documents.Checks) -> dict[str, Any]:
    """get_collection arguments for a read's read preference and read concern (empty: the defaults)."""
    options: dict[str, Any] = {}
    if request.HasField("read_preference"):
        options["read_preference"] = _read_preference(request.read_preference, checks)
    level = request.read_concern
    if level != broker_pb2.READ_CONCERN_UNSPECIFIED:
        try:
            options["read_concern"] = ReadConcern(_READ_CONCERNS[level])
        except KeyError:
            raise invalid_argument(f"unknown read_concern {level}") from None
    return options


def _read_preference(message: broker_pb2.ReadPreference, checks: documents.Checks) -> Any:
    try:
        mode = _READ_MODES[message.mode]
    except KeyError:
        raise invalid_argument(f"unknown read_preference.mode {message.mode}") from None
    tag_sets = []
    for i, data in enumerate(message.tag_sets):
        field = f"read_preference.tag_sets[{i}]"
        tags = documents.parse_document(data, field, checks.max_depth) if data else {}
        if not all(isinstance(v, str) for v in tags.values()):
            raise invalid_argument(f"{field}: tag values must be strings, as replica set member tags are")
        tag_sets.append(tags)
    staleness = _non_negative(message.max_staleness_s, "read_preference.max_staleness_s")
    if mode is read_preferences.Primary:
        if tag_sets or staleness:
            raise invalid_argument(
                "read_preference: tag_sets and max_staleness_s need a mode other than primary"
            )
        return read_preferences.Primary()
    if staleness and staleness < _MIN_STALENESS_S:
        raise invalid_argument(
            f"read_preference.max_staleness_s must be 0 (no limit) or at least {_MIN_STALENESS_S}, "
            f"got {staleness}"
        )
    return mode(tag_sets=tag_sets or None, max_staleness=staleness or -1)


def write_options(request: Any) -> dict[str, Any]:
    """get_collection arguments for a write: its write concern, if it names one."""
    concern = write_concern(request)
    return {} if concern is None else {"write_concern": concern}


def common_options(request: Any, call_comment: str, checks: documents.Checks) -> dict[str, Any]:
    """The options most methods share: hint, collation, let and comment (None ones left out)."""
    options: dict[str, Any] = {"comment": call_comment}
    if (chosen := hint(request, checks)) is not None:
        options["hint"] = chosen
    if hasattr(request, "collation") and (value := collation(request.collation, checks)) is not None:
        options["collation"] = value
    if hasattr(request, "let") and (let := documents.raw_document(request.let, "let", checks)) is not None:
        options["let"] = let
    if hasattr(request, "max_time_ms"):
        _non_negative(request.max_time_ms, "max_time_ms")
    return options


# --- one builder per method: (pymongo method name, its arguments) -----------------

_EMPTY = RawBSONDocument(b"\x05\x00\x00\x00\x00")


def _filter(data: bytes, checks: documents.Checks, field: str = "filter") -> RawBSONDocument:
    return documents.raw_document(data, field, checks) or _EMPTY


def update_arguments(
    request: broker_pb2.UpdateRequest, guard: documents.Checks, stored: documents.Checks, comment: str
) -> tuple[str, dict[str, Any]]:
    """update_one, update_many or replace_one, and its arguments."""
    chosen = change(request, guard, stored)
    if chosen is None:
        raise invalid_argument("give one of update (operators), update_pipeline or replacement")
    options = common_options(request, comment, guard)
    options.update(
        filter=_filter(request.filter, guard),
        upsert=request.upsert,
        bypass_document_validation=request.bypass_document_validation,
    )
    if chosen.kind == "replacement":
        if request.multi:
            raise invalid_argument("a replacement replaces one document: multi must be false")
        if request.array_filters:
            raise invalid_argument("array_filters apply to update operators, not to a replacement")
        return "replace_one", {**options, "replacement": chosen.value}
    if request.array_filters:
        options["array_filters"] = documents_list(request.array_filters, "array_filters", guard)
    return ("update_many" if request.multi else "update_one"), {**options, "update": chosen.value}


def delete_arguments(
    request: broker_pb2.DeleteRequest, guard: documents.Checks, comment: str
) -> tuple[str, dict[str, Any]]:
    options = common_options(request, comment, guard)
    options["filter"] = _filter(request.filter, guard)
    return ("delete_many" if request.multi else "delete_one"), options


def find_and_modify_arguments(
    request: broker_pb2.FindOneAndModifyRequest,
    guard: documents.Checks,
    stored: documents.Checks,
    comment: str,
) -> tuple[str, dict[str, Any]]:
    """find_one_and_update, find_one_and_replace or find_one_and_delete, and its arguments."""
    chosen = change(request, guard, stored)
    if request.remove == (chosen is not None):
        raise invalid_argument("give exactly one of update, update_pipeline, replacement and remove")
    options = common_options(request, comment, guard)
    options["filter"] = _filter(request.filter, guard)
    if (projection := documents.raw_document(request.projection, "projection", guard)) is not None:
        options["projection"] = projection
    if (order := sort(request.sort, guard)) is not None:
        options["sort"] = order
    if request.bypass_document_validation:
        # find_one_and_* pass extra keywords into the findAndModify command.
        options["bypassDocumentValidation"] = True
    if chosen is None:
        if request.upsert or request.return_document == broker_pb2.RETURN_DOCUMENT_AFTER:
            raise invalid_argument(
                "remove deletes the document: upsert and RETURN_DOCUMENT_AFTER do not apply"
            )
        if request.array_filters:
            raise invalid_argument("array_filters apply to update operators, not to remove")
        return "find_one_and_delete", options
    if request.return_document not in (broker_pb2.RETURN_DOCUMENT_BEFORE, broker_pb2.RETURN_DOCUMENT_AFTER):
        raise invalid_argument(f"unknown return_document {request.return_document}")
    options.update(
        upsert=request.upsert,
        return_document=request.return_document == broker_pb2.RETURN_DOCUMENT_AFTER,
    )
    if chosen.kind == "replacement":
        if request.array_filters:
            raise invalid_argument("array_filters apply to update operators, not to a replacement")
        return "find_one_and_replace", {**options, "replacement": chosen.value}
    if request.array_filters:
        options["array_filters"] = documents_list(request.array_filters, "array_filters", guard)
    return "find_one_and_update", {**options, "update": chosen.value}


def count_arguments(
    request: broker_pb2.CountRequest, guard: documents.Checks, comment: str
) -> tuple[str, dict[str, Any]]:
    """count_documents or estimated_document_count, and its arguments."""
    skip = _non_negative(request.skip, "skip")
    limit = _non_negative(request.limit, "limit")
    if request.estimated:
        given = [
            name
            for name, value in (
                ("filter", request.filter),
                ("skip", skip),
                ("limit", limit),
                ("hint", request.WhichOneof("hint")),
                ("collation", request.collation),
            )
            if value
        ]
        if given:
            raise invalid_argument(
                f"estimated counts the whole collection from its metadata: {', '.join(given)} "
                "cannot apply; leave estimated false to count matching documents"
            )
        _non_negative(request.max_time_ms, "max_time_ms")
        return "estimated_document_count", {"comment": comment}
    options = common_options(request, comment, guard)
    options["filter"] = _filter(request.filter, guard)
    if skip:
        options["skip"] = skip
    if limit:
        options["limit"] = limit
    return "count_documents", options


def distinct_arguments(
    request: broker_pb2.DistinctRequest, guard: documents.Checks, comment: str
) -> dict[str, Any]:
    if not request.key:
        raise invalid_argument("key is required: the field whose distinct values to return")
    if "\0" in request.key or request.key.startswith("$"):
        raise invalid_argument(
            f"key {request.key!r} must be a field name in dot notation, without NUL or a leading $"
        )
    options = common_options(request, comment, guard)
    options.update(key=request.key, filter=_filter(request.filter, guard))
    return options


def aggregate_arguments(
    request: broker_pb2.AggregateRequest, guard: documents.Checks, default_batch_size: int, comment: str
) -> dict[str, Any]:
    """aggregate_raw_batches arguments; the pipeline's stages checked, not yet vetted for reach."""
    if not request.pipeline:
        raise invalid_argument("pipeline is empty: give at least one stage, e.g. {'$match': {}}")
    options = common_options(request, comment, guard)
    options["pipeline"] = documents_list(request.pipeline, "pipeline", guard)
    options["batchSize"] = _non_negative(request.batch_size, "batch_size") or default_batch_size
    if request.HasField("allow_disk_use"):
        options["allowDiskUse"] = request.allow_disk_use
    if request.bypass_document_validation:
        options["bypassDocumentValidation"] = True
    return options


def bulk_operations(
    request: broker_pb2.BulkWriteRequest, guard: documents.Checks, stored: documents.Checks, max_bytes: int
) -> tuple[list[Any], list[tuple[int, bytes]], int]:
    """pymongo write models for a BulkWrite; the inserted `_id`s by index; the documents' size."""
    models: list[Any] = []
    inserted: list[tuple[int, bytes]] = []
    size = 0
    for i, operation in enumerate(request.operations):
        which = operation.WhichOneof("model")
        prefix = f"operations[{i}].{which}."
        if which is None:
            raise invalid_argument(
                f"operations[{i}] is empty: set one of insert_one, update_one, ... delete_many"
            )
        model = getattr(operation, which)
        if which == "insert_one":
            if not model.document:
                raise invalid_argument(f"{prefix}document is required")
            prepared = documents.prepare_inserts(
                [model.document], stored, max_bytes, field=f"{prefix}document", first=i
            )
            inserted.append((i, prepared.id_documents[0]))
            size += prepared.bytes
            models.append(pymongo.InsertOne(prepared.documents[0]))
            continue
        options: dict[str, Any] = {}
        if (chosen_hint := hint(model, guard, prefix)) is not None:
            options["hint"] = chosen_hint
        if (value := collation(model.collation, guard, f"{prefix}collation")) is not None:
            options["collation"] = value
        filter_ = _filter(model.filter, guard, f"{prefix}filter")
        if which in ("delete_one", "delete_many"):
            deletion = pymongo.DeleteOne if which == "delete_one" else pymongo.DeleteMany
            models.append(deletion(filter_, **options))
            continue
        chosen = change(model, guard, stored, prefix)
        if which == "replace_one":
            if chosen is None or chosen.kind != "replacement":
                raise invalid_argument(f"{prefix}replacement is required")
            models.append(pymongo.ReplaceOne(filter_, chosen.value, upsert=model.upsert, **options))
            continue
        if chosen is None or chosen.kind != "update":
            raise invalid_argument(f"{prefix}update or {prefix}update_pipeline is required")
        if model.array_filters:
            options["array_filters"] = documents_list(model.array_filters, f"{prefix}array_filters", guard)
        update = pymongo.UpdateOne if which == "update_one" else pymongo.UpdateMany
        models.append(update(filter_, chosen.value, upsert=model.upsert, **options))
    return models, inserted, size
